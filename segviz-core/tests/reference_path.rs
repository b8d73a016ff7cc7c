//! Training and inference through SegViz's CPU operations (convolutions, BatchNorm + PReLU,
//! head probabilities) against Burn's own path.
//!
//! `SEGVIZ_REFERENCE_CONV=1` sends every custom operation through Burn's path, and it is read
//! once per process; so the test runs itself twice, once each way, in child processes, and
//! compares what they record. Without the `flex` feature there is no custom operation, and
//! nothing to compare.
#![cfg(feature = "flex")]

mod common;

use std::path::Path;
use std::process::Command;

use burn::module::Module;
use common::*;
use segviz_core::loss::DiceLoss;
use segviz_core::train::{optimizer_step, OptimizerConfig};

/// Where a child process writes its figures (set by the parent).
const TRACE: &str = "SEGVIZ_TEST_TRACE";

/// Ten training steps of the tiny model on a two-item batch (their losses); then, for a
/// fresh model of the same seed, three forward passes in training mode (which update the
/// BatchNorm running statistics and nothing else) and inference with those statistics.
///
/// The trained model's inference is not compared: the biases of the convolutions before a
/// BatchNorm have a true gradient of zero, and what either path computes for them is rounding
/// noise, which Adam turns into steps of ±lr. Outputs in training do not see those biases
/// (BatchNorm removes them), but the running means lag behind them, so inference after
/// training differs between any two summation orders, Burn's included.
fn record(out: &Path) {
    let dev = device().autodiff();
    let (x, y, _) = ball(16, 4.5, &dev);
    let x = burn::tensor::Tensor::cat(vec![x.clone(), x.mul_scalar(-0.5)], 0);
    let y = burn::tensor::Tensor::cat(vec![y.clone(), y], 0);
    let mut model = tiny_config(&["organ"]).init(&dev, 5).unwrap();
    let mut optim = OptimizerConfig::new().adam();
    let mut figures = Vec::new();
    for _ in 0..10 {
        let loss = DiceLoss::new().dice_ce(model.forward(x.clone()).remove(0), &y);
        figures.push(loss.clone().into_scalar::<f32>());
        model = optimizer_step(model, &mut optim, loss, 1e-2);
    }
    let fresh = tiny_config(&["organ"]).init(&dev, 5).unwrap();
    for k in 0..3 {
        let _ = fresh.forward(x.clone().mul_scalar(1.0 + k as f32));
    }
    let p = fresh.valid().probabilities(x.without_autodiff());
    figures.extend(p.into_data().try_to_vec::<f32>().unwrap());
    let text: Vec<String> = figures.iter().map(|v| v.to_string()).collect();
    std::fs::write(out, text.join("\n")).unwrap();
}

/// Runs this test in a child process with `SEGVIZ_REFERENCE_CONV` set to `reference`.
fn child(reference: &str, out: &Path) -> Vec<f32> {
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "training_follows_burns_path", "--test-threads=1"])
        .env(TRACE, out)
        .env("SEGVIZ_REFERENCE_CONV", reference)
        .status()
        .unwrap();
    assert!(
        status.success(),
        "child with SEGVIZ_REFERENCE_CONV={reference} failed"
    );
    std::fs::read_to_string(out)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

#[test]
fn training_follows_burns_path() {
    if let Some(out) = std::env::var_os(TRACE) {
        record(Path::new(&out));
        return;
    }
    let dir = std::env::temp_dir().join(format!("segviz-reference-path-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ours = child("0", &dir.join("ours"));
    let burns = child("1", &dir.join("burns"));
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(ours.len(), burns.len());
    let (losses, probabilities) = ours.split_at(10);
    let (ref_losses, ref_probabilities) = burns.split_at(10);
    // The losses fall, and follow Burn's to a relative 1e-3 (the sums run in another order,
    // and ten Adam steps at 1e-2 carry the difference forward).
    assert!(losses[9] < losses[0] * 0.9, "losses {losses:?}");
    for (step, (a, b)) in losses.iter().zip(ref_losses).enumerate() {
        assert!(
            (a - b).abs() <= 1e-3 * b.abs().max(1.0),
            "step {step}: loss {a} against Burn's {b}"
        );
    }
    let worst = probabilities
        .iter()
        .zip(ref_probabilities)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-5,
        "probabilities differ from Burn's by up to {worst}"
    );
    // The two children did take different paths (their sums run in different orders), so
    // the comparison above is not of one path with itself.
    assert!(ours != burns, "SEGVIZ_REFERENCE_CONV changed nothing");
}
