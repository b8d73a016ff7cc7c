//! Segmentation losses with MONAI's semantics.
//!
//! - [`DiceLoss`]: MONAI `DiceLoss(softmax=True, to_onehot_y=True)`: per class
//!   `1 − (2·Σ p·g + smooth_nr) / (Σ p + Σ g + smooth_dr)`, averaged over classes and, unless
//!   `batch` is set, over samples (with `batch`, the sums also run over the batch first).
//! - [`cross_entropy`]: mean voxel-wise cross-entropy of the softmax.
//! - [`DiceLoss::dice_ce`]: Dice + cross-entropy (MONAI `DiceCELoss`, both weights 1).
//! - [`MarginalLoss`]: the partial-label (marginal) loss of Shi et al. 2021 for a multi-class
//!   model that sees samples annotated for different organs.
//!
//! Targets are integer label maps `[batch, d, h, w]`; logits are `[batch, classes, d, h, w]`.

use burn::config::Config;
use burn::tensor::activation::{log_softmax, softmax};
use burn::tensor::{Int, Tensor, TensorData};

/// One-hot encoding of a label map.
///
/// # Shapes
/// - target: `[batch, d, h, w]` with values in `0..classes`
/// - output: `[batch, classes, d, h, w]` (float)
pub fn one_hot(target: &Tensor<4, Int>, classes: usize) -> Tensor<5> {
    let planes: Vec<Tensor<5>> = (0..classes)
        .map(|c| target.clone().equal_elem(c as i64).float().unsqueeze_dim(1))
        .collect();
    Tensor::cat(planes, 1)
}

/// Flattens the spatial axes: `[b, c, d, h, w] → [b, c, d·h·w]`.
fn flat(x: Tensor<5>) -> Tensor<3> {
    let [b, c, d, h, w] = x.dims();
    x.reshape([b, c, d * h * w])
}

/// MONAI-style soft Dice loss. See the module documentation.
#[derive(Config, Debug, PartialEq)]
pub struct DiceLoss {
    /// Whether the background class (channel 0) counts in the mean.
    #[config(default = true)]
    pub include_background: bool,
    /// Added to the numerator.
    #[config(default = 1e-5)]
    pub smooth_nr: f64,
    /// Added to the denominator.
    #[config(default = 1e-5)]
    pub smooth_dr: f64,
    /// Sum intersections and volumes over the whole batch before the ratio.
    #[config(default = false)]
    pub batch: bool,
}

impl DiceLoss {
    /// The loss from logits and an integer target.
    ///
    /// # Shapes
    /// - logits: `[batch, classes, d, h, w]`
    /// - target: `[batch, d, h, w]`
    /// - output: `[1]`
    pub fn forward(&self, logits: Tensor<5>, target: &Tensor<4, Int>) -> Tensor<1> {
        let classes = logits.dims()[1];
        let probs = flat(softmax(logits, 1));
        let truth = flat(one_hot(target, classes));
        let ones = self.class_weights(classes, &probs);
        self.loss_from_probabilities(probs, truth, ones)
    }

    /// Dice + cross-entropy, MONAI `DiceCELoss` with unit weights.
    ///
    /// # Shapes
    /// As [`DiceLoss::forward`].
    pub fn dice_ce(&self, logits: Tensor<5>, target: &Tensor<4, Int>) -> Tensor<1> {
        self.forward(logits.clone(), target) + cross_entropy(logits, target)
    }

