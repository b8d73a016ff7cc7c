//! KiTS19: `data/case_XXXXX/imaging.nii.gz` and `segmentation.nii.gz`.
//!
//! Labels: 1 kidney, 2 tumour (merged into the kidney). KiTS19 stores its volumes
//! slice-first (axis 0 is cranio-caudal); the affine says so, and loading keeps it.
//! Cases without `segmentation.nii.gz` are the challenge's unlabelled test cases and are
//! skipped; a segmentation without its image is an error.

use std::path::{Path, PathBuf};

use super::{folder_name, require_files, CaseRef, Layout, SiteDataset};
use crate::error::{DataError, Result};
use crate::labels::LabelMap;

/// The image file of a case.
pub const IMAGING: &str = "imaging.nii.gz";
/// The label file of a case.
pub const SEGMENTATION: &str = "segmentation.nii.gz";

/// The folder holding the `case_*` folders: `dir/data` or `dir` itself; `None` if neither
/// has any.
pub fn case_folder(dir: &Path) -> Result<Option<PathBuf>> {
    for candidate in [dir.join("data"), dir.to_path_buf()] {
        if candidate.is_dir() && !case_dirs(&candidate)?.is_empty() {
            return Ok(Some(candidate));
        }
    }
    Ok(None)
}

/// The `case_*` folders directly inside `dir`, sorted.
fn case_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let is_case = entry.file_name().to_string_lossy().starts_with("case_");
        if is_case && entry.path().is_dir() {
            dirs.push(entry.path());
        }
    }
    dirs.sort();
    Ok(dirs)
}

/// Reads a KiTS19 folder (the repository root, its `data/`, or any folder of `case_*`).
pub fn open(dir: &Path) -> Result<SiteDataset> {
    let folder = case_folder(dir)?.ok_or_else(|| DataError::Layout {
        path: dir.to_path_buf(),
        reason: "no case_* folders here or in data/".into(),
    })?;
    let mut cases = Vec::new();
    for case_dir in case_dirs(&folder)? {
        let case = CaseRef {
            id: folder_name(&case_dir),
            image: case_dir.join(IMAGING),
            label: case_dir.join(SEGMENTATION),
        };
        if !case.label.exists() {
            continue;
        }
        require_files(&case)?;
        cases.push(case);
    }
    if cases.is_empty() {
        return Err(DataError::Layout {
            path: folder,
            reason: format!("no case_* folder holds a {SEGMENTATION}"),
        });
    }
    Ok(SiteDataset {
        name: folder_name(dir),
        root: dir.to_path_buf(),
        layout: Layout::Kits19,
        cases,
        label_map: LabelMap::kits19(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::tests::touch;
    use crate::labels::{Organ, OrganSet};

    #[test]
    fn reads_repository_root_and_data_folder() {
        let dir = tempfile::tempdir().unwrap();
        for case in ["case_00001", "case_00000"] {
            touch(&dir.path().join("data").join(case).join(IMAGING));
            touch(&dir.path().join("data").join(case).join(SEGMENTATION));
        }
        // An unlabelled test case is skipped.
        touch(&dir.path().join("data/case_00210").join(IMAGING));
        for root in [dir.path().to_path_buf(), dir.path().join("data")] {
            let ds = SiteDataset::detect(&root).unwrap();
            assert_eq!(ds.layout, Layout::Kits19);
            assert_eq!(ds.case_ids(), ["case_00000", "case_00001"]);
            assert_eq!(ds.label_map, LabelMap::kits19());
            assert_eq!(ds.annotated(), OrganSet::single(Organ::Kidney));
        }
    }

    #[test]
    fn segmentation_without_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("case_00007").join(SEGMENTATION));
        let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("case_00007/imaging.nii.gz"), "{msg}");
    }
}
