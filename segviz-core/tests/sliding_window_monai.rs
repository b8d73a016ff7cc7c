//! Sliding-window inference against MONAI's `sliding_window_inference` (see
//! fixtures/make_sliding_window_fixture.py): a volume shorter than the window along one axis,
//! constant and Gaussian blending, two overlaps, and a predictor whose output depends on the
//! position inside the window, so padding placement, window starts and weights all show.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use segviz_core::sliding_window::{sliding_window_inference, BlendMode, SlidingWindowConfig};

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("sliding_window_monai.json")).unwrap())
        .unwrap()
}

fn triple(v: &serde_json::Value) -> [usize; 3] {
    [0, 1, 2].map(|a| v[a].as_u64().unwrap() as usize)
}

/// The fixture's predictor: channel 0 = 2x + 0.1i − 0.05j + 0.3k, channel 1 = −x + 0.02ik
/// + 0.01j, with (i, j, k) the position inside the window.
fn predictor(x: Tensor<5>) -> Tensor<5> {
    let [n, _, a, b, c] = x.dims();
    let (mut i, mut j, mut k, mut ik) = (vec![], vec![], vec![], vec![]);
    for ii in 0..a {
        for jj in 0..b {
            for kk in 0..c {
                i.push(ii as f32);
                j.push(jj as f32);
                k.push(kk as f32);
                ik.push((ii * kk) as f32);
            }
        }
    }
    let device = x.device();
    let grid = |v: Vec<f32>| {
        Tensor::<5>::from_data(TensorData::new(v, [1, 1, a, b, c]), &device).repeat_dim(0, n)
    };
    let (i, j, k, ik) = (grid(i), grid(j), grid(k), grid(ik));
    let y0 = x.clone().mul_scalar(2.0) + i.mul_scalar(0.1) - j.clone().mul_scalar(0.05)
        + k.mul_scalar(0.3);
    let y1 = x.neg() + ik.mul_scalar(0.02) + j.mul_scalar(0.01);
    Tensor::cat(vec![y0, y1], 1)
}

#[test]
fn short_axis_is_padded_and_blended_as_monai_does() {
    let meta = meta();
    let shape = triple(&meta["shape"]);
    let roi = triple(&meta["roi_size"]);
    assert!(
        shape[2] < roi[2],
        "the fixture must have an axis shorter than the window"
    );
    let input = read_f32("sliding_window_input.f32");
    let dev = device();
    for case in meta["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let mode = match case["mode"].as_str().unwrap() {
            "constant" => BlendMode::Constant,
            _ => BlendMode::Gaussian,
        };
        let config = SlidingWindowConfig::new(roi)
            .with_sw_batch_size(3)
            .with_overlap(case["overlap"].as_f64().unwrap())
            .with_mode(mode)
            .with_sigma_scale(meta["sigma_scale"].as_f64().unwrap());
        let (ours, channels) =
            sliding_window_inference(&input, shape, &config, &dev, predictor).unwrap();
        assert_eq!(channels, 2);
        let theirs = read_f32(&format!("sliding_window_{name}.f32"));
        let diff = max_abs_diff(&ours, &theirs);
        assert!(diff < 1e-4, "{name}: max |Δ| = {diff} against MONAI");
    }
}

#[test]
fn gaussian_weights_have_monais_absolute_floor() {
    // A 4×6×5 window at σ = 0.125·size: MONAI's peak is 0.49 and its corners fall below
    // 1e-3, where MONAI clamps them to 1e-3 (not to 1e-3 of the peak). The weights show
    // through a constant-input predictor on a volume two windows long: each voxel's output
    // is the weighted mean of the window-local k positions covering it.
    let meta = meta();
    let roi = triple(&meta["importance_roi"]);
    let weights: Vec<f64> = meta["importance_c_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let min = weights.iter().copied().fold(f64::INFINITY, f64::min);
    assert!(
        (min - 1e-3).abs() < 1e-9,
        "MONAI's floor is 1e-3, got {min}"
    );
    // Volume [4, 6, 7]: along k two windows at 0 and 2 (overlap 0.6 → step 2).
    let shape = [roi[0], roi[1], roi[2] + 2];
    let config = SlidingWindowConfig::new(roi)
        .with_overlap(0.6)
        .with_mode(BlendMode::Gaussian)
        .with_sigma_scale(meta["sigma_scale"].as_f64().unwrap());
    let volume = vec![0.0f32; shape.iter().product()];
    let local_k = |x: Tensor<5>| {
        let [n, _, a, b, c] = x.dims();
        let k: Vec<f32> = (0..a * b * c).map(|t| (t % c) as f32).collect();
        Tensor::<5>::from_data(TensorData::new(k, [1, 1, a, b, c]), &x.device()).repeat_dim(0, n)
    };
    let (ours, _) = sliding_window_inference(&volume, shape, &config, &device(), local_k).unwrap();
    let starts = [0usize, 2];
    let w = |i: usize, j: usize, k: usize| weights[(i * roi[1] + j) * roi[2] + k];
    for i in 0..shape[0] {
        for j in 0..shape[1] {
            for z in 0..shape[2] {
                let (mut num, mut den) = (0.0, 0.0);
                for &s in &starts {
                    if z >= s && z < s + roi[2] {
                        num += w(i, j, z - s) * (z - s) as f64;
                        den += w(i, j, z - s);
                    }
                }
                let got = ours[(i * shape[1] + j) * shape[2] + z] as f64;
                assert!(
                    (got - num / den).abs() < 1e-4,
                    "voxel ({i}, {j}, {z}): {got}, MONAI's weights give {}",
                    num / den
                );
            }
        }
    }
}