    /// Which classes count: all, or all but the background.
    fn class_weights(&self, classes: usize, like: &Tensor<3>) -> Tensor<2> {
        let [b, _, _] = like.dims();
        let row: Vec<f32> = (0..classes)
            .map(|c| {
                if c == 0 && !self.include_background {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let data: Vec<f32> = (0..b).flat_map(|_| row.iter().copied()).collect();
        Tensor::from_data(TensorData::new(data, [b, classes]), &like.device())
    }

    /// The Dice loss from probabilities `[b, c, n]`, one-hot truth `[b, c, n]` and per
    /// sample-class weights `[b, c]` (1 = counts, 0 = ignored); the mean runs over the
    /// counted entries.
    fn loss_from_probabilities(
        &self,
        probs: Tensor<3>,
        truth: Tensor<3>,
        weights: Tensor<2>,
    ) -> Tensor<1> {
        let (inter, volumes) = if self.batch {
            let inter = (probs.clone() * truth.clone()).sum_dim(2).sum_dim(0);
            let volumes = (probs.sum_dim(2) + truth.sum_dim(2)).sum_dim(0);
            (inter, volumes)
        } else {
            let inter = (probs.clone() * truth.clone()).sum_dim(2);
            (inter, probs.sum_dim(2) + truth.sum_dim(2))
        };
        let [b2, c2, _] = inter.dims();
        let inter: Tensor<2> = inter.reshape([b2, c2]);
        let volumes: Tensor<2> = volumes.reshape([b2, c2]);
        let dice =
            (inter.mul_scalar(2.0).add_scalar(self.smooth_nr)) / volumes.add_scalar(self.smooth_dr);
        let loss = dice.neg().add_scalar(1.0);
        let weights = if self.batch {
            weights.sum_dim(0).clamp_max(1.0)
        } else {
            weights
        };
        let counted = weights.clone().sum().clamp_min(1.0);
        (loss * weights).sum() / counted
    }
}

/// Mean voxel-wise cross-entropy of `softmax(logits)` against an integer target.
///
/// # Shapes
/// - logits: `[batch, classes, d, h, w]`, target `[batch, d, h, w]`, output `[1]`
pub fn cross_entropy(logits: Tensor<5>, target: &Tensor<4, Int>) -> Tensor<1> {
    let classes = logits.dims()[1];
    let log_p = flat(log_softmax(logits, 1));
    let truth = flat(one_hot(target, classes));
    let [b, _, n] = log_p.dims();
    (log_p * truth).sum().neg().div_scalar((b * n) as f64)
}

/// The marginal (partial-label) loss for a multi-class model: for each sample, the
/// probabilities of the organs it is *not* annotated for are merged into the background
/// before Dice + cross-entropy, so an unannotated organ is never taught to be background
/// (Shi et al., "Marginal loss and exclusion loss for partially supervised multi-organ
/// segmentation", 2021). The optional exclusion term penalises predicting an unannotated
/// organ where the sample's annotated organs are (organs do not overlap).
#[derive(Config, Debug, PartialEq)]
pub struct MarginalLoss {
    /// The Dice part's settings.
    #[config(default = "DiceLoss::new()")]
    pub dice: DiceLoss,
    /// Weight of the exclusion term (0 disables it).
    #[config(default = 0.0)]
    pub exclusion_weight: f64,
    /// Adds cross-entropy on the merged classes to the Dice part (MONAI `DiceCELoss`);
    /// `false` for Dice alone.
    #[config(default = true)]
    pub cross_entropy: bool,
}

impl MarginalLoss {
    /// The loss.
    ///
    /// `annotated[b][k]` says whether sample `b` is annotated for organ class `k + 1`.
    /// Labels of unannotated organs must not occur in the target (they are unknown).
    ///
    /// # Shapes
    /// - logits: `[batch, classes, d, h, w]`, target `[batch, d, h, w]`, output `[1]`
    ///
    /// # Panics
    /// If `annotated` does not have `batch` rows of `classes − 1` flags.
    pub fn forward(
        &self,
        logits: Tensor<5>,
        target: &Tensor<4, Int>,
        annotated: &[Vec<bool>],
    ) -> Tensor<1> {
        let [b, classes, _, _, _] = logits.dims();
        assert_eq!(annotated.len(), b, "one annotation row per sample");
        assert!(
            annotated.iter().all(|r| r.len() + 1 == classes),
            "annotation rows need classes - 1 flags"
        );
        let device = logits.device();
        let probs = flat(softmax(logits, 1));
        let truth = flat(one_hot(target, classes));
        let n = probs.dims()[2];

        // merge[b] maps class c to row k: an unannotated organ's probability goes to row 0.
        let mut merge = vec![0.0f32; b * classes * classes];
        let mut keep = vec![0.0f32; b * classes];
        for (s, row) in annotated.iter().enumerate() {
            for c in 0..classes {
                let known = c == 0 || row[c - 1];
                let k = if known { c } else { 0 };
                merge[(s * classes + k) * classes + c] = 1.0;
                if known {
                    keep[s * classes + c] = 1.0;
                }
            }
        }
        let merge: Tensor<3> =
            Tensor::from_data(TensorData::new(merge, [b, classes, classes]), &device);
        let keep_t: Tensor<2> =
            Tensor::from_data(TensorData::new(keep.clone(), [b, classes]), &device);
        let merged = merge.matmul(probs.clone());

        let mut dice_weights = keep_t.clone();
        if !self.dice.include_background {
            let mut w = keep.clone();
            for s in 0..b {
                w[s * classes] = 0.0;
            }
            dice_weights = Tensor::from_data(TensorData::new(w, [b, classes]), &device);
        }
        let dice = self
            .dice
            .loss_from_probabilities(merged.clone(), truth.clone(), dice_weights);
        let mut loss = dice;
        if self.cross_entropy {
            let ce = (merged.clamp_min(1e-7).log() * truth.clone())
                .sum()
                .neg()
                .div_scalar((b * n) as f64);
            loss = loss + ce;
        }

        if self.exclusion_weight > 0.0 {
            // Annotated foreground of each sample: [b, 1, n].
            let foreground = truth.slice([0..b, 1..classes, 0..n]).sum_dim(1);
            let unknown: Tensor<2> = keep_t.neg().add_scalar(1.0);
            let overlap = (probs.clone() * foreground.clone()).sum_dim(2); // [b, c, 1]
            let volumes = probs.sum_dim(2) + foreground.sum_dim(2); // [b, c, 1]
            let [bb, cc, _] = overlap.dims();
            let ratio: Tensor<2> = (overlap.mul_scalar(2.0).add_scalar(self.dice.smooth_nr)
                / volumes.add_scalar(self.dice.smooth_dr))
            .reshape([bb, cc]);
            let counted = unknown.clone().sum().clamp_min(1.0);
            let exclusion = (ratio * unknown).sum() / counted;
            loss = loss + exclusion.mul_scalar(self.exclusion_weight);
        }
        loss
    }
}
