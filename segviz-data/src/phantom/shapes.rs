//! Implicit shapes in world millimetres, and the smooth random displacement fields that
//! make each subject's organs irregular.
//!
//! Every shape answers "how far inside am I?" as a *level*: `< 1` inside, `1` on the
//! surface, `> 1` outside, so shells (kidney cortex, bowel wall) are level bands.

use rand::Rng;

/// A point in world coordinates (mm, RAS+).
pub type Point = [f64; 3];

/// A smooth random displacement field: per axis, a sum of a few low-frequency plane-wave
/// sinusoids. Evaluating a shape at `p + field(p)` deforms it smoothly.
#[derive(Debug, Clone)]
pub struct DisplacementField {
    /// Per output axis: `(wave vector in rad/mm, phase, amplitude in mm)`.
    waves: [Vec<([f64; 3], f64, f64)>; 3],
    /// Largest displacement the field can produce along any axis, in mm.
    bound: f64,
}

impl DisplacementField {
    /// A field whose displacement along each axis is at most `amplitude` mm, built from
    /// `waves` sinusoids per axis with wavelengths in `wavelength` (mm).
    pub fn random<R: Rng>(
        rng: &mut R,
        amplitude: f64,
        wavelength: (f64, f64),
        waves: usize,
    ) -> Self {
        let mut make_axis = || {
            (0..waves)
                .map(|_| {
                    let lambda = rng.random_range(wavelength.0..=wavelength.1);
                    let k = 2.0 * std::f64::consts::PI / lambda;
                    let dir = random_unit(rng);
                    let phase = rng.random_range(0.0..2.0 * std::f64::consts::PI);
                    let amp = amplitude / waves as f64 * rng.random_range(0.5..=1.0);
                    (dir.map(|d| d * k), phase, amp)
                })
                .collect::<Vec<_>>()
        };
        let waves = [make_axis(), make_axis(), make_axis()];
        DisplacementField {
            waves,
            bound: amplitude,
        }
    }

    /// The field that displaces nothing.
    pub fn zero() -> Self {
        DisplacementField {
            waves: [Vec::new(), Vec::new(), Vec::new()],
            bound: 0.0,
        }
    }

    /// Largest displacement along any axis, in mm.
    pub fn bound(&self) -> f64 {
        self.bound
    }

    /// `p` moved by the field.
    #[inline]
    pub fn warp(&self, p: Point) -> Point {
        let mut out = p;
        for (axis, waves) in self.waves.iter().enumerate() {
            for (k, phase, amp) in waves {
                let arg = k[0] * p[0] + k[1] * p[1] + k[2] * p[2] + phase;
                out[axis] += amp * arg.sin();
            }
        }
        out
    }
}

/// A uniformly random unit vector.
fn random_unit<R: Rng>(rng: &mut R) -> [f64; 3] {
    loop {
        let v: [f64; 3] = std::array::from_fn(|_| rng.random_range(-1.0..=1.0));
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        if (0.1..=1.0).contains(&n) {
            return v.map(|x| x / n);
        }
    }
}

/// An ellipsoid with any orientation.
#[derive(Debug, Clone, Copy)]
pub struct Ellipsoid {
    /// Centre (mm).
    pub centre: Point,
    /// Semi-axes along the ellipsoid's own x, y and z (mm).
    pub radii: [f64; 3],
    /// Rows are the ellipsoid's own axes in world coordinates (a rotation matrix).
    axes: [[f64; 3]; 3],
}

impl Ellipsoid {
    /// An axis-aligned ellipsoid.
    pub fn new(centre: Point, radii: [f64; 3]) -> Self {
        Ellipsoid {
            centre,
            radii,
            axes: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
        }
    }

    /// The same ellipsoid rotated by `angle` radians about z (anticlockwise seen from
    /// above), replacing any earlier orientation.
    pub fn rotated(self, angle: f64) -> Self {
        self.oriented(angle, 0.0, 0.0)
    }

