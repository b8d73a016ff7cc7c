//! A model file whose checksum is valid but whose configuration does not describe its
//! tensors (say 64 million channels) is refused before anything is allocated, and the
//! configuration's own size check agrees with built models.

mod common;

use common::*;
use segviz_core::checkpoint::{load_model, read_checkpoint, save_model};
use segviz_core::{RepresentationConfig, SegVizConfig};

/// Rewrites the safetensors JSON header of a model file with `edit`.
fn rewrite_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + len..]);
    out
}

/// Sets the model configuration's channels in a safetensors header.
fn set_channels(header: &mut serde_json::Value, channels: serde_json::Value) {
    let meta = &mut header["__metadata__"];
    let mut config: serde_json::Value =
        serde_json::from_str(meta["config"].as_str().unwrap()).unwrap();
    config["representation"]["channels"] = channels;
    meta["config"] = serde_json::Value::String(config.to_string());
}

#[test]
fn a_configuration_that_does_not_match_the_tensors_is_refused_before_building() {
    let dir = std::env::temp_dir().join(format!("segviz-core-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.segviz");
    let model = tiny_config(&["liver"]).init(&device(), 1).unwrap();
    save_model(&path, &model, serde_json::json!({})).unwrap();
    let good = std::fs::read(&path).unwrap();

    // The issue's case: 64 million channels at the second level.
    let huge = rewrite_header(&good, |h| {
        set_channels(h, serde_json::json!([4, 64_000_000, 16]))
    });
    std::fs::write(&path, &huge).unwrap();
    let err = read_checkpoint(&path).unwrap_err().to_string();
    assert!(
        err.contains("model.segviz") && err.contains("64000000"),
        "{err}"
    );
    assert!(load_model(&path, &device()).is_err());

    // A plausible but wrong configuration: one channel more at the bottom. The file reads
    // (a file may hold part of its model: a client's state, an update) but is no model.
    let off_by_one = rewrite_header(&good, |h| set_channels(h, serde_json::json!([4, 8, 17])));
    std::fs::write(&path, &off_by_one).unwrap();
    read_checkpoint(&path).unwrap();
    let err = load_model(&path, &device()).unwrap_err().to_string();
    assert!(
        err.contains("model.segviz") && err.contains("declares") && err.contains("values"),
        "{err}"
    );
    // One channel fewer: the file holds more than such a model has, which no state can.
    let too_small = rewrite_header(&good, |h| set_channels(h, serde_json::json!([4, 8, 15])));
    std::fs::write(&path, &too_small).unwrap();
    let err = read_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("declares") && err.contains("values"), "{err}");

    // A tensor shape whose size overflows is an error, not a panic.
    let first = "heads.liver.block.refine.units.0.adn.act.alpha";
    let overflow = rewrite_header(&good, |h| {
        h[first]["shape"] = serde_json::json!([usize::MAX, 2])
    });
    std::fs::write(&path, &overflow).unwrap();
    let err = read_checkpoint(&path).unwrap_err().to_string();
    assert!(
        err.contains("model.segviz") && err.contains("safetensors"),
        "{err}"
    );

    // The untouched file still loads.
    std::fs::write(&path, &good).unwrap();
    load_model(&path, &device()).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_configuration_beyond_reason_fails_validation() {
    let config = SegVizConfig::new(
        RepresentationConfig::new().with_channels(vec![16, 64_000_000, 64, 128, 256]),
        vec!["liver".into()],
    );
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("limit"), "{err}");
    // And it is refused before building, not by an aborted allocation.
    assert!(config.init(&device(), 0).is_err());
}

