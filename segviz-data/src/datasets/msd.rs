//! Medical Segmentation Decathlon task folders (`TaskXX_Name/`).
//!
//! `dataset.json` lists the training cases as `{"image": "./imagesTr/x.nii.gz",
//! "label": "./labelsTr/x.nii.gz"}` (paths relative to the task folder), their count in
//! `numTraining`, and the label names in `labels` (`{"0": "background", "1": "liver",
//! "2": "cancer"}`). Label names that are organs of the vocabulary map to that organ;
//! tumour names (cancer, tumour, tumor, lesion) merge into the task's organ, as the paper
//! does; any other name is a structure outside the vocabulary and maps to background.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{folder_name, nifti_stem, require_files, CaseRef, Layout, SiteDataset};
use crate::error::{DataError, Result};
use crate::labels::{LabelMap, Organ};

/// The MSD description file.
pub const DATASET_JSON: &str = "dataset.json";

/// Reads an MSD task folder.
pub fn open(dir: &Path) -> Result<SiteDataset> {
    let path = dir.join(DATASET_JSON);
    let text = std::fs::read_to_string(&path).map_err(|e| DataError::io(&path, e))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| DataError::invalid(&path, format!("not valid JSON: {e}")))?;
    let label_map = parse_labels(&json, &path)?;
    let cases = parse_training(&json, &path, dir)?;
    for case in &cases {
        require_files(case)?;
    }
    Ok(SiteDataset {
        name: folder_name(dir),
        root: dir.to_path_buf(),
        layout: Layout::Msd,
        cases,
        label_map,
    })
}

/// Words that mark a tumour label, merged into the task's organ.
const TUMOUR_WORDS: [&str; 5] = ["cancer", "tumour", "tumor", "lesion", "neoplasm"];

/// Builds the label map from the `labels` field.
fn parse_labels(json: &Value, path: &Path) -> Result<LabelMap> {
    let labels = json
        .get("labels")
        .ok_or_else(|| DataError::invalid(path, "missing field `labels`"))?
        .as_object()
        .ok_or_else(|| DataError::invalid(path, "field `labels` must be an object"))?;
    let mut named = Vec::new();
    for (key, name) in labels {
        let value: u8 = key.trim().parse().map_err(|_| {
            DataError::invalid(
                path,
                format!("field `labels`: key {key:?} is not a label value 0..=255"),
            )
        })?;
        let name = name.as_str().ok_or_else(|| {
            DataError::invalid(
                path,
                format!("field `labels`: value of {key:?} is not a string"),
            )
        })?;
        named.push((value, name.to_ascii_lowercase()));
    }
    let organs: Vec<Organ> = named
        .iter()
        .filter_map(|(_, name)| Organ::from_name(name))
        .collect();
    let task_organ = match organs.as_slice() {
        [] => {
            return Err(DataError::invalid(
                path,
                "field `labels` names none of liver, spleen, pancreas, kidney",
            ))
        }
        [first, rest @ ..] if rest.iter().all(|o| o == first) => *first,
        _ => {
            return Err(DataError::invalid(
                path,
                "field `labels` names several organs; MSD tasks have one (use the generic \
                 layout for multi-organ data)",
            ))
        }
    };
    let mut map = LabelMap::new();
    for (value, name) in named {
        if value == 0 {
            continue;
        }
        map = if let Some(organ) = Organ::from_name(&name) {
            map.organ(value, organ)
        } else if TUMOUR_WORDS.iter().any(|w| name.contains(w)) {
            map.organ(value, task_organ)
        } else {
            map.background(value)
        };
    }
    Ok(map)
}

