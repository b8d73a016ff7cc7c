//! One site's data as a training site holds it: its dataset, its saved train/validation
//! split, and its preprocessed volumes (cached on disk, read back when needed, never all
//! held in memory).

use std::path::{Path, PathBuf};

use crate::cache::PreprocessCache;
use crate::datasets::SiteDataset;
use crate::error::{DataError, Result};
use crate::labels::{LabelMap, OrganSet};
use crate::preprocess::{preprocess_pair, PreprocessConfig};
use crate::split::Split;
use crate::volume::Volume;

/// A site's dataset with split and preprocessing.
#[derive(Debug, Clone)]
pub struct SiteData {
    /// The dataset (layout, cases, label map).
    pub dataset: SiteDataset,
    /// Train/validation split (saved beside the results).
    pub split: Split,
    /// How volumes are prepared.
    pub preprocess: PreprocessConfig,
    cache: PathBuf,
}

impl SiteData {
    /// Opens the dataset in `dir`, loads or creates its split in `split_dir` (an 80:20
    /// split seeded by `seed`, reused if saved before) and prepares the cache in
    /// `cache_dir`.
    pub fn open(
        dir: &Path,
        preprocess: PreprocessConfig,
        validation_fraction: f64,
        seed: u64,
        split_dir: &Path,
        cache_dir: &Path,
    ) -> Result<SiteData> {
        let dataset = SiteDataset::detect(dir)?;
        let split_path = split_dir.join(format!("split_{}.json", dataset.name));
        let split =
            Split::load_or_create(&split_path, &dataset.case_ids(), validation_fraction, seed)?;
        Ok(SiteData {
            dataset,
            split,
            preprocess,
            cache: cache_dir.to_path_buf(),
        })
    }

    /// A site whose cases are all for testing (e.g. the external BTCV site): no split file.
    pub fn open_test(
        dir: &Path,
        preprocess: PreprocessConfig,
        cache_dir: &Path,
    ) -> Result<SiteData> {
        let dataset = SiteDataset::detect(dir)?;
        let ids = dataset.case_ids();
        Ok(SiteData {
            split: Split {
                seed: 0,
                validation_fraction: 1.0,
                train: Vec::new(),
                validation: ids,
            },
            dataset,
            preprocess,
            cache: cache_dir.to_path_buf(),
        })
    }

    /// The site's name.
    pub fn name(&self) -> &str {
        &self.dataset.name
    }

    /// The organs its labels annotate.
    pub fn annotated(&self) -> OrganSet {
        self.dataset.annotated()
    }

    /// The label map of its dataset.
    pub fn label_map(&self) -> &LabelMap {
        &self.dataset.label_map
    }

    /// The preprocessed image (RAS, windowed to [0, 1], padded) and vocabulary label map of
    /// case `id`, from the cache when it is there.
    pub fn volume(&self, id: &str) -> Result<(Volume<f32>, Volume<u8>)> {
        let index = self.dataset.position(id).ok_or_else(|| {
            DataError::Config(format!("site {} has no case {id:?}", self.dataset.name))
        })?;
        let case = &self.dataset.cases[index];
        let cache = PreprocessCache::new(&self.cache)?;
        let (image, label, _) =
            cache.get_or_insert_with(&[&case.image, &case.label], &self.preprocess, || {
                let sample = self.dataset.load_case(index)?;
                preprocess_pair(&sample.image, &sample.label, &self.preprocess)
            })?;
        Ok((image, label))
    }
}
