//! Random spatial and intensity augmentation of training patches (the authors' MONAI
//! `RandAffine(rotate_range=(0, 0, π/15), scale_range=0.1)`, `RandScaleIntensity(0.1)`,
//! `RandShiftIntensity(0.1)`).
//!
//! Image and label go through the same spatial transform — trilinear for the image,
//! nearest for the label — so the annotation stays on the structure it marks; the intensity
//! change touches the image only.

use std::f64::consts::PI;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
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
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            rotate_range: PI / 15.0,
            scale_range: 0.1,
            intensity_scale: 0.1,
            intensity_shift: 0.1,
            image_fill: 0.0,
        }
    }
}

impl AugmentConfig {
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
}

impl AugmentParams {
    /// No change at all.
    pub fn identity() -> Self {
        AugmentParams {
            angle: 0.0,
            scale: [1.0; 3],
            intensity_factor: 1.0,
            intensity_offset: 0.0,
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
        AugmentParams {
            angle,
            scale,
            intensity_factor,
            intensity_offset,
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
    for v in &mut image {
        *v = *v * params.intensity_factor + params.intensity_offset;
    }
    Ok(Patch {
        image,
        label,
        shape,
    })
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
}
