//! Shared helpers of the segviz-core integration tests.
#![allow(dead_code)]

use burn::tensor::{Device, Int, Tensor, TensorData};
use segviz_core::{RepresentationConfig, SegVizConfig};

/// The CPU test device (flex backend).
pub fn device() -> Device {
    Device::flex()
}

/// A tiny U-Net (channels 4-8-16, two levels) with the given heads.
pub fn tiny_config(tasks: &[&str]) -> SegVizConfig {
    SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![4, 8, 16])
            .with_strides(vec![2, 2]),
        tasks.iter().map(|t| t.to_string()).collect(),
    )
}

/// A deterministic pseudo-random input `[1, 1, d, h, w]`.
pub fn input(shape: [usize; 3], device: &Device) -> Tensor<5> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n)
        .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 2.0)
        .collect();
    Tensor::from_data(
        TensorData::new(data, [1, 1, shape[0], shape[1], shape[2]]),
        device,
    )
}

/// A ball of radius `r` voxels centred in a `size³` cube: (image, label).
pub fn ball(size: usize, r: f32, device: &Device) -> (Tensor<5>, Tensor<4, Int>, Vec<u8>) {
    let c = (size as f32 - 1.0) / 2.0;
    let mut img = Vec::new();
    let mut lab = Vec::new();
    for i in 0..size {
        for j in 0..size {
            for k in 0..size {
                let d = ((i as f32 - c).powi(2) + (j as f32 - c).powi(2) + (k as f32 - c).powi(2))
                    .sqrt();
                let inside = d <= r;
                // Organ a little brighter than background, plus texture.
                let noise = ((i * 31 + j * 17 + k * 7) as f32 * 0.37).sin() * 0.15;
                img.push(if inside { 0.7 } else { 0.3 } + noise);
                lab.push(inside as u8);
            }
        }
    }
    let image = Tensor::from_data(TensorData::new(img, [1, 1, size, size, size]), device);
    let label = Tensor::<4, Int>::from_data(
        TensorData::new(
            lab.iter().map(|&v| v as i64).collect::<Vec<_>>(),
            [1, size, size, size],
        ),
        device,
    );
    (image, label, lab)
}

/// Host values of a tensor.
pub fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 tensor")
}

/// Largest absolute difference.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A file of `tests/fixtures`.
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fixture of little-endian `f32` values.
pub fn read_f32(name: &str) -> Vec<f32> {
    std::fs::read(fixture(name))
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
