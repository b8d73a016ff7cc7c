//! The SegViz generic layout, for one's own partially labelled data:
//!
//! ```text
//! site/
//!   images/  case_a.nii.gz  case_b.nii.gz  case_c/      (case_c/: a DICOM series folder)
//!   labels/  case_a.nii.gz  case_b.nii.gz  case_c.nii.gz (same names; NIfTI labels)
//!   segviz.toml   or   labels.json
//! ```
//! A DICOM series' label map is a NIfTI file in the series' geometry (as `predict` writes
//! them and dcm2niix converts the series).
//!
//! `segviz.toml`:
//! ```toml
//! name = "hospital-a"              # optional; default: the folder name
//! annotated = ["liver", "spleen"]  # optional; default: the organs named in [labels]
//! [labels]                         # every value the label files may hold (0 is implied)
//! 1 = "liver"
//! 2 = "liver"                      # e.g. a tumour, merged into the liver
//! 3 = "background"                 # a structure outside the vocabulary
//! ```
//! `labels.json` holds the same fields (`{"labels": {...}, "annotated": [...]}`) or just
//! the label table (`{"1": "liver", "2": "liver"}`). Label names must be organ names or
//! `"background"`, so that a typo cannot silently turn an organ into background.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{folder_name, list_nifti, CaseRef, Layout, SiteDataset};
use crate::error::{DataError, Result};
use crate::labels::{LabelMap, Organ, OrganSet};

/// The TOML configuration file.
pub const TOML_CONFIG: &str = "segviz.toml";
/// The JSON configuration file.
pub const JSON_CONFIG: &str = "labels.json";
/// The image folder.
pub const IMAGE_DIR: &str = "images";
/// The label folder.
pub const LABEL_DIR: &str = "labels";

/// The configuration file of a generic folder (`segviz.toml` preferred), if any.
pub fn config_file(dir: &Path) -> Option<PathBuf> {
    [TOML_CONFIG, JSON_CONFIG]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

/// Reads a generic folder.
pub fn open(dir: &Path) -> Result<SiteDataset> {
    let config_path = config_file(dir).ok_or_else(|| DataError::Layout {
        path: dir.to_path_buf(),
        reason: format!("neither {TOML_CONFIG} nor {JSON_CONFIG} found"),
    })?;
    let text = std::fs::read_to_string(&config_path).map_err(|e| DataError::io(&config_path, e))?;
    let config = parse_config(&text, &config_path)?;
    let (name, label_map) = interpret(&config, &config_path)?;
    let cases = pair_files(dir)?;
    Ok(SiteDataset {
        name: name.unwrap_or_else(|| folder_name(dir)),
        root: dir.to_path_buf(),
        layout: Layout::Generic,
        cases,
        label_map,
    })
}

/// Parses either file format into one JSON value.
fn parse_config(text: &str, path: &Path) -> Result<Value> {
    let is_toml = path.extension().is_some_and(|e| e == "toml");
    if is_toml {
        let table: toml::Table = toml::from_str(text)
            .map_err(|e| DataError::invalid(path, format!("not valid TOML: {e}")))?;
        serde_json::to_value(table)
            .map_err(|e| DataError::invalid(path, format!("unusable TOML value: {e}")))
    } else {
        serde_json::from_str(text)
            .map_err(|e| DataError::invalid(path, format!("not valid JSON: {e}")))
    }
}

/// The site name (if given) and the label map of a parsed configuration.
fn interpret(config: &Value, path: &Path) -> Result<(Option<String>, LabelMap)> {
    let object = config
        .as_object()
        .ok_or_else(|| DataError::invalid(path, "must be a table of fields"))?;
    // The short JSON form is the label table alone.
    let (labels, name, annotated) = match object.get("labels") {
        Some(labels) => (labels, object.get("name"), object.get("annotated")),
        None => (config, None, None),
    };
    let labels = labels
        .as_object()
        .ok_or_else(|| DataError::invalid(path, "field `labels` must be a table"))?;
    let mut table = BTreeMap::new();
    for (key, value) in labels {
        let source: u8 = key.trim().parse().map_err(|_| {
            DataError::invalid(
                path,
                format!("field `labels`: key {key:?} is not a label value 0..=255"),
            )
        })?;
        let target = value.as_str().ok_or_else(|| {
            DataError::invalid(path, format!("field `labels.{key}` must be a string"))
        })?;
        let organ = match Organ::from_name(target) {
            Some(organ) => Some(organ),
            None if target.trim().eq_ignore_ascii_case("background") => None,
            None => {
                return Err(DataError::invalid(
                    path,
                    format!(
                        "field `labels.{key}`: {target:?} is not liver, spleen, pancreas, \
                         kidney or background"
                    ),
                ))
            }
        };
        table.insert(source, organ);
    }
    if table.get(&0).is_some_and(Option::is_some) {
        return Err(DataError::invalid(
            path,
            "field `labels.0`: value 0 is background",
        ));
    }
    let mut map = LabelMap::new();
    for (source, organ) in table {
        map = match organ {
            Some(organ) => map.organ(source, organ),
            None => map.background(source),
        };
    }
    if let Some(annotated) = annotated {
        let declared: OrganSet = serde_json::from_value(annotated.clone()).map_err(|e| {
            DataError::invalid(
                path,
                format!("field `annotated` must be a list of organ names: {e}"),
            )
        })?;
        if !declared.is_superset(map.annotated()) {
            return Err(DataError::invalid(
                path,
                format!(
                    "field `annotated` {declared} leaves out organs that `labels` maps to {}",
                    map.annotated()
                ),
            ));
        }
        map = map.with_annotated(declared);
    }
    let name = match name {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| DataError::invalid(path, "field `name` must be a string"))?
                .to_owned(),
        ),
    };
    Ok((name, map))
}

