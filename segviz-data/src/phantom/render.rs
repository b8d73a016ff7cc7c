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

use super::anatomy::{ContrastPhase, Landmarks, MetalImplant, Subject, Tissue};
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

/// How far a scan reaches along the body, planned from anatomical landmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanRange {
    /// Diaphragm dome to below the kidneys (upper abdomen).
    Abdomen,
    /// Diaphragm dome to the femoral heads.
    AbdomenPelvis,
    /// Upper chest to the femoral heads (staging scans).
    ChestAbdomenPelvis,
}

/// A site's scanners and protocols: the ranges each case's [`Acquisition`] is drawn from.
/// This is the domain shift between hospitals that federated learning has to cope with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteStyle {
    /// Contrast phases and their relative frequencies.
    pub phases: Vec<(ContrastPhase, f64)>,
    /// Scan ranges and their relative frequencies.
    pub scan_ranges: Vec<(ScanRange, f64)>,
    /// In-plane field of view, mm (`[lo, hi]`; a body wider than it is cut off).
    pub fov_mm: [f64; 2],
    /// In-plane spacing relative to the size preset (`[lo, hi]`).
    pub inplane_spacing_scale: [f64; 2],
    /// Slice spacing relative to the size preset (`[lo, hi]`).
    pub slice_spacing_scale: [f64; 2],
    /// Image noise SD in HU for an average-sized patient and a voxel of the `small` preset's
    /// size (`[lo, hi]`); each case scales it by `sqrt(reference voxel / its voxel)`.
    pub noise_sigma: [f64; 2],
    /// Smoothing passes that shape the noise texture (`[lo, hi]`): 0 is a sharp kernel
    /// (fine, white-ish noise), 3 a soft kernel (blotchy noise).
    pub noise_kernel: [usize; 2],
    /// HU calibration offset of the site's scanners.
    pub intensity_offset: f64,
    /// Per-case calibration jitter, ± HU.
    pub offset_jitter: f64,
    /// How far the patient lies off the scanner's centre, ± mm.
    pub table_offset_mm: f64,
    /// Peak HU of metal streaks (0 where iterative or metal-artefact reduction hides them).
    pub streak_hu: f64,
    /// Order and direction of the stored axes.
    pub layout: AxisLayout,
}

impl SiteStyle {
    /// A neutral style: portal venous abdomen at the preset's grid, noise 15 HU, no offset,
    /// RAS storage.
    pub fn neutral() -> Self {
        SiteStyle {
            phases: vec![(ContrastPhase::PortalVenous, 1.0)],
            scan_ranges: vec![(ScanRange::Abdomen, 1.0)],
            fov_mm: [360.0, 360.0],
            inplane_spacing_scale: [1.0, 1.0],
            slice_spacing_scale: [1.0, 1.0],
            noise_sigma: [15.0, 15.0],
            noise_kernel: [1, 1],
            intensity_offset: 0.0,
            offset_jitter: 0.0,
            table_offset_mm: 0.0,
            streak_hu: 0.0,
            layout: AxisLayout::RAS,
        }
    }

