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

#[test]
fn an_exported_state_dict_has_monais_keys_and_values_and_imports_back() {
    use burn::store::pytorch_reader::{DType, PytorchReader};
    use segviz_core::monai::export_monai;
    let dev = device();
    let source = fixture("monai_small_state_dict.pt");
    let model = load_monai_checkpoint(&source, &small_config(), "organ", &dev).unwrap();
    let dir = std::env::temp_dir().join(format!("segviz-monai-export-{}", std::process::id()));
    let out = dir.join("organ.pt");
    export_monai(&model, "organ", &out).unwrap();

    // The keys MONAI wrote, num_batches_tracked included, with the same shapes and values.
    let original = PytorchReader::with_top_level_key(&source, "state_dict").unwrap();
    let exported = PytorchReader::new(&out).unwrap();
    let mut keys = original.keys();
    keys.sort();
    let mut ours = exported.keys();
    ours.sort();
    assert_eq!(ours, keys);
    for key in &keys {
        let (a, b) = (original.get(key).unwrap(), exported.get(key).unwrap());
        assert_eq!(b.shape(), a.shape(), "{key}");
        assert_eq!(b.dtype(), a.dtype(), "{key}");
        if a.dtype() == DType::F32 {
            assert_eq!(b.read().unwrap(), a.read().unwrap(), "{key}");
        } else {
            assert_eq!(b.read().unwrap(), 0i64.to_le_bytes().to_vec(), "{key}");
        }
    }
    // Imported back, it gives MONAI's output.
    let back = load_monai_checkpoint(&out, &small_config(), "organ", &dev).unwrap();
    let x = Tensor::<5>::from_data(
        TensorData::new(read_f32("monai_small_input.f32"), [1, 1, 8, 8, 8]),
        &dev,
    );
    let diff = max_abs_diff(
        &values(back.forward(x).remove(0)),
        &read_f32("monai_small_output.f32"),
    );
    assert!(diff < 1e-4, "max |Δ| = {diff} against MONAI");
    // The same model always gives the same file: the one MONAI itself loaded with
    // strict=True and ran to MONAI's own output (fixtures/check_monai_export.py).
    let bytes = std::fs::read(&out).unwrap();
    let checked = fixture("monai_small_exported.pt");
    if std::env::var_os("SEGVIZ_WRITE_FIXTURES").is_some() {
        std::fs::write(&checked, &bytes).unwrap();
    }
    assert_eq!(
        bytes,
        std::fs::read(&checked).unwrap(),
        "export changed: rerun the check"
    );
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("monai_small_exported.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report["bytes"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(report["strict_load"], true);
    assert!(report["max_abs_diff_vs_monai_output"].as_f64().unwrap() < 1e-4);

    let err = export_monai(&model, "spleen", &dir.join("spleen.pt"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("spleen") && err.contains("organ"), "{err}");
    assert!(!dir.join("spleen.pt").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn each_head_of_a_multi_head_model_exports_as_its_own_monai_unet() {
    use segviz_core::monai::export_monai;
    let dev = device();
    let config = SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![2, 4, 8])
            .with_strides(vec![2, 2]),
        vec!["liver".into(), "spleen".into()],
    );
    let model = config.init(&dev, 5).unwrap();
    let dir = std::env::temp_dir().join(format!("segviz-monai-heads-{}", std::process::id()));
    let x = Tensor::<5>::from_data(
        TensorData::new(read_f32("monai_small_input.f32"), [1, 1, 8, 8, 8]),
        &dev,
    );
    let outputs = model.forward(x.clone());
    for (i, task) in ["liver", "spleen"].into_iter().enumerate() {
        let pt = dir.join(format!("{task}.pt"));
        export_monai(&model, task, &pt).unwrap();
        let single = load_monai_checkpoint(&pt, &config, task, &dev).unwrap();
        let diff = max_abs_diff(
            &values(single.forward(x.clone()).remove(0)),
            &values(outputs[i].clone()),
        );
        assert!(diff < 1e-6, "{task}: max |Δ| = {diff}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