/// The non-hidden sub-folders of `dir`, sorted.
fn list_folders(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut folders = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))? {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && entry.path().is_dir() {
            folders.push(entry.path());
        }
    }
    folders.sort();
    Ok(folders)
}

/// Pairs `images/X` with `labels/X` (and a DICOM series folder `images/X/` with
/// `labels/X.nii.gz`); a file without a partner is an error naming it.
fn pair_files(dir: &Path) -> Result<Vec<CaseRef>> {
    let images_dir = dir.join(IMAGE_DIR);
    let labels_dir = dir.join(LABEL_DIR);
    for d in [&images_dir, &labels_dir] {
        if !d.is_dir() {
            return Err(DataError::Layout {
                path: dir.to_path_buf(),
                reason: format!("missing folder {}", d.display()),
            });
        }
    }
    let images = list_nifti(&images_dir)?;
    let labels = list_nifti(&labels_dir)?;
    let mut unmatched: Vec<String> = Vec::new();
    let mut cases = Vec::with_capacity(images.len());
    // DICOM series folders, each paired with the NIfTI label of the folder's name.
    let mut series_names = Vec::new();
    for folder in list_folders(&images_dir)? {
        let name = folder
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !crate::dicom::is_dicom_folder(&folder) {
            unmatched.push(format!(
                "{} (a folder without DICOM files)",
                folder.display()
            ));
            continue;
        }
        let label = [".nii.gz", ".nii"]
            .iter()
            .map(|ext| labels_dir.join(format!("{name}{ext}")))
            .find(|p| p.is_file());
        match label {
            Some(label) => cases.push(CaseRef {
                id: name.clone(),
                image: folder.clone(),
                label,
            }),
            None => unmatched.push(folder.display().to_string()),
        }
        series_names.push(name);
    }
    for image in &images {
        let Some(file_name) = image.file_name() else {
            continue;
        };
        let label = labels_dir.join(file_name);
        if !label.is_file() {
            unmatched.push(image.display().to_string());
            continue;
        }
        let id = super::nifti_stem(image).unwrap_or_default();
        cases.push(CaseRef {
            id,
            image: image.clone(),
            label,
        });
    }
    for label in &labels {
        if let Some(file_name) = label.file_name() {
            let of_series = super::nifti_stem(label).is_some_and(|s| series_names.contains(&s));
            if !images_dir.join(file_name).is_file() && !of_series {
                unmatched.push(label.display().to_string());
            }
        }
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    if !unmatched.is_empty() {
        return Err(DataError::Layout {
            path: dir.to_path_buf(),
            reason: format!("file(s) without a partner: {}", unmatched.join(", ")),
        });
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::tests::touch;

    fn site(config_name: &str, config: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(config_name), config).unwrap();
        for f in [
            "images/a.nii.gz",
            "labels/a.nii.gz",
            "images/b.nii",
            "labels/b.nii",
        ] {
            touch(&dir.path().join(f));
        }
        dir
    }

    #[test]
    fn toml_config() {
        let dir = site(
            TOML_CONFIG,
            "name = \"hospital-a\"\nannotated = [\"liver\", \"spleen\"]\n\
             [labels]\n1 = \"liver\"\n2 = \"liver\"\n3 = \"background\"\n",
        );
        let ds = SiteDataset::detect(dir.path()).unwrap();
        assert_eq!(ds.layout, Layout::Generic);
        assert_eq!(ds.name, "hospital-a");
        assert_eq!(ds.case_ids(), ["a", "b"]);
        assert_eq!(ds.label_map.declared(), [0, 1, 2, 3]);
        assert_eq!(ds.label_map.target(2), Some(Organ::Liver.label()));
        assert_eq!(ds.label_map.target(3), Some(0));
        assert_eq!(
            ds.annotated(),
            OrganSet::single(Organ::Liver).with(Organ::Spleen)
        );
    }

    #[test]
    fn short_json_config() {
        let dir = site(
            JSON_CONFIG,
            r#"{"1": "liver", "2": "liver", "4": "kidneys"}"#,
        );
        let ds = SiteDataset::detect(dir.path()).unwrap();
        assert_eq!(
            ds.annotated(),
            OrganSet::single(Organ::Liver).with(Organ::Kidney)
        );
        assert_eq!(ds.label_map.target(4), Some(Organ::Kidney.label()));
    }

    #[test]
    fn bad_configs_name_file_and_field() {
        let cases = [
            (JSON_CONFIG, r#"{"1": "livr"}"#, "`labels.1`"),
            (
                JSON_CONFIG,
                r#"{"labels": {"1": "liver"}, "annotated": ["spleen"]}"#,
                "`annotated`",
            ),
            (
                JSON_CONFIG,
                r#"{"labels": {"1": "liver"}, "annotated": ["lung"]}"#,
                "`annotated`",
            ),
            (JSON_CONFIG, r#"{"1": "liver""#, "JSON"),
            (TOML_CONFIG, "[labels]\n1 = 3\n", "`labels.1`"),
            (TOML_CONFIG, "[labels\n", "TOML"),
        ];
        for (file, text, needle) in cases {
            let dir = site(file, text);
            let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
            assert!(msg.contains(file) && msg.contains(needle), "{text}: {msg}");
        }
    }

    #[test]
    fn unpaired_file_is_named() {
        let dir = site(JSON_CONFIG, r#"{"1": "liver"}"#);
        touch(&dir.path().join("labels/c.nii.gz"));
        let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("c.nii.gz"), "{msg}");
    }
}
