//! Voxel-axis orientation: naming it ("RAS", "LPS", "SRA", ...) and reorienting to RAS.
//!
//! Every decision is taken from the affine, never from an assumed axis order: KiTS19 stores
//! the cranio-caudal axis first, MSD stores it last, and both must come out as `i → R`,
//! `j → A`, `k → S` (MONAI's `Orientation(axcodes="RAS")`). Reorienting only permutes and
//! flips voxel axes — no interpolation — and updates the affine so every voxel keeps its
//! world position.

use crate::affine::{self, Affine};
use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// For each voxel axis: the world axis (0 = x/R, 1 = y/A, 2 = z/S) it runs closest to, and
/// whether it runs towards the negative end of that axis (L, P or I).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AxisMap {
    /// `world_axis[a]` is the world axis nearest to voxel axis `a`; a permutation of 0, 1, 2.
    pub world_axis: [usize; 3],
    /// `flipped[a]` is true when voxel axis `a` points to L, P or I.
    pub flipped: [bool; 3],
}

impl AxisMap {
    /// The nearest-axis assignment of an affine's three columns.
    ///
    /// The three columns are matched to distinct world axes by the assignment with the
    /// largest total alignment (sum of absolute direction cosines), so a 45° oblique scan
    /// still gives a valid permutation instead of two axes claiming the same world axis.
    pub fn of(affine: &Affine) -> Self {
        let mut cosines = [[0.0f64; 3]; 3]; // [voxel axis][world axis]
        for (a, row) in cosines.iter_mut().enumerate() {
            let column = affine::column(affine, a);
            let norm = column.iter().map(|v| v * v).sum::<f64>().sqrt();
            for (w, c) in row.iter_mut().enumerate() {
                *c = if norm > 0.0 { column[w] / norm } else { 0.0 };
            }
        }
        const PERMUTATIONS: [[usize; 3]; 6] = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let score = |p: &[usize; 3]| (0..3).map(|a| cosines[a][p[a]].abs()).sum::<f64>();
        let mut best = PERMUTATIONS[0];
        for p in PERMUTATIONS.iter().skip(1) {
            if score(p) > score(&best) + 1e-12 {
                best = *p;
            }
        }
        let flipped = [0, 1, 2].map(|a| cosines[a][best[a]] < 0.0);
        AxisMap {
            world_axis: best,
            flipped,
        }
    }

    /// The three-letter code, one letter per voxel axis (`"RAS"`, `"LPS"`, `"SRA"`, ...).
    pub fn code(&self) -> String {
        (0..3)
            .map(|a| {
                let letters = [('R', 'L'), ('A', 'P'), ('S', 'I')][self.world_axis[a]];
                if self.flipped[a] {
                    letters.1
                } else {
                    letters.0
                }
            })
            .collect()
    }

    /// Whether the voxel axes already are `i → R`, `j → A`, `k → S`.
    pub fn is_ras(&self) -> bool {
        self.world_axis == [0, 1, 2] && self.flipped == [false; 3]
    }
}

/// The orientation code of an affine: the nearest world-axis letter of each voxel axis,
/// e.g. `"RAS"` (nibabel's `aff2axcodes` with RAS+ world), `"LPS"` (DICOM-like), `"SRA"`
/// (slice axis first, as KiTS19 stores it).
pub fn orientation_code(affine: &Affine) -> String {
    AxisMap::of(affine).code()
}

/// The geometry a volume of geometry `geometry` has after [`Volume::to_ras`].
pub fn ras_geometry(geometry: &Geometry) -> Geometry {
    let map = AxisMap::of(&geometry.affine);
    let mut shape = [0usize; 3];
    let mut out = affine::identity();
    for (row, source) in out.iter_mut().zip(&geometry.affine).take(3) {
        row[3] = source[3];
    }
    for a in 0..3 {
        let w = map.world_axis[a];
        shape[w] = geometry.shape[a];
        let sign = if map.flipped[a] { -1.0 } else { 1.0 };
        for (row, source) in out.iter_mut().zip(&geometry.affine).take(3) {
            row[w] = sign * source[a];
            // A flipped axis starts at its last voxel: move the origin there.
            if map.flipped[a] {
                row[3] += source[a] * (geometry.shape[a] as f64 - 1.0);
            }
        }
    }
    Geometry { shape, affine: out }
}

