//! Training batches: patches drawn from a site's cached volumes, augmented, and grouped into
//! batches on a worker thread while the model trains on the previous batch.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use segviz_data::{AugmentConfig, Augmenter, OrganSet, Patch, PatchSampler, PatchSamplerConfig};

use crate::error::{FedError, Result};
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

    /// The images as a tensor `[n, 1, d, h, w]`.
    pub fn image_tensor(&self, device: &Device) -> Tensor<5> {
        let [d, h, w] = self.shape;
        Tensor::from_data(
            TensorData::new(self.images.clone(), [self.len(), 1, d, h, w]),
            device,
        )
    }

    /// A label tensor `[n, d, h, w]` after mapping every vocabulary value through `map`.
    pub fn target_tensor(&self, device: &Device, map: impl Fn(u8) -> i64) -> Tensor<4, Int> {
        let [d, h, w] = self.shape;
        let values: Vec<i64> = self.labels.iter().map(|&v| map(v)).collect();
        Tensor::from_data(TensorData::new(values, [self.len(), d, h, w]), device)
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
                        return Some(Err(FedError::Config(
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