    /// Errors on an empty or negative range or weight.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        let ranges = [
            ("fov_mm", self.fov_mm),
            ("inplane_spacing_scale", self.inplane_spacing_scale),
            ("slice_spacing_scale", self.slice_spacing_scale),
            ("noise_sigma", self.noise_sigma),
        ];
        for (name, [lo, hi]) in ranges {
            if !(lo.is_finite() && hi.is_finite() && lo <= hi && lo >= 0.0) {
                return Err(DataError::Config(format!(
                    "site style {name} must be a finite range lo <= hi with lo >= 0, got \
                     [{lo}, {hi}]"
                )));
            }
        }
        if self.fov_mm[0] <= 0.0
            || self.inplane_spacing_scale[0] <= 0.0
            || self.slice_spacing_scale[0] <= 0.0
        {
            return Err(DataError::Config(
                "site style field of view and spacings must be positive".into(),
            ));
        }
        if self.noise_kernel[0] > self.noise_kernel[1] || self.noise_kernel[1] > 8 {
            return Err(DataError::Config(format!(
                "site style noise_kernel must be a range within 0..=8, got {:?}",
                self.noise_kernel
            )));
        }
        let weights_ok = |w: &mut dyn Iterator<Item = f64>| {
            let w: Vec<f64> = w.collect();
            !w.is_empty()
                && w.iter().all(|v| v.is_finite() && *v >= 0.0)
                && w.iter().sum::<f64>() > 0.0
        };
        if !weights_ok(&mut self.phases.iter().map(|p| p.1))
            || !weights_ok(&mut self.scan_ranges.iter().map(|p| p.1))
        {
            return Err(DataError::Config(
                "site style phases and scan ranges need non-negative weights, not all zero".into(),
            ));
        }
        for v in [
            self.intensity_offset,
            self.offset_jitter,
            self.table_offset_mm,
            self.streak_hu,
        ] {
            if !v.is_finite() {
                return Err(DataError::Config(
                    "site style offsets must be finite".into(),
                ));
            }
        }
        Ok(())
    }

    /// Draws one case's acquisition for a subject with `landmarks`.
    pub fn draw<R: Rng>(
        &self,
        size: &PhantomSize,
        landmarks: &Landmarks,
        rng: &mut R,
    ) -> Acquisition {
        let pick = |rng: &mut R, weights: &mut dyn Iterator<Item = f64>| {
            let w: Vec<f64> = weights.collect();
            let mut x = rng.random_range(0.0..w.iter().sum::<f64>().max(f64::MIN_POSITIVE));
            for (i, v) in w.iter().enumerate() {
                if x < *v {
                    return i;
                }
                x -= v;
            }
            w.len() - 1
        };
        let range = |rng: &mut R, [lo, hi]: [f64; 2]| {
            if hi > lo {
                rng.random_range(lo..=hi)
            } else {
                lo
            }
        };
        let phase = self.phases[pick(rng, &mut self.phases.iter().map(|p| p.1))].0;
        let scan = self.scan_ranges[pick(rng, &mut self.scan_ranges.iter().map(|p| p.1))].0;
        let nominal = size.spacing();
        let inplane = nominal[0] * range(rng, self.inplane_spacing_scale);
        let dz = nominal[2] * range(rng, self.slice_spacing_scale);
        let fov = range(rng, self.fov_mm);
        let top = match scan {
            ScanRange::ChestAbdomenPelvis => {
                landmarks.diaphragm_top + rng.random_range(110.0..=190.0)
            }
            _ => landmarks.diaphragm_top + rng.random_range(5.0..=35.0),
        };
        let bottom = match scan {
            ScanRange::Abdomen => landmarks.kidney_bottom - rng.random_range(15.0..=70.0),
            _ => landmarks.femoral_heads - rng.random_range(0.0..=40.0),
        };
        let extent = (top - bottom).max(2.0 * dz);
        let n_xy = ((fov / inplane).round() as usize).max(2);
        let n_z = ((extent / dz).round() as usize).max(2);
        let table = |rng: &mut R| {
            if self.table_offset_mm > 0.0 {
                rng.random_range(-self.table_offset_mm..=self.table_offset_mm)
            } else {
                0.0
            }
        };
        let centre = [
            table(rng),
            landmarks.body_centre_y + table(rng),
            (top + bottom) / 2.0,
        ];
        // Larger patients are noisier (tube current modulation only partly compensates).
        let girth = (landmarks.body_semi_axes[0] + landmarks.body_semi_axes[1]) / 250.0;
        // Noise SD falls with the square root of the voxel volume (quantum noise), so the
        // style's SD is for a reference voxel of the `small` preset: thinner slices are
        // noisier, and the coarse `tiny` preset is far quieter.
        let reference = PhantomSize::Small.spacing().iter().product::<f64>();
        let voxel = inplane * inplane * dz;
        let dose = (reference / voxel).sqrt().clamp(0.1, 3.0);
        let noise_sigma = range(rng, self.noise_sigma) * girth.clamp(0.7, 1.6) * dose;
        let noise_kernel = rng.random_range(self.noise_kernel[0]..=self.noise_kernel[1]);
        let jitter = if self.offset_jitter > 0.0 {
            rng.random_range(-self.offset_jitter..=self.offset_jitter)
        } else {
            0.0
        };
        Acquisition {
            phase,
            scan_range: scan,
            spacing: [inplane, inplane, dz],
            shape: [n_xy, n_xy, n_z],
            centre,
            noise_sigma,
            noise_kernel,
            intensity_offset: self.intensity_offset + jitter,
            streak_hu: self.streak_hu,
            layout: self.layout,
        }
    }
}

