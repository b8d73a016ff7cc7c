//! Resampling a volume onto another voxel grid: to a new spacing (MONAI `Spacing`), to a
//! new shape (MONAI `Resize`), or onto any target [`Geometry`].
//!
//! Every target voxel centre is mapped to world coordinates and back into the source's voxel
//! indices, so the physical position of the content never moves; only the grid changes.

use rayon::prelude::*;

use crate::affine;
use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// Source index of target voxel `[0, 0, 0]` and the source steps of one target step along
/// each target axis (`target → source` in voxel units).
struct IndexMap {
    m: affine::Affine,
}

impl IndexMap {
    fn new(source: &Geometry, target: &Geometry) -> Result<Self> {
        let inverse = affine::invert(&source.affine).ok_or_else(|| {
            DataError::Config(format!(
                "cannot resample from a singular affine {:?}",
                source.affine
            ))
        })?;
        Ok(IndexMap {
            m: affine::multiply(&inverse, &target.affine),
        })
    }

    #[inline]
    fn source(&self, o: [usize; 3]) -> [f64; 3] {
        affine::apply(&self.m, o.map(|x| x as f64))
    }

    /// When target axis `a` maps onto source axis `a` alone (a spacing change or a resize,
    /// whatever the orientation: the grids share their axes), the source index along each
    /// axis as a function of the target index along it; `None` for a rotated or permuted
    /// grid.
    fn per_axis(&self, target: [usize; 3]) -> Option<[Vec<f64>; 3]> {
        let scale = (0..3).map(|a| self.m[a][a].abs()).fold(0.0, f64::max);
        let aligned =
            (0..3).all(|r| (0..3).all(|c| r == c || self.m[r][c].abs() <= 1e-12 * scale.max(1.0)));
        aligned.then(|| {
            [0, 1, 2].map(|a| {
                (0..target[a])
                    .map(|o| self.m[a][a] * o as f64 + self.m[a][3])
                    .collect()
            })
        })
    }
}

/// Along one axis: the two source indices, the weight of the upper one, and whether the
/// position lies within the source (as [`inside`] and [`trilinear_at`] decide per axis).
#[derive(Clone, Copy)]
struct Tap {
    lo: usize,
    hi: usize,
    t: f64,
    inside: bool,
}

impl Tap {
    fn new(p: f64, n: usize) -> Tap {
        let max = (n - 1) as f64;
        let x = p.clamp(0.0, max);
        let lo = (x.floor() as usize).min(n.saturating_sub(2));
        Tap {
            lo,
            hi: (lo + 1).min(n - 1),
            t: if n > 1 { x - lo as f64 } else { 0.0 },
            inside: p >= -0.5 - 1e-6 && p <= n as f64 - 0.5 + 1e-6,
        }
    }

    /// The nearest source index.
    fn nearest(p: f64, n: usize) -> usize {
        (p.round().max(0.0) as usize).min(n - 1)
    }
}

/// Whether a continuous source index lies within the source's voxel boxes
/// (`-0.5 ..= n - 0.5` on every axis, with a small tolerance for rounding).
#[inline]
pub(crate) fn inside(p: [f64; 3], shape: [usize; 3]) -> bool {
    (0..3).all(|a| p[a] >= -0.5 - 1e-6 && p[a] <= shape[a] as f64 - 0.5 + 1e-6)
}

