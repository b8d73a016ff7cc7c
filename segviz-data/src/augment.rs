//! Random spatial and intensity augmentation of training patches: the authors' MONAI
//! `RandAffine(rotate_range=(0, 0, π/15), scale_range=0.1)`, `RandScaleIntensity(0.1)`,
//! `RandShiftIntensity(0.1)` ([`AugmentConfig::default`]), and what the training sites do
//! not cover on their own ([`AugmentConfig::phase_invariant`]): each annotated organ shifted
//! on its own and a random smooth intensity curve (other contrast phases and calibrations),
//! in-plane blur and slice averaging (softer kernels, thicker slices) and extra noise.
//!
//! Image and label go through the same spatial transform — trilinear for the image,
//! nearest for the label — so the annotation stays on the structure it marks; the intensity
//! changes touch the image only.

use std::f64::consts::PI;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::patches::Patch;
use crate::preprocess::resample::{inside, trilinear_at};

/// Ranges of the random transforms; a range of 0 disables that transform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Largest rotation (radians) about the axial `k` axis, drawn in `±rotate_range`.
    pub rotate_range: f64,
    /// Largest relative scaling per axis, drawn in `1 ± scale_range`.
    pub scale_range: f64,
    /// Intensity scale: `v · (1 + f)` with `f` in `±intensity_scale`.
    pub intensity_scale: f32,
    /// Intensity shift: `v + o` with `o` in `±intensity_shift`.
    pub intensity_shift: f32,
    /// Image value of voxels that the transform brings in from outside the patch.
    pub image_fill: f32,
    /// Per-organ shift: the voxels of each label value get their own offset in
    /// `±organ_shift` (image units), as organs enhance differently from phase to phase.
    pub organ_shift: f32,
    /// Random monotone intensity curve: control points at 0, ¼, ½, ¾, 1 of the image range
    /// moved by up to `±intensity_curve` (tissue contrasts of another phase or scanner).
    pub intensity_curve: f32,
    /// Gaussian noise with a standard deviation drawn in `[0, noise_std]` (image units).
    pub noise_std: f32,
    /// In-plane `[1, 2, 1] / 4` blur passes, drawn in `0..=max_blur_passes` (softer kernels).
    pub max_blur_passes: usize,
    /// Thicker slices: a moving average over `1..=max_slice_average` slices along `k`.
    pub max_slice_average: usize,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            rotate_range: PI / 15.0,
            scale_range: 0.1,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
            image_fill: 0.0,
            organ_shift: 0.0,
            intensity_curve: 0.0,
            noise_std: 0.0,
            max_blur_passes: 0,
            max_slice_average: 1,
        }
    }
}

impl AugmentConfig {
    /// The MONAI transforms of [`AugmentConfig::default`] plus contrast-phase, kernel,
    /// slice-thickness and noise simulation, so that a model learns organs that look the
    /// same in every phase and scanner. Ranges are in units of a `[0, 1]` image scaled from
    /// a ~450 HU window (`a_min = -200`, `a_max = 250`): organs shift by up to ±0.15
    /// (≈ ±70 HU, the portal-venous uptake of liver and spleen), the curve bends by up to
    /// ±0.06 (≈ ±27 HU), noise adds up to 0.03 (≈ 14 HU), one blur pass, up to 3 slices.
    pub fn phase_invariant() -> Self {
        AugmentConfig {
            organ_shift: 0.15,
            intensity_curve: 0.06,
            noise_std: 0.03,
            max_blur_passes: 1,
            max_slice_average: 3,
            ..AugmentConfig::default()
        }
    }

