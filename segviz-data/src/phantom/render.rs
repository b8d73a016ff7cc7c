//! Rendering a subject into a CT volume the way one site's scanner would store it.
//!
//! A [`SiteStyle`] is what makes sites differ (the domain shift federated learning has to
//! cope with): noise level, contrast phase, voxel spacing, field of view, an intensity
//! offset, and the order and direction of the stored axes. Whatever the layout, the affine
//! describes it exactly, so reorienting to RAS recovers the same anatomy.

use std::str::FromStr;

use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use super::anatomy::{ContrastPhase, Subject};
use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// Volume size presets: voxels along world `x, y, z` and their spacing (mm). All cover
/// about 365 × 365 × 240 mm, the abdomen from the liver dome to below the kidneys.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PhantomSize {
    /// 32 × 32 × 16 voxels (~11.5 × 11.5 × 15 mm): for tests.
    Tiny,
    /// 96 × 96 × 48 voxels (~3.8 × 3.8 × 5 mm): quick experiments.
    Small,
    /// 160 × 160 × 80 voxels (~2.3 × 2.3 × 3 mm).
    Medium,
    /// Any shape and spacing.
    Custom {
        /// Voxels along world `x, y, z`.
        shape: [usize; 3],
        /// Spacing along world `x, y, z`, mm.
        spacing: [f64; 3],
    },
}

impl PhantomSize {
    /// Nominal voxels along world `x, y, z` (sites vary it through their field of view).
    pub fn shape(&self) -> [usize; 3] {
        match self {
            PhantomSize::Tiny => [32, 32, 16],
            PhantomSize::Small => [96, 96, 48],
            PhantomSize::Medium => [160, 160, 80],
            PhantomSize::Custom { shape, .. } => *shape,
        }
    }

    /// Nominal spacing along world `x, y, z`, mm.
    pub fn spacing(&self) -> [f64; 3] {
        match self {
            PhantomSize::Tiny => [11.5, 11.5, 15.0],
            PhantomSize::Small => [3.8, 3.8, 5.0],
            PhantomSize::Medium => [2.3, 2.3, 3.0],
            PhantomSize::Custom { spacing, .. } => *spacing,
        }
    }

    /// Errors on an empty shape or a non-positive spacing.
    pub fn validate(&self) -> Result<()> {
        let shape_ok = self.shape().iter().all(|&n| (2..=2048).contains(&n));
        let spacing_ok = self.spacing().iter().all(|&s| s.is_finite() && s > 0.0);
        if shape_ok && spacing_ok {
            Ok(())
        } else {
            Err(DataError::Config(format!(
                "phantom size needs 2..=2048 voxels and a positive spacing per axis, got \
                 {:?} at {:?} mm",
                self.shape(),
                self.spacing()
            )))
        }
    }
}

impl FromStr for PhantomSize {
    type Err = DataError;

    /// `tiny`, `small` or `medium`.
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tiny" => Ok(PhantomSize::Tiny),
            "small" => Ok(PhantomSize::Small),
            "medium" => Ok(PhantomSize::Medium),
            other => Err(DataError::Config(format!(
                "unknown phantom size {other:?}: use tiny, small or medium"
            ))),
        }
    }
}

/// How the stored axes relate to the world axes: stored axis `a` runs along world axis
/// `world_axis[a]` (0 = x/R, 1 = y/A, 2 = z/S), towards the negative end if `flip[a]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AxisLayout {
    /// World axis of each stored axis (a permutation of 0, 1, 2).
    pub world_axis: [usize; 3],
    /// Whether each stored axis runs towards decreasing world coordinates.
    pub flip: [bool; 3],
}

impl AxisLayout {
    /// Stored axes are R, A, S.
    pub const RAS: AxisLayout = AxisLayout {
        world_axis: [0, 1, 2],
        flip: [false, false, false],
    };
    /// Stored axes are L, P, S (the DICOM patient axes; common in MSD and BTCV files).
    pub const LPS: AxisLayout = AxisLayout {
        world_axis: [0, 1, 2],
        flip: [true, true, false],
    };
    /// KiTS19-style slice-first storage: axes I, P, L (cranio-caudal first).
    pub const SLICE_FIRST: AxisLayout = AxisLayout {
        world_axis: [2, 1, 0],
        flip: [true, true, true],
    };

