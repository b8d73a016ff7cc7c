//! One convolution of the paper-size U-Net (channels 16–256, 128×128×32 patches, batch 2),
//! forward alone (inference) and forward + backward (input and weight gradients), through
//! Burn's own path (`conv.forward`) and through `segviz_core::fast_conv::flex_ad` (the
//! `cpu_conv` kernels the model takes on the CPU backend). The shapes are those of the
//! U-Net's layers: the first strided convolution, a stride-1 convolution of each of the next
//! levels, the head's last convolution (2 → 2 channels at full size) and a transposed
//! convolution of the way up.
//!
//! `cargo bench --bench convolution`

use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::PaddingConfig3d;
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use segviz::core::fast_conv::flex_ad::{self, Geometry};

const BATCH: usize = 2;

enum Layer {
    Conv(Conv3d),
    Transposed(ConvTranspose3d),
}

struct Case {
    name: &'static str,
    input: [usize; 4],
    layer: fn(&Device) -> Layer,
}

fn conv(c_in: usize, c_out: usize, stride: usize) -> impl Fn(&Device) -> Layer {
    move |device| {
        Layer::Conv(
            Conv3dConfig::new([c_in, c_out], [3; 3])
                .with_stride([stride; 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .init(device),
        )
    }
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "conv_1to16_s2_128x128x32",
            input: [1, 32, 128, 128],
            layer: |d| conv(1, 16, 2)(d),
        },
        Case {
            name: "conv_16to16_s1_64x64x16",
            input: [16, 16, 64, 64],
            layer: |d| conv(16, 16, 1)(d),
        },
        Case {
            name: "conv_2to2_s1_128x128x32",
            input: [2, 32, 128, 128],
            layer: |d| conv(2, 2, 1)(d),
        },
        Case {
            name: "conv_32to32_s1_32x32x8",
            input: [32, 8, 32, 32],
            layer: |d| conv(32, 32, 1)(d),
        },
        Case {
            name: "conv_64to64_s1_16x16x4",
            input: [64, 4, 16, 16],
            layer: |d| conv(64, 64, 1)(d),
        },
        Case {
            name: "convT_64to16_s2_32x32x8",
            input: [64, 8, 32, 32],
            layer: |d| {
                Layer::Transposed(
                    ConvTranspose3dConfig::new([64, 16], [3; 3])
                        .with_stride([2; 3])
                        .with_padding([1; 3])
                        .with_padding_out([1; 3])
                        .init(d),
                )
            },
        },
    ]
}

fn run(layer: &Layer, x: Tensor<5>, custom: bool) -> Tensor<5> {
    let geometry = |stride: [usize; 3], padding: [usize; 3]| Geometry { stride, padding };
    // The bias is added as the model adds it, so both paths compute the same thing.
    let bias = |y: Tensor<5>, b: Option<Tensor<1>>| match b {
        Some(b) => {
            let c = b.dims()[0];
            y + b.reshape([1, c, 1, 1, 1])
        }
        None => y,
    };
    match (layer, custom) {
        (Layer::Conv(c), true) => bias(
            flex_ad::conv3d(x, c.weight.val(), geometry(c.stride, [1; 3])).expect("flex"),
            c.bias.as_ref().map(|b| b.val()),
        ),
        (Layer::Conv(c), false) => c.forward(x),
        (Layer::Transposed(c), true) => bias(
            flex_ad::conv_transpose3d(
                x,
                c.weight.val(),
                geometry(c.stride, c.padding),
                c.padding_out,
            )
            .expect("flex"),
            c.bias.as_ref().map(|b| b.val()),
        ),
        (Layer::Transposed(c), false) => c.forward(x),
    }
}

fn convolution(c: &mut Criterion) {
    let device = segviz::default_device();
    let train = device.clone().autodiff();
    for case in cases() {
        let [ch, d, h, w] = case.input;
        let mut group = c.benchmark_group(case.name);
        group.sample_size(10);
        let layer = (case.layer)(&device);
        let x = Tensor::<5>::random([BATCH, ch, d, h, w], Distribution::Default, &device);
        for (label, fast) in [("forward_burn", false), ("forward_custom", true)] {
            group.bench_function(label, |b| {
                b.iter(|| run(&layer, x.clone(), fast).into_data())
            });
        }
        let layer = (case.layer)(&train);
        let xt =
            Tensor::<5>::random([BATCH, ch, d, h, w], Distribution::Default, &train).require_grad();
        for (label, fast) in [
            ("forward_backward_burn", false),
            ("forward_backward_custom", true),
        ] {
            group.bench_function(label, |b| {
                b.iter(|| {
                    let y = run(&layer, xt.clone(), fast);
                    y.sum().backward()
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, convolution);
criterion_main!(benches);
