//! Patch throughput of the SegViz U-Net outside criterion, as one JSON line: median
//! milliseconds per training step (forward + backward + Adam, Dice + CE, batch 2), per
//! inference patch, and the process's peak resident memory — the same figures
//! `benches/monai_reference.py` prints for MONAI + PyTorch.
//!
//! ```text
//! cargo run --release --example patch_throughput -- --size paper --steps 20
//! ```

use std::process::ExitCode;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use clap::Parser;
use segviz::core::loss::DiceLoss;
use segviz::core::train::{optimizer_step, OptimizerConfig};
use segviz::core::{RepresentationConfig, SegVizConfig};

/// Time training steps and inference of the SegViz U-Net.
#[derive(Parser, Debug)]
#[command(name = "patch_throughput")]
struct Args {
    /// tiny (4–64, 32×32×16), small (8–128, 64×64×16) or paper (16–256, 128×128×32).
    #[arg(long, default_value = "tiny")]
    size: String,
    /// Timed steps (after two warm-up steps).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Timed training steps, when they should differ from `--steps` (0 times inference
    /// alone, e.g. to profile it; the training figure is then null).
    #[arg(long)]
    train_steps: Option<usize>,
}

const BATCH: usize = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    let (channels, patch): (Vec<usize>, [usize; 3]) = match args.size.as_str() {
        "tiny" => (vec![4, 8, 16, 32, 64], [32, 32, 16]),
        "small" => (vec![8, 16, 32, 64, 128], [64, 64, 16]),
        "paper" => (vec![16, 32, 64, 128, 256], [128, 128, 32]),
        other => {
            eprintln!("error: unknown size {other:?} (tiny, small or paper)");
            return ExitCode::FAILURE;
        }
    };
    let device = segviz::default_device();
    let train_device = device.clone().autodiff();
    let config = SegVizConfig::new(
        RepresentationConfig::new().with_channels(channels),
        vec!["organ".into()],
    );
    let mut model = match config.init(&train_device, 0) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let [d, h, w] = patch;
    let n = BATCH * d * h * w;
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
        .collect();
    let y: Vec<i64> = (0..n).map(|i| i64::from((i * 31) % 10 > 6)).collect();
    let xt = Tensor::<5>::from_data(
        TensorData::new(x.clone(), [BATCH, 1, d, h, w]),
        &train_device,
    );
    let yt = Tensor::<4, Int>::from_data(TensorData::new(y, [BATCH, d, h, w]), &train_device);
    let mut optim = OptimizerConfig::new().adam();
    let mut train_ms = Vec::new();
    let train_steps = args.train_steps.unwrap_or(args.steps);
    for step in 0..train_steps + 2 * usize::from(train_steps > 0) {
        let start = Instant::now();
        let loss = DiceLoss::new().dice_ce(model.forward(xt.clone()).remove(0), &yt);
        model = optimizer_step(model, &mut optim, loss.clone(), 1e-4);
        // Reading the loss waits for the step on asynchronous backends.
        let _ = loss.into_scalar::<f32>();
        if step >= 2 {
            train_ms.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    let eval = model.valid();
    let xi = Tensor::<5>::from_data(TensorData::new(x, [BATCH, 1, d, h, w]), &device);
    let mut infer_ms = Vec::new();
    for step in 0..args.steps + 2 {
        let start = Instant::now();
        let _ = eval.probabilities(xi.clone()).into_data();
        if step >= 2 {
            infer_ms.push(start.elapsed().as_secs_f64() * 1e3 / BATCH as f64);
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "framework": "segviz",
            "backend": segviz::backend_name(),
            "size": args.size,
            "batch": BATCH,
            "train_step_ms": (!train_ms.is_empty()).then(|| round2(median(&mut train_ms))),
            "inference_ms_per_patch": round2(median(&mut infer_ms)),
            "peak_rss_mib": peak_rss_mib(),
        })
    );
    ExitCode::SUCCESS
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Peak resident memory (Linux `VmHWM`), in MiB; `None` where it cannot be read.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(round2(kib / 1024.0))
}
