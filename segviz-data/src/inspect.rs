//! A one-look summary of a NIfTI file, as JSON (for the `inspect` example and for checking a
//! dataset before training: orientation, spacing, HU range, label values).

use std::collections::HashSet;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::Result;
use crate::nifti_io::{read_volume_with_info, AffineSource};
use crate::orientation::orientation_code;

/// At most this many distinct values are listed for integer files.
pub const MAX_DISTINCT_VALUES: usize = 256;

/// Summarises a NIfTI file: `path`, `shape`, `spacing`, `orientation` (e.g. `"LPS"`),
/// `affine` (row-major 4×4), `affine_source`, `geometry_warnings` (see
/// [`NiftiInfo::warnings`](crate::nifti_io::NiftiInfo::warnings)), `datatype`, `scl_slope`, `scl_inter`, and
/// `min`/`max`/`mean` of the scaled values (finite voxels only; `nan_count` and
/// `infinite_count` report the others). For integer datatypes, `distinct_values` lists the
/// sorted distinct scaled values, at most [`MAX_DISTINCT_VALUES`] of them
/// (`distinct_values_truncated` says whether there were more).
///
/// # Errors
/// Any reading error of [`read_volume_with_info`]; NaN voxels are reported, not refused.
pub fn inspect_file(path: impl AsRef<Path>) -> Result<Value> {
    let path = path.as_ref();
    let (volume, info) = read_volume_with_info(path)?;
    let mut min = f64::INFINITY;
    let mut max = f64::NEG_INFINITY;
    let mut sum = 0.0f64;
    let (mut finite, mut nan, mut infinite) = (0usize, 0usize, 0usize);
    for &v in &volume.data {
        if v.is_nan() {
            nan += 1;
        } else if v.is_infinite() {
            infinite += 1;
        } else {
            let v = v as f64;
            min = min.min(v);
            max = max.max(v);
            sum += v;
            finite += 1;
        }
    }
    let statistic = |x: f64| if finite > 0 { number(x) } else { Value::Null };
    let mut summary = json!({
        "path": path.display().to_string(),
        "shape": volume.geometry.shape,
        "spacing": volume.geometry.spacing(),
        "orientation": orientation_code(&volume.geometry.affine),
        "affine": volume.geometry.affine,
        "affine_source": match info.affine_source {
            AffineSource::Sform => "sform",
            AffineSource::Qform => "qform",
            AffineSource::Pixdim => "pixdim",
        },
        "geometry_warnings": info.warnings,
        "datatype": info.datatype.name(),
        "scl_slope": info.scl_slope,
        "scl_inter": info.scl_inter,
        "min": statistic(min),
        "max": statistic(max),
        "mean": statistic(if finite > 0 { sum / finite as f64 } else { 0.0 }),
        "nan_count": nan,
        "infinite_count": infinite,
    });
    if info.datatype.is_integer() {
        let (values, truncated) = distinct_values(&volume.data, MAX_DISTINCT_VALUES);
        if let Value::Object(map) = &mut summary {
            map.insert(
                "distinct_values".into(),
                Value::Array(values.into_iter().map(|v| number(v as f64)).collect()),
            );
            map.insert("distinct_values_truncated".into(), Value::Bool(truncated));
        }
    }
    Ok(summary)
}

/// The sorted distinct values (at most `cap`), and whether more exist.
fn distinct_values(data: &[f32], cap: usize) -> (Vec<f32>, bool) {
    let mut seen = HashSet::new();
    for &v in data {
        // +0 and −0 are one value; NaN never occurs for integer storage.
        let v = if v == 0.0 { 0.0 } else { v };
        if seen.insert(v.to_bits()) && seen.len() > cap {
            break;
        }
    }
    let truncated = seen.len() > cap;
    let mut values: Vec<f32> = seen.into_iter().map(f32::from_bits).collect();
    values.sort_by(|a, b| a.total_cmp(b));
    values.truncate(cap);
    (values, truncated)
}

/// A JSON number, written as an integer when the value is one (labels read as `1`, not `1.0`).
fn number(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        json!(v as i64)
    } else {
        json!(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti_io::{write_labels, write_volume, VoxelType};
    use crate::volume::{Geometry, Volume};

    #[test]
    fn summarises_a_label_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut geometry = Geometry::from_spacing([8, 8, 8], [0.8, 0.8, 2.5]);
        geometry.affine[0][0] = -0.8;
        let mut labels = Volume::filled(geometry, 0u8);
        labels.data[3] = 2;
        labels.data[100] = 13;
        let path = dir.path().join("label0001.nii.gz");
        write_labels(&path, &labels).expect("write");
        let s = inspect_file(&path).expect("inspect");
        assert_eq!(s["shape"], json!([8, 8, 8]));
        assert_eq!(s["orientation"], "LAS");
        assert_eq!(s["datatype"], "uint8");
        assert_eq!(s["distinct_values"], json!([0, 2, 13]));
        assert_eq!(s["distinct_values_truncated"], false);
        assert_eq!(s["max"], 13);
        assert!(s["path"]
            .as_str()
            .expect("path")
            .ends_with("label0001.nii.gz"));
        let spacing = s["spacing"].as_array().expect("spacing");
        assert!((spacing[2].as_f64().expect("number") - 2.5).abs() < 1e-6);
    }

    #[test]
    fn float_files_have_statistics_but_no_value_list_and_many_values_are_capped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let geometry = Geometry::from_spacing([8, 8, 8], [1.0; 3]);
        let image = Volume {
            data: (0..512).map(|n| n as f32 - 100.0).collect(),
            geometry,
        };
        let path = dir.path().join("img.nii");
        write_volume(&path, &image, VoxelType::Float32).expect("write");
        let s = inspect_file(&path).expect("inspect");
        assert_eq!(s["min"], -100);
        assert_eq!(s["max"], 411);
        assert!((s["mean"].as_f64().expect("mean") - 155.5).abs() < 1e-9);
        assert!(s.get("distinct_values").is_none());

        write_volume(&path, &image, VoxelType::Int16).expect("write");
        let s = inspect_file(&path).expect("inspect");
        assert_eq!(
            s["distinct_values"].as_array().expect("values").len(),
            MAX_DISTINCT_VALUES
        );
        assert_eq!(s["distinct_values_truncated"], true);
        assert!(inspect_file(dir.path().join("missing.nii")).is_err());
    }
}