/// One case's scan: what [`SiteStyle::draw`] chose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Acquisition {
    /// Contrast phase.
    pub phase: ContrastPhase,
    /// Scan range.
    pub scan_range: ScanRange,
    /// Spacing along world `x, y, z`, mm.
    pub spacing: [f64; 3],
    /// Voxels along world `x, y, z`.
    pub shape: [usize; 3],
    /// World point (mm) at the centre of the grid.
    pub centre: [f64; 3],
    /// Noise SD, HU.
    pub noise_sigma: f64,
    /// Smoothing passes that shape the noise (see [`SiteStyle::noise_kernel`]).
    pub noise_kernel: usize,
    /// Added to every voxel, HU.
    pub intensity_offset: f64,
    /// Peak HU of metal streaks.
    pub streak_hu: f64,
    /// Order and direction of the stored axes.
    pub layout: AxisLayout,
}

impl Acquisition {
    /// The preset's nominal grid centred at `centre`, portal venous, noise-free, RAS.
    pub fn nominal(size: &PhantomSize, centre: [f64; 3]) -> Self {
        Acquisition {
            phase: ContrastPhase::PortalVenous,
            scan_range: ScanRange::Abdomen,
            spacing: size.spacing(),
            shape: size.shape(),
            centre,
            noise_sigma: 0.0,
            noise_kernel: 1,
            intensity_offset: 0.0,
            streak_hu: 0.0,
            layout: AxisLayout::RAS,
        }
    }

    /// Errors on an unusable grid or noise.
    pub fn validate(&self) -> Result<()> {
        self.layout.validate()?;
        PhantomSize::Custom {
            shape: self.shape,
            spacing: self.spacing,
        }
        .validate()?;
        if !(self.noise_sigma >= 0.0 && self.noise_sigma.is_finite()) {
            return Err(DataError::Config(format!(
                "noise sigma must be finite and non-negative, got {}",
                self.noise_sigma
            )));
        }
        if self.noise_kernel > 8
            || !self.intensity_offset.is_finite()
            || !self.streak_hu.is_finite()
        {
            return Err(DataError::Config(format!(
                "acquisition needs a noise kernel within 0..=8 and finite offsets, got {self:?}"
            )));
        }
        Ok(())
    }