impl<T: Copy> Volume<T> {
    /// This volume with voxel axes `i → R`, `j → A`, `k → S`, by permuting and flipping axes
    /// (no interpolation). Every voxel keeps its world coordinates.
    ///
    /// An oblique volume becomes "closest to RAS": its columns are permuted and signed so
    /// each points to the positive end of its nearest world axis.
    pub fn to_ras(&self) -> Volume<T> {
        let map = AxisMap::of(&self.geometry.affine);
        if map.is_ras() {
            return self.clone();
        }
        self.permuted(&map)
    }

    /// [`Volume::to_ras`] without a copy when the volume is RAS already.
    pub fn into_ras(self) -> Volume<T> {
        let map = AxisMap::of(&self.geometry.affine);
        if map.is_ras() {
            return self;
        }
        self.permuted(&map)
    }

    /// The voxels in the order of `map`'s RAS grid. The source index is linear in the
    /// target index, so each target row is a run of the source at one stride (±1 along the
    /// source's last axis: a plain or reversed copy).
    fn permuted(&self, map: &AxisMap) -> Volume<T> {
        let geometry = ras_geometry(&self.geometry);
        let input = self.geometry.shape;
        let stride_in = [input[1] * input[2], input[2], 1].map(|v| v as isize);
        // Per target axis, the source step; and the source index of target (0, 0, 0).
        let mut step = [0isize; 3];
        let mut base = 0isize;
        for a in 0..3 {
            if map.flipped[a] {
                step[map.world_axis[a]] = -stride_in[a];
                base += (input[a] as isize - 1) * stride_in[a];
            } else {
                step[map.world_axis[a]] = stride_in[a];
            }
        }
        let [n0, n1, n2] = geometry.shape;
        let mut data = Vec::with_capacity(self.data.len());
        for o0 in 0..n0 {
            for o1 in 0..n1 {
                let start = base + o0 as isize * step[0] + o1 as isize * step[1];
                match step[2] {
                    1 => {
                        let start = start as usize;
                        data.extend_from_slice(&self.data[start..start + n2]);
                    }
                    -1 => {
                        let end = start as usize + 1;
                        data.extend(self.data[end - n2..end].iter().rev());
                    }
                    s => {
                        data.extend((0..n2).map(|o2| self.data[(start + o2 as isize * s) as usize]))
                    }
                }
            }
        }
        Volume { data, geometry }
    }
}

