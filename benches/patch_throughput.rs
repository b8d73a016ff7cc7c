//! Patch throughput of the SegViz U-Net on the selected backend: one training step
//! (forward + backward + Adam) and one inference forward pass, for three model sizes:
//! *tiny* (channels 4–64, 32×32×16), *small* (8–128, 64×64×16) and *paper* (16–256,
//! 128×128×32, batch 2).
//!
//! `cargo bench --bench patch_throughput` (add `--features vulkan` for the GPU).

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segviz::core::loss::DiceLoss;
use segviz::core::train::{optimizer_step, OptimizerConfig};
use segviz::core::{RepresentationConfig, SegVizConfig};

struct Size {
    name: &'static str,
    channels: Vec<usize>,
    patch: [usize; 3],
    batch: usize,
}

fn sizes() -> Vec<Size> {
    vec![
        Size {
            name: "tiny",
            channels: vec![4, 8, 16, 32, 64],
            patch: [32, 32, 16],
            batch: 2,
        },
        Size {
            name: "small",
            channels: vec![8, 16, 32, 64, 128],
            patch: [64, 64, 16],
            batch: 2,
        },
        Size {
            name: "paper",
            channels: vec![16, 32, 64, 128, 256],
            patch: [128, 128, 32],
            batch: 2,
        },
    ]
}

fn throughput(c: &mut Criterion) {
    let device = segviz::default_device();
    let train_device = device.clone().autodiff();
    for size in sizes() {
        let config = SegVizConfig::new(
            RepresentationConfig::new().with_channels(size.channels.clone()),
            vec!["organ".into()],
        );
        let [d, h, w] = size.patch;
        let n = size.batch * d * h * w;
        let x: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0)
            .collect();
        let y: Vec<i64> = (0..n).map(|i| i64::from((i / 97) % 3 == 0)).collect();
        let mut group = c.benchmark_group(format!("unet_{}", size.name));
        group.sample_size(10);
        group.throughput(Throughput::Elements(size.batch as u64));

        let mut model = config.init(&train_device, 0).expect("model");
        let mut optim = OptimizerConfig::new().adam();
        let xt = Tensor::<5>::from_data(
            TensorData::new(x.clone(), [size.batch, 1, d, h, w]),
            &train_device,
        );
        let yt =
            Tensor::<4, Int>::from_data(TensorData::new(y, [size.batch, d, h, w]), &train_device);
        group.bench_function("train_step", |b| {
            b.iter(|| {
                let logits = model.forward(xt.clone()).remove(0);
                let loss = DiceLoss::new().dice_ce(logits, &yt);
                model = optimizer_step(model.clone(), &mut optim, loss, 1e-4);
            })
        });

        let eval = model.valid();
        let xi = Tensor::<5>::from_data(TensorData::new(x, [size.batch, 1, d, h, w]), &device);
        group.bench_function("inference", |b| {
            b.iter(|| {
                let p = eval.probabilities(xi.clone());
                // Wait for the result, as a real caller reading it would.
                p.into_data()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, throughput);
criterion_main!(benches);