/// Resamples any volume onto `target` by nearest neighbour; voxels outside the source get
/// `fill`.
///
/// # Errors
/// [`DataError::Config`] if the source affine is singular.
pub fn resample_nearest<T: Copy + Send + Sync>(
    volume: &Volume<T>,
    target: &Geometry,
    fill: T,
) -> Result<Volume<T>> {
    let map = IndexMap::new(&volume.geometry, target)?;
    let shape = volume.geometry.shape;
    if let Some(axes) = map.per_axis(target.shape) {
        // Each axis' nearest index computed once: `None` outside the source.
        let near = [0, 1, 2].map(|a| {
            axes[a]
                .iter()
                .map(|&p| {
                    Tap::new(p, shape[a])
                        .inside
                        .then(|| Tap::nearest(p, shape[a]))
                })
                .collect::<Vec<_>>()
        });
        // Target slices `i` in parallel, each written in order.
        let mut data = vec![fill; target.len()];
        let slice = target.shape[1] * target.shape[2];
        data.par_chunks_mut(slice.max(1))
            .zip(near[0].par_iter())
            .for_each(|(out, i)| {
                let Some(i) = i else { return };
                for (row, j) in out.chunks_exact_mut(target.shape[2]).zip(&near[1]) {
                    let Some(j) = j else { continue };
                    let src = &volume.data[volume.geometry.index(*i, *j, 0)..];
                    for (value, k) in row.iter_mut().zip(&near[2]) {
                        if let Some(k) = k {
                            *value = src[*k];
                        }
                    }
                }
            });
        return Ok(Volume {
            data,
            geometry: target.clone(),
        });
    }
    let mut data = Vec::with_capacity(target.len());
    for o0 in 0..target.shape[0] {
        for o1 in 0..target.shape[1] {
            for o2 in 0..target.shape[2] {
                let p = map.source([o0, o1, o2]);
                if inside(p, shape) {
                    let s = [0, 1, 2].map(|a| Tap::nearest(p[a], shape[a]));
                    data.push(volume.data[volume.geometry.index(s[0], s[1], s[2])]);
                } else {
                    data.push(fill);
                }
            }
        }
    }
    Ok(Volume {
        data,
        geometry: target.clone(),
    })
}

/// Resamples an image onto `target` by trilinear interpolation; voxels outside the source
/// get `fill`, voxels within half a voxel of its border take the border value.
///
/// # Errors
/// [`DataError::Config`] if the source affine is singular.
pub fn resample_trilinear(
    volume: &Volume<f32>,
    target: &Geometry,
    fill: f32,
) -> Result<Volume<f32>> {
    let map = IndexMap::new(&volume.geometry, target)?;
    let shape = volume.geometry.shape;
    if let Some(axes) = map.per_axis(target.shape) {
        // Trilinear weights as in `trilinear_at`, with each axis' taps computed once and
        // the (i, j) rows of the source and their weights once per target (i, j).
        let taps = [0, 1, 2].map(|a| {
            axes[a]
                .iter()
                .map(|&p| Tap::new(p, shape[a]))
                .collect::<Vec<_>>()
        });
        let src = &volume.data;
        // Target slices `i` in parallel; every value is computed as it would be in order.
        let mut data = vec![fill; target.len()];
        let slice = target.shape[1] * target.shape[2];
        data.par_chunks_mut(slice.max(1))
            .zip(taps[0].par_iter())
            .for_each(|(out, a)| {
                if !a.inside {
                    return;
                }
                let mut rows: Vec<(usize, f64)> = Vec::with_capacity(4);
                for (line, b) in out.chunks_exact_mut(target.shape[2]).zip(&taps[1]) {
                    if !b.inside {
                        continue;
                    }
                    rows.clear();
                    for (i, w0) in [(a.lo, 1.0 - a.t), (a.hi, a.t)] {
                        for (j, w1) in [(b.lo, 1.0 - b.t), (b.hi, b.t)] {
                            if w0 != 0.0 && w1 != 0.0 {
                                rows.push(((i * shape[1] + j) * shape[2], w0 * w1));
                            }
                        }
                    }
                    for (value, c) in line.iter_mut().zip(&taps[2]) {
                        if !c.inside {
                            continue;
                        }
                        let (lo, hi, t) = (c.lo, c.hi, c.t);
                        let sum: f64 = rows
                            .iter()
                            .map(|&(row, w)| {
                                let low = if t == 1.0 {
                                    0.0
                                } else {
                                    (1.0 - t) * src[row + lo] as f64
                                };
                                let high = if t == 0.0 {
                                    0.0
                                } else {
                                    t * src[row + hi] as f64
                                };
                                w * (low + high)
                            })
                            .sum();
                        *value = sum as f32;
                    }
                }
            });
        return Ok(Volume {
            data,
            geometry: target.clone(),
        });
    }
    let mut data = Vec::with_capacity(target.len());
    for o0 in 0..target.shape[0] {
        for o1 in 0..target.shape[1] {
            for o2 in 0..target.shape[2] {
                let p = map.source([o0, o1, o2]);
                if inside(p, shape) {
                    data.push(trilinear_at(&volume.data, shape, p));
                } else {
                    data.push(fill);
                }
            }
        }
    }
    Ok(Volume {
        data,
        geometry: target.clone(),
    })
}