    /// Checks every range.
    ///
    /// # Errors
    /// [`DataError::Config`] for a negative or non-finite range, or `scale_range ≥ 1`
    /// (which could scale an axis to zero).
    pub fn validate(&self) -> Result<()> {
        let ranges = [
            ("rotate_range", self.rotate_range),
            ("scale_range", self.scale_range),
            ("intensity_scale", self.intensity_scale as f64),
            ("intensity_shift", self.intensity_shift as f64),
            ("organ_shift", self.organ_shift as f64),
            ("intensity_curve", self.intensity_curve as f64),
            ("noise_std", self.noise_std as f64),
        ];
        for (name, v) in ranges {
            if !v.is_finite() || v < 0.0 {
                return Err(DataError::Config(format!(
                    "{name} must be a non-negative number, got {v}"
                )));
            }
        }
        if self.scale_range >= 1.0 {
            return Err(DataError::Config(format!(
                "scale_range must be below 1, got {}",
                self.scale_range
            )));
        }
        if !self.image_fill.is_finite() {
            return Err(DataError::Config("image_fill must be finite".into()));
        }
        if self.max_slice_average == 0 || self.max_slice_average > 16 || self.max_blur_passes > 8 {
            return Err(DataError::Config(format!(
                "max_slice_average must be in 1..=16 and max_blur_passes at most 8, got {} and {}",
                self.max_slice_average, self.max_blur_passes
            )));
        }
        Ok(())
    }
}

/// One draw of the random parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AugmentParams {
    /// Rotation about the `k` axis, radians.
    pub angle: f64,
    /// Scale factor per axis.
    pub scale: [f64; 3],
    /// Intensity factor `1 + f`.
    pub intensity_factor: f32,
    /// Intensity offset.
    pub intensity_offset: f32,
    /// Offset added to the voxels of each label value (index = label; 0 is background).
    pub organ_offset: [f32; 8],
    /// Where the curve maps 0, ¼, ½, ¾ and 1 (identity: those same values).
    pub curve: [f32; 5],
    /// In-plane blur passes.
    pub blur_passes: usize,
    /// Slices averaged along `k`.
    pub slice_average: usize,
    /// Noise standard deviation.
    pub noise_std: f32,
    /// Seed of the noise.
    pub noise_seed: u64,
}

impl AugmentParams {
    /// No change at all.
    pub fn identity() -> Self {
        AugmentParams {
            angle: 0.0,
            scale: [1.0; 3],
            intensity_factor: 1.0,
            intensity_offset: 0.0,
            organ_offset: [0.0; 8],
            curve: [0.0, 0.25, 0.5, 0.75, 1.0],
            blur_passes: 0,
            slice_average: 1,
            noise_std: 0.0,
            noise_seed: 0,
        }
    }
}

/// Applies random augmentations with a seeded random stream.
#[derive(Debug, Clone)]
pub struct Augmenter {
    config: AugmentConfig,
    rng: ChaCha8Rng,
}

