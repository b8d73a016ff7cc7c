//! Constant padding, in particular up to a multiple of the network's total stride
//! (MONAI `DivisiblePad`, symmetric): the U-Net needs sides divisible by 16.

use crate::volume::{Geometry, Volume};

/// Pads `before[a]` voxels before and `after[a]` after each axis with `value`; the affine
/// origin moves so the original voxels keep their world position.
pub fn pad<T: Copy>(
    volume: &Volume<T>,
    before: [usize; 3],
    after: [usize; 3],
    value: T,
) -> Volume<T> {
    let old = volume.geometry.shape;
    let shape = [0, 1, 2].map(|a| old[a] + before[a] + after[a]);
    let mut affine = volume.geometry.affine;
    for row in affine.iter_mut().take(3) {
        row[3] -= (0..3).map(|c| row[c] * before[c] as f64).sum::<f64>();
    }
    let geometry = Geometry { shape, affine };
    let mut out = Volume::filled(geometry, value);
    for i in 0..old[0] {
        for j in 0..old[1] {
            let src = volume.geometry.index(i, j, 0);
            let dst = out.geometry.index(i + before[0], j + before[1], before[2]);
            out.data[dst..dst + old[2]].copy_from_slice(&volume.data[src..src + old[2]]);
        }
    }
    out
}

/// Pads each side up to the next multiple of `multiple`, half before and the rest after.
/// A `multiple` of 0 or 1 leaves the volume as it is.
pub fn pad_to_multiple<T: Copy>(volume: &Volume<T>, multiple: usize, value: T) -> Volume<T> {
    match padding_to_multiple(volume, multiple) {
        Some((before, after)) => pad(volume, before, after, value),
        None => volume.clone(),
    }
}

/// [`pad_to_multiple`] on a volume the caller gives up: returned as it is when no side
/// needs padding.
pub fn pad_to_multiple_owned<T: Copy>(volume: Volume<T>, multiple: usize, value: T) -> Volume<T> {
    match padding_to_multiple(&volume, multiple) {
        Some((before, after)) => pad(&volume, before, after, value),
        None => volume,
    }
}

/// The padding before and after each axis that [`pad_to_multiple`] adds, or `None` when
/// it adds none.
fn padding_to_multiple<T>(volume: &Volume<T>, multiple: usize) -> Option<([usize; 3], [usize; 3])> {
    if multiple <= 1 {
        return None;
    }
    let old = volume.geometry.shape;
    let total = old.map(|n| n.div_ceil(multiple) * multiple - n);
    if total == [0; 3] {
        return None;
    }
    let before = total.map(|t| t / 2);
    let after = [0, 1, 2].map(|a| total[a] - before[a]);
    Some((before, after))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affine;

    #[test]
    fn pads_symmetrically_to_a_multiple_and_keeps_world_positions() {
        let g = Geometry::from_spacing([13, 16, 3], [1.5, 1.5, 2.0]);
        let mut v = Volume::filled(g, 1.0f32);
        let at = v.geometry.index(12, 15, 2);
        v.data[at] = 7.0;
        let p = pad_to_multiple(&v, 16, 0.0);
        assert_eq!(p.shape(), [16, 16, 16]);
        // 3 extra on axis 0: 1 before, 2 after; 13 extra on axis 2: 6 before, 7 after.
        assert_eq!(p.at(0, 0, 6), 0.0);
        assert_eq!(p.at(1, 0, 6), 1.0);
        assert_eq!(p.at(13, 15, 8), 7.0);
        assert_eq!(p.at(14, 15, 8), 0.0);
        let w0 = affine::apply(&v.geometry.affine, [12.0, 15.0, 2.0]);
        let w1 = affine::apply(&p.geometry.affine, [13.0, 15.0, 8.0]);
        assert_eq!(w0, w1);
        assert_eq!(p.data.iter().filter(|&&x| x != 0.0).count(), v.data.len());
        assert_eq!(pad_to_multiple(&v, 1, 0.0), v);
    }
}