/// Trilinear value at continuous index `p` of a C-order grid of `shape`, with `p` clamped
/// into the grid (every side of `shape` must be at least 1).
#[inline]
pub(crate) fn trilinear_at(data: &[f32], shape: [usize; 3], p: [f64; 3]) -> f32 {
    let mut lo = [0usize; 3];
    let mut t = [0.0f64; 3];
    for a in 0..3 {
        let max = (shape[a] - 1) as f64;
        let x = p[a].clamp(0.0, max);
        let base = (x.floor() as usize).min(shape[a].saturating_sub(2));
        lo[a] = base;
        t[a] = if shape[a] > 1 { x - base as f64 } else { 0.0 };
    }
    let hi = [0, 1, 2].map(|a| (lo[a] + 1).min(shape[a] - 1));
    let mut value = 0.0f64;
    for (c, w0) in [(lo[0], 1.0 - t[0]), (hi[0], t[0])] {
        if w0 == 0.0 {
            continue;
        }
        for (d, w1) in [(lo[1], 1.0 - t[1]), (hi[1], t[1])] {
            if w1 == 0.0 {
                continue;
            }
            for (e, w2) in [(lo[2], 1.0 - t[2]), (hi[2], t[2])] {
                if w2 == 0.0 {
                    continue;
                }
                value += w0 * w1 * w2 * data[(c * shape[1] + d) * shape[2] + e] as f64;
            }
        }
    }
    value as f32
}

/// The grid with voxel spacing `pixdim` (mm) covering the same physical extent as
/// `geometry`, centred on the same point, with the same axis directions.
///
/// Each side becomes `max(1, round(n · spacing / pixdim))` voxels.
///
/// # Errors
/// [`DataError::Config`] if a `pixdim` entry is not a positive finite number.
pub fn spacing_geometry(geometry: &Geometry, pixdim: [f64; 3]) -> Result<Geometry> {
    if pixdim.iter().any(|p| !p.is_finite() || *p <= 0.0) {
        return Err(DataError::Config(format!(
            "pixdim must be positive, got {pixdim:?}"
        )));
    }
    let spacing = geometry.spacing();
    let mut shape = [1usize; 3];
    let mut scale = [1.0f64; 3];
    for a in 0..3 {
        let extent = geometry.shape[a] as f64 * spacing[a];
        shape[a] = ((extent / pixdim[a]).round() as usize).max(1);
        scale[a] = if spacing[a] > 0.0 {
            pixdim[a] / spacing[a]
        } else {
            1.0
        };
    }
    Ok(rescaled_grid(geometry, shape, scale))
}

/// The grid with `shape` voxels covering exactly the same box as `geometry` (voxel edges
/// aligned, as MONAI `Resize` / `torch.nn.functional.interpolate` without `align_corners`).
///
/// # Errors
/// [`DataError::Config`] if a side of `shape` is zero.
pub fn resize_geometry(geometry: &Geometry, shape: [usize; 3]) -> Result<Geometry> {
    if shape.contains(&0) {
        return Err(DataError::Config(format!(
            "resize target must have no zero side, got {shape:?}"
        )));
    }
    let scale = [0, 1, 2].map(|a| geometry.shape[a] as f64 / shape[a] as f64);
    Ok(rescaled_grid(geometry, shape, scale))
}

/// A grid whose columns are the source's scaled by `scale`, with `shape` voxels, centred on
/// the source's centre.
fn rescaled_grid(geometry: &Geometry, shape: [usize; 3], scale: [f64; 3]) -> Geometry {
    let centre_index = geometry.shape.map(|n| (n as f64 - 1.0) / 2.0);
    let centre = affine::apply(&geometry.affine, centre_index);
    let mut out = affine::identity();
    for r in 0..3 {
        for c in 0..3 {
            out[r][c] = geometry.affine[r][c] * scale[c];
        }
        out[r][3] = centre[r]
            - (0..3)
                .map(|c| out[r][c] * (shape[c] as f64 - 1.0) / 2.0)
                .sum::<f64>();
    }
    Geometry { shape, affine: out }
}

/// Resamples an image to voxel spacing `pixdim` (trilinear), keeping its physical extent.
///
/// # Errors
/// [`DataError::Config`] for a bad `pixdim` or a singular affine.
pub fn resample_image_to_spacing(volume: &Volume<f32>, pixdim: [f64; 3]) -> Result<Volume<f32>> {
    let target = spacing_geometry(&volume.geometry, pixdim)?;
    resample_trilinear(volume, &target, 0.0)
}