/// Puts a volume computed in the RAS grid of `original` (the grid [`Volume::to_ras`] gives)
/// back into `original`'s own voxel order — e.g. to write a prediction so that it overlays
/// the input file in any viewer. The result carries `original` as its geometry.
///
/// # Errors
/// [`DataError::Shape`] if `ras` does not have the shape of `original`'s RAS grid.
pub fn from_ras<T: Copy>(ras: &Volume<T>, original: &Geometry) -> Result<Volume<T>> {
    let map = AxisMap::of(&original.affine);
    let expected = ras_geometry(original);
    if ras.geometry.shape != expected.shape || ras.data.len() != expected.len() {
        return Err(DataError::Shape {
            context: "putting a RAS volume back into its original geometry".into(),
            expected: expected.shape,
            found: ras.geometry.shape,
        });
    }
    let mut data = Vec::with_capacity(ras.data.len());
    // Inverse of `to_ras`: for each original voxel, find where it went.
    let mut o = [0usize; 3];
    for s0 in 0..original.shape[0] {
        for s1 in 0..original.shape[1] {
            for s2 in 0..original.shape[2] {
                let s = [s0, s1, s2];
                for a in 0..3 {
                    o[map.world_axis[a]] = if map.flipped[a] {
                        original.shape[a] - 1 - s[a]
                    } else {
                        s[a]
                    };
                }
                data.push(ras.data[expected.index(o[0], o[1], o[2])]);
            }
        }
    }
    Ok(Volume {
        data,
        geometry: original.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A RAS volume whose every voxel value encodes its index.
    fn canonical() -> Volume<i32> {
        let geometry = Geometry {
            shape: [8, 9, 10],
            affine: [
                [0.7, 0.0, 0.0, -30.0],
                [0.0, 0.8, 0.0, 12.0],
                [0.0, 0.0, 2.5, -100.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let mut data = Vec::new();
        for i in 0..8i32 {
            for j in 0..9 {
                for k in 0..10 {
                    data.push(i * 100 + j * 10 + k);
                }
            }
        }
        Volume { data, geometry }
    }

    /// Reorders `v`'s axes: output axis `b` is input axis `perm[b]`, flipped when `flip[b]`,
    /// with the affine updated so world positions are kept.
    fn permute_and_flip(v: &Volume<i32>, perm: [usize; 3], flip: [bool; 3]) -> Volume<i32> {
        let shape = perm.map(|a| v.geometry.shape[a]);
        let mut affine = affine::identity();
        for (row, source) in affine.iter_mut().zip(&v.geometry.affine).take(3) {
            row[3] = source[3];
            for b in 0..3 {
                let a = perm[b];
                let sign = if flip[b] { -1.0 } else { 1.0 };
                row[b] = sign * source[a];
                if flip[b] {
                    row[3] += source[a] * (shape[b] as f64 - 1.0);
                }
            }
        }
        let geometry = Geometry { shape, affine };
        let mut data = Vec::new();
        for o0 in 0..shape[0] {
            for o1 in 0..shape[1] {
                for o2 in 0..shape[2] {
                    let o = [o0, o1, o2];
                    let mut s = [0; 3];
                    for b in 0..3 {
                        s[perm[b]] = if flip[b] { shape[b] - 1 - o[b] } else { o[b] };
                    }
                    data.push(v.at(s[0], s[1], s[2]));
                }
            }
        }
        Volume { data, geometry }
    }

    #[test]
    fn codes_name_the_nearest_axes() {
        let v = canonical();
        assert_eq!(orientation_code(&v.geometry.affine), "RAS");
        let lps = permute_and_flip(&v, [0, 1, 2], [true, true, false]);
        assert_eq!(orientation_code(&lps.geometry.affine), "LPS");
        let slice_first = permute_and_flip(&v, [2, 0, 1], [false, false, false]);
        assert_eq!(orientation_code(&slice_first.geometry.affine), "SRA");
        let kits_like = permute_and_flip(&v, [2, 1, 0], [true, true, false]);
        assert_eq!(orientation_code(&kits_like.geometry.affine), "IPR");
    }

    #[test]
    fn oblique_45_degrees_still_gives_a_permutation() {
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let a = [
            [h, -h, 0.0, 0.0],
            [h, h, 0.0, 0.0],
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ];
        let map = AxisMap::of(&a);
        let mut seen = map.world_axis;
        seen.sort();
        assert_eq!(seen, [0, 1, 2]);
    }

    #[test]
    fn every_permuted_and_flipped_copy_reorients_to_the_canonical_volume() {
        let v = canonical();
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        for perm in perms {
            for bits in 0..8u8 {
                let flip = [bits & 1 != 0, bits & 2 != 0, bits & 4 != 0];
                let moved = permute_and_flip(&v, perm, flip);
                let back = moved.to_ras();
                assert_eq!(back.geometry.shape, v.geometry.shape, "{perm:?} {flip:?}");
                assert_eq!(back.data, v.data, "{perm:?} {flip:?}");
                let owned = moved.clone().into_ras();
                assert_eq!(owned.geometry, back.geometry, "{perm:?} {flip:?}");
                assert_eq!(owned.data, v.data, "{perm:?} {flip:?}");
                let d = affine::max_abs_difference(&back.geometry.affine, &v.geometry.affine);
                assert!(d < 1e-9, "{perm:?} {flip:?}: affine off by {d}");
                // And back again into the moved geometry.
                let restored = from_ras(&back, &moved.geometry).expect("same grid");
                assert_eq!(restored, moved, "{perm:?} {flip:?}");
            }
        }
    }

    #[test]
    fn reorienting_keeps_world_coordinates_of_every_voxel() {
        let v = canonical();
        let moved = permute_and_flip(&v, [2, 0, 1], [true, false, true]);
        let ras = moved.to_ras();
        // Voxel value encodes the canonical index: check world positions agree.
        for (n, &value) in ras.data.iter().enumerate() {
            let [_, s1, s2] = ras.geometry.shape;
            let o = [n / (s1 * s2), (n / s2) % s1, n % s2].map(|x| x as f64);
            let c = [value / 100, (value / 10) % 10, value % 10].map(|x| x as f64);
            let a = affine::apply(&ras.geometry.affine, o);
            let b = affine::apply(&v.geometry.affine, c);
            for d in 0..3 {
                assert!((a[d] - b[d]).abs() < 1e-9);
            }
        }
    }

    #[test]
    fn from_ras_rejects_a_wrong_shape() {
        let v = canonical();
        let moved = permute_and_flip(&v, [1, 0, 2], [false; 3]);
        let wrong = Volume::filled(Geometry::from_spacing([8, 8, 8], [1.0; 3]), 0i32);
        let err = from_ras(&wrong, &moved.geometry).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Shape {
                    expected: [8, 9, 10],
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
