//! Whole-volume inference and model files.

mod common;

use common::*;
use segviz_core::checkpoint::{load_model, read_checkpoint, save_model};
use segviz_core::sliding_window::{sliding_window_inference, BlendMode, SlidingWindowConfig};

#[test]
fn one_covering_window_equals_a_full_forward_pass() {
    let dev = device();
    let model = tiny_config(&["liver", "spleen"]).init(&dev, 9).unwrap();
    let shape = [8, 12, 16];
    let x = input(shape, &dev);
    let full = values(model.probabilities(x.clone()));
    let volume = values(x);
    for mode in [BlendMode::Constant, BlendMode::Gaussian] {
        let cfg = SlidingWindowConfig::new(shape).with_mode(mode);
        let (out, channels) =
            sliding_window_inference(&volume, shape, &cfg, &dev, |w| model.probabilities(w))
                .unwrap();
        assert_eq!(channels, 2);
        assert!(max_abs_diff(&out, &full) < 1e-5);
    }
}

#[test]
fn overlapping_windows_cover_any_size_and_blend_sensibly() {
    let dev = device();
    // A "network" whose output is its input: any blend of windows must give the volume back.
    let shape = [13, 9, 21];
    let volume: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| (i % 97) as f32 / 97.0)
        .collect();
    for mode in [BlendMode::Constant, BlendMode::Gaussian] {
        let cfg = SlidingWindowConfig::new([8, 8, 8])
            .with_overlap(0.5)
            .with_sw_batch_size(3)
            .with_mode(mode);
        let (out, channels) = sliding_window_inference(&volume, shape, &cfg, &dev, |w| w).unwrap();
        assert_eq!(channels, 1);
        assert!(max_abs_diff(&out, &volume) < 1e-5);
    }
    // A smaller volume than the window is padded and cropped back.
    let small = vec![0.5f32; 4 * 4 * 4];
    let cfg = SlidingWindowConfig::new([8, 8, 8]);
    let (out, _) = sliding_window_inference(&small, [4, 4, 4], &cfg, &dev, |w| w).unwrap();
    assert_eq!(out.len(), 64);
    // Model-sized windows over a larger volume keep the model's output range.
    let model = tiny_config(&["liver"]).init(&dev, 9).unwrap();
    let big = values(input([12, 20, 12], &dev));
    let cfg = SlidingWindowConfig::new([8, 8, 8]).with_overlap(0.25);
    let (p, _) =
        sliding_window_inference(&big, [12, 20, 12], &cfg, &dev, |w| model.probabilities(w))
            .unwrap();
    assert!(p.iter().all(|v| (0.0..=1.0).contains(v)));
    assert!(sliding_window_inference(&big, [12, 20, 13], &cfg, &dev, |w| w).is_err());
}

#[test]
fn save_then_load_gives_identical_outputs() {
    let dev = device();
    let dir = tempdir("save_load");
    let path = dir.join("model.segviz");
    let model = tiny_config(&["liver", "kidney"]).init(&dev, 21).unwrap();
    save_model(&path, &model, serde_json::json!({"round": 3})).unwrap();
    let (loaded, meta) = load_model(&path, &dev).unwrap();
    assert_eq!(meta["round"], 3);
    assert_eq!(loaded.tasks(), model.tasks());
    let x = input([8, 8, 8], &dev);
    let a = values(model.probabilities(x.clone()));
    let b = values(loaded.probabilities(x));
    assert_eq!(a, b);
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn truncated_or_corrupted_model_files_are_errors() {
    let dev = device();
    let dir = tempdir("truncated");
    let path = dir.join("model.segviz");
    let model = tiny_config(&["liver"]).init(&dev, 1).unwrap();
    save_model(&path, &model, serde_json::Value::Null).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for cut in [0, 5, 20, bytes.len() / 2, bytes.len() - 1] {
        let bad = dir.join(format!("cut{cut}.segviz"));
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let err = read_checkpoint(&bad).unwrap_err().to_string();
        assert!(err.contains(&format!("cut{cut}.segviz")), "{err}");
    }
    let mut flipped = bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x55;
    let bad = dir.join("flipped.segviz");
    std::fs::write(&bad, &flipped).unwrap();
    let err = load_model(&bad, &dev).unwrap_err().to_string();
    assert!(
        err.contains("flipped.segviz") && err.contains("CRC-32 mismatch"),
        "{err}"
    );
    let err = load_model(&dir.join("missing.segviz"), &dev)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.segviz"), "{err}");
}

fn tempdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