    /// The same ellipsoid turned by `yaw` about z, then tilted by `pitch` about its own x
    /// axis and `roll` about its own y axis (radians), replacing any earlier orientation.
    pub fn oriented(self, yaw: f64, pitch: f64, roll: f64) -> Self {
        let (sy, cy) = yaw.sin_cos();
        let (sp, cp) = pitch.sin_cos();
        let (sr, cr) = roll.sin_cos();
        // Columns of R = Rz(yaw) · Rx(pitch) · Ry(roll) are the own axes in world
        // coordinates; store them as rows (Rᵀ) so `level` projects with dot products.
        let rz = [[cy, -sy, 0.0], [sy, cy, 0.0], [0.0, 0.0, 1.0]];
        let rx = [[1.0, 0.0, 0.0], [0.0, cp, -sp], [0.0, sp, cp]];
        let ry = [[cr, 0.0, sr], [0.0, 1.0, 0.0], [-sr, 0.0, cr]];
        let r = matmul(matmul(rz, rx), ry);
        let axes = std::array::from_fn(|a| [r[0][a], r[1][a], r[2][a]]);
        Ellipsoid { axes, ..self }
    }

    /// The same ellipsoid with every semi-axis multiplied by `factor`.
    pub fn scaled(self, factor: f64) -> Self {
        Ellipsoid {
            radii: self.radii.map(|r| r * factor),
            ..self
        }
    }

    /// The same ellipsoid moved by `offset` mm.
    pub fn moved(self, offset: Point) -> Self {
        Ellipsoid {
            centre: std::array::from_fn(|a| self.centre[a] + offset[a]),
            ..self
        }
    }

    /// An ellipsoid with this one's orientation at `centre` with semi-axes `radii`.
    pub fn with_orientation_of(self, centre: Point, radii: [f64; 3]) -> Self {
        Ellipsoid {
            centre,
            radii,
            ..self
        }
    }

    /// The world direction of the ellipsoid's own axis `axis` (0, 1 or 2).
    pub fn axis(&self, axis: usize) -> Point {
        self.axes[axis.min(2)]
    }

    /// The point at own coordinates `u` (each in units of the semi-axis; `|u| = 1` is on
    /// the surface).
    pub fn point_at(&self, u: Point) -> Point {
        std::array::from_fn(|w| {
            self.centre[w]
                + (0..3)
                    .map(|a| self.axes[a][w] * u[a] * self.radii[a])
                    .sum::<f64>()
        })
    }

    /// Squared normalised radius of `p`: `< 1` inside.
    #[inline]
    pub fn level(&self, p: Point) -> f64 {
        let d = [
            p[0] - self.centre[0],
            p[1] - self.centre[1],
            p[2] - self.centre[2],
        ];
        let mut sum = 0.0;
        for a in 0..3 {
            let x = self.axes[a][0] * d[0] + self.axes[a][1] * d[1] + self.axes[a][2] * d[2];
            sum += (x / self.radii[a]).powi(2);
        }
        sum
    }

    /// Whether `p` is within `margin` mm of a box that bounds the ellipsoid (the sphere of
    /// its largest semi-axis).
    #[inline]
    pub fn near(&self, p: Point, margin: f64) -> bool {
        let r = self.radii[0].max(self.radii[1]).max(self.radii[2]) + margin;
        (p[0] - self.centre[0]).abs() <= r
            && (p[1] - self.centre[1]).abs() <= r
            && (p[2] - self.centre[2]).abs() <= r
    }
}

fn matmul(a: [[f64; 3]; 3], b: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|r| std::array::from_fn(|c| (0..3).map(|k| a[r][k] * b[k][c]).sum()))
}

/// A tube of varying radius along a polyline (vessels, pancreas, bowel loops).
#[derive(Debug, Clone)]
pub struct Tube {
    /// Centre-line points (mm).
    pub points: Vec<Point>,
    /// Radius at each point (mm), interpolated linearly along each segment.
    pub radii: Vec<f64>,
    /// Bounding box (min, max) including the largest radius.
    bounds: (Point, Point),
}

impl Tube {
    /// A tube through `points` with `radii` (one per point; the shorter list wins).
    pub fn new(points: Vec<Point>, radii: Vec<f64>) -> Self {
        let n = points.len().min(radii.len());
        let (points, radii) = (points[..n].to_vec(), radii[..n].to_vec());
        let r = radii.iter().copied().fold(0.0, f64::max);
        let mut lo = [f64::INFINITY; 3];
        let mut hi = [f64::NEG_INFINITY; 3];
        for p in &points {
            for a in 0..3 {
                lo[a] = lo[a].min(p[a] - r);
                hi[a] = hi[a].max(p[a] + r);
            }
        }
        Tube {
            points,
            radii,
            bounds: (lo, hi),
        }
    }

