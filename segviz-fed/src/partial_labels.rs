//! Partial-label-aware federation ("SegViz + PL"): every site trains every task head, and
//! every head is averaged over all sites. See `docs/partial_labels.md` for the method and
//! its equations.
//!
//! At a site that annotated the organs `A`, the head of organ `o` gets:
//! - `o ∈ A`: the supervised loss of its own mask (as in SegViz);
//! - `o ∉ A`, **exclusion**: the voxels labelled with an organ of `A` cannot be `o`, so they
//!   are known negatives — cross-entropy towards background on them;
//! - `o ∉ A`, **distillation**: the voxels the site did not annotate (its background) may be
//!   `o`; there the head follows the round's global head (a frozen teacher) through the
//!   Kullback–Leibler divergence of softmaxes at a temperature `T` (scaled by `T²`), with a
//!   weight that ramps up over the rounds, as in ConDistFL.

use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Device, Tensor, TensorData};
use segviz_data::{HostBatch, Organ, OrganSet};
use serde::{Deserialize, Serialize};

use crate::error::{FedError, Result};

/// Fit-configuration key: train every head of the instruction with the partial-label
/// objective (value 1).
pub const KEY_PARTIAL_LABELS: &str = "partial_labels";
/// Fit-configuration key: weight of the exclusion term (0 disables it).
pub const KEY_EXCLUSION_WEIGHT: &str = "exclusion_weight";
/// Fit-configuration key: this round's weight of the distillation term (0 disables it).
pub const KEY_DISTILLATION_WEIGHT: &str = "distillation_weight";
/// Fit-configuration key: the distillation temperature.
pub const KEY_DISTILLATION_TEMPERATURE: &str = "distillation_temperature";
/// Fit-configuration key: distil only where the teacher's organ probability exceeds this
/// (0: every unannotated voxel).
pub const KEY_DISTILLATION_THRESHOLD: &str = "distillation_threshold";

/// The default [`PartialLabelConfig::exclusion_weight`]. Three sites of four push a head
/// towards background on their organs' voxels and one site has its positives; at 0.5 that
/// pull collapsed the pancreas head on the quick preset, at 0.15 it did not
/// (`docs/partial_labels.md`).
pub const DEFAULT_EXCLUSION_WEIGHT: f64 = 0.15;

/// The default [`PartialLabelConfig::owner_weight`]: each head from the sites that own its
/// organ, so the other sites' exclusion and distillation terms shape only the shared
/// representation (at 0.75 their quarter of every head pulled the small organs' heads towards
/// background; `docs/partial_labels.md`).
pub const DEFAULT_OWNER_WEIGHT: f64 = 1.0;

/// The default [`PartialLabelConfig::distillation_threshold`].
pub const DEFAULT_DISTILLATION_THRESHOLD: f64 = 0.5;

/// Settings of the partial-label objective.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PartialLabelConfig {
    /// Weight of the exclusion term (known negatives); 0 turns it off.
    pub exclusion_weight: f64,
    /// Final weight of the distillation term; 0 turns it off.
    pub distillation_weight: f64,
    /// Fraction of the final distillation weight used in round 1; the weight then grows
    /// linearly to the full value in the last round. ConDistFL ramps from 0.01; our
    /// default is 1 (no ramp). Neither keeps the spleen, pancreas and kidney heads from
    /// collapsing to background in the quick preset (see `docs/partial_labels.md`).
    pub distillation_start: f64,
    /// Softmax temperature of the distillation (ConDistFL: 2).
    pub temperature: f64,
    /// Share of each head's average that comes from the sites owning its organ; the other
    /// sites share the rest (each group averaged by the strategy's weighting). `None`: one
    /// plain average over every site, so a head with one owner among four sites gets about
    /// a quarter of its update from the only site that has its positives.
    #[serde(default)]
    pub owner_weight: Option<f64>,
    /// Distil only on the unannotated voxels where the teacher's organ probability exceeds
    /// this, in [0, 1): the teacher's positives. 0 distils on every unannotated voxel, so
    /// a teacher that sees no organ yet pulls every site's copy of the head, and the shared
    /// representation, towards background there.
    #[serde(default)]
    pub distillation_threshold: f64,
}

impl Default for PartialLabelConfig {
    fn default() -> Self {
        PartialLabelConfig {
            exclusion_weight: DEFAULT_EXCLUSION_WEIGHT,
            distillation_weight: 1.0,
            distillation_start: 1.0,
            temperature: 2.0,
            owner_weight: Some(DEFAULT_OWNER_WEIGHT),
            distillation_threshold: DEFAULT_DISTILLATION_THRESHOLD,
        }
    }
}

