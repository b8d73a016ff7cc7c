//! Bad data fails an experiment before any training, with one error that names every bad
//! file; an output folder of an earlier run is never deleted or mixed in without being
//! asked for.

use std::path::{Path, PathBuf};

use segviz::data::phantom::{write_sites, PhantomConfig};
use segviz::data::{read_labels, read_volume, write_labels, write_volume, SiteDataset, VoxelType};
use segviz::fed::experiment::{Experiment, ExperimentConfig, ExperimentData, RunMode};
use segviz::fed::FedError;

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-checks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn phantoms(dir: &Path) -> PathBuf {
    let out = dir.join("phantoms");
    write_sites(&PhantomConfig::tiny(&out)).unwrap();
    out
}

fn config() -> ExperimentConfig {
    ExperimentConfig {
        methods: vec![segviz::fed::experiment::Method::Baseline],
        ..ExperimentConfig::tiny()
    }
}

/// The `n`-th case's (image, label) of the site in `dir`.
fn case(dir: &Path, n: usize) -> (PathBuf, PathBuf) {
    let ds = SiteDataset::detect(dir).unwrap();
    let c = &ds.cases[n];
    (c.image.clone(), c.label.clone())
}

fn problems(e: FedError) -> Vec<String> {
    match e {
        FedError::BadData { problems } => problems,
        other => panic!("expected BadData, got {other}"),
    }
}

#[test]
fn a_broken_site_folder_is_an_error_not_a_silent_drop() {
    let dir = tempdir("discover");
    let data = phantoms(&dir);
    std::fs::create_dir_all(data.join("notes")).unwrap();
    std::fs::write(
        data.join("Task03_Liver").join("dataset.json"),
        b"{\"labels\": ",
    )
    .unwrap();
    // An MSD folder whose images are gone.
    let spleen = data.join("Task09_Spleen").join("imagesTr");
    std::fs::remove_dir_all(&spleen).unwrap();
    std::fs::create_dir_all(&spleen).unwrap();
    let found = problems(ExperimentData::discover(&data).unwrap_err());
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].contains("Task03_Liver") && found[0].contains("dataset.json"));
    assert!(found[1].contains("Task09_Spleen"), "{found:?}");

    // An unrelated folder is not a dataset: it is reported, not an error.
    let dir = tempdir("discover-ok");
    let data = phantoms(&dir);
    std::fs::create_dir_all(data.join("notes")).unwrap();
    let found = ExperimentData::discover(&data).unwrap();
    assert_eq!(found.training_sites.len(), 4);
    assert_eq!(found.ignored, vec![data.join("notes")]);
}

#[test]
fn every_bad_case_of_every_split_is_listed_before_training() {
    let dir = tempdir("cases");
    let data = phantoms(&dir);
    // A truncated image (liver), an image/label shape mismatch (spleen), an undeclared label
    // value (pancreas: 7), NaN voxels (kidney) and a truncated label on the test site.
    let (liver, _) = case(&data.join("Task03_Liver"), 0);
    let bytes = std::fs::read(&liver).unwrap();
    std::fs::write(&liver, &bytes[..bytes.len() / 2]).unwrap();
    let (_, spleen) = case(&data.join("Task09_Spleen"), 1);
    let mut labels = read_labels(&spleen).unwrap();
    labels.geometry.shape[2] -= 1;
    labels.data.truncate(labels.geometry.len());
    write_labels(&spleen, &labels).unwrap();
    let (_, pancreas) = case(&data.join("Task07_Pancreas"), 0);
    let mut labels = read_labels(&pancreas).unwrap();
    labels.data[0] = 7;
    write_labels(&pancreas, &labels).unwrap();
    let (kidney, _) = case(&data.join("kits19"), 1);
    let mut image = read_volume(&kidney).unwrap();
    image.data[3] = f32::NAN;
    write_volume(&kidney, &image, VoxelType::Float32).unwrap();
    let (_, test_label) = case(&data.join("btcv"), 0);
    let bytes = std::fs::read(&test_label).unwrap();
    std::fs::write(&test_label, &bytes[..bytes.len() - 40]).unwrap();

    let found = ExperimentData::discover(&data).unwrap();
    let out = dir.join("run");
    let e = Experiment::new(config(), &found, &out, RunMode::Fresh)
        .err()
        .unwrap();
    let found = problems(e);
    assert_eq!(found.len(), 5, "{found:#?}");
    for (file, what) in [
        (&liver, ""),
        (&spleen, "do not match"),
        (&pancreas, "7"),
        (&kidney, "NaN"),
        (&test_label, ""),
    ] {
        let name = file.display().to_string();
        assert!(
            found.iter().any(|p| p.contains(&name) && p.contains(what)),
            "{name} ({what}) not in {found:#?}"
        );
    }
    // Nothing was trained: no model, no checkpoint.
    assert!(!out.join("models").exists() && !out.join("checkpoints").exists());
}

#[test]
fn an_earlier_run_is_refused_unless_resumed_or_overwritten() {
    let dir = tempdir("rerun");
    let data = ExperimentData::discover(&phantoms(&dir)).unwrap();
    let out = dir.join("run");
    Experiment::new(config(), &data, &out, RunMode::Fresh).unwrap();
    // An earlier run's checkpoint and results.
    let checkpoint = out.join("checkpoints").join("fedbn").join("round-0001");
    std::fs::create_dir_all(&checkpoint).unwrap();
    std::fs::write(out.join("results.json"), b"{}").unwrap();
    let e = Experiment::new(config(), &data, &out, RunMode::Fresh)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("--resume") && e.contains("--overwrite") && e.contains("results.json"),
        "{e}"
    );
    assert!(checkpoint.exists(), "nothing is deleted by a refused run");
    Experiment::new(config(), &data, &out, RunMode::Resume).unwrap();
    assert!(checkpoint.exists());
    // A federation checkpoint of other settings is refused before anything trains.
    std::fs::write(
        checkpoint.join("manifest.json"),
        br#"{"round": 1, "strategy": "fedbn", "rounds": 9, "local_epochs": 1, "settings": {}}"#,
    )
    .unwrap();
    let fedbn = ExperimentConfig {
        methods: vec![segviz::fed::experiment::Method::Fedbn],
        ..config()
    };
    let e = Experiment::new(fedbn, &data, &out, RunMode::Resume)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("rounds: checkpoint 9, now 2") && e.contains("round-0001"),
        "{e}"
    );
    // A resumed run with another seed cannot reuse the saved splits.
    let reseeded = ExperimentConfig {
        seed: 1,
        ..config()
    };
    let e = Experiment::new(reseeded.clone(), &data, &out, RunMode::Resume)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("seed 0"), "{e}");
    Experiment::new(reseeded, &data, &out, RunMode::Overwrite).unwrap();
    assert!(!checkpoint.exists() && !out.join("results.json").exists());
}
