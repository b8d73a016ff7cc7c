//! Training patches centred on organ or background voxels, in a fixed ratio
//! (MONAI `RandCropByPosNegLabel`: 128×128×32 patches, pos:neg 1:1, 4 per volume).
//!
//! Sampling positives as often as negatives is what lets a network learn small organs such
//! as the pancreas from volumes that are mostly background.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::volume::Volume;

/// How patches are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PatchSamplerConfig {
    /// Patch shape `[i, j, k]` (RAS after preprocessing).
    pub patch_size: [usize; 3],
    /// Relative weight of patches centred on an annotated organ voxel (label > 0).
    pub pos: u32,
    /// Relative weight of patches centred on a background voxel (label 0).
    pub neg: u32,
    /// Patches drawn per volume.
    pub samples_per_volume: usize,
    /// Seed of the sampler's random stream.
    pub seed: u64,
    /// Shift a patch that would cross the border back inside the volume, as MONAI does;
    /// when false the patch stays centred on its voxel and is padded outside. Either way a
    /// volume smaller than the patch is padded.
    pub keep_inside: bool,
    /// Image value of padded voxels (0 is the bottom of the intensity window).
    pub image_pad_value: f32,
}

impl Default for PatchSamplerConfig {
    fn default() -> Self {
        PatchSamplerConfig {
            patch_size: [128, 128, 32],
            pos: 1,
            neg: 1,
            samples_per_volume: 4,
            seed: 0,
            keep_inside: true,
            image_pad_value: 0.0,
        }
    }
}

impl PatchSamplerConfig {
    /// Checks every field.
    ///
    /// # Errors
    /// [`DataError::Config`] for a zero-sized patch, `pos + neg == 0`, or a non-finite pad
    /// value.
    pub fn validate(&self) -> Result<()> {
        if self.patch_size.contains(&0) {
            return Err(DataError::Config(format!(
                "patch_size must have no zero side, got {:?}",
                self.patch_size
            )));
        }
        if self.pos == 0 && self.neg == 0 {
            return Err(DataError::Config("pos and neg cannot both be 0".into()));
        }
        if !self.image_pad_value.is_finite() {
            return Err(DataError::Config("image_pad_value must be finite".into()));
        }
        Ok(())
    }
}

/// One training patch: image and label values in C order over `shape`.
#[derive(Debug, Clone, PartialEq)]
pub struct Patch {
    /// Image values, `shape.iter().product()` of them.
    pub image: Vec<f32>,
    /// Label values, same layout.
    pub label: Vec<u8>,
    /// `[i, j, k]` sizes.
    pub shape: [usize; 3],
}

/// The voxel a patch was drawn around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PatchCentre {
    /// Voxel index in the source volume.
    pub index: [usize; 3],
    /// Whether it was drawn as a positive (organ) centre.
    pub positive: bool,
}

/// Draws patches from (image, label) pairs with a seeded random stream.
#[derive(Debug, Clone)]
pub struct PatchSampler {
    config: PatchSamplerConfig,
    rng: ChaCha8Rng,
}