    /// Errors if `world_axis` is not a permutation.
    pub fn validate(&self) -> Result<()> {
        let mut seen = [false; 3];
        for &w in &self.world_axis {
            if w > 2 || seen[w] {
                return Err(DataError::Config(format!(
                    "axis layout {:?} is not a permutation of 0, 1, 2",
                    self.world_axis
                )));
            }
            seen[w] = true;
        }
        Ok(())
    }
}

/// Everything that distinguishes one site's images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStyle {
    /// Standard deviation of the image noise, HU (after the mild smoothing).
    pub noise_sigma: f64,
    /// Contrast phase.
    pub phase: ContrastPhase,
    /// Spacing relative to the size preset, along world `x, y, z`.
    pub spacing_scale: [f64; 3],
    /// Field of view relative to the size preset, along world `x, y, z`.
    pub fov_scale: [f64; 3],
    /// Added to every voxel, HU (scanner calibration).
    pub intensity_offset: f64,
    /// Order and direction of the stored axes.
    pub layout: AxisLayout,
}

impl SiteStyle {
    /// A neutral style: portal venous, RAS storage, the preset's grid, noise 15 HU.
    pub fn neutral() -> Self {
        SiteStyle {
            noise_sigma: 15.0,
            phase: ContrastPhase::PortalVenous,
            spacing_scale: [1.0; 3],
            fov_scale: [1.0; 3],
            intensity_offset: 0.0,
            layout: AxisLayout::RAS,
        }
    }
}

/// One rendered case: the image and the full ground truth.
#[derive(Debug, Clone)]
pub struct PhantomCase {
    /// CT image in HU, rounded to integers and clamped to `[-1024, 3071]`.
    pub image: Volume<f32>,
    /// Ground truth of every structure in BTCV numbering (see [`super::anatomy::btcv`]).
    pub labels: Volume<u8>,
    /// Tumour mask on the same grid (1 inside a tumour), the tumour's organ in `labels`.
    pub tumour: Volume<u8>,
}

/// The storage geometry for a size, style and scan centre (world mm).
pub fn site_geometry(size: &PhantomSize, style: &SiteStyle, centre: [f64; 3]) -> Geometry {
    let nominal_shape = size.shape();
    let nominal_spacing = size.spacing();
    let world_n: [usize; 3] = std::array::from_fn(|w| {
        let n = nominal_shape[w] as f64 * style.fov_scale[w] / style.spacing_scale[w];
        (n.round() as usize).max(2)
    });
    let world_h: [f64; 3] = std::array::from_fn(|w| nominal_spacing[w] * style.spacing_scale[w]);
    let mut affine = [[0.0; 4]; 4];
    affine[3][3] = 1.0;
    let mut shape = [0; 3];
    for a in 0..3 {
        let w = style.layout.world_axis[a];
        let sign = if style.layout.flip[a] { -1.0 } else { 1.0 };
        shape[a] = world_n[w];
        affine[w][a] = sign * world_h[w];
        // Voxel (n − 1) / 2 along this axis sits at the scan centre.
        affine[w][3] = centre[w] - sign * world_h[w] * (world_n[w] - 1) as f64 / 2.0;
    }
    Geometry { shape, affine }
}