    /// Whether `p` is within `margin` mm of the tube's bounding box.
    #[inline]
    pub fn near(&self, p: Point, margin: f64) -> bool {
        (0..3).all(|a| p[a] >= self.bounds.0[a] - margin && p[a] <= self.bounds.1[a] + margin)
    }

    /// Distance to the centre line divided by the local radius: `< 1` inside.
    pub fn level(&self, p: Point) -> f64 {
        let mut best = f64::INFINITY;
        for s in 0..self.points.len().saturating_sub(1) {
            let (a, b) = (self.points[s], self.points[s + 1]);
            let ab = [b[0] - a[0], b[1] - a[1], b[2] - a[2]];
            let ap = [p[0] - a[0], p[1] - a[1], p[2] - a[2]];
            let len2 = ab[0] * ab[0] + ab[1] * ab[1] + ab[2] * ab[2];
            let t = if len2 > 0.0 {
                ((ap[0] * ab[0] + ap[1] * ab[1] + ap[2] * ab[2]) / len2).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let d = [ap[0] - t * ab[0], ap[1] - t * ab[1], ap[2] - t * ab[2]];
            let dist = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt();
            let r = self.radii[s] + t * (self.radii[s + 1] - self.radii[s]);
            best = best.min(dist / r.max(1e-6));
        }
        best
    }
}

/// The points of a quadratic Bézier curve from `a` to `c` pulled towards `b`, `n` of them.
pub fn bezier(a: Point, b: Point, c: Point, n: usize) -> Vec<Point> {
    (0..n)
        .map(|i| {
            let t = i as f64 / (n.max(2) - 1) as f64;
            let u = 1.0 - t;
            std::array::from_fn(|k| u * u * a[k] + 2.0 * u * t * b[k] + t * t * c[k])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn ellipsoid_levels() {
        let e = Ellipsoid::new([10.0, 0.0, 0.0], [5.0, 2.0, 1.0]);
        assert!(e.level([10.0, 0.0, 0.0]) < 1e-12);
        assert!((e.level([15.0, 0.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(e.level([10.0, 2.5, 0.0]) > 1.0);
        // Rotated by 90°: the long axis now lies along y.
        let r = e.rotated(std::f64::consts::FRAC_PI_2);
        assert!((r.level([10.0, 5.0, 0.0]) - 1.0).abs() < 1e-9);
        assert!(r.near([10.0, 5.0, 0.0], 0.0));
        assert!(!r.near([10.0, 0.0, 7.0], 1.0));
        // A pitch of 90° turns the own y axis (2 mm) onto world z.
        let t = e.oriented(0.0, std::f64::consts::FRAC_PI_2, 0.0);
        assert!((t.level([10.0, 0.0, 2.0]) - 1.0).abs() < 1e-9);
        assert!((t.level([10.0, 1.0, 0.0]) - 1.0).abs() < 1e-9);
        let q = t.point_at([0.0, 1.0, 0.0]);
        assert!((t.level(q) - 1.0).abs() < 1e-9, "{q:?}");
    }

    #[test]
    fn tube_levels() {
        let t = Tube::new(vec![[0.0; 3], [10.0, 0.0, 0.0]], vec![1.0, 3.0]);
        assert!((t.level([0.0, 1.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!((t.level([10.0, 0.0, 3.0]) - 1.0).abs() < 1e-12);
        assert!((t.level([5.0, 2.0, 0.0]) - 1.0).abs() < 1e-12);
        assert!(t.level([-2.0, 0.0, 0.0]) > 1.0);
    }

    #[test]
    fn field_is_bounded_and_deterministic() {
        let a = DisplacementField::random(&mut ChaCha8Rng::seed_from_u64(1), 6.0, (80.0, 200.0), 3);
        let b = DisplacementField::random(&mut ChaCha8Rng::seed_from_u64(1), 6.0, (80.0, 200.0), 3);
        for i in 0..50 {
            let p = [i as f64 * 7.0, -(i as f64) * 3.0, i as f64];
            let (wa, wb) = (a.warp(p), b.warp(p));
            assert_eq!(wa, wb);
            for k in 0..3 {
                assert!((wa[k] - p[k]).abs() <= 6.0 + 1e-9);
            }
        }
        assert_eq!(
            DisplacementField::zero().warp([1.0, 2.0, 3.0]),
            [1.0, 2.0, 3.0]
        );
    }
}
