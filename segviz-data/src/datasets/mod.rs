//! Partially annotated CT datasets in the layouts SegViz's sites use: MSD task folders,
//! KiTS19, BTCV and a small generic layout for one's own data.
//!
//! [`SiteDataset::detect`] recognises the layout of a folder and lists its cases
//! ([`CaseRef`]: an id and the image/label paths) together with the [`LabelMap`] that turns
//! the dataset's label values into the SegViz vocabulary. [`SiteDataset::load_case`] reads
//! one case into a [`Sample`]: the image in Hounsfield units, the label volume in vocabulary
//! values, and the organs the sample is annotated for.
//!
//! Loading does not reorient or resample: the volumes keep the axes and affine of their
//! files (KiTS19 stores the cranio-caudal axis first); preprocessing brings them to RAS.

pub mod btcv;
pub mod generic;
pub mod kits;
pub mod msd;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::labels::{LabelMap, OrganSet};
use crate::nifti_io::read_labels;
use crate::volume::{Geometry, Volume};

/// The folder layout a dataset was recognised as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    /// Medical Segmentation Decathlon task folder (`dataset.json`, `imagesTr/`, `labelsTr/`).
    Msd,
    /// KiTS19 (`data/case_XXXXX/{imaging,segmentation}.nii.gz`).
    Kits19,
    /// BTCV abdomen (`img/imgXXXX.nii.gz`, `label/labelXXXX.nii.gz`).
    Btcv,
    /// SegViz generic (`images/`, `labels/`, and `segviz.toml` or `labels.json`).
    Generic,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Msd => "MSD",
            Layout::Kits19 => "KiTS19",
            Layout::Btcv => "BTCV",
            Layout::Generic => "generic",
        })
    }
}

/// One case of a dataset: an id unique within the dataset and its two files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaseRef {
    /// Case id (e.g. `liver_3`, `case_00012`, `0001`).
    pub id: String,
    /// The CT image file.
    pub image: PathBuf,
    /// The label file, in the dataset's own label values.
    pub label: PathBuf,
}

/// One loaded case.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Case id.
    pub id: String,
    /// CT image in Hounsfield units, axes and affine as in the file.
    pub image: Volume<f32>,
    /// Label volume in vocabulary values (0 background/unknown, 1 liver, 2 spleen,
    /// 3 pancreas, 4 kidney), on the image's grid.
    pub label: Volume<u8>,
    /// Organs this sample is annotated for. A `0` voxel is background only for these; for
    /// the others it means "not annotated".
    pub annotated: OrganSet,
}

/// A site's dataset: its cases and how to read their labels.
#[derive(Debug, Clone)]
pub struct SiteDataset {
    /// Site name (the folder name, or the name a generic config gives).
    pub name: String,
    /// The dataset folder.
    pub root: PathBuf,
    /// The layout it was recognised as.
    pub layout: Layout,
    /// The cases, sorted by id.
    pub cases: Vec<CaseRef>,
    /// Source label values → vocabulary, with the annotated organs.
    pub label_map: LabelMap,
}

impl SiteDataset {
    /// Recognises the layout of `dir` and lists its cases.
    ///
    /// Checked in this order: `dataset.json` → MSD; `case_*` folders (in `dir` or
    /// `dir/data`) → KiTS19; `img/` and `label/` → BTCV; `segviz.toml` or `labels.json` →
    /// generic. Anything else is a [`DataError::Layout`] that lists what was looked for.
    /// Every listed image and label file must exist.
    pub fn detect(dir: &Path) -> Result<SiteDataset> {
        if !dir.is_dir() {
            return Err(DataError::Layout {
                path: dir.to_path_buf(),
                reason: "not a folder".into(),
            });
        }
        if dir.join(msd::DATASET_JSON).is_file() {
            return msd::open(dir);
        }
        if kits::case_folder(dir)?.is_some() {
            return kits::open(dir);
        }
        if dir.join(btcv::IMAGE_DIR).is_dir() && dir.join(btcv::LABEL_DIR).is_dir() {
            return btcv::open(dir);
        }
        if generic::config_file(dir).is_some() {
            return generic::open(dir);
        }
        Err(DataError::Layout {
            path: dir.to_path_buf(),
            reason: format!(
                "no known dataset layout: looked for {} (MSD), case_* folders in the folder \
                 or in data/ (KiTS19), {}/ and {}/ (BTCV), {} or {} (generic)",
                msd::DATASET_JSON,
                btcv::IMAGE_DIR,
                btcv::LABEL_DIR,
                generic::TOML_CONFIG,
                generic::JSON_CONFIG,
            ),
        })
    }