/// Renders `subject` as `style` stores it, on a grid centred at `centre`; `rng` draws the
/// noise. Deterministic for a given rng state.
pub fn render_case(
    subject: &Subject,
    size: &PhantomSize,
    style: &SiteStyle,
    centre: [f64; 3],
    rng: &mut ChaCha8Rng,
) -> Result<PhantomCase> {
    size.validate()?;
    style.layout.validate()?;
    if !(style.noise_sigma >= 0.0 && style.noise_sigma.is_finite()) {
        return Err(DataError::Config(format!(
            "noise sigma must be finite and non-negative, got {}",
            style.noise_sigma
        )));
    }
    let geometry = site_geometry(size, style, centre);
    let [ni, nj, nk] = geometry.shape;
    let n = geometry.len();
    let mut hu = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut tumour = Vec::with_capacity(n);
    let a = &geometry.affine;
    for i in 0..ni {
        for j in 0..nj {
            for k in 0..nk {
                let idx = [i as f64, j as f64, k as f64];
                let p: [f64; 3] = std::array::from_fn(|r| {
                    a[r][0] * idx[0] + a[r][1] * idx[1] + a[r][2] * idx[2] + a[r][3]
                });
                let v = subject.sample(p);
                hu.push(subject.hu(v.tissue, p, style.phase));
                labels.push(v.label);
                tumour.push(u8::from(v.tumour));
            }
        }
    }
    // Noise is added before the mild smoothing, so it comes out spatially correlated like
    // CT noise; the [1, 2, 1]/4 kernel on three axes keeps sqrt(0.375³) of its σ.
    if style.noise_sigma > 0.0 {
        let sigma = style.noise_sigma / 0.375f64.powf(1.5);
        let normal = Normal::new(0.0, sigma)
            .map_err(|e| DataError::Config(format!("noise sigma {sigma}: {e}")))?;
        for v in hu.iter_mut() {
            *v += normal.sample(rng);
        }
    }
    smooth(&mut hu, geometry.shape);
    let offset = style.intensity_offset + rng.random_range(-4.0..=4.0);
    let data = hu
        .into_iter()
        .map(|v| (v + offset).round().clamp(-1024.0, 3071.0) as f32)
        .collect();
    Ok(PhantomCase {
        image: Volume {
            data,
            geometry: geometry.clone(),
        },
        labels: Volume {
            data: labels,
            geometry: geometry.clone(),
        },
        tumour: Volume {
            data: tumour,
            geometry,
        },
    })
}

/// Separable `[1, 2, 1] / 4` smoothing along each axis, edges clamped.
fn smooth(data: &mut [f64], shape: [usize; 3]) {
    let strides = [shape[1] * shape[2], shape[2], 1];
    let mut out = vec![0.0; data.len()];
    for axis in 0..3 {
        let (n, stride) = (shape[axis], strides[axis]);
        if n < 2 {
            continue;
        }
        for (c, o) in out.iter_mut().enumerate() {
            let pos = (c / stride) % n;
            let prev = if pos > 0 { c - stride } else { c };
            let next = if pos + 1 < n { c + stride } else { c };
            *o = 0.25 * data[prev] + 0.5 * data[c] + 0.25 * data[next];
        }
        data.copy_from_slice(&out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn geometry_follows_the_layout() {
        let size = PhantomSize::Custom {
            shape: [4, 6, 8],
            spacing: [1.0, 2.0, 3.0],
        };
        let style = SiteStyle {
            layout: AxisLayout::SLICE_FIRST,
            ..SiteStyle::neutral()
        };
        let g = site_geometry(&size, &style, [0.0; 3]);
        assert_eq!(g.shape, [8, 6, 4]);
        assert_eq!(g.spacing(), [3.0, 2.0, 1.0]);
        assert_eq!(g.affine[2][0], -3.0);
        assert_eq!(g.affine[0][2], -1.0);
        // The centre voxel maps to the scan centre.
        let c = (0..3)
            .map(|r| {
                g.affine[r][0] * 3.5 + g.affine[r][1] * 2.5 + g.affine[r][2] * 1.5 + g.affine[r][3]
            })
            .collect::<Vec<_>>();
        assert!(c.iter().all(|v| v.abs() < 1e-12), "{c:?}");
        let bad = AxisLayout {
            world_axis: [0, 0, 2],
            flip: [false; 3],
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn smoothing_keeps_constants_and_the_mean() {
        let mut d = vec![5.0; 24];
        smooth(&mut d, [2, 3, 4]);
        assert!(d.iter().all(|v| (v - 5.0).abs() < 1e-12));
        let mut spike = vec![0.0; 27];
        spike[13] = 1.0;
        smooth(&mut spike, [3, 3, 3]);
        assert!((spike[13] - 0.125).abs() < 1e-12);
        assert!((spike.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!("Tiny".parse::<PhantomSize>().unwrap(), PhantomSize::Tiny);
        assert!("huge".parse::<PhantomSize>().is_err());
        assert!(PhantomSize::Custom {
            shape: [0, 4, 4],
            spacing: [1.0; 3]
        }
        .validate()
        .is_err());
        let _ = ChaCha8Rng::seed_from_u64(0);
    }
}