#[test]
fn the_value_count_of_a_configuration_is_that_of_its_model() {
    let configs = [
        tiny_config(&["liver"]),
        tiny_config(&["liver", "spleen", "pancreas"]).with_head_out_channels(5),
        SegVizConfig::new(
            RepresentationConfig::new()
                .with_in_channels(2)
                .with_channels(vec![3, 5, 7, 11])
                .with_strides(vec![2, 1, 2])
                .with_num_res_units(3),
            vec!["kidney".into()],
        ),
        SegVizConfig::new(
            RepresentationConfig::new()
                .with_channels(vec![4, 4, 8])
                .with_strides(vec![2, 2])
                .with_num_res_units(1),
            vec![],
        ),
    ];
    for config in configs {
        let model = config.init(&device(), 0).unwrap();
        assert_eq!(
            config.value_count(),
            Some(model.state().num_values()),
            "{config:?}"
        );
    }
    // The paper's U-Net with MONAI's two output classes: 4,808,917 trainable parameters
    // plus the BatchNorm running statistics.
    let paper = SegVizConfig::paper(&["liver"]);
    let model = paper.init(&device(), 0).unwrap();
    assert_eq!(model.num_trainable_params(), 4_808_917);
    assert_eq!(paper.value_count(), Some(model.state().num_values()));
}

/// The bytes of `checkpoint` in the first SegViz format (magic, JSON header, float32 values,
/// FNV-1a checksum), as SegViz wrote model files before they became safetensors.
fn legacy_bytes(checkpoint: &segviz_core::checkpoint::Checkpoint) -> Vec<u8> {
    let tensors: Vec<serde_json::Value> = checkpoint
        .state
        .tensors
        .iter()
        .map(|(p, t)| {
            serde_json::json!({"path": p, "shape": t.shape, "role": t.role,
                               "batch_norm": t.batch_norm, "trainable": t.trainable})
        })
        .collect();
    let header = serde_json::json!({"config": checkpoint.config,
                                    "metadata": checkpoint.metadata, "tensors": tensors});
    let json = serde_json::to_vec(&header).unwrap();
    let mut bytes = b"SEGVIZ\0\x01".to_vec();
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for t in checkpoint.state.tensors.values() {
        for v in &t.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let sum = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    bytes.extend_from_slice(&sum.to_le_bytes());
    bytes
}

#[test]
fn model_files_are_safetensors_and_files_of_the_first_format_still_load() {
    let dir = std::env::temp_dir().join(format!("segviz-core-legacy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.segviz");
    let model = tiny_config(&["liver", "spleen"])
        .init(&device(), 3)
        .unwrap();
    let meta = serde_json::json!({"round": 4, "preprocess": {"a_min": -175.0}});
    save_model(&path, &model, meta.clone()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    // The same checkpoint always gives the same bytes.
    save_model(&path, &model, meta.clone()).unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    // Any safetensors reader sees every tensor, float32, with its shape, and our metadata.
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let state = model.state();
    assert_eq!(file.len(), state.tensors.len());
    for (p, t) in &state.tensors {
        let view = file.tensor(p).unwrap();
        assert_eq!(view.dtype(), safetensors::Dtype::F32);
        assert_eq!(view.shape(), t.shape.as_slice());
    }
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let stored = header.metadata().as_ref().unwrap();
    assert_eq!(stored["format"], "segviz");
    assert_eq!(stored["preprocess"], r#"{"a_min":-175.0}"#);
    let checkpoint = read_checkpoint(&path).unwrap();
    assert_eq!(checkpoint.metadata, meta);
    assert_eq!(checkpoint.state, state);

    // The first format reads to the same checkpoint; saving it again writes safetensors.
    let old = dir.join("old.segviz");
    std::fs::write(&old, legacy_bytes(&checkpoint)).unwrap();
    assert_eq!(read_checkpoint(&old).unwrap(), checkpoint);
    let (loaded, _) = load_model(&old, &device()).unwrap();
    assert_eq!(loaded.state(), state);
    let mut corrupted = legacy_bytes(&checkpoint);
    let mid = corrupted.len() / 2;
    corrupted[mid] ^= 1;
    std::fs::write(&old, &corrupted).unwrap();
    let err = read_checkpoint(&old).unwrap_err().to_string();
    assert!(
        err.contains("old.segviz") && err.contains("checksum"),
        "{err}"
    );

    // A safetensors file that is not ours (no SegViz metadata) is named as such.
    let foreign = dir.join("foreign.safetensors");
    let data = [0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap();
    std::fs::write(
        &foreign,
        safetensors::serialize([("w", view)], None).unwrap(),
    )
    .unwrap();
    let err = read_checkpoint(&foreign).unwrap_err().to_string();
    assert!(
        err.contains("foreign.safetensors") && err.contains("not a SegViz model file"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
