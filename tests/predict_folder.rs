//! `predict -i DIR -o DIR`: every NIfTI scan of a folder is segmented into the output folder,
//! every other entry is reported with its reason, and one bad scan does not stop the others.

use std::path::PathBuf;

use segviz::core::SegVizConfig;
use segviz::data::phantom::{write_sites, PhantomConfig};
use segviz::data::{read_labels, read_volume, SiteDataset};
use segviz::fed::evaluate::Segmenter;
use segviz::fed::experiment::ExperimentConfig;
use segviz::predict::{plan_folder, segment_to_file, FolderPlan};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-predict-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Segments every case of `plan` with an untrained tiny liver model (tiny preset), returning
/// for each the output path or the error.
fn segment_plan(plan: &FolderPlan) -> Vec<Result<PathBuf, String>> {
    let config = ExperimentConfig::tiny();
    let device = segviz::default_device();
    let model = SegVizConfig::new(config.representation.clone(), vec!["liver".into()])
        .init(&device, 1)
        .unwrap();
    let segmenter = Segmenter::Single(Box::new(model));
    plan.cases
        .iter()
        .map(|(input, output)| {
            segment_to_file(
                &segmenter,
                input,
                output,
                &config.preprocess,
                &config.window,
                &device,
            )
            .map(|line| {
                assert!(line.contains("liver"), "{line}");
                output.clone()
            })
            .map_err(|e| e.to_string())
        })
        .collect()
}

#[test]
fn a_folder_of_scans_is_segmented_and_nothing_is_skipped_silently() {
    let dir = tempdir("folder");
    let phantoms = dir.join("phantoms");
    write_sites(&PhantomConfig {
        cases_per_site: 3,
        ..PhantomConfig::tiny(&phantoms)
    })
    .unwrap();
    let site = SiteDataset::detect(&phantoms.join("Task03_Liver")).unwrap();
    let scans = dir.join("scans");
    std::fs::create_dir_all(scans.join("series_001")).unwrap();
    std::fs::copy(&site.cases[0].image, scans.join("a.nii.gz")).unwrap();
    std::fs::copy(&site.cases[1].image, scans.join("b.nii.gz")).unwrap();
    // Half a gzip stream: a scan that fails, between two good ones.
    let bytes = std::fs::read(&site.cases[2].image).unwrap();
    std::fs::write(scans.join("ab_truncated.nii.gz"), &bytes[..bytes.len() / 2]).unwrap();
    std::fs::write(scans.join("notes.txt"), "not a scan").unwrap();
    std::fs::write(scans.join(".DS_Store"), "").unwrap();
    let out = dir.join("labels");

    let plan = plan_folder(&scans, &out).unwrap();
    let names: Vec<String> = plan
        .cases
        .iter()
        .map(|(_, o)| o.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.nii.gz", "ab_truncated.nii.gz", "b.nii.gz"]);
    assert_eq!(plan.skipped.len(), 3, "{:?}", plan.skipped);
    let skipped = plan.skipped.join("\n");
    for (entry, reason) in [
        (".DS_Store", "hidden"),
        ("notes.txt", "not a NIfTI file"),
        ("series_001", "without DICOM files"),
    ] {
        assert!(
            skipped.contains(entry) && skipped.contains(reason),
            "{skipped}"
        );
    }

    let failed: Vec<String> = segment_plan(&plan)
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert!(failed[0].contains("ab_truncated.nii.gz"), "{}", failed[0]);
    for name in ["a.nii.gz", "b.nii.gz"] {
        let labels = read_labels(out.join(name)).unwrap();
        let scan = read_volume(scans.join(name)).unwrap();
        assert_eq!(labels.geometry, scan.geometry, "{name}");
    }
    assert!(!out.join("ab_truncated.nii.gz").exists());
    // A file is not a folder to list.
    assert!(plan_folder(&scans.join("notes.txt"), &out).is_err());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_dicom_series_segments_into_nifti_in_the_series_geometry() {
    let fixtures =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("segviz-data/tests/fixtures/dicom");
    let dir = tempdir("dicom");
    let scans = dir.join("scans");
    std::fs::create_dir_all(&scans).unwrap();
    for series in ["ct_explicit", "ct_j2k", "ct_tilted"] {
        let to = scans.join(series);
        std::fs::create_dir_all(&to).unwrap();
        for f in std::fs::read_dir(fixtures.join(series)).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
        }
    }
    let out = dir.join("labels");
    let plan = plan_folder(&scans, &out).unwrap();
    assert_eq!(plan.cases.len(), 3, "{plan:?}");
    assert!(plan.skipped.is_empty(), "{plan:?}");

    let expected = read_volume(fixtures.join("ct_expected.nii.gz")).unwrap();
    let mut errors = Vec::new();
    for result in segment_plan(&plan) {
        match result {
            Ok(output) => {
                let labels = read_labels(&output).unwrap();
                assert_eq!(labels.geometry.shape, expected.geometry.shape);
                let d = labels
                    .geometry
                    .affine
                    .iter()
                    .flatten()
                    .zip(expected.geometry.affine.iter().flatten())
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(d < 1e-5, "{}: affine differs by {d}", output.display());
            }
            Err(e) => errors.push(e),
        }
    }
    // The tilted series is refused, by name; the other two are written.
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("ct_tilted") && errors[0].contains("gantry tilt"));
    assert!(out.join("ct_explicit.nii.gz").exists() && out.join("ct_j2k.nii.gz").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
