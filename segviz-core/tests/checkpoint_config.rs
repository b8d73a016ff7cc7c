//! A model file whose checksum is valid but whose configuration does not describe its
//! tensors (say 64 million channels) is refused before anything is allocated, and the
//! configuration's own size check agrees with built models.

mod common;

use common::*;
use segviz_core::checkpoint::{load_model, read_checkpoint, save_model};
use segviz_core::{RepresentationConfig, SegVizConfig};

/// FNV-1a, the model file's checksum.
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Rewrites the JSON header of a model file with `edit`, keeping the checksum valid.
fn rewrite_header(bytes: &[u8], edit: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[16..16 + len]).unwrap();
    edit(&mut header);
    let json = serde_json::to_vec(&header).unwrap();
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[16 + len..bytes.len() - 8]);
    let sum = checksum(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

#[test]
fn a_configuration_that_does_not_match_the_tensors_is_refused_before_building() {
    let dir = std::env::temp_dir().join(format!("segviz-core-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.segviz");
    let model = tiny_config(&["liver"]).init(&device(), 1).unwrap();
    save_model(&path, &model, serde_json::json!({})).unwrap();
    let good = std::fs::read(&path).unwrap();

    // The case: 64 million channels at the second level.
    let huge = rewrite_header(&good, |h| {
        h["config"]["representation"]["channels"] = serde_json::json!([4, 64_000_000, 16])
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
    let off_by_one = rewrite_header(&good, |h| {
        h["config"]["representation"]["channels"] = serde_json::json!([4, 8, 17])
    });
    std::fs::write(&path, &off_by_one).unwrap();
    read_checkpoint(&path).unwrap();
    let err = load_model(&path, &device()).unwrap_err().to_string();
    assert!(
        err.contains("model.segviz") && err.contains("declares") && err.contains("values"),
        "{err}"
    );
    // One channel fewer: the file holds more than such a model has, which no state can.
    let too_small = rewrite_header(&good, |h| {
        h["config"]["representation"]["channels"] = serde_json::json!([4, 8, 15])
    });
    std::fs::write(&path, &too_small).unwrap();
    let err = read_checkpoint(&path).unwrap_err().to_string();
    assert!(err.contains("declares") && err.contains("values"), "{err}");

    // A tensor shape whose size overflows is an error, not a panic.
    let overflow = rewrite_header(&good, |h| {
        h["tensors"][0]["shape"] = serde_json::json!([usize::MAX, 2])
    });
    std::fs::write(&path, &overflow).unwrap();
    assert!(read_checkpoint(&path)
        .unwrap_err()
        .to_string()
        .contains("impossible shape"));

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
