//! NIfTI geometry as nibabel reads it: headers written by nibabel (see
//! fixtures/nifti_geometry/make_nifti_geometry_fixtures.py) must give nibabel's `img.affine`,
//! and every case nibabel resolves by guessing is a warning or an error, never a silent 1 mm.

use std::path::PathBuf;

use segviz_data::nifti_io::{read_volume_with_info, AffineSource};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nifti_geometry")
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixtures().join("expected.json")).expect("expected.json");
    serde_json::from_str(&text).expect("valid JSON")
}

fn matrix(value: &serde_json::Value) -> [[f64; 4]; 4] {
    let mut m = [[0.0; 4]; 4];
    for (r, row) in m.iter_mut().enumerate() {
        for (c, v) in row.iter_mut().enumerate() {
            *v = value[r][c].as_f64().expect("number");
        }
    }
    m
}

#[test]
fn every_fixture_reads_as_nibabel_reads_it_or_is_refused() {
    let all = expected();
    let cases = all["cases"].as_object().expect("cases");
    assert_eq!(cases.len(), 11, "the fixture script writes eleven cases");
    for (name, case) in cases {
        let path = fixtures().join(format!("{name}.nii"));
        let segviz = &case["segviz"];
        let result = read_volume_with_info(&path);
        if let Some(needle) = segviz["error"].as_str() {
            let message = match result {
                Err(e) => e.to_string(),
                Ok((v, _)) => panic!("{name}: read with affine {:?}", v.geometry.affine),
            };
            assert!(
                message.contains(needle) && message.contains(&format!("{name}.nii")),
                "{name}: {message}"
            );
            continue;
        }
        let (volume, info) = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        let source = match info.affine_source {
            AffineSource::Sform => "sform",
            AffineSource::Qform => "qform",
            AffineSource::Pixdim => "pixdim",
        };
        assert_eq!(source, segviz["source"].as_str().unwrap(), "{name}");
        let reference = segviz["expected"].as_str().unwrap_or("nibabel_affine");
        let theirs = matrix(&case[reference]);
        let ours = volume.geometry.affine;
        for r in 0..4 {
            for c in 0..4 {
                assert!(
                    (ours[r][c] - theirs[r][c]).abs() < 1e-5,
                    "{name}: affine[{r}][{c}] is {} here, {} in nibabel\n{ours:?}",
                    ours[r][c],
                    theirs[r][c]
                );
            }
        }
        let zooms: Vec<f64> = case["nibabel_zooms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|z| z.as_f64().unwrap())
            .collect();
        // nibabel's zooms are |pixdim|, which an sform need not agree with.
        let spacing_of_pixdim = source != "sform";
        for (axis, (ours, theirs)) in volume
            .geometry
            .spacing()
            .iter()
            .zip(&zooms)
            .enumerate()
            .filter(|_| spacing_of_pixdim)
        {
            assert!(
                (ours - theirs).abs() < 1e-5,
                "{name}: spacing {axis} is {ours} here, {theirs} in nibabel"
            );
        }
        let shape: Vec<usize> = case["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(volume.geometry.shape.to_vec(), shape, "{name}");
        let values: Vec<f32> = case["values_c_order"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(volume.data, values, "{name}: voxel values");
        match segviz["warning"].as_str() {
            Some(needle) => assert!(
                info.warnings.iter().any(|w| w.contains(needle)),
                "{name}: no warning containing {needle:?} in {:?}",
                info.warnings
            ),
            None => assert!(info.warnings.is_empty(), "{name}: {:?}", info.warnings),
        }
    }
}

#[test]
fn negative_pixdim_is_four_four_five_millimetres_with_a_warning() {
    // The case: nibabel reads 4, 4, 5 mm; SegViz used to read 1 mm silently.
    let (volume, info) =
        read_volume_with_info(fixtures().join("negative_pixdim.nii")).expect("readable");
    let spacing = volume.geometry.spacing();
    assert!(
        (spacing[0] - 4.0).abs() < 1e-6
            && (spacing[1] - 4.0).abs() < 1e-6
            && (spacing[2] - 5.0).abs() < 1e-6,
        "{spacing:?}"
    );
    assert!(
        info.warnings.iter().any(|w| w.contains("negative pixdim")),
        "{:?}",
        info.warnings
    );
}

#[test]
fn the_header_alone_gives_the_same_geometry_and_warnings_as_a_full_read() {
    let all = expected();
    for name in all["cases"].as_object().expect("cases").keys() {
        let path = fixtures().join(format!("{name}.nii"));
        match (
            read_volume_with_info(&path),
            segviz_data::read_header(&path),
        ) {
            (Ok((_, full)), Ok(header)) => assert_eq!(full, header, "{name}"),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string(), "{name}"),
            (a, b) => panic!("{name}: full read {:?}, header {:?}", a.is_ok(), b.is_ok()),
        }
    }
    // Gzipped too (a phantom written by our writer, no warnings).
    let dir = std::env::temp_dir().join(format!("segviz-header-{}", std::process::id()));
    let path = dir.join("x.nii.gz");
    let (volume, _) = read_volume_with_info(fixtures().join("sform_only.nii")).unwrap();
    segviz_data::write_volume(&path, &volume, segviz_data::VoxelType::Int16).unwrap();
    let header = segviz_data::read_header(&path).unwrap();
    assert_eq!(header.geometry, volume.geometry);
    assert!(header.warnings.is_empty(), "{:?}", header.warnings);
    std::fs::remove_dir_all(&dir).unwrap();
}
