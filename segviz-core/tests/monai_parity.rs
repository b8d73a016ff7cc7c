//! A MONAI UNet checkpoint made with PyTorch (see fixtures/make_monai_fixture.py) loads into
//! a single-head SegViz model and gives MONAI's output.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use segviz_core::monai::{load_monai_checkpoint, monai_key};
use segviz_core::{RepresentationConfig, SegVizConfig};

fn fixture_config() -> SegVizConfig {
    SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![2, 4, 8, 16, 32])
            .with_strides(vec![2, 2, 2, 2]),
        vec!["organ".into()],
    )
}

#[test]
fn monai_keys_are_exactly_the_fixture_keys() {
    let model = fixture_config().init(&device(), 0).unwrap();
    let mut ours: Vec<String> = model
        .layout()
        .tensors
        .keys()
        .map(|p| monai_key(p, 4).unwrap())
        .collect();
    ours.sort();
    let text = std::fs::read_to_string(fixture("monai_unet_tiny_keys.txt")).unwrap();
    let mut theirs: Vec<String> = text
        .lines()
        .filter_map(|l| l.split('\t').next())
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .map(str::to_string)
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
}

#[test]
fn monai_checkpoint_gives_monai_output() {
    let dev = device();
    let model = load_monai_checkpoint(
        &fixture("monai_unet_tiny.pt"),
        &fixture_config(),
        "organ",
        &dev,
    )
    .unwrap();
    assert_eq!(model.num_trainable_params(), 76_007);
    let x = Tensor::<5>::from_data(
        TensorData::new(read_f32("monai_unet_tiny_input.f32"), [1, 1, 16, 16, 16]),
        &dev,
    );
    // Not on an autodiff device, so BatchNorm uses the running statistics (eval mode).
    let y = model.forward(x).remove(0);
    assert_eq!(y.dims(), [1, 2, 16, 16, 16]);
    let expected = read_f32("monai_unet_tiny_output.f32");
    let diff = max_abs_diff(&values(y), &expected);
    assert!(diff < 1e-4, "max |Δ| = {diff}");
}

#[test]
fn checkpoint_of_another_shape_is_refused_with_the_key() {
    let mut config = fixture_config();
    config.representation.channels = vec![2, 4, 8, 16, 64];
    let err = load_monai_checkpoint(&fixture("monai_unet_tiny.pt"), &config, "organ", &device())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("monai_unet_tiny.pt") && err.contains("shape"),
        "{err}"
    );
    let err = load_monai_checkpoint(
        &fixture("monai_unet_tiny_input.f32"),
        &fixture_config(),
        "organ",
        &device(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("monai_unet_tiny_input.f32"), "{err}");
}
