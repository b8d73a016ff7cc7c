//! Small helpers for the 4×4 voxel-to-world affines of [`Geometry`](crate::Geometry).
//!
//! Affines are row-major `[[f64; 4]; 4]` with the last row `[0, 0, 0, 1]`; only the upper
//! 3×4 block carries information.

/// A row-major 4×4 affine.
pub type Affine = [[f64; 4]; 4];

/// The identity affine.
pub fn identity() -> Affine {
    let mut a = [[0.0; 4]; 4];
    for (r, row) in a.iter_mut().enumerate() {
        row[r] = 1.0;
    }
    a
}

/// Applies `affine` to the point `p` (voxel indices → world millimetres).
#[inline]
pub fn apply(affine: &Affine, p: [f64; 3]) -> [f64; 3] {
    let mut out = [0.0; 3];
    for (r, o) in out.iter_mut().enumerate() {
        *o = affine[r][0] * p[0] + affine[r][1] * p[1] + affine[r][2] * p[2] + affine[r][3];
    }
    out
}

/// The product `a · b` of two affines.
pub fn multiply(a: &Affine, b: &Affine) -> Affine {
    let mut out = [[0.0; 4]; 4];
    for (r, row) in out.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = (0..4).map(|k| a[r][k] * b[k][c]).sum();
        }
    }
    out
}

/// Determinant of the linear (upper 3×3) part.
pub fn determinant(a: &Affine) -> f64 {
    a[0][0] * (a[1][1] * a[2][2] - a[1][2] * a[2][1])
        - a[0][1] * (a[1][0] * a[2][2] - a[1][2] * a[2][0])
        + a[0][2] * (a[1][0] * a[2][1] - a[1][1] * a[2][0])
}

/// The inverse affine, or `None` when the linear part is singular (or not finite).
pub fn invert(a: &Affine) -> Option<Affine> {
    let det = determinant(a);
    if !det.is_finite() || det.abs() < 1e-12 {
        return None;
    }
    // Inverse of the 3×3 block by cofactors, then the translation follows.
    let m = |r: usize, c: usize| a[r][c];
    let mut inv = [[0.0; 4]; 4];
    inv[0][0] = (m(1, 1) * m(2, 2) - m(1, 2) * m(2, 1)) / det;
    inv[0][1] = (m(0, 2) * m(2, 1) - m(0, 1) * m(2, 2)) / det;
    inv[0][2] = (m(0, 1) * m(1, 2) - m(0, 2) * m(1, 1)) / det;
    inv[1][0] = (m(1, 2) * m(2, 0) - m(1, 0) * m(2, 2)) / det;
    inv[1][1] = (m(0, 0) * m(2, 2) - m(0, 2) * m(2, 0)) / det;
    inv[1][2] = (m(0, 2) * m(1, 0) - m(0, 0) * m(1, 2)) / det;
    inv[2][0] = (m(1, 0) * m(2, 1) - m(1, 1) * m(2, 0)) / det;
    inv[2][1] = (m(0, 1) * m(2, 0) - m(0, 0) * m(2, 1)) / det;
    inv[2][2] = (m(0, 0) * m(1, 1) - m(0, 1) * m(1, 0)) / det;
    for row in inv.iter_mut().take(3) {
        row[3] = -(0..3).map(|k| row[k] * a[k][3]).sum::<f64>();
    }
    inv[3][3] = 1.0;
    Some(inv)
}

/// Largest absolute difference between two affines, element by element.
pub fn max_abs_difference(a: &Affine, b: &Affine) -> f64 {
    let mut worst = 0.0f64;
    for r in 0..4 {
        for c in 0..4 {
            let d = (a[r][c] - b[r][c]).abs();
            // A NaN difference must count as a mismatch, not vanish in `max`.
            worst = if d.is_nan() {
                f64::INFINITY
            } else {
                worst.max(d)
            };
        }
    }
    worst
}

/// Column `c` (0..3) of the linear part: the world displacement of one step along voxel axis `c`.
#[inline]
pub fn column(a: &Affine, c: usize) -> [f64; 3] {
    [a[0][c], a[1][c], a[2][c]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverse_undoes_a_general_affine() {
        let a = [
            [0.0, -1.5, 0.2, 10.0],
            [0.8, 0.0, 0.0, -20.0],
            [0.0, 0.1, -2.0, 5.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let inv = invert(&a).expect("invertible");
        let p = [3.0, -4.0, 7.5];
        let back = apply(&inv, apply(&a, p));
        for d in 0..3 {
            assert!((back[d] - p[d]).abs() < 1e-9);
        }
        assert!(max_abs_difference(&multiply(&a, &inv), &identity()) < 1e-12);
    }

    #[test]
    fn singular_affine_has_no_inverse() {
        let mut a = identity();
        a[2][2] = 0.0;
        assert!(invert(&a).is_none());
    }
}
