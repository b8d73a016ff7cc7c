//! Training batches: patches drawn from sites' cached volumes, augmented, and grouped into
//! batches on a worker thread while the model trains on the previous batch. Only the
//! current batches are in memory; volumes are read back from the preprocessing cache.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::augment::{AugmentConfig, Augmenter};
use crate::error::{DataError, Result};
use crate::labels::OrganSet;
use crate::patches::{Patch, PatchSampler, PatchSamplerConfig};
use crate::site::SiteData;

/// A batch on the host: images, vocabulary labels and the organs each sample is annotated
/// for.
#[derive(Debug, Clone)]
pub struct HostBatch {
    /// Patches, C order, `[n, d, h, w]` together.
    pub images: Vec<f32>,
    /// Labels, same layout.
    pub labels: Vec<u8>,
    /// Annotated organs of each sample.
    pub annotated: Vec<OrganSet>,
    /// Patch shape.
    pub shape: [usize; 3],
}

impl HostBatch {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.annotated.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.annotated.is_empty()
    }
}

/// How one epoch's batches are drawn.
#[derive(Debug, Clone)]
pub struct EpochPlan {
    /// Patch sampling (its `seed` is replaced per epoch).
    pub sampler: PatchSamplerConfig,
    /// Augmentation; `None` trains on raw patches.
    pub augment: Option<AugmentConfig>,
    /// Samples per batch.
    pub batch_size: usize,
    /// Seed of this epoch (case order, patch centres, augmentation).
    pub seed: u64,
}

/// An epoch of batches produced on a worker thread; iterate it to train.
pub struct BatchStream {
    receiver: Receiver<Result<HostBatch>>,
    worker: Option<JoinHandle<()>>,
}

impl BatchStream {
    /// Starts producing one epoch over the training cases of every site in `sites`
    /// (several for a pooled model), in a seeded shuffled order.
    pub fn start(sites: Vec<Arc<SiteData>>, plan: EpochPlan) -> BatchStream {
        let (sender, receiver) = sync_channel(2);
        let worker = std::thread::spawn(move || {
            let result = produce(&sites, &plan, |batch| sender.send(Ok(batch)).is_ok());
            if let Err(e) = result {
                let _ = sender.send(Err(e));
            }
        });
        BatchStream {
            receiver,
            worker: Some(worker),
        }
    }
}

impl Iterator for BatchStream {
    type Item = Result<HostBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.receiver.recv() {
            Ok(item) => Some(item),
            Err(_) => {
                if let Some(w) = self.worker.take() {
                    if w.join().is_err() {
                        return Some(Err(DataError::Config(
                            "the batch worker thread panicked".into(),
                        )));
                    }
                }
                None
            }
        }
    }
}

/// Draws the epoch and hands each batch to `emit` (which returns false to stop early).
fn produce(
    sites: &[Arc<SiteData>],
    plan: &EpochPlan,
    mut emit: impl FnMut(HostBatch) -> bool,
) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(plan.seed);
    let mut cases: Vec<(usize, String)> = sites
        .iter()
        .enumerate()
        .flat_map(|(s, site)| site.split.train.iter().map(move |id| (s, id.clone())))
        .collect();
    cases.shuffle(&mut rng);
    let mut sampler = PatchSampler::new(PatchSamplerConfig {
        seed: plan.seed ^ 0x5eed_0001,
        ..plan.sampler.clone()
    })?;
    let mut augmenter = match &plan.augment {
        Some(cfg) => Some(Augmenter::new(cfg.clone(), plan.seed ^ 0x5eed_0002)?),
        None => None,
    };
    let mut pending: Vec<(Patch, OrganSet)> = Vec::new();
    for (s, id) in cases {
        let site = &sites[s];
        let (image, label) = site.volume(&id)?;
        for patch in sampler.sample(&image, &label)? {
            let patch = match augmenter.as_mut() {
                Some(a) => a.augment(&patch)?,
                None => patch,
            };
            pending.push((patch, site.annotated()));
            if pending.len() == plan.batch_size && !emit(collate(std::mem::take(&mut pending))) {
                return Ok(());
            }
        }
    }
    if !pending.is_empty() {
        emit(collate(pending));
    }
    Ok(())
}

fn collate(items: Vec<(Patch, OrganSet)>) -> HostBatch {
    let shape = items[0].0.shape;
    let mut batch = HostBatch {
        images: Vec::new(),
        labels: Vec::new(),
        annotated: Vec::new(),
        shape,
    };
    for (p, a) in items {
        batch.images.extend_from_slice(&p.image);
        batch.labels.extend_from_slice(&p.label);
        batch.annotated.push(a);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::phantom::{write_sites, PhantomConfig};
    use crate::preprocess::PreprocessConfig;

    fn plan(seed: u64) -> EpochPlan {
        EpochPlan {
            sampler: PatchSamplerConfig {
                patch_size: [16, 16, 8],
                samples_per_volume: 3,
                ..PatchSamplerConfig::default()
            },
            augment: Some(AugmentConfig::default()),
            batch_size: 2,
            seed,
        }
    }

    #[test]
    fn an_epoch_streams_every_patch_in_batches_deterministically() {
        let dir = tempfile::tempdir().expect("temp dir");
        let manifest = write_sites(&PhantomConfig::tiny(dir.path().join("p"))).expect("phantoms");
        let sites: Vec<Arc<SiteData>> = manifest
            .sites
            .iter()
            .filter(|s| s.name != "btcv")
            .take(2)
            .map(|s| {
                let preprocess = PreprocessConfig {
                    pixdim: [11.5, 11.5, 15.0],
                    pad_multiple: 8,
                    ..PreprocessConfig::default()
                };
                let site = SiteData::open(
                    &dir.path().join("p").join(&s.name),
                    preprocess,
                    0.0,
                    1,
                    &dir.path().join("splits"),
                    &dir.path().join("cache"),
                )
                .expect("site");
                Arc::new(site)
            })
            .collect();
        let cases: usize = sites.iter().map(|s| s.split.train.len()).sum();
        let a: Vec<HostBatch> = BatchStream::start(sites.clone(), plan(5))
            .collect::<Result<_>>()
            .expect("batches");
        let total: usize = a.iter().map(HostBatch::len).sum();
        assert_eq!(total, cases * 3);
        assert!(a.iter().all(|b| b.len() <= 2 && b.shape == [16, 16, 8]));
        assert!(a.iter().all(|b| b.images.len() == b.len() * 16 * 16 * 8));
        // Every sample says which organs it is annotated for: one per site here.
        assert!(a.iter().flat_map(|b| &b.annotated).all(|o| o.len() == 1));
        let b: Vec<HostBatch> = BatchStream::start(sites.clone(), plan(5))
            .collect::<Result<_>>()
            .expect("batches");
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| x.images == y.images && x.labels == y.labels));
        let c: Vec<HostBatch> = BatchStream::start(sites, plan(6))
            .collect::<Result<_>>()
            .expect("batches");
        assert!(a.iter().zip(&c).any(|(x, y)| x.images != y.images));
    }
}