impl PatchSampler {
    /// A sampler whose stream starts from `config.seed`.
    ///
    /// # Errors
    /// [`DataError::Config`] if the config is invalid.
    pub fn new(config: PatchSamplerConfig) -> Result<Self> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(PatchSampler { config, rng })
    }

    /// The configuration.
    pub fn config(&self) -> &PatchSamplerConfig {
        &self.config
    }

    /// Draws `samples_per_volume` patches from one pair.
    ///
    /// # Errors
    /// [`DataError::Shape`] if image and label shapes differ or their data lengths do not
    /// match their shapes.
    pub fn sample(&mut self, image: &Volume<f32>, label: &Volume<u8>) -> Result<Vec<Patch>> {
        check_same_grid(image, label)?;
        let centres = self.sample_centres(label)?;
        Ok(centres
            .iter()
            .map(|c| self.extract(image, label, c.index))
            .collect())
    }

    /// Draws `samples_per_volume` centres: each is positive with probability
    /// `pos / (pos + neg)`, falling back to the other kind when a volume has none of one.
    ///
    /// # Errors
    /// [`DataError::Shape`] if the label's data length does not match its shape or it has
    /// no voxel.
    pub fn sample_centres(&mut self, label: &Volume<u8>) -> Result<Vec<PatchCentre>> {
        if label.data.len() != label.geometry.len() || label.data.is_empty() {
            return Err(DataError::Shape {
                context: format!("sampling patches from {} label values", label.data.len()),
                expected: label.geometry.shape,
                found: label.geometry.shape,
            });
        }
        let positives: Vec<usize> = (0..label.data.len())
            .filter(|&n| label.data[n] > 0)
            .collect();
        let negatives = label.data.len() - positives.len();
        let p_positive = self.config.pos as f64 / (self.config.pos + self.config.neg) as f64;
        let mut centres = Vec::with_capacity(self.config.samples_per_volume);
        for _ in 0..self.config.samples_per_volume {
            let want_positive = self.rng.random_bool(p_positive);
            let positive = if positives.is_empty() {
                false
            } else if negatives == 0 {
                true
            } else {
                want_positive
            };
            let linear = if positive {
                positives[self.rng.random_range(0..positives.len())]
            } else {
                // Rejection sampling: background is usually most of the volume, so this
                // avoids listing every background voxel.
                self.random_background(label, negatives)
            };
            let [_, s1, s2] = label.geometry.shape;
            centres.push(PatchCentre {
                index: [linear / (s1 * s2), (linear / s2) % s1, linear % s2],
                positive,
            });
        }
        Ok(centres)
    }

    /// A uniformly random background voxel (there are `count > 0` of them).
    fn random_background(&mut self, label: &Volume<u8>, count: usize) -> usize {
        let n = label.data.len();
        if count * 4 >= n {
            loop {
                let candidate = self.rng.random_range(0..n);
                if label.data[candidate] == 0 {
                    return candidate;
                }
            }
        }
        // Sparse background: pick the m-th background voxel directly.
        let m = self.rng.random_range(0..count);
        label
            .data
            .iter()
            .enumerate()
            .filter(|(_, &l)| l == 0)
            .nth(m)
            .map_or(0, |(n, _)| n)
    }

    /// The patch around voxel `centre`, padded where it leaves the volume.
    ///
    /// Image and label must share one shape (as after [`crate::preprocess::preprocess_pair`]).
    pub fn extract(&self, image: &Volume<f32>, label: &Volume<u8>, centre: [usize; 3]) -> Patch {
        let size = self.config.patch_size;
        let shape = label.geometry.shape;
        let mut start = [0isize; 3];
        for a in 0..3 {
            let (n, p) = (shape[a] as isize, size[a] as isize);
            let centred = centre[a] as isize - p / 2;
            start[a] = if n < p {
                // The whole axis fits: centre the volume inside the patch.
                -(p - n) / 2
            } else if self.config.keep_inside {
                centred.clamp(0, n - p)
            } else {
                centred
            };
        }
        let len = size.iter().product();
        let mut patch = Patch {
            image: vec![self.config.image_pad_value; len],
            label: vec![0; len],
            shape: size,
        };
        let source = |a: usize, x: usize| -> Option<usize> {
            let s = start[a] + x as isize;
            (s >= 0 && s < shape[a] as isize).then_some(s as usize)
        };
        let mut n = 0;
        for x in 0..size[0] {
            let si = source(0, x);
            for y in 0..size[1] {
                let sj = source(1, y);
                for z in 0..size[2] {
                    if let (Some(i), Some(j), Some(k)) = (si, sj, source(2, z)) {
                        let s = label.geometry.index(i, j, k);
                        patch.image[n] = image.data[s];
                        patch.label[n] = label.data[s];
                    }
                    n += 1;
                }
            }
        }
        patch
    }
}