/// Resamples a label map to voxel spacing `pixdim` (nearest), keeping its physical extent.
///
/// # Errors
/// [`DataError::Config`] for a bad `pixdim` or a singular affine.
pub fn resample_labels_to_spacing(labels: &Volume<u8>, pixdim: [f64; 3]) -> Result<Volume<u8>> {
    let target = spacing_geometry(&labels.geometry, pixdim)?;
    resample_nearest(labels, &target, 0)
}

/// Resizes an image to `shape` voxels (trilinear) over the same physical box.
///
/// # Errors
/// [`DataError::Config`] for a zero side or a singular affine.
pub fn resize_image(volume: &Volume<f32>, shape: [usize; 3]) -> Result<Volume<f32>> {
    let target = resize_geometry(&volume.geometry, shape)?;
    resample_trilinear(volume, &target, 0.0)
}

/// Resizes a label map to `shape` voxels (nearest) over the same physical box.
///
/// # Errors
/// [`DataError::Config`] for a zero side or a singular affine.
pub fn resize_labels(labels: &Volume<u8>, shape: [usize; 3]) -> Result<Volume<u8>> {
    let target = resize_geometry(&labels.geometry, shape)?;
    resample_nearest(labels, &target, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ball of `radius` mm centred in a 32³ grid of 1 mm voxels (label 1 inside).
    fn ball(radius: f64) -> Volume<u8> {
        let geometry = Geometry::from_spacing([32, 32, 32], [1.0, 1.0, 1.0]);
        let mut data = Vec::new();
        for i in 0..32 {
            for j in 0..32 {
                for k in 0..32 {
                    let d2 = [i, j, k]
                        .iter()
                        .map(|&x| (x as f64 - 15.5).powi(2))
                        .sum::<f64>();
                    data.push(u8::from(d2 <= radius * radius));
                }
            }
        }
        Volume { data, geometry }
    }

    fn voxel_volume(g: &Geometry) -> f64 {
        g.spacing().iter().product()
    }

    #[test]
    fn resampling_a_ball_keeps_its_volume_in_cubic_millimetres() {
        let radius = 10.0f64;
        let expected = 4.0 / 3.0 * std::f64::consts::PI * radius.powi(3);
        let labels = ball(radius);
        let resampled = resample_labels_to_spacing(&labels, [1.5, 1.5, 2.0]).expect("resample");
        assert_eq!(resampled.geometry.shape, [21, 21, 16]);
        let count = resampled.data.iter().filter(|&&v| v == 1).count() as f64;
        let mm3 = count * voxel_volume(&resampled.geometry);
        assert!(
            (mm3 / expected - 1.0).abs() < 0.05,
            "labels: {mm3} vs {expected}"
        );

        let image = Volume {
            data: labels.data.iter().map(|&v| v as f32).collect(),
            geometry: labels.geometry.clone(),
        };
        let resampled = resample_image_to_spacing(&image, [1.5, 1.5, 2.0]).expect("resample");
        let mass: f64 = resampled.data.iter().map(|&v| v as f64).sum::<f64>()
            * voxel_volume(&resampled.geometry);
        assert!(
            (mass / expected - 1.0).abs() < 0.05,
            "image: {mass} vs {expected}"
        );
    }

    #[test]
    fn resampling_keeps_the_centre_of_the_field_of_view() {
        let g = Geometry {
            shape: [20, 10, 7],
            affine: [
                [0.0, -0.7, 0.0, 50.0],
                [0.9, 0.0, 0.0, -20.0],
                [0.0, 0.0, 3.0, 7.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let t = spacing_geometry(&g, [1.5, 1.5, 2.0]).expect("geometry");
        let c0 = affine::apply(&g.affine, g.shape.map(|n| (n as f64 - 1.0) / 2.0));
        let c1 = affine::apply(&t.affine, t.shape.map(|n| (n as f64 - 1.0) / 2.0));
        for d in 0..3 {
            assert!((c0[d] - c1[d]).abs() < 1e-9);
        }
        let s = t.spacing();
        assert!(
            (s[0] - 1.5).abs() < 1e-12 && (s[1] - 1.5).abs() < 1e-12 && (s[2] - 2.0).abs() < 1e-12
        );
        assert_eq!(t.shape, [12, 5, 11]);
    }

    #[test]
    fn trilinear_reproduces_a_linear_ramp() {
        let g = Geometry::from_spacing([8, 8, 8], [2.0, 2.0, 2.0]);
        let mut data = Vec::new();
        for i in 0..8 {
            for j in 0..8 {
                for k in 0..8 {
                    data.push((i + 2 * j + 3 * k) as f32);
                }
            }
        }
        let v = Volume { data, geometry: g };
        let r = resample_image_to_spacing(&v, [1.0, 1.0, 1.0]).expect("resample");
        assert_eq!(r.geometry.shape, [16, 16, 16]);
        // Interior voxels (away from the clamped half-voxel border) are exactly linear.
        for i in 2..14 {
            for j in 2..14 {
                for k in 2..14 {
                    let world = affine::apply(&r.geometry.affine, [i as f64, j as f64, k as f64]);
                    let expected = (world[0] + 2.0 * world[1] + 3.0 * world[2]) / 2.0;
                    assert!((r.at(i, j, k) as f64 - expected).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn nearest_never_invents_labels_and_resize_keeps_the_box() {
        let mut labels = ball(8.0);
        for v in labels.data.iter_mut().step_by(7) {
            if *v == 1 {
                *v = 3;
            }
        }
        let r = resize_labels(&labels, [13, 17, 9]).expect("resize");
        assert!(r.data.iter().all(|v| [0, 1, 3].contains(v)));
        // Box corners: the first voxel's outer corner is at -0.5 in both grids.
        let corner = |g: &Geometry| affine::apply(&g.affine, [-0.5, -0.5, -0.5]);
        let (a, b) = (corner(&labels.geometry), corner(&r.geometry));
        for d in 0..3 {
            assert!((a[d] - b[d]).abs() < 1e-9);
        }
    }

    #[test]
    fn bad_parameters_are_errors() {
        let v = ball(3.0);
        assert!(resample_labels_to_spacing(&v, [0.0, 1.0, 1.0]).is_err());
        assert!(resize_labels(&v, [0, 4, 4]).is_err());
        let mut singular = v.clone();
        singular.geometry.affine[1][1] = 0.0;
        assert!(resample_nearest(&singular, &v.geometry, 0).is_err());
    }

    #[test]
    fn the_per_axis_fast_path_equals_the_voxel_by_voxel_map() {
        // An oblique, anisotropic grid: spacing changes keep its axes, so the fast path runs.
        let geometry = Geometry {
            shape: [13, 9, 7],
            affine: [
                [0.0, -0.7, 0.1, 50.0],
                [0.9, 0.0, 0.0, -20.0],
                [0.0, 0.05, 3.0, 7.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let data: Vec<f32> = (0..geometry.len())
            .map(|n| ((n * 7919) % 1013) as f32 - 500.0)
            .collect();
        let image = Volume {
            data,
            geometry: geometry.clone(),
        };
        let labels = Volume {
            data: image
                .data
                .iter()
                .map(|&v| (v.abs() as u32 % 5) as u8)
                .collect(),
            geometry: geometry.clone(),
        };
        for target in [
            spacing_geometry(&geometry, [0.5, 1.3, 2.2]).unwrap(),
            resize_geometry(&geometry, [5, 17, 4]).unwrap(),
        ] {
            let map = IndexMap::new(&geometry, &target).unwrap();
            assert!(map.per_axis(target.shape).is_some());
            let fast = resample_trilinear(&image, &target, -7.0).unwrap();
            let fast_labels = resample_nearest(&labels, &target, 9).unwrap();
            let mut n = 0;
            for o0 in 0..target.shape[0] {
                for o1 in 0..target.shape[1] {
                    for o2 in 0..target.shape[2] {
                        let p = map.source([o0, o1, o2]);
                        let (value, label) = if inside(p, geometry.shape) {
                            let s = [0, 1, 2].map(|a| Tap::nearest(p[a], geometry.shape[a]));
                            (
                                trilinear_at(&image.data, geometry.shape, p),
                                labels.data[geometry.index(s[0], s[1], s[2])],
                            )
                        } else {
                            (-7.0, 9)
                        };
                        assert!((fast.data[n] - value).abs() <= 1e-4, "{o0} {o1} {o2}");
                        assert_eq!(fast_labels.data[n], label, "{o0} {o1} {o2}");
                        n += 1;
                    }
                }
            }
        }
        // A rotated target is not axis-aligned with the source: the general path.
        let mut rotated = geometry.clone();
        rotated.affine[0][0] = 0.3;
        assert!(IndexMap::new(&geometry, &rotated)
            .unwrap()
            .per_axis(rotated.shape)
            .is_none());
    }
}
