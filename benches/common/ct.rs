//! The synthetic CT the benchmarks share.

use segviz::data::{Geometry, Volume};

/// A CT-like 512×512×100 volume at 0.8×0.8×2.5 mm: a body ellipse of soft tissue with a
/// brighter "organ" (label 1) inside, in air.
pub fn ct_pair() -> (Volume<f32>, Volume<u8>) {
    let shape = [512, 512, 100];
    let geometry = Geometry::from_spacing(shape, [0.8, 0.8, 2.5]);
    let mut image = Volume::filled(geometry.clone(), -1000.0f32);
    let mut label = Volume::filled(geometry, 0u8);
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            let (x, y) = (i as f32 / 256.0 - 1.0, j as f32 / 256.0 - 1.0);
            let body = (x / 0.9).powi(2) + (y / 0.7).powi(2) < 1.0;
            let organ = ((x + 0.3) / 0.35).powi(2) + (y / 0.3).powi(2) < 1.0;
            for k in 0..shape[2] {
                let idx = image.geometry.index(i, j, k);
                let noise = (((i * 7 + j * 13 + k * 31) % 97) as f32 - 48.0) * 0.5;
                if organ && (20..80).contains(&k) {
                    image.data[idx] = 110.0 + noise;
                    label.data[idx] = 1;
                } else if body {
                    image.data[idx] = 40.0 + noise;
                }
            }
        }
    }
    (image, label)
}
