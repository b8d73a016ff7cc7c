//! BTCV abdomen (RawData/Training): `img/imgXXXX.nii.gz` and `label/labelXXXX.nii.gz`,
//! paired by number.
//!
//! All 13 structures are annotated, so all four SegViz organs are annotated here; the nine
//! structures outside the vocabulary become background (see [`LabelMap::btcv`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::{folder_name, list_nifti, nifti_stem, CaseRef, Layout, SiteDataset};
use crate::error::{DataError, Result};
use crate::labels::LabelMap;

/// The image folder.
pub const IMAGE_DIR: &str = "img";
/// The label folder.
pub const LABEL_DIR: &str = "label";

/// The files of `dir` whose stem is `prefix` followed by digits, keyed by those digits.
fn numbered(dir: &Path, prefix: &str) -> Result<BTreeMap<String, PathBuf>> {
    let mut out = BTreeMap::new();
    for path in list_nifti(dir)? {
        let Some(stem) = nifti_stem(&path) else {
            continue;
        };
        if let Some(number) = stem.strip_prefix(prefix) {
            if !number.is_empty() && number.bytes().all(|b| b.is_ascii_digit()) {
                out.insert(number.to_owned(), path);
            }
        }
    }
    Ok(out)
}

/// Reads a BTCV folder.
pub fn open(dir: &Path) -> Result<SiteDataset> {
    let images = numbered(&dir.join(IMAGE_DIR), "img")?;
    let mut labels = numbered(&dir.join(LABEL_DIR), "label")?;
    let mut cases = Vec::with_capacity(images.len());
    let mut unmatched = Vec::new();
    for (number, image) in images {
        match labels.remove(&number) {
            Some(label) => cases.push(CaseRef {
                id: number,
                image,
                label,
            }),
            None => unmatched.push(image),
        }
    }
    unmatched.extend(labels.into_values());
    if !unmatched.is_empty() {
        let names: Vec<String> = unmatched.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::Layout {
            path: dir.to_path_buf(),
            reason: format!("file(s) without a partner: {}", names.join(", ")),
        });
    }
    if cases.is_empty() {
        return Err(DataError::Layout {
            path: dir.to_path_buf(),
            reason: format!("no imgXXXX.nii.gz files in {IMAGE_DIR}/"),
        });
    }
    Ok(SiteDataset {
        name: folder_name(dir),
        root: dir.to_path_buf(),
        layout: Layout::Btcv,
        cases,
        label_map: LabelMap::btcv(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datasets::tests::touch;
    use crate::labels::OrganSet;

    #[test]
    fn pairs_by_number() {
        let dir = tempfile::tempdir().unwrap();
        for n in ["0002", "0001"] {
            touch(&dir.path().join(format!("img/img{n}.nii.gz")));
            touch(&dir.path().join(format!("label/label{n}.nii.gz")));
        }
        let ds = SiteDataset::detect(dir.path()).unwrap();
        assert_eq!(ds.layout, Layout::Btcv);
        assert_eq!(ds.case_ids(), ["0001", "0002"]);
        assert_eq!(ds.cases[1].label, dir.path().join("label/label0002.nii.gz"));
        assert_eq!(ds.annotated(), OrganSet::ALL);
    }

    #[test]
    fn unmatched_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("img/img0001.nii.gz"));
        touch(&dir.path().join("label/label0001.nii.gz"));
        touch(&dir.path().join("label/label0005.nii.gz"));
        let msg = SiteDataset::detect(dir.path()).unwrap_err().to_string();
        assert!(msg.contains("label0005.nii.gz"), "{msg}");
    }
}
