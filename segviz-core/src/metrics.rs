//! Evaluation metrics on label maps: Dice per organ per volume and the 95 % Hausdorff
//! distance in millimetres.
//!
//! Both work on host label maps in C order with their `shape` (and voxel `spacing` for
//! distances), so they apply equally to predictions and to ground truth read from disk.

/// Dice coefficient of one label: `2|A∩B| / (|A| + |B|)` where `A` are the voxels predicted
/// as `label` and `B` the voxels that are `label` in the truth.
///
/// Empty cases are defined, not NaN: both empty → `1.0` (the organ is rightly absent);
/// exactly one empty → `0.0`.
///
/// # Panics
/// If the two maps have different lengths (a programmer error).
pub fn dice(prediction: &[u8], truth: &[u8], label: u8) -> f64 {
    assert_eq!(
        prediction.len(),
        truth.len(),
        "label maps of equal size expected"
    );
    let (mut both, mut a, mut b) = (0usize, 0usize, 0usize);
    for (&p, &t) in prediction.iter().zip(truth) {
        let (p, t) = (p == label, t == label);
        a += p as usize;
        b += t as usize;
        both += (p && t) as usize;
    }
    if a + b == 0 {
        1.0
    } else {
        2.0 * both as f64 / (a + b) as f64
    }
}

/// 95 % Hausdorff distance (mm) between the voxels of `label` in two maps, MONAI's
/// definition: the surface voxels of each mask, the distance of each to the nearest surface
/// voxel of the other, the 95th percentile (linear interpolation) of each direction, and
/// the larger of the two.
///
/// Returns `None` when either mask is empty (the distance is undefined).
///
/// # Panics
/// If a map's length differs from `shape`'s product (a programmer error).
pub fn hausdorff95(
    prediction: &[u8],
    truth: &[u8],
    label: u8,
    shape: [usize; 3],
    spacing: [f64; 3],
) -> Option<f64> {
    let n: usize = shape.iter().product();
    assert_eq!(prediction.len(), n, "prediction does not match shape");
    assert_eq!(truth.len(), n, "truth does not match shape");
    let a: Vec<bool> = prediction.iter().map(|&v| v == label).collect();
    let b: Vec<bool> = truth.iter().map(|&v| v == label).collect();
    if !a.contains(&true) || !b.contains(&true) {
        return None;
    }
    let surface_a = surface(&a, shape);
    let surface_b = surface(&b, shape);
    let to_b = distance_to(&surface_b, shape, spacing);
    let to_a = distance_to(&surface_a, shape, spacing);
    let mut d_ab: Vec<f64> = (0..n).filter(|&i| surface_a[i]).map(|i| to_b[i]).collect();
    let mut d_ba: Vec<f64> = (0..n).filter(|&i| surface_b[i]).map(|i| to_a[i]).collect();
    Some(percentile(&mut d_ab, 95.0).max(percentile(&mut d_ba, 95.0)))
}

/// Mask voxels with at least one 6-neighbour outside the mask (the volume's outside counts
/// as outside).
fn surface(mask: &[bool], shape: [usize; 3]) -> Vec<bool> {
    let [ni, nj, nk] = shape;
    let idx = |i: usize, j: usize, k: usize| (i * nj + j) * nk + k;
    let mut out = vec![false; mask.len()];
    for i in 0..ni {
        for j in 0..nj {
            for k in 0..nk {
                if !mask[idx(i, j, k)] {
                    continue;
                }
                let outside = |di: isize, dj: isize, dk: isize| {
                    let (x, y, z) = (i as isize + di, j as isize + dj, k as isize + dk);
                    if x < 0 || y < 0 || z < 0 {
                        return true;
                    }
                    let (x, y, z) = (x as usize, y as usize, z as usize);
                    x >= ni || y >= nj || z >= nk || !mask[idx(x, y, z)]
                };
                out[idx(i, j, k)] = outside(-1, 0, 0)
                    || outside(1, 0, 0)
                    || outside(0, -1, 0)
                    || outside(0, 1, 0)
                    || outside(0, 0, -1)
                    || outside(0, 0, 1);
            }
        }
    }
    out
}

/// Euclidean distance (mm) from every voxel to the nearest `true` voxel, by the exact
/// separable squared-distance transform of Felzenszwalb & Huttenlocher, one axis at a time
/// with that axis's spacing.
fn distance_to(targets: &[bool], shape: [usize; 3], spacing: [f64; 3]) -> Vec<f64> {
    let mut d: Vec<f64> = targets
        .iter()
        .map(|&t| if t { 0.0 } else { f64::INFINITY })
        .collect();
    let strides = [shape[1] * shape[2], shape[2], 1];
    for axis in 0..3 {
        let len = shape[axis];
        let w = spacing[axis] * spacing[axis];
        let mut line = vec![0.0; len];
        let mut out = vec![0.0; len];
        // Every line along `axis`: iterate over all start voxels with coordinate 0 there.
        let others: Vec<usize> = (0..3).filter(|&a| a != axis).collect();
        for u in 0..shape[others[0]] {
            for v in 0..shape[others[1]] {
                let start = u * strides[others[0]] + v * strides[others[1]];
                for (t, x) in line.iter_mut().enumerate() {
                    *x = d[start + t * strides[axis]];
                }
                lower_envelope(&line, w, &mut out);
                for (t, x) in out.iter().enumerate() {
                    d[start + t * strides[axis]] = *x;
                }
            }
        }
    }
    d.into_iter().map(f64::sqrt).collect()
}

