//! CT intensity windowing (MONAI `ScaleIntensityRange` with `b_min = 0`, `b_max = 1`).

use crate::error::{DataError, Result};
use crate::volume::Volume;

/// Maps Hounsfield units linearly so that `a_min → 0` and `a_max → 1`, clipping to `[0, 1]`
/// when `clip` is true (the paper's setting: organ-specific windows, clipped).
///
/// # Errors
/// [`DataError::Config`] unless `a_min < a_max` and both are finite.
pub fn window_intensity(
    image: &Volume<f32>,
    a_min: f32,
    a_max: f32,
    clip: bool,
) -> Result<Volume<f32>> {
    window_intensity_owned(image.clone(), a_min, a_max, clip)
}

/// [`window_intensity`] in place, on a volume the caller gives up.
///
/// # Errors
/// As [`window_intensity`].
pub fn window_intensity_owned(
    mut image: Volume<f32>,
    a_min: f32,
    a_max: f32,
    clip: bool,
) -> Result<Volume<f32>> {
    if !(a_min.is_finite() && a_max.is_finite() && a_min < a_max) {
        return Err(DataError::Config(format!(
            "intensity window needs finite a_min < a_max, got {a_min}..{a_max}"
        )));
    }
    let width = a_max - a_min;
    for v in &mut image.data {
        let x = (*v - a_min) / width;
        *v = if clip { x.clamp(0.0, 1.0) } else { x };
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    #[test]
    fn window_maps_ends_to_zero_and_one_and_clips() {
        let g = Geometry::from_spacing([1, 1, 5], [1.0; 3]);
        let v = Volume {
            data: vec![-1000.0, -57.0, 53.5, 164.0, 1000.0],
            geometry: g,
        };
        let w = window_intensity(&v, -57.0, 164.0, true).expect("window");
        assert_eq!(w.data[0], 0.0);
        assert_eq!(w.data[1], 0.0);
        assert!((w.data[2] - 0.5).abs() < 1e-6);
        assert_eq!(w.data[3], 1.0);
        assert_eq!(w.data[4], 1.0);
        let unclipped = window_intensity(&v, -57.0, 164.0, false).expect("window");
        assert!(unclipped.data[0] < 0.0 && unclipped.data[4] > 1.0);
        assert!(window_intensity(&v, 10.0, 10.0, true).is_err());
    }
}
