//! Finding the sites of an experiment in a data folder.

use std::path::{Path, PathBuf};

use crate::error::{FedError, Result};

/// The data of an experiment: training sites and an optional external test site.
#[derive(Debug, Clone)]
pub struct ExperimentData {
    /// One folder per training site (MSD task folder, KiTS19 folder, generic folder…).
    pub training_sites: Vec<PathBuf>,
    /// The external test site (e.g. BTCV), all organs annotated.
    pub test_site: Option<PathBuf>,
    /// Sub-folders of the data folder that hold nothing of a dataset layout and were
    /// therefore not used (shown to the user, so nothing is left out unseen).
    pub ignored: Vec<PathBuf>,
}

impl ExperimentData {
    /// Finds the sites in `dir`: every sub-folder whose layout is recognised (see
    /// [`segviz_data::SiteDataset::detect`]); a BTCV-layout folder is the external test
    /// site, the others are training sites.
    ///
    /// A sub-folder with nothing of a dataset in it is listed in
    /// [`ExperimentData::ignored`]. A sub-folder that looks like a dataset but cannot be
    /// read (a malformed `dataset.json`, missing files, an empty `imagesTr/`…) is an error:
    /// one error lists every such folder and what is wrong with it. Finding no training
    /// site is an error too.
    pub fn discover(dir: &Path) -> Result<ExperimentData> {
        let entries = std::fs::read_dir(dir).map_err(|e| FedError::io(dir, e))?;
        let mut folders: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        folders.sort();
        let mut data = ExperimentData {
            training_sites: Vec::new(),
            test_site: None,
            ignored: Vec::new(),
        };
        let mut broken = Vec::new();
        for folder in folders {
            match segviz_data::SiteDataset::detect(&folder) {
                Ok(ds) if ds.layout == segviz_data::Layout::Btcv => {
                    if data.test_site.replace(folder.clone()).is_some() {
                        return Err(FedError::Config(format!(
                            "{}: more than one BTCV-layout test site",
                            dir.display()
                        )));
                    }
                }
                Ok(_) => data.training_sites.push(folder),
                Err(e) if segviz_data::SiteDataset::looks_like_dataset(&folder) => {
                    broken.push(e.to_string())
                }
                Err(_) => data.ignored.push(folder),
            }
        }
        if !broken.is_empty() {
            return Err(FedError::BadData { problems: broken });
        }
        if data.training_sites.is_empty() {
            return Err(FedError::Config(format!(
                "{}: no training site found among its sub-folders (looked for MSD \
                 dataset.json, KiTS19 case_* folders, BTCV img/ + label/, or a generic \
                 images/ + labels/ with segviz.toml or labels.json)",
                dir.display(),
            )));
        }
        Ok(data)
    }
}