/// 1-D squared distance transform: `out[q] = min_p (w·(q − p)² + f[p])`.
fn lower_envelope(f: &[f64], w: f64, out: &mut [f64]) {
    let n = f.len();
    let finite: Vec<usize> = (0..n).filter(|&p| f[p].is_finite()).collect();
    if finite.is_empty() {
        out.iter_mut().for_each(|o| *o = f64::INFINITY);
        return;
    }
    // Parabola vertices and the boundaries between them.
    let mut v: Vec<usize> = Vec::with_capacity(finite.len());
    let mut z: Vec<f64> = Vec::with_capacity(finite.len() + 1);
    let intersect = |p: usize, q: usize| {
        let (p, q) = (p as f64, q as f64);
        ((f[q as usize] + w * q * q) - (f[p as usize] + w * p * p)) / (2.0 * w * (q - p))
    };
    for &q in &finite {
        while let Some(&last) = v.last() {
            let s = intersect(last, q);
            if v.len() > 1 && s <= z[z.len() - 1] {
                v.pop();
                z.pop();
            } else {
                z.push(s);
                v.push(q);
                break;
            }
        }
        if v.is_empty() {
            v.push(q);
        }
    }
    // z[i] is the left boundary of parabola v[i + 1].
    let mut k = 0;
    for (q, o) in out.iter_mut().enumerate() {
        while k < z.len() && z[k] < q as f64 {
            k += 1;
        }
        let p = v[k];
        let dq = q as f64 - p as f64;
        *o = w * dq * dq + f[p];
    }
}

/// Percentile with linear interpolation between order statistics (NumPy's default).
fn percentile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    let pos = q / 100.0 * (values.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    values[lo] + (values[hi] - values[lo]) * (pos - lo as f64)
}

/// Mean and sample standard deviation (n − 1); `(NaN, NaN)` for no value, SD 0 for one.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len();
    if n == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mean = values.iter().sum::<f64>() / n as f64;
    if n == 1 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cube(shape: [usize; 3], lo: [usize; 3], hi: [usize; 3], label: u8) -> Vec<u8> {
        let mut v = vec![0u8; shape.iter().product()];
        for i in lo[0]..hi[0] {
            for j in lo[1]..hi[1] {
                for k in lo[2]..hi[2] {
                    v[(i * shape[1] + j) * shape[2] + k] = label;
                }
            }
        }
        v
    }

    #[test]
    fn dice_on_hand_made_masks() {
        let a = [1, 1, 0, 0, 2];
        let b = [1, 0, 0, 1, 2];
        // label 1: |A|=2, |B|=2, overlap 1 → 0.5
        assert!((dice(&a, &b, 1) - 0.5).abs() < 1e-12);
        assert!((dice(&a, &b, 2) - 1.0).abs() < 1e-12);
        // both empty → 1, one empty → 0
        assert_eq!(dice(&a, &b, 3), 1.0);
        assert_eq!(dice(&[0, 0], &[0, 4], 4), 0.0);
    }

    #[test]
    fn hausdorff_of_shifted_cube_is_the_shift_in_mm() {
        let shape = [12, 12, 12];
        let a = cube(shape, [2, 2, 2], [6, 6, 6], 1);
        let b = cube(shape, [4, 2, 2], [8, 6, 6], 1);
        // Shift of 2 voxels along i at 1.5 mm: every surface distance is at most 3 mm and
        // the faces perpendicular to i are exactly 3 mm apart.
        let hd = hausdorff95(&a, &b, 1, shape, [1.5, 1.0, 1.0]).unwrap();
        assert!((hd - 3.0).abs() < 1e-9, "hd95 = {hd}");
        assert_eq!(hausdorff95(&a, &a, 1, shape, [1.0; 3]), Some(0.0));
        assert_eq!(hausdorff95(&a, &vec![0; a.len()], 1, shape, [1.0; 3]), None);
    }

    #[test]
    fn distance_transform_matches_brute_force() {
        let shape = [5, 6, 7];
        let n = 5 * 6 * 7;
        let targets: Vec<bool> = (0..n).map(|i| i % 17 == 3 || i == 100).collect();
        let spacing = [0.7, 1.3, 2.1];
        let d = distance_to(&targets, shape, spacing);
        let coord = |i: usize| [i / 42, (i / 7) % 6, i % 7];
        for (q, dq) in d.iter().enumerate() {
            let cq = coord(q);
            let best = (0..n)
                .filter(|&p| targets[p])
                .map(|p| {
                    let cp = coord(p);
                    (0..3)
                        .map(|a| ((cq[a] as f64 - cp[a] as f64) * spacing[a]).powi(2))
                        .sum::<f64>()
                        .sqrt()
                })
                .fold(f64::INFINITY, f64::min);
            assert!((dq - best).abs() < 1e-9, "voxel {q}: {dq} vs {best}");
        }
    }

    #[test]
    fn mean_and_sd() {
        let (m, s) = mean_sd(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - 1.2909944487358056).abs() < 1e-12);
    }
}
