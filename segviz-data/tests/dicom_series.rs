//! DICOM CT series in (fixtures/dicom, written by pydicom with make_dicom_fixtures.py): every
//! transfer syntax decodes to the HU volume and the geometry of the series' NIfTI conversion
//! (ct_expected.nii.gz, written by nibabel); tilted, gapped and mixed series are refused.

use std::path::{Path, PathBuf};

use segviz_data::{read_dicom_series, read_volume, DataError};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/dicom")
        .join(name)
}

fn manifest() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("dicom_fixtures.json")).unwrap()).unwrap()
}

fn max_affine_diff(a: &[[f64; 4]; 4], b: &[[f64; 4]; 4]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

#[test]
fn every_transfer_syntax_reads_to_the_nifti_conversion() {
    let expected = read_volume(fixture("ct_expected.nii.gz")).unwrap();
    let series = &manifest()["series"];
    for (name, lossless) in [
        ("ct_explicit", true),
        ("ct_implicit", true),
        ("ct_rle", true),
        ("ct_j2k", true),
        ("ct_j2k_lossy", false),
    ] {
        let (volume, info) =
            read_dicom_series(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            info.transfer_syntax,
            series[name]["transfer_syntax_uid"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(volume.geometry.shape, expected.geometry.shape, "{name}");
        let d = max_affine_diff(&volume.geometry.affine, &expected.geometry.affine);
        assert!(d < 1e-5, "{name}: affine differs by {d}");
        let worst = volume
            .data
            .iter()
            .zip(&expected.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        if lossless {
            assert_eq!(worst, 0.0, "{name}: HU differ by up to {worst}");
        } else {
            let allowed = series[name]["max_abs_error_hu"].as_f64().unwrap() as f32;
            assert!(worst <= allowed + 0.5, "{name}: {worst} HU > {allowed}");
        }
        // Files sorted by position, not by name or InstanceNumber.
        let order: Vec<String> = info
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(order[0], "IM0004.dcm", "{name}: {order:?}");
    }
}

fn refusal(dir: &Path) -> String {
    match read_dicom_series(dir) {
        Ok(_) => panic!("{} was read", dir.display()),
        Err(e @ DataError::Invalid { .. }) => e.to_string(),
        Err(e) => panic!("{}: unexpected error kind: {e}", dir.display()),
    }
}

#[test]
fn tilted_gapped_and_mixed_series_are_refused_by_name() {
    let err = refusal(&fixture("ct_tilted"));
    assert!(
        err.contains("ct_tilted") && err.contains("gantry tilt"),
        "{err}"
    );
    let err = refusal(&fixture("ct_missing"));
    assert!(
        err.contains("ct_missing") && err.contains("uneven slice spacing"),
        "{err}"
    );
    let err = refusal(&fixture("ct_two_series"));
    assert!(err.contains("2 series"), "{err}");
}

#[test]
fn damaged_or_foreign_files_are_named() {
    let dir = std::env::temp_dir().join(format!("segviz-dicom-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let err = refusal(&dir);
    assert!(err.contains("no file"), "{err}");
    for f in std::fs::read_dir(fixture("ct_explicit")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    read_dicom_series(&dir).unwrap();
    std::fs::write(dir.join("notes.txt"), "not DICOM").unwrap();
    let err = refusal(&dir);
    assert!(err.contains("notes.txt") && err.contains("DICOM"), "{err}");
    std::fs::remove_file(dir.join("notes.txt")).unwrap();
    // A slice cut in its pixel data.
    let slice = dir.join("IM0002.dcm");
    let bytes = std::fs::read(&slice).unwrap();
    std::fs::write(&slice, &bytes[..bytes.len() - 100]).unwrap();
    let err = read_dicom_series(&dir).unwrap_err().to_string();
    assert!(err.contains("IM0002.dcm"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_generic_layout_takes_dicom_series_folders_with_nifti_labels() {
    use segviz_data::{write_labels, Organ, SiteDataset, Volume};
    let dir = std::env::temp_dir().join(format!("segviz-dicom-site-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let series = dir.join("images/case_dicom");
    std::fs::create_dir_all(&series).unwrap();
    std::fs::create_dir_all(dir.join("labels")).unwrap();
    for f in std::fs::read_dir(fixture("ct_j2k")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, series.join(f.file_name().unwrap())).unwrap();
    }
    // A NIfTI case beside it, and labels in each scan's geometry.
    std::fs::copy(
        fixture("ct_expected.nii.gz"),
        dir.join("images/case_nifti.nii.gz"),
    )
    .unwrap();
    let expected = read_volume(fixture("ct_expected.nii.gz")).unwrap();
    let mut label = Volume::filled(expected.geometry.clone(), 0u8);
    for v in label.data.iter_mut().take(100) {
        *v = 1;
    }
    write_labels(dir.join("labels/case_dicom.nii.gz"), &label).unwrap();
    write_labels(dir.join("labels/case_nifti.nii.gz"), &label).unwrap();
    std::fs::write(dir.join("labels.json"), r#"{"1": "liver"}"#).unwrap();

    let site = SiteDataset::detect(&dir).unwrap();
    let ids: Vec<&str> = site.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["case_dicom", "case_nifti"]);
    assert!(site.cases[0].image.is_dir());
    let a = site.load_case(0).unwrap();
    let b = site.load_case(1).unwrap();
    assert_eq!(a.image.data, b.image.data);
    assert!(a.annotated.contains(Organ::Liver));

    // A folder in images/ that is no series, or a series without its label, is named.
    std::fs::create_dir_all(dir.join("images/empty")).unwrap();
    let err = SiteDataset::detect(&dir).unwrap_err().to_string();
    assert!(
        err.contains("empty") && err.contains("without DICOM"),
        "{err}"
    );
    std::fs::remove_dir_all(dir.join("images/empty")).unwrap();
    std::fs::remove_file(dir.join("labels/case_dicom.nii.gz")).unwrap();
    let err = SiteDataset::detect(&dir).unwrap_err().to_string();
    assert!(err.contains("case_dicom"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
