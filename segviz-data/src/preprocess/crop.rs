//! Cropping to the foreground (MONAI `CropForeground`), used at validation time.

use crate::affine;
use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// A box of voxels `start[a] .. end[a]` (end exclusive) on each axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundingBox {
    /// First voxel inside, per axis.
    pub start: [usize; 3],
    /// One past the last voxel inside, per axis.
    pub end: [usize; 3],
}

impl BoundingBox {
    /// The box's shape.
    pub fn shape(&self) -> [usize; 3] {
        [0, 1, 2].map(|a| self.end[a].saturating_sub(self.start[a]))
    }
}

/// The smallest box holding every voxel where `is_foreground` holds, grown by `margin`
/// voxels on every side (and clipped to the volume); `None` when no voxel is foreground.
pub fn foreground_box<T: Copy>(
    volume: &Volume<T>,
    is_foreground: impl Fn(T) -> bool,
    margin: usize,
) -> Option<BoundingBox> {
    let shape = volume.geometry.shape;
    let mut lo = shape;
    let mut hi = [0usize; 3];
    let mut any = false;
    let mut n = 0usize;
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for k in 0..shape[2] {
                if is_foreground(volume.data[n]) {
                    any = true;
                    for (a, x) in [i, j, k].into_iter().enumerate() {
                        lo[a] = lo[a].min(x);
                        hi[a] = hi[a].max(x + 1);
                    }
                }
                n += 1;
            }
        }
    }
    any.then(|| BoundingBox {
        start: lo.map(|x| x.saturating_sub(margin)),
        end: [0, 1, 2].map(|a| (hi[a] + margin).min(shape[a])),
    })
}

/// The sub-volume inside `bounds`, with its affine moved so every voxel keeps its world
/// position.
///
/// # Errors
/// [`DataError::Shape`] if the box is empty or reaches outside the volume.
pub fn crop<T: Copy>(volume: &Volume<T>, bounds: &BoundingBox) -> Result<Volume<T>> {
    let shape = volume.geometry.shape;
    if (0..3).any(|a| bounds.start[a] >= bounds.end[a] || bounds.end[a] > shape[a]) {
        return Err(DataError::Shape {
            context: format!("cropping to {bounds:?}"),
            expected: shape,
            found: bounds.shape(),
        });
    }
    let new_shape = bounds.shape();
    let mut data = Vec::with_capacity(new_shape.iter().product());
    for i in bounds.start[0]..bounds.end[0] {
        for j in bounds.start[1]..bounds.end[1] {
            let row = volume.geometry.index(i, j, 0);
            data.extend_from_slice(&volume.data[row + bounds.start[2]..row + bounds.end[2]]);
        }
    }
    let mut affine = volume.geometry.affine;
    let origin = affine::apply(&volume.geometry.affine, bounds.start.map(|x| x as f64));
    for r in 0..3 {
        affine[r][3] = origin[r];
    }
    Ok(Volume {
        data,
        geometry: Geometry {
            shape: new_shape,
            affine,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crops_to_the_foreground_with_margin_and_keeps_world_positions() {
        let g = Geometry::from_spacing([10, 12, 8], [1.5, 1.5, 2.0]);
        let mut v = Volume::filled(g, 0u8);
        let at = v.geometry.index(4, 5, 3);
        v.data[at] = 2;
        let at = v.geometry.index(6, 5, 4);
        v.data[at] = 1;
        let b = foreground_box(&v, |x| x > 0, 1).expect("foreground");
        assert_eq!(
            b,
            BoundingBox {
                start: [3, 4, 2],
                end: [8, 7, 6]
            }
        );
        let c = crop(&v, &b).expect("crop");
        assert_eq!(c.shape(), [5, 3, 4]);
        assert_eq!(c.at(1, 1, 1), 2);
        let w0 = affine::apply(&v.geometry.affine, [4.0, 5.0, 3.0]);
        let w1 = affine::apply(&c.geometry.affine, [1.0, 1.0, 1.0]);
        assert_eq!(w0, w1);
        // The margin is clipped at the border.
        assert_eq!(
            foreground_box(&v, |x| x > 0, 100).expect("fg").end,
            [10, 12, 8]
        );
        assert!(foreground_box(&v, |x| x > 5, 0).is_none());
        assert!(crop(
            &v,
            &BoundingBox {
                start: [0; 3],
                end: [11, 1, 1]
            }
        )
        .is_err());
    }
}
