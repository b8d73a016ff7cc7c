//! Backend parity: the same weights and input give the same logits on the CPU default
//! (`flex`) and on WebGPU, and one training step moves the loss the same way on both.
//!
//! `cargo test --features wgpu --test backend_parity` (or `--features vulkan`). It needs a
//! Vulkan, Metal or DX12 adapter — in CI, Debian's lavapipe (`mesa-vulkan-drivers`), a CPU
//! Vulkan driver. Without an adapter the test prints why and passes without checking —
//! except when the `CI` variable is set: CI installs lavapipe, so there it fails instead.
//! Autotuning is kept minimal (`CUBECL_AUTOTUNE_LEVEL=minimal`) unless set otherwise:
//! on lavapipe every autotune candidate is a shader compilation.
#![cfg(any(feature = "wgpu", feature = "vulkan"))]

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use segviz::core::loss::DiceLoss;
use segviz::core::train::{optimizer_step, OptimizerConfig};
use segviz::core::{RepresentationConfig, SegVizConfig, SegVizModel};

/// Skips with `reason`, or fails when `CI` is set (CI provides an adapter).
fn skip(reason: &str) -> Option<Device> {
    if std::env::var_os("CI").is_some() {
        panic!("backend parity cannot run under CI: {reason}");
    }
    eprintln!("SKIPPED backend parity: {reason}");
    None
}

/// The WebGPU device, or `None` (with the reason printed) when no adapter can be used.
fn gpu_device() -> Option<Device> {
    if std::env::var_os("CUBECL_AUTOTUNE_LEVEL").is_none() {
        // Set before the first GPU use, while this test is the only thread touching CubeCL.
        std::env::set_var("CUBECL_AUTOTUNE_LEVEL", "minimal");
    }
    let probe = std::panic::catch_unwind(|| {
        let device = segviz::default_device();
        let t = Tensor::<1>::from_data(TensorData::new(vec![1.0f32, 2.0], [2]), &device);
        let sum = t.sum().into_scalar::<f32>();
        (device, sum)
    });
    match probe {
        Ok((device, sum)) if (sum - 3.0).abs() < 1e-6 => Some(device),
        Ok((_, sum)) => skip(&format!("the WebGPU device computed 1 + 2 = {sum}")),
        Err(_) => skip(
            "no usable WebGPU adapter (install a Vulkan driver, e.g. Debian's \
             mesa-vulkan-drivers)",
        ),
    }
}

fn config() -> SegVizConfig {
    SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![4, 8, 16])
            .with_strides(vec![2, 2]),
        vec!["organ".into()],
    )
}

const SHAPE: [usize; 3] = [16, 16, 8];

fn input(device: &Device) -> (Tensor<5>, Tensor<4, Int>) {
    let n: usize = SHAPE.iter().product();
    let c = [7.5f32, 7.5, 3.5];
    let mut x = Vec::with_capacity(2 * n);
    let mut y = Vec::with_capacity(2 * n);
    for s in 0..2 {
        for i in 0..SHAPE[0] {
            for j in 0..SHAPE[1] {
                for k in 0..SHAPE[2] {
                    let d = ((i as f32 - c[0]).powi(2)
                        + (j as f32 - c[1]).powi(2)
                        + (2.0 * (k as f32 - c[2])).powi(2))
                    .sqrt();
                    let inside = d < 5.0 + s as f32;
                    let texture = ((i * 13 + j * 7 + k * 3 + s) as f32 * 0.7).sin() * 0.1;
                    x.push(if inside { 0.7 } else { 0.3 } + texture);
                    y.push(i64::from(inside));
                }
            }
        }
    }
    (
        Tensor::from_data(
            TensorData::new(x, [2, 1, SHAPE[0], SHAPE[1], SHAPE[2]]),
            device,
        ),
        Tensor::from_data(
            TensorData::new(y, [2, SHAPE[0], SHAPE[1], SHAPE[2]]),
            device,
        ),
    )
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 values")
}

/// Loss before and after one Adam step from the same weights.
fn one_step(model: SegVizModel, device: &Device) -> (f64, f64) {
    let (x, y) = input(device);
    let loss_fn = DiceLoss::new();
    let loss = loss_fn.dice_ce(model.forward(x.clone()).remove(0), &y);
    let before = loss.clone().into_scalar::<f32>() as f64;
    let mut optim = OptimizerConfig::new().adam();
    let model = optimizer_step(model, &mut optim, loss, 1e-2);
    let after = loss_fn
        .dice_ce(model.forward(x).remove(0), &y)
        .into_scalar::<f32>() as f64;
    (before, after)
}

#[test]
fn webgpu_matches_the_cpu_default() {
    let Some(gpu) = gpu_device() else { return };
    let cpu = Device::flex();
    let state = config().init(&cpu, 3).expect("model").state();

    // Inference: identical weights, identical input, same logits.
    let on_cpu = config().with_state(&cpu, &state).expect("cpu model");
    let on_gpu = config().with_state(&gpu, &state).expect("gpu model");
    let a = values(on_cpu.forward(input(&cpu).0).remove(0));
    let b = values(on_gpu.forward(input(&gpu).0).remove(0));
    let scale = a.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1.0);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!("logits: max |cpu - gpu| = {diff:e} (largest |logit| {scale})");
    assert!(diff <= 1e-4 * scale, "logits differ by {diff}");

    // Training: one step from the same weights lowers the loss by the same amount.
    let cpu_train = config()
        .with_state(&cpu.clone().autodiff(), &state)
        .expect("cpu");
    let gpu_train = config()
        .with_state(&gpu.clone().autodiff(), &state)
        .expect("gpu");
    let (c0, c1) = one_step(cpu_train, &cpu.autodiff());
    let (g0, g1) = one_step(gpu_train, &gpu.autodiff());
    eprintln!("loss: cpu {c0:.6} -> {c1:.6}, gpu {g0:.6} -> {g1:.6}");
    assert!(
        (c0 - g0).abs() < 1e-4,
        "initial losses differ: {c0} vs {g0}"
    );
    assert!(
        c1 < c0 && g1 < g0,
        "a step must lower the loss on both backends"
    );
    let (dc, dg) = (c0 - c1, g0 - g1);
    assert!(
        (dc - dg).abs() < 0.05 * dc.abs().max(1e-3),
        "loss moved by {dc} on cpu, {dg} on gpu"
    );
    // The trained model keeps working on the plain device.
    let _ = on_gpu.valid();
}