impl PartialLabelConfig {
    /// The distillation weight of `round` (1-based) out of `rounds`: linear from
    /// `distillation_start × weight` to `weight`.
    pub fn distillation_weight_at(&self, round: usize, rounds: usize) -> f64 {
        let t = if rounds <= 1 {
            1.0
        } else {
            (round.saturating_sub(1)) as f64 / (rounds - 1) as f64
        };
        let t = t.clamp(0.0, 1.0);
        self.distillation_weight * (self.distillation_start + (1.0 - self.distillation_start) * t)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        let ok = |v: f64| v.is_finite() && v >= 0.0;
        let valid = ok(self.exclusion_weight)
            && ok(self.distillation_weight)
            && ok(self.distillation_start)
            && self.distillation_start <= 1.0
            && self.temperature.is_finite()
            && self.temperature > 0.0
            && self
                .owner_weight
                .is_none_or(|a| a.is_finite() && (0.0..=1.0).contains(&a))
            && (0.0..1.0).contains(&self.distillation_threshold);
        if !valid {
            return Err(FedError::Config(format!(
                "partial-label settings out of range: {self:?} (weights ≥ 0, start and owner \
                 weight in [0, 1], distillation threshold in [0, 1), temperature > 0)"
            )));
        }
        Ok(())
    }
}

/// What a site's batch says about one head of the partial-label objective.
pub(crate) struct HeadMasks {
    /// Voxels labelled with one of the site's own organs: known negatives, `[n, 1, d, h, w]`.
    pub known_negative: Tensor<5>,
    /// Their number.
    pub known_negative_count: f64,
    /// Voxels the site did not annotate (its background), `[n, 1, d, h, w]`.
    pub unannotated: Tensor<5>,
    /// Their number.
    pub unannotated_count: f64,
}

/// The organs every sample of `batch` is annotated for; a batch mixing sites with other
/// annotations is refused (the partial-label objective trains one site at a time).
pub(crate) fn batch_annotation(batch: &HostBatch) -> Result<OrganSet> {
    let mut sets = batch.annotated.iter();
    let first = *sets
        .next()
        .ok_or_else(|| FedError::Config("an empty batch".into()))?;
    if sets.any(|s| *s != first) {
        return Err(FedError::Config(
            "the partial-label objective needs batches from one site (one annotation set)".into(),
        ));
    }
    Ok(first)
}

/// Masks of the voxels labelled with an organ of `annotated`, and of the unlabelled ones.
pub(crate) fn head_masks(batch: &HostBatch, annotated: OrganSet, device: &Device) -> HeadMasks {
    let own: Vec<u8> = Organ::ALL
        .into_iter()
        .filter(|o| annotated.contains(*o))
        .map(|o| o.label())
        .collect();
    let [d, h, w] = batch.shape;
    let shape = [batch.len(), 1, d, h, w];
    let negative: Vec<f32> = batch
        .labels
        .iter()
        .map(|v| f32::from(u8::from(own.contains(v))))
        .collect();
    let unlabelled: Vec<f32> = batch
        .labels
        .iter()
        .map(|v| f32::from(u8::from(*v == 0)))
        .collect();
    let count = |m: &[f32]| m.iter().map(|v| f64::from(*v)).sum::<f64>();
    HeadMasks {
        known_negative_count: count(&negative),
        unannotated_count: count(&unlabelled),
        known_negative: Tensor::from_data(TensorData::new(negative, shape), device),
        unannotated: Tensor::from_data(TensorData::new(unlabelled, shape), device),
    }
}

/// Exclusion term: mean over the known-negative voxels of `−log p(background)`.
///
/// # Shapes
/// - `logits`: `[n, 2, d, h, w]`; `mask`: `[n, 1, d, h, w]`
pub(crate) fn exclusion_loss(logits: Tensor<5>, mask: Tensor<5>, count: f64) -> Tensor<1> {
    let [n, _, d, h, w] = logits.dims();
    let log_background = log_softmax(logits, 1).slice([0..n, 0..1, 0..d, 0..h, 0..w]);
    (log_background * mask)
        .sum()
        .neg()
        .div_scalar(count.max(1.0))
}

/// `[n, 1, d, h, w]` mask of the voxels where the teacher's organ probability (softmax
/// channel 1 of its logits `[n, 2, d, h, w]`) exceeds `threshold`.
pub(crate) fn teacher_positive(teacher: Tensor<5>, threshold: f64) -> Tensor<5> {
    let [n, _, d, h, w] = teacher.dims();
    softmax(teacher, 1)
        .slice([0..n, 1..2, 0..d, 0..h, 0..w])
        .greater_elem(threshold)
        .float()
}

