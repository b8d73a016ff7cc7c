//! Importing MONAI checkpoints as they are found in practice (see
//! fixtures/make_monai_import_fixtures.py): wrapped state_dicts load and give MONAI's output;
//! a checkpoint with tensors the configuration has no place for is refused, naming them.

mod common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use segviz_core::monai::load_monai_checkpoint;
use segviz_core::{RepresentationConfig, SegVizConfig};

/// MONAI's defaults but for the small channels: num_res_units 2, two output classes.
fn small_config() -> SegVizConfig {
    SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![2, 4, 8])
            .with_strides(vec![2, 2]),
        vec!["organ".into()],
    )
}

#[test]
fn state_dict_and_model_wrappers_load_and_give_monais_output() {
    let dev = device();
    let x = Tensor::<5>::from_data(
        TensorData::new(read_f32("monai_small_input.f32"), [1, 1, 8, 8, 8]),
        &dev,
    );
    let expected = read_f32("monai_small_output.f32");
    for file in ["monai_small_state_dict.pt", "monai_small_model.pt"] {
        let model = load_monai_checkpoint(&fixture(file), &small_config(), "organ", &dev)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let y = model.forward(x.clone()).remove(0);
        let diff = max_abs_diff(&values(y), &expected);
        assert!(diff < 1e-4, "{file}: max |Δ| = {diff} against MONAI");
    }
}

#[test]
fn a_checkpoint_with_both_wrappers_is_ambiguous() {
    let err = load_monai_checkpoint(
        &fixture("monai_small_both.pt"),
        &small_config(),
        "organ",
        &device(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ambiguous") && err.contains("monai_small_both.pt"),
        "{err}"
    );
}

#[test]
fn unused_checkpoint_keys_are_refused_and_named() {
    // A num_res_units=3 U-Net read with the default num_res_units=2: every tensor the
    // configuration needs is there, but the third conv units would be dropped.
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("monai_small.json")).unwrap())
            .unwrap();
    let extra: Vec<&str> = meta["res3_keys_not_in_res2"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    assert!(!extra.is_empty());
    let err = load_monai_checkpoint(
        &fixture("monai_small_res3.pt"),
        &small_config(),
        "organ",
        &device(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("monai_small_res3.pt"), "{err}");
    assert!(
        err.contains(&format!("{} tensor(s)", extra.len())),
        "the error must count every unused tensor ({}): {err}",
        extra.len()
    );
    // The first keys, in sorted order, are named.
    let mut sorted = extra.clone();
    sorted.sort();
    assert!(err.contains(sorted[0]), "{err}");
    // With the right num_res_units the same file loads.
    let res3 = SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![2, 4, 8])
            .with_strides(vec![2, 2])
            .with_num_res_units(3),
        vec!["organ".into()],
    );
    load_monai_checkpoint(&fixture("monai_small_res3.pt"), &res3, "organ", &device())
        .expect("num_res_units 3 matches");
}