/// Reads the `training` list and checks it against `numTraining`.
fn parse_training(json: &Value, path: &Path, dir: &Path) -> Result<Vec<CaseRef>> {
    let training = json
        .get("training")
        .ok_or_else(|| DataError::invalid(path, "missing field `training`"))?
        .as_array()
        .ok_or_else(|| DataError::invalid(path, "field `training` must be a list"))?;
    let count = json
        .get("numTraining")
        .ok_or_else(|| DataError::invalid(path, "missing field `numTraining`"))?
        .as_u64()
        .ok_or_else(|| DataError::invalid(path, "field `numTraining` must be a whole number"))?;
    if count != training.len() as u64 {
        return Err(DataError::invalid(
            path,
            format!(
                "field `numTraining` is {count} but `training` lists {} case(s)",
                training.len()
            ),
        ));
    }
    let mut cases = Vec::with_capacity(training.len());
    for (n, entry) in training.iter().enumerate() {
        let field = |name: &str| -> Result<PathBuf> {
            let rel = entry.get(name).and_then(Value::as_str).ok_or_else(|| {
                DataError::invalid(
                    path,
                    format!("field `training[{n}].{name}` is missing or not a string"),
                )
            })?;
            Ok(dir.join(rel.trim_start_matches("./")))
        };
        let image = field("image")?;
        let label = field("label")?;
        let id = nifti_stem(&image).ok_or_else(|| {
            DataError::invalid(
                path,
                format!("field `training[{n}].image` is not a .nii or .nii.gz file"),
            )
        })?;
        cases.push(CaseRef { id, image, label });
    }
    cases.sort_by(|a, b| a.id.cmp(&b.id));
    if let Some(w) = cases.windows(2).find(|w| w[0].id == w[1].id) {
        return Err(DataError::invalid(
            path,
            format!("field `training` lists case {} twice", w[0].id),
        ));
    }
    Ok(cases)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::tests::touch;
    use crate::labels::OrganSet;

    fn task(json: &str, files: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(DATASET_JSON), json).unwrap();
        for f in files {
            touch(&dir.path().join(f));
        }
        dir
    }

    const LIVER: &str = r#"{
        "name": "Liver",
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "numTraining": 2,
        "training": [
            {"image": "./imagesTr/liver_1.nii.gz", "label": "./labelsTr/liver_1.nii.gz"},
            {"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}
        ]
    }"#;

    const LIVER_FILES: [&str; 4] = [
        "imagesTr/liver_0.nii.gz",
        "imagesTr/liver_1.nii.gz",
        "labelsTr/liver_0.nii.gz",
        "labelsTr/liver_1.nii.gz",
    ];

    #[test]
    fn reads_liver_task() {
        let dir = task(LIVER, &LIVER_FILES);
        let ds = SiteDataset::detect(dir.path()).unwrap();
        assert_eq!(ds.layout, Layout::Msd);
        assert_eq!(ds.case_ids(), ["liver_0", "liver_1"]);
        assert_eq!(
            ds.cases[0].label,
            dir.path().join("labelsTr/liver_0.nii.gz")
        );
        assert_eq!(ds.label_map, LabelMap::msd_liver());
        assert_eq!(ds.annotated(), OrganSet::single(Organ::Liver));
    }

    #[test]
    fn pancreas_and_spleen_label_maps() {
        let pancreas = r#"{"labels": {"0": "background", "1": "pancreas", "2": "cancer"},
                           "numTraining": 0, "training": []}"#;
        let ds = SiteDataset::detect(task(pancreas, &[]).path()).unwrap();
        assert_eq!(ds.label_map, LabelMap::msd_pancreas());
        let spleen = r#"{"labels": {"0": "background", "1": "spleen"},
                         "numTraining": 0, "training": []}"#;
        let ds = SiteDataset::detect(task(spleen, &[]).path()).unwrap();
        assert_eq!(ds.label_map, LabelMap::msd_spleen());
        let vessels = r#"{"labels": {"0": "background", "1": "Liver", "2": "vessel"},
                          "numTraining": 0, "training": []}"#;
        let ds = SiteDataset::detect(task(vessels, &[]).path()).unwrap();
        assert_eq!(ds.label_map.target(2), Some(0));
        assert_eq!(ds.label_map.target(1), Some(Organ::Liver.label()));
    }

    #[test]
    fn malformed_json_names_dataset_json() {
        let dir = task(r#"{"labels": {"0": "background""#, &[]);
        let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
        assert!(
            msg.contains("dataset.json") && msg.contains("JSON"),
            "{msg}"
        );
    }

    #[test]
    fn missing_or_wrong_fields_are_named() {
        let cases = [
            (r#"{"numTraining": 0, "training": []}"#, "`labels`"),
            (
                r#"{"labels": {"1": "liver"}, "numTraining": 0}"#,
                "`training`",
            ),
            (
                r#"{"labels": {"1": "liver"}, "training": []}"#,
                "`numTraining`",
            ),
            (
                r#"{"labels": {"1": "liver"}, "numTraining": 3, "training": []}"#,
                "`numTraining`",
            ),
            (
                r#"{"labels": {"x": "liver"}, "numTraining": 0, "training": []}"#,
                "`labels`",
            ),
            (
                r#"{"labels": {"1": "aorta"}, "numTraining": 0, "training": []}"#,
                "`labels`",
            ),
            (
                r#"{"labels": {"1": "liver"}, "numTraining": 1, "training": [{"image": "./a.nii.gz"}]}"#,
                "`training[0].label`",
            ),
        ];
        for (json, field) in cases {
            let dir = task(json, &[]);
            let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
            assert!(
                msg.contains("dataset.json") && msg.contains(field),
                "{json}: {msg}"
            );
        }
    }

    #[test]
    fn missing_label_file_is_named() {
        let dir = task(LIVER, &LIVER_FILES[..3]);
        let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("labelsTr/liver_1.nii.gz"), "{msg}");
    }
}