/// Distillation term: `T² · KL(softmax(teacher/T) ‖ softmax(student/T))`, averaged over
/// the masked voxels.
///
/// # Shapes
/// - `student`, `teacher`: `[n, c, d, h, w]`; `mask`: `[n, 1, d, h, w]`
pub(crate) fn distillation_loss(
    student: Tensor<5>,
    teacher: Tensor<5>,
    mask: Tensor<5>,
    count: f64,
    temperature: f64,
) -> Tensor<1> {
    let t = temperature;
    let log_q = log_softmax(teacher.clone().div_scalar(t), 1);
    let q = softmax(teacher.div_scalar(t), 1);
    let log_p = log_softmax(student.div_scalar(t), 1);
    let kl = (q * (log_q - log_p)).sum_dim(1);
    (kl * mask)
        .sum()
        .mul_scalar(t * t)
        .div_scalar(count.max(1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> Device {
        Device::flex()
    }

    #[test]
    fn the_distillation_weight_ramps_linearly() {
        let c = PartialLabelConfig {
            distillation_start: 0.01,
            ..PartialLabelConfig::default()
        };
        assert!((c.distillation_weight_at(1, 11) - 0.01).abs() < 1e-12);
        assert!((c.distillation_weight_at(6, 11) - 0.505).abs() < 1e-12);
        assert!((c.distillation_weight_at(11, 11) - 1.0).abs() < 1e-12);
        assert!((c.distillation_weight_at(1, 1) - 1.0).abs() < 1e-12);
        assert!(PartialLabelConfig {
            temperature: 0.0,
            ..c
        }
        .validate()
        .is_err());
    }

    #[test]
    fn distillation_is_zero_for_a_perfect_student_and_positive_otherwise() {
        let data =
            |v: Vec<f32>| Tensor::<5>::from_data(TensorData::new(v, [1, 2, 1, 1, 2]), &device());
        let teacher = data(vec![2.0, -1.0, 0.5, 3.0]);
        let mask = Tensor::<5>::from_data(
            TensorData::new(vec![1.0f32, 1.0], [1, 1, 1, 1, 2]),
            &device(),
        );
        let same = distillation_loss(teacher.clone(), teacher.clone(), mask.clone(), 2.0, 2.0)
            .into_scalar::<f32>();
        assert!(same.abs() < 1e-6, "{same}");
        let other = distillation_loss(data(vec![-2.0, 1.0, 0.5, 3.0]), teacher, mask, 2.0, 2.0)
            .into_scalar::<f32>();
        // Channels are the slowest axis: voxel 0 is teacher (2, 0.5) vs student (−2, 0.5),
        // voxel 1 teacher (−1, 3) vs student (1, 3); at T = 2 two-class softmaxes are
        // sigmoids of the halved logit differences.
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        let kl = |q: f64, p: f64| q * (q / p).ln() + (1.0 - q) * ((1.0 - q) / (1.0 - p)).ln();
        let expected =
            (kl(sigmoid(0.75), sigmoid(-1.25)) + kl(sigmoid(-2.0), sigmoid(-1.0))) * 4.0 / 2.0;
        assert!(
            (f64::from(other) - expected).abs() < 1e-4,
            "{other} vs {expected}"
        );
    }

    #[test]
    fn the_teacher_positive_mask_keeps_the_voxels_the_teacher_calls_organ() {
        // Channel 0 background, channel 1 organ: organ probabilities σ(z1 − z0) of the four
        // voxels are σ(−3), σ(0.5), σ(0) = 0.5 and σ(4).
        let teacher = Tensor::<5>::from_data(
            TensorData::new(
                vec![2.0f32, 0.0, 1.0, -2.0, -1.0, 0.5, 1.0, 2.0],
                [1, 2, 1, 1, 4],
            ),
            &device(),
        );
        let mask = teacher_positive(teacher.clone(), 0.5)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(mask, vec![0.0, 1.0, 0.0, 1.0]);
        let strict = teacher_positive(teacher, 0.9)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        assert_eq!(strict, vec![0.0, 0.0, 0.0, 1.0]);
        assert!(PartialLabelConfig {
            distillation_threshold: 1.0,
            ..PartialLabelConfig::default()
        }
        .validate()
        .is_err());
    }

    #[test]
    fn exclusion_penalises_organ_probability_on_known_negatives_only() {
        let logits = Tensor::<5>::from_data(
            TensorData::new(vec![0.0f32, 0.0, 0.0, 5.0], [1, 2, 1, 1, 2]),
            &device(),
        );
        // Only voxel 0 (p = 0.5) is a known negative; voxel 1's confident organ is not.
        let mask = Tensor::<5>::from_data(
            TensorData::new(vec![1.0f32, 0.0], [1, 1, 1, 1, 2]),
            &device(),
        );
        let loss = exclusion_loss(logits, mask, 1.0).into_scalar::<f32>();
        assert!((f64::from(loss) - 2f64.ln()).abs() < 1e-5, "{loss}");
    }
}