    /// The storage geometry.
    pub fn geometry(&self) -> Geometry {
        let mut affine = [[0.0; 4]; 4];
        affine[3][3] = 1.0;
        let mut shape = [0; 3];
        for a in 0..3 {
            let w = self.layout.world_axis[a];
            let sign = if self.layout.flip[a] { -1.0 } else { 1.0 };
            shape[a] = self.shape[w];
            affine[w][a] = sign * self.spacing[w];
            // Voxel (n − 1) / 2 along this axis sits at the scan centre.
            affine[w][3] =
                self.centre[w] - sign * self.spacing[w] * (self.shape[w] - 1) as f64 / 2.0;
        }
        Geometry { shape, affine }
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
    /// Body mask on the same grid (1 inside the body outline).
    pub body: Volume<u8>,
    /// How it was scanned.
    pub acquisition: Acquisition,
}

/// Renders `subject` as `acquisition` describes; `rng` draws the noise. Deterministic for a
/// given rng state.
///
/// The image is the tissue HU at each voxel centre, blurred by a `[1, 2, 1]` kernel per axis
/// (the scanner's resolution: it mixes fat into organ edges like partial volume), plus noise
/// shaped by the reconstruction kernel, metal streaks and the calibration offset.
pub fn render_case(
    subject: &Subject,
    acquisition: &Acquisition,
    rng: &mut ChaCha8Rng,
) -> Result<PhantomCase> {
    acquisition.validate()?;
    let geometry = acquisition.geometry();
    let [ni, nj, nk] = geometry.shape;
    let n = geometry.len();
    let mut hu = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    let mut tumour = Vec::with_capacity(n);
    let mut body = Vec::with_capacity(n);
    let a = &geometry.affine;
    for i in 0..ni {
        for j in 0..nj {
            for k in 0..nk {
                let idx = [i as f64, j as f64, k as f64];
                let p: [f64; 3] = std::array::from_fn(|r| {
                    a[r][0] * idx[0] + a[r][1] * idx[1] + a[r][2] * idx[2] + a[r][3]
                });
                let v = subject.sample(p);
                hu.push(subject.hu(v.tissue, p, acquisition.phase));
                labels.push(v.label);
                tumour.push(u8::from(v.tumour));
                body.push(u8::from(v.tissue != Tissue::Air));
            }
        }
    }
    smooth(&mut hu, geometry.shape, 1);
    if let Some(metal) = subject.metal() {
        add_streaks(&mut hu, &geometry, metal, acquisition.streak_hu, rng);
    }
    if acquisition.noise_sigma > 0.0 {
        let normal =
            Normal::new(0.0, 1.0).map_err(|e| DataError::Config(format!("unit normal: {e}")))?;
        let mut noise: Vec<f64> = (0..n).map(|_| normal.sample(rng)).collect();
        smooth_in_plane(&mut noise, &geometry, acquisition.noise_kernel);
        // Each [1, 2, 1] / 4 pass along an axis keeps C(4p, 2p) / 16^p of the variance.
        let kept = binomial_variance(acquisition.noise_kernel).powi(2);
        let scale = acquisition.noise_sigma / kept.sqrt();
        for (v, e) in hu.iter_mut().zip(&noise) {
            *v += scale * e;
        }
    }
    let offset = acquisition.intensity_offset;
    let data = hu
        .into_iter()
        .map(|v| (v + offset).round().clamp(-1024.0, 3071.0) as f32)
        .collect();
    let volume = |data| Volume {
        data,
        geometry: geometry.clone(),
    };
    Ok(PhantomCase {
        image: Volume {
            data,
            geometry: geometry.clone(),
        },
        labels: volume(labels),
        tumour: volume(tumour),
        body: volume(body),
        acquisition: acquisition.clone(),
    })
}

/// Fraction of white-noise variance kept by `passes` `[1, 2, 1] / 4` passes along one axis.
fn binomial_variance(passes: usize) -> f64 {
    // The kernel is the binomial row 2p over 4^p; the sum of its squares is C(4p, 2p) / 16^p.
    let p = passes as u32;
    let mut c = 1.0f64;
    for i in 0..(2 * p) {
        c = c * f64::from(4 * p - i) / f64::from(i + 1);
    }
    c / 16f64.powi(p as i32)
}

/// Metal streaks: alternating bright and dark rays from the implant across the slices it
/// lies in, fading with distance (photon starvation and beam hardening).
fn add_streaks(
    hu: &mut [f64],
    geometry: &Geometry,
    metal: &MetalImplant,
    peak: f64,
    rng: &mut ChaCha8Rng,
) {
    if peak <= 0.0 {
        return;
    }
    let rays = rng.random_range(3..=7) as f64;
    let phase = rng.random_range(0.0..std::f64::consts::TAU);
    let [ni, nj, nk] = geometry.shape;
    let a = &geometry.affine;
    let mut c = 0;
    for i in 0..ni {
        for j in 0..nj {
            for k in 0..nk {
                let idx = [i as f64, j as f64, k as f64];
                let p: [f64; 3] = std::array::from_fn(|r| {
                    a[r][0] * idx[0] + a[r][1] * idx[1] + a[r][2] * idx[2] + a[r][3]
                });
                let dz = (p[2] - metal.centre[2]).abs() - metal.half_length;
                if dz < 0.0 {
                    let (dx, dy) = (p[0] - metal.centre[0], p[1] - metal.centre[1]);
                    let r = (dx * dx + dy * dy).sqrt();
                    let theta = dy.atan2(dx);
                    let ray = (rays * theta + phase).cos();
                    hu[c] += peak * ray.powi(9) * (-r / 90.0).exp();
                }
                c += 1;
            }
        }
    }
}

/// `passes` separable `[1, 2, 1] / 4` smoothings along every axis, edges clamped.
fn smooth(data: &mut [f64], shape: [usize; 3], passes: usize) {
    for _ in 0..passes {
        for axis in 0..3 {
            smooth_axis(data, shape, axis);
        }
    }
}

/// `passes` `[1, 2, 1] / 4` smoothings along the two in-plane (world x and y) axes.
fn smooth_in_plane(data: &mut [f64], geometry: &Geometry, passes: usize) {
    for _ in 0..passes {
        for axis in 0..3 {
            // A stored axis is in-plane unless it runs along world z.
            let along_z = (0..3).all(|w| w == 2 || geometry.affine[w][axis] == 0.0);
            if !along_z {
                smooth_axis(data, geometry.shape, axis);
            }
        }
    }
}

fn smooth_axis(data: &mut [f64], shape: [usize; 3], axis: usize) {
    let strides = [shape[1] * shape[2], shape[2], 1];
    let (n, stride) = (shape[axis], strides[axis]);
    if n < 2 {
        return;
    }
    let out: Vec<f64> = (0..data.len())
        .map(|c| {
            let pos = (c / stride) % n;
            let prev = if pos > 0 { c - stride } else { c };
            let next = if pos + 1 < n { c + stride } else { c };
            0.25 * data[prev] + 0.5 * data[c] + 0.25 * data[next]
        })
        .collect();
    data.copy_from_slice(&out);
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
        let acquisition = Acquisition {
            layout: AxisLayout::SLICE_FIRST,
            ..Acquisition::nominal(&size, [0.0; 3])
        };
        let g = acquisition.geometry();
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
        smooth(&mut d, [2, 3, 4], 1);
        assert!(d.iter().all(|v| (v - 5.0).abs() < 1e-12));
        let mut spike = vec![0.0; 27];
        spike[13] = 1.0;
        smooth(&mut spike, [3, 3, 3], 1);
        assert!((spike[13] - 0.125).abs() < 1e-12);
        assert!((spike.iter().sum::<f64>() - 1.0).abs() < 1e-12);
    }