    /// Whether `dir` holds anything of a dataset layout (`dataset.json`, `imagesTr/`,
    /// `labelsTr/`, `data/`, `case_*` folders, `img/`, `label/`, `images/`, `labels/`, a
    /// generic config). A folder with such a marker that [`SiteDataset::detect`] refuses is a
    /// broken dataset, not an unrelated folder.
    pub fn looks_like_dataset(dir: &Path) -> bool {
        const MARKERS: [&str; 11] = [
            msd::DATASET_JSON,
            "imagesTr",
            "labelsTr",
            "data",
            btcv::IMAGE_DIR,
            btcv::LABEL_DIR,
            generic::IMAGE_DIR,
            generic::LABEL_DIR,
            generic::TOML_CONFIG,
            generic::JSON_CONFIG,
            "imagesTs",
        ];
        if MARKERS.iter().any(|m| dir.join(m).exists()) {
            return true;
        }
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().starts_with("case_") && e.path().is_dir())
        })
    }

    /// The organs every sample of this dataset is annotated for.
    pub fn annotated(&self) -> OrganSet {
        self.label_map.annotated()
    }

    /// Number of cases.
    pub fn len(&self) -> usize {
        self.cases.len()
    }

    /// Whether the dataset has no case.
    pub fn is_empty(&self) -> bool {
        self.cases.is_empty()
    }

    /// The case ids, in case order.
    pub fn case_ids(&self) -> Vec<String> {
        self.cases.iter().map(|c| c.id.clone()).collect()
    }

    /// Index of the case with id `id`.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.cases.iter().position(|c| c.id == id)
    }

    /// Reads case `index`: image, label (mapped to the vocabulary) and annotated organs.
    ///
    /// Errors when the index is out of range, a file cannot be read, the image and label
    /// grids differ (naming both files), or the label holds an undeclared value.
    pub fn load_case(&self, index: usize) -> Result<Sample> {
        let case = self.cases.get(index).ok_or_else(|| {
            DataError::Config(format!(
                "case index {index} out of range: dataset {} has {} case(s)",
                self.name,
                self.cases.len()
            ))
        })?;
        let (image, _) = crate::dicom::read_scan(&case.image)?;
        let raw_label = read_labels(&case.label)?;
        check_same_grid(
            &image.geometry,
            &raw_label.geometry,
            &case.image,
            &case.label,
        )?;
        let label = self.label_map.apply(&raw_label, &case.label)?;
        // The label takes the image's affine: the two agree within tolerance, and one
        // geometry for the pair keeps later resampling exact.
        let label = Volume {
            data: label.data,
            geometry: image.geometry.clone(),
        };
        Ok(Sample {
            id: case.id.clone(),
            image,
            label,
            annotated: self.annotated(),
        })
    }
}

/// Checks that an image and its label share one voxel grid (shape and affine); the same
/// check as [`crate::preprocess::check_pair`], arguments in grid-first order.
pub fn check_same_grid(
    image: &Geometry,
    label: &Geometry,
    image_path: &Path,
    label_path: &Path,
) -> Result<()> {
    crate::preprocess::check_pair(image_path, image, label_path, label)
}

/// The file name of `path` without `.nii.gz` / `.nii`; `None` if it has neither suffix.
pub(crate) fn nifti_stem(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    name.strip_suffix(".nii.gz")
        .or_else(|| name.strip_suffix(".nii"))
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The NIfTI files directly inside `dir` (hidden files such as macOS `._x.nii.gz` skipped),
/// sorted by name.
pub(crate) fn list_nifti(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        if !hidden && path.is_file() && nifti_stem(&path).is_some() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// Errors naming the first file of `case` that does not exist (an image may be a DICOM
/// series folder).
pub(crate) fn require_files(case: &CaseRef) -> Result<()> {
    for path in [&case.image, &case.label] {
        if !(path.is_file() || (path == &case.image && path.is_dir())) {
            return Err(DataError::io(
                path.clone(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
            ));
        }
    }
    Ok(())
}

/// The last component of `dir` as a site name.
pub(crate) fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .as_deref()
        .unwrap_or(dir)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "dataset".into())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Creates an empty file (and its folders).
    pub(crate) fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn unknown_layout_lists_what_was_looked_for() {
        let dir = tempfile::tempdir().unwrap();
        touch(&dir.path().join("readme.txt"));
        let err = SiteDataset::detect(dir.path()).unwrap_err();
        let msg = err.to_string();
        for needle in [
            "dataset.json",
            "case_*",
            "img/",
            "label/",
            "segviz.toml",
            "labels.json",
        ] {
            assert!(msg.contains(needle), "{msg}");
        }
    }

    #[test]
    fn grid_check_names_both_files() {
        let a = Geometry::from_spacing([2, 3, 4], [1.0, 1.0, 2.0]);
        let mut b = a.clone();
        b.affine[0][3] = 0.5;
        let err = check_same_grid(&a, &b, Path::new("img.nii"), Path::new("seg.nii")).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("img.nii") && msg.contains("seg.nii"), "{msg}");
        let c = Geometry::from_spacing([2, 3, 5], [1.0, 1.0, 2.0]);
        assert!(check_same_grid(&a, &c, Path::new("i"), Path::new("l")).is_err());
        let mut d = a.clone();
        d.affine[0][0] += 1e-6;
        assert!(check_same_grid(&a, &d, Path::new("i"), Path::new("l")).is_ok());
    }

    #[test]
    fn nifti_stems() {
        assert_eq!(
            nifti_stem(Path::new("a/liver_1.nii.gz")).as_deref(),
            Some("liver_1")
        );
        assert_eq!(nifti_stem(Path::new("x.nii")).as_deref(), Some("x"));
        assert_eq!(nifti_stem(Path::new("x.mha")), None);
    }
}