/// Image and label must have one shape and consistent data lengths.
fn check_same_grid(image: &Volume<f32>, label: &Volume<u8>) -> Result<()> {
    if image.geometry.shape != label.geometry.shape || image.data.len() != label.data.len() {
        return Err(DataError::Shape {
            context: "sampling patches: image and label shapes differ".into(),
            expected: label.geometry.shape,
            found: image.geometry.shape,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    /// 24×20×16 label with a small organ (label 2) and an image equal to `i + 100 j + 10000 k`.
    fn pair() -> (Volume<f32>, Volume<u8>) {
        let geometry = Geometry::from_spacing([24, 20, 16], [1.5, 1.5, 2.0]);
        let mut label = Volume::filled(geometry.clone(), 0u8);
        let mut image = Volume::filled(geometry, 0.0f32);
        for i in 0..24 {
            for j in 0..20 {
                for k in 0..16 {
                    let n = label.geometry.index(i, j, k);
                    image.data[n] = (i + 100 * j + 10_000 * k) as f32;
                    if (10..13).contains(&i) && (4..7).contains(&j) && (2..4).contains(&k) {
                        label.data[n] = 2;
                    }
                }
            }
        }
        (image, label)
    }

    fn sampler(pos: u32, neg: u32, samples: usize, seed: u64) -> PatchSampler {
        PatchSampler::new(PatchSamplerConfig {
            patch_size: [8, 8, 4],
            pos,
            neg,
            samples_per_volume: samples,
            seed,
            ..Default::default()
        })
        .expect("valid config")
    }

    #[test]
    fn positive_ratio_is_honoured_over_many_draws() {
        let (_, label) = pair();
        for (pos, neg, expected) in [(1, 1, 0.5), (3, 1, 0.75), (1, 0, 1.0), (0, 1, 0.0)] {
            let mut s = sampler(pos, neg, 4000, 7);
            let centres = s.sample_centres(&label).expect("centres");
            let positives = centres.iter().filter(|c| c.positive).count() as f64;
            let ratio = positives / centres.len() as f64;
            assert!((ratio - expected).abs() < 0.03, "{pos}:{neg} gave {ratio}");
            // A positive centre lies on the organ, a negative one on background.
            for c in &centres {
                let l = label.at(c.index[0], c.index[1], c.index[2]);
                assert_eq!(l > 0, c.positive, "{c:?}");
            }
        }
    }

    #[test]
    fn positive_patches_contain_the_organ_and_match_the_image() {
        let (image, label) = pair();
        let mut s = sampler(1, 0, 16, 3);
        for patch in s.sample(&image, &label).expect("patches") {
            assert_eq!(patch.shape, [8, 8, 4]);
            assert_eq!(patch.image.len(), 256);
            assert!(patch.label.contains(&2));
            // With keep_inside (default) nothing is padded in a volume larger than the patch,
            // and the image values still encode their source voxel consistently.
            let i0 = patch.image[0] as usize;
            let (a, b, c) = (i0 % 100, (i0 / 100) % 100, i0 / 10_000);
            assert_eq!(
                patch.image[(7 * 8 + 7) * 4 + 3] as usize,
                (a + 7) + 100 * (b + 7) + 10_000 * (c + 3)
            );
        }
    }

    #[test]
    fn patches_crossing_the_border_are_padded_and_small_volumes_centred() {
        let (image, label) = pair();
        let s = PatchSampler::new(PatchSamplerConfig {
            patch_size: [8, 8, 4],
            keep_inside: false,
            image_pad_value: -1.0,
            ..Default::default()
        })
        .expect("config");
        let corner = s.extract(&image, &label, [0, 0, 0]);
        // Start is -4, -4, -2: the first 4 rows along i are padding.
        assert_eq!(corner.image[0], -1.0);
        assert_eq!(corner.image[(4 * 8 + 4) * 4 + 2], 0.0);

        let big = PatchSampler::new(PatchSamplerConfig {
            patch_size: [32, 20, 20],
            ..Default::default()
        })
        .expect("config");
        let p = big.extract(&image, &label, [10, 10, 10]);
        assert_eq!(p.shape, [32, 20, 20]);
        let real = p.image.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(real, 24 * 20 * 16 - 1); // every source voxel but the zero at (0, 0, 0)
    }

    #[test]
    fn same_seed_same_patches_and_volumes_without_organ_fall_back() {
        let (image, label) = pair();
        let a = sampler(1, 1, 8, 42).sample(&image, &label).expect("a");
        let b = sampler(1, 1, 8, 42).sample(&image, &label).expect("b");
        assert_eq!(a, b);
        let empty = Volume::filled(label.geometry.clone(), 0u8);
        let centres = sampler(1, 0, 10, 1)
            .sample_centres(&empty)
            .expect("centres");
        assert!(centres.iter().all(|c| !c.positive));
        let bad = Volume::filled(Geometry::from_spacing([4, 4, 4], [1.0; 3]), 0.0f32);
        assert!(sampler(1, 1, 2, 1).sample(&bad, &label).is_err());
        assert!(PatchSampler::new(PatchSamplerConfig {
            pos: 0,
            neg: 0,
            ..Default::default()
        })
        .is_err());
    }
}