    #[test]
    fn noise_kernel_variance_matches_the_kernel() {
        for passes in 0..5 {
            // Convolve a spike `passes` times with [1, 2, 1] / 4 and sum the squares.
            let mut k = vec![1.0];
            for _ in 0..passes {
                let mut next = vec![0.0; k.len() + 2];
                for (i, v) in k.iter().enumerate() {
                    next[i] += 0.25 * v;
                    next[i + 1] += 0.5 * v;
                    next[i + 2] += 0.25 * v;
                }
                k = next;
            }
            let expected: f64 = k.iter().map(|v| v * v).sum();
            assert!(
                (binomial_variance(passes) - expected).abs() < 1e-12,
                "{passes}"
            );
        }
        assert!((binomial_variance(1) - 0.375).abs() < 1e-12);
    }

    #[test]
    fn drawn_acquisitions_stay_in_the_style_ranges() {
        let style = SiteStyle {
            phases: vec![
                (ContrastPhase::Native, 1.0),
                (ContrastPhase::Delayed, 0.0),
                (ContrastPhase::LateArterial, 1.0),
            ],
            scan_ranges: vec![
                (ScanRange::Abdomen, 1.0),
                (ScanRange::ChestAbdomenPelvis, 1.0),
            ],
            fov_mm: [300.0, 450.0],
            slice_spacing_scale: [0.5, 2.0],
            noise_sigma: [10.0, 20.0],
            noise_kernel: [0, 3],
            ..SiteStyle::neutral()
        };
        style.validate().unwrap();
        let landmarks = Landmarks {
            diaphragm_top: 110.0,
            kidney_bottom: -90.0,
            femoral_heads: -330.0,
            body_semi_axes: [150.0, 100.0],
            body_centre_y: 5.0,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut phases = std::collections::BTreeSet::new();
        let mut extents = Vec::new();
        for _ in 0..40 {
            let a = style.draw(&PhantomSize::Small, &landmarks, &mut rng);
            a.validate().unwrap();
            phases.insert(a.phase.name());
            let fov = a.shape[0] as f64 * a.spacing[0];
            assert!((295.0..=455.0).contains(&fov), "{fov}");
            assert!((2.5..=10.0).contains(&a.spacing[2]), "{:?}", a.spacing);
            assert!((0..=3).contains(&a.noise_kernel));
            extents.push(a.shape[2] as f64 * a.spacing[2]);
        }
        assert_eq!(
            phases.into_iter().collect::<Vec<_>>(),
            ["late_arterial", "native"]
        );
        let (lo, hi) = extents
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), &e| (l.min(e), h.max(e)));
        assert!(lo < 320.0 && hi > 550.0, "scan extents {lo}..{hi} mm");
        let bad = SiteStyle {
            phases: vec![],
            ..SiteStyle::neutral()
        };
        assert!(bad.validate().is_err());
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
    }
}