impl Augmenter {
    /// An augmenter whose stream starts from `seed`.
    ///
    /// # Errors
    /// [`DataError::Config`] if the config is invalid.
    pub fn new(config: AugmentConfig, seed: u64) -> Result<Self> {
        config.validate()?;
        Ok(Augmenter {
            config,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Draws the next set of parameters.
    pub fn draw(&mut self) -> AugmentParams {
        let c = &self.config;
        let mut symmetric = |range: f64| {
            if range > 0.0 {
                self.rng.random_range(-range..=range)
            } else {
                0.0
            }
        };
        let angle = symmetric(c.rotate_range);
        let scale = [
            1.0 + symmetric(c.scale_range),
            1.0 + symmetric(c.scale_range),
            1.0 + symmetric(c.scale_range),
        ];
        let intensity_factor = 1.0 + symmetric(c.intensity_scale as f64) as f32;
        let intensity_offset = symmetric(c.intensity_shift as f64) as f32;
        let mut organ_offset = [0.0; 8];
        for o in organ_offset.iter_mut().skip(1) {
            *o = symmetric(c.organ_shift as f64) as f32;
        }
        let mut curve = AugmentParams::identity().curve;
        for y in curve.iter_mut() {
            *y += symmetric(c.intensity_curve as f64) as f32;
        }
        // Keep the curve monotone: tissue order may change only where values were close.
        for i in 1..curve.len() {
            curve[i] = curve[i].max(curve[i - 1]);
        }
        // Draw only what is enabled, so the MONAI-only default keeps its random stream.
        let blur_passes = if c.max_blur_passes > 0 {
            self.rng.random_range(0..=c.max_blur_passes)
        } else {
            0
        };
        let slice_average = if c.max_slice_average > 1 {
            self.rng.random_range(1..=c.max_slice_average)
        } else {
            1
        };
        let (noise_std, noise_seed) = if c.noise_std > 0.0 {
            (self.rng.random_range(0.0..=c.noise_std), self.rng.random())
        } else {
            (0.0, 0)
        };
        AugmentParams {
            angle,
            scale,
            intensity_factor,
            intensity_offset,
            organ_offset,
            curve,
            blur_passes,
            slice_average,
            noise_std,
            noise_seed,
        }
    }

    /// Draws parameters and applies them to `patch`.
    ///
    /// # Errors
    /// [`DataError::Shape`] if the patch's vectors do not match its shape.
    pub fn augment(&mut self, patch: &Patch) -> Result<Patch> {
        let params = self.draw();
        apply(patch, &params, self.config.image_fill)
    }
}

/// Applies `params` to a patch: the spatial transform about the patch centre (image
/// trilinear, label nearest, outside → `image_fill` / background), then the intensity change
/// on the image.
///
/// The rotation is in the `(i, j)` index plane, which is the axial plane after
/// preprocessing (RAS, equal in-plane spacing).
///
/// # Errors
/// [`DataError::Shape`] if the patch's vectors do not match its shape.
pub fn apply(patch: &Patch, params: &AugmentParams, image_fill: f32) -> Result<Patch> {
    let shape = patch.shape;
    let len: usize = shape.iter().product();
    if patch.image.len() != len || patch.label.len() != len || len == 0 {
        return Err(DataError::Shape {
            context: format!(
                "augmenting a patch with {} image and {} label values",
                patch.image.len(),
                patch.label.len()
            ),
            expected: shape,
            found: shape,
        });
    }
    let centre = shape.map(|n| (n as f64 - 1.0) / 2.0);
    let (sin, cos) = params.angle.sin_cos();
    let mut image = Vec::with_capacity(len);
    let mut label = Vec::with_capacity(len);
    for x in 0..shape[0] {
        for y in 0..shape[1] {
            for z in 0..shape[2] {
                // Output → source: undo the rotation, then the scaling.
                let q = [
                    x as f64 - centre[0],
                    y as f64 - centre[1],
                    z as f64 - centre[2],
                ];
                let r = [cos * q[0] + sin * q[1], -sin * q[0] + cos * q[1], q[2]];
                let p = [0, 1, 2].map(|a| centre[a] + r[a] / params.scale[a]);
                if inside(p, shape) {
                    image.push(trilinear_at(&patch.image, shape, p));
                    let s = [0, 1, 2].map(|a| (p[a].round().max(0.0) as usize).min(shape[a] - 1));
                    label.push(patch.label[(s[0] * shape[1] + s[1]) * shape[2] + s[2]]);
                } else {
                    image.push(image_fill);
                    label.push(0);
                }
            }
        }
    }
    for (v, &l) in image.iter_mut().zip(&label) {
        *v = apply_curve(
            &params.curve,
            *v + params.organ_offset[usize::from(l).min(7)],
        );
    }
    for _ in 0..params.blur_passes {
        convolve_axis(&mut image, shape, 0, &[0.25, 0.5, 0.25]);
        convolve_axis(&mut image, shape, 1, &[0.25, 0.5, 0.25]);
    }
    if params.slice_average > 1 {
        // An odd box keeps the image centred; an even count becomes the next odd one.
        let width = params.slice_average | 1;
        convolve_axis(&mut image, shape, 2, &vec![1.0 / width as f32; width]);
    }
    if params.noise_std > 0.0 {
        let mut rng = ChaCha8Rng::seed_from_u64(params.noise_seed);
        let normal = Normal::new(0.0f32, params.noise_std)
            .map_err(|e| DataError::Config(format!("noise std {}: {e}", params.noise_std)))?;
        for v in image.iter_mut() {
            *v += normal.sample(&mut rng);
        }
    }
    for v in &mut image {
        *v = *v * params.intensity_factor + params.intensity_offset;
    }
    Ok(Patch {
        image,
        label,
        shape,
    })
}

/// The piecewise-linear curve through `(i / 4, curve[i])`, extended linearly beyond 0 and 1.
fn apply_curve(curve: &[f32; 5], v: f32) -> f32 {
    let segment = ((v * 4.0).floor() as isize).clamp(0, 3) as usize;
    let x0 = segment as f32 / 4.0;
    let slope = (curve[segment + 1] - curve[segment]) * 4.0;
    curve[segment] + (v - x0) * slope
}

/// Convolves along `axis` with a centred odd-length `kernel` (edges clamped).
fn convolve_axis(data: &mut [f32], shape: [usize; 3], axis: usize, kernel: &[f32]) {
    let strides = [shape[1] * shape[2], shape[2], 1];
    let (n, stride) = (shape[axis], strides[axis]);
    if n < 2 || kernel.len() < 2 {
        return;
    }
    let half = (kernel.len() / 2) as isize;
    let out: Vec<f32> = (0..data.len())
        .map(|c| {
            let pos = (c / stride) % n;
            let base = c - pos * stride;
            kernel
                .iter()
                .enumerate()
                .map(|(t, w)| {
                    let p = (pos as isize + t as isize - half).clamp(0, n as isize - 1) as usize;
                    w * data[base + p * stride]
                })
                .sum()
        })
        .collect();
    data.copy_from_slice(&out);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 24×24×12 patch holding an off-centre box (label 1) and an image equal to the label.
    fn patch() -> Patch {
        let shape = [24, 24, 12];
        let mut label = Vec::new();
        for i in 0..24 {
            for j in 0..24 {
                for k in 0..12 {
                    let inside =
                        (6..15).contains(&i) && (9..20).contains(&j) && (3..9).contains(&k);
                    label.push(u8::from(inside));
                }
            }
        }
        Patch {
            image: label.iter().map(|&l| l as f32).collect(),
            label,
            shape,
        }
    }

    fn dice(a: &[bool], b: &[bool]) -> f64 {
        let both = a.iter().zip(b).filter(|(x, y)| **x && **y).count() as f64;
        let total = (a.iter().filter(|x| **x).count() + b.iter().filter(|x| **x).count()) as f64;
        2.0 * both / total
    }

    #[test]
    fn augmented_label_stays_on_the_augmented_image() {
        let original = patch();
        let config = AugmentConfig {
            intensity_scale: 0.0,
            intensity_shift: 0.0,
            ..Default::default()
        };
        let mut augmenter = Augmenter::new(config, 11).expect("config");
        let original_mask: Vec<bool> = original.label.iter().map(|&l| l == 1).collect();
        let mut moved = 0;
        for _ in 0..10 {
            let out = augmenter.augment(&original).expect("augment");
            let from_image: Vec<bool> = out.image.iter().map(|&v| v > 0.5).collect();
            let from_label: Vec<bool> = out.label.iter().map(|&l| l == 1).collect();
            let d = dice(&from_image, &from_label);
            assert!(d > 0.9, "image and label drifted apart: Dice {d}");
            if dice(&from_label, &original_mask) < 0.97 {
                moved += 1;
            }
        }
        // The transform is not the identity: most draws visibly move the box.
        assert!(moved >= 5, "only {moved} of 10 draws changed the label");
    }

    #[test]
    fn same_seed_gives_the_same_output_and_intensity_touches_only_the_image() {
        let original = patch();
        let run = |seed| {
            let mut a = Augmenter::new(AugmentConfig::default(), seed).expect("config");
            (0..3)
                .map(|_| a.augment(&original).expect("augment"))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(5), run(5));
        assert_ne!(run(5), run(6));

        let params = AugmentParams {
            intensity_factor: 1.1,
            intensity_offset: -0.05,
            ..AugmentParams::identity()
        };
        let out = apply(&original, &params, 0.0).expect("apply");
        assert_eq!(out.label, original.label);
        for (a, b) in out.image.iter().zip(&original.image) {
            assert!((a - (b * 1.1 - 0.05)).abs() < 1e-6);
        }
    }

    #[test]
    fn a_quarter_turn_moves_voxels_where_expected_and_bad_input_is_refused() {
        let mut p = Patch {
            image: vec![0.0; 25],
            label: vec![0; 25],
            shape: [5, 5, 1],
        };
        p.label[4 * 5 + 2] = 1; // (i, j) = (4, 2): +2 along i from the centre
        p.image[4 * 5 + 2] = 1.0;
        let params = AugmentParams {
            angle: PI / 2.0,
            ..AugmentParams::identity()
        };
        let out = apply(&p, &params, 0.0).expect("apply");
        // Rotating +90° about k takes +i to +j: (4, 2) → (2, 4).
        assert_eq!(out.label[2 * 5 + 4], 1);
        assert!((out.image[2 * 5 + 4] - 1.0).abs() < 1e-9);
        assert_eq!(out.label.iter().map(|&l| l as usize).sum::<usize>(), 1);

        p.label.pop();
        assert!(apply(&p, &params, 0.0).is_err());
        assert!(Augmenter::new(
            AugmentConfig {
                scale_range: 1.0,
                ..Default::default()
            },
            0
        )
        .is_err());
    }

    #[test]
    fn organ_shift_and_curve_change_intensities_not_labels() {
        let original = patch();
        let mut params = AugmentParams {
            organ_offset: [0.0, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
            ..AugmentParams::identity()
        };
        let out = apply(&original, &params, 0.0).expect("apply");
        assert_eq!(out.label, original.label);
        for ((o, i), l) in out.image.iter().zip(&original.image).zip(&original.label) {
            let expected = i + if *l == 1 { 0.2 } else { 0.0 };
            assert!((o - expected).abs() < 1e-6, "{o} vs {expected}");
        }
        // A curve that lifts the middle: 0 stays, 0.5 → 0.6, 1 stays.
        params = AugmentParams {
            curve: [0.0, 0.3, 0.6, 0.8, 1.0],
            ..AugmentParams::identity()
        };
        assert!((apply_curve(&params.curve, 0.5) - 0.6).abs() < 1e-6);
        assert!((apply_curve(&params.curve, 0.125) - 0.15).abs() < 1e-6);
        // Beyond the ends it continues the end segments.
        assert!((apply_curve(&params.curve, 1.25) - 1.2).abs() < 1e-6);
        assert!((apply_curve(&params.curve, -0.25) - -0.3).abs() < 1e-6);
    }

    #[test]
    fn blur_slices_and_noise_keep_the_mean_and_the_labels() {
        let original = patch();
        let params = AugmentParams {
            blur_passes: 2,
            slice_average: 3,
            noise_std: 0.05,
            noise_seed: 9,
            ..AugmentParams::identity()
        };
        let out = apply(&original, &params, 0.0).expect("apply");
        assert_eq!(out.label, original.label);
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        assert!((mean(&out.image) - mean(&original.image)).abs() < 0.01);
        // The box edge is now soft: a voxel just outside it along k took some of it.
        let at = |p: &Patch, i: usize, j: usize, k: usize| p.image[(i * 24 + j) * 12 + k];
        let noiseless = apply(
            &original,
            &AugmentParams {
                noise_std: 0.0,
                ..params
            },
            0.0,
        )
        .expect("apply");
        assert!(at(&noiseless, 10, 14, 2) > 0.2 && at(&noiseless, 10, 14, 2) < 0.5);
        assert!((at(&noiseless, 10, 14, 5) - 1.0).abs() < 1e-6);
        let residual: Vec<f32> = out
            .image
            .iter()
            .zip(&noiseless.image)
            .map(|(a, b)| a - b)
            .collect();
        let sd = (mean(&residual.iter().map(|r| r * r).collect::<Vec<_>>())).sqrt();
        assert!((sd - 0.05).abs() < 0.005, "noise sd {sd}");
    }

    #[test]
    fn phase_invariant_preset_is_valid_and_varies_organs_between_draws() {
        let config = AugmentConfig::phase_invariant();
        config.validate().expect("valid");
        let mut augmenter = Augmenter::new(config, 3).expect("config");
        let a = augmenter.draw();
        let b = augmenter.draw();
        assert_ne!(a.organ_offset[1], b.organ_offset[1]);
        assert_eq!(a.organ_offset[0], 0.0);
        assert!(a.curve.windows(2).all(|w| w[0] <= w[1]));
        assert!((1..=3).contains(&a.slice_average));
        // The MONAI-only default leaves the new transforms off.
        let mut plain = Augmenter::new(AugmentConfig::default(), 3).expect("config");
        let p = plain.draw();
        assert_eq!(p.organ_offset, [0.0; 8]);
        assert_eq!(p.curve, AugmentParams::identity().curve);
        assert_eq!((p.blur_passes, p.slice_average, p.noise_std), (0, 1, 0.0));
        assert!(Augmenter::new(
            AugmentConfig {
                max_slice_average: 0,
                ..AugmentConfig::default()
            },
            0
        )
        .is_err());
    }
}
