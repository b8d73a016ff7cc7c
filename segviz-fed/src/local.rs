//! Local training: what a site (or a pooled, central trainer) does with its own data —
//! epochs of patch batches, the objective for the model's heads, Adam with a cosine
//! schedule, an optional FedProx pull towards the global weights, and a deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::{ModuleMapper, Param};
use burn::tensor::{Device, Int, Tensor};
use segviz_core::loss::{DiceLoss, MarginalLoss};
use segviz_core::train::{optimizer_step, CosineAnnealing, OptimizerConfig};
use segviz_core::{ModelState, SegVizModel, TensorRole};
use segviz_data::{AugmentConfig, Organ, PatchSamplerConfig};
use serde::{Deserialize, Serialize};

use crate::batches::BatchTensors;
use crate::error::{FedError, Result};
use segviz_data::SiteData;
use segviz_data::{BatchStream, EpochPlan, HostBatch};

/// The name of the single multi-class head of a pooled (central) model.
pub const POOLED_HEAD: &str = "organs";

/// Which loss is applied to a head's logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Soft Dice (the paper's loss).
    Dice,
    /// Soft Dice + cross-entropy (MONAI `DiceCELoss`): converges faster on small data.
    DiceCe,
}

/// What a model is trained to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// SegViz: every head learns its own organ (background / organ) from the sites that
    /// annotate it.
    TaskHeads,
    /// One multi-class head on pooled data, an organ a sample is not annotated for counting
    /// as background (the paper's "central aggregation").
    PooledNaive,
    /// One multi-class head on pooled data with the marginal (partial-label) loss.
    PooledMarginal {
        /// Weight of the exclusion term.
        exclusion_weight: f64,
    },
}

/// Settings of local training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalTrainingConfig {
    /// Patch sampling.
    pub sampler: PatchSamplerConfig,
    /// Augmentation (`None` for none).
    pub augment: Option<AugmentConfig>,
    /// Samples per batch (paper: 2).
    pub batch_size: usize,
    /// Loss applied to each head.
    pub loss: LossKind,
    /// Adam and the cosine schedule.
    pub learning_rate: f64,
    /// Final learning rate of the cosine schedule.
    pub min_learning_rate: f64,
}

impl LocalTrainingConfig {
    /// The optimiser settings.
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig::new()
            .with_learning_rate(self.learning_rate)
            .with_min_learning_rate(self.min_learning_rate)
    }
}

/// Where training stands in a longer schedule, so the learning rate follows one cosine
/// curve across rounds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Epochs already trained before this call.
    pub first_epoch: usize,
    /// Epochs of the whole schedule.
    pub total_epochs: usize,
}

/// What a call to [`train_epochs`] did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TrainStats {
    /// Training samples (patches) seen.
    pub examples: usize,
    /// Optimisation steps.
    pub steps: usize,
    /// Mean loss over the steps.
    pub mean_loss: f64,
}

/// A FedProx anchor: the global representation weights and the strength μ.
pub struct ProximalAnchor {
    weights: HashMap<String, Tensor<1>>,
    mu: f64,
}

impl ProximalAnchor {
    /// The representation tensors of `global` as the anchor, on `device`.
    pub fn new(global: &ModelState, mu: f64, device: &Device) -> Self {
        let weights = global
            .tensors
            .iter()
            .filter(|(_, t)| t.role == TensorRole::Representation && t.trainable)
            .map(|(p, t)| {
                let data = burn::tensor::TensorData::new(t.data.clone(), [t.data.len()]);
                (p.clone(), Tensor::<1>::from_data(data, device))
            })
            .collect();
        ProximalAnchor { weights, mu }
    }
}

/// Moves every anchored weight towards its anchor: `w ← w − η·μ·(w − w₀)`, the gradient
/// step of FedProx's term `μ/2 · ‖w − w₀‖²`, applied after each optimiser step.
struct ProximalPull<'a> {
    anchor: &'a ProximalAnchor,
    rate: f64,
    path: Vec<String>,
}

impl ModuleMapper for ProximalPull<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(w0) = self.anchor.weights.get(&self.path.join(".")) else {
            return param;
        };
        let w = param.val();
        let dims = w.dims();
        let w0: Tensor<D> = w0.clone().reshape(dims);
        let pulled = (w.clone() - (w - w0).mul_scalar(self.rate)).detach();
        let id = param.id;
        param.transform_for_load(pulled, id)
    }
}

/// Trains `model` for `epochs` epochs on the training split of `sites` with a fresh Adam
/// optimiser (each call starts from zero moments, so a resumed federation repeats exactly).
///
/// `seed` fixes case order, patches and augmentation; `deadline` stops with an error once
/// passed; `on_step` is called after every step with the step's loss.
#[allow(clippy::too_many_arguments)]
pub fn train_epochs(
    mut model: SegVizModel,
    sites: &[Arc<SiteData>],
    objective: Objective,
    config: &LocalTrainingConfig,
    epochs: usize,
    schedule: Schedule,
    seed: u64,
    proximal: Option<&ProximalAnchor>,
    deadline: Option<Instant>,
    mut on_step: impl FnMut(f64),
) -> Result<(SegVizModel, TrainStats)> {
    let device = model_device(&model);
    let mut optimizer = config.optimizer().adam();
    let optimizer = &mut optimizer;
    let cosine = CosineAnnealing::new(&config.optimizer(), schedule.total_epochs);
    let mut stats = TrainStats {
        examples: 0,
        steps: 0,
        mean_loss: 0.0,
    };
    let mut loss_sum = 0.0;
    for epoch in 0..epochs {
        let global_epoch = schedule.first_epoch + epoch;
        let lr = cosine.at(global_epoch);
        let plan = EpochPlan {
            sampler: config.sampler.clone(),
            augment: config.augment.clone(),
            batch_size: config.batch_size,
            seed: seed
                .wrapping_add(global_epoch as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        for batch in BatchStream::start(sites.to_vec(), plan) {
            let batch = batch?;
            let loss = objective_loss(&model, &batch, objective, config.loss, &device)?;
            let value = loss.clone().into_scalar::<f32>() as f64;
            if !value.is_finite() {
                return Err(FedError::Config(format!(
                    "training diverged (loss {value}) at epoch {global_epoch}; lower the learning rate"
                )));
            }
            model = optimizer_step(model, optimizer, loss, lr);
            if let Some(anchor) = proximal {
                let mut pull = ProximalPull {
                    anchor,
                    rate: lr * anchor.mu,
                    path: Vec::new(),
                };
                model = burn::module::Module::map(model, &mut pull);
            }
            stats.examples += batch.len();
            stats.steps += 1;
            loss_sum += value;
            on_step(value);
            if deadline.is_some_and(|d| Instant::now() > d) {
                return Err(FedError::Config(format!(
                    "deadline passed after {} step(s)",
                    stats.steps
                )));
            }
        }
    }
    stats.mean_loss = if stats.steps == 0 {
        f64::NAN
    } else {
        loss_sum / stats.steps as f64
    };
    Ok((model, stats))
}

/// The device of a model's parameters.
pub fn model_device(model: &SegVizModel) -> Device {
    model.device()
}

/// The organ of a task head, by its name.
pub fn organ_of(task: &str) -> Result<Organ> {
    Organ::from_name(task).ok_or_else(|| {
        FedError::Config(format!(
            "task {task:?} is not one of the organs liver, spleen, pancreas, kidney"
        ))
    })
}

fn head_loss(kind: LossKind, logits: Tensor<5>, target: &Tensor<4, Int>) -> Tensor<1> {
    let dice = DiceLoss::new();
    match kind {
        LossKind::Dice => dice.forward(logits, target),
        LossKind::DiceCe => dice.dice_ce(logits, target),
    }
}

/// The loss of one batch under `objective`.
fn objective_loss(
    model: &SegVizModel,
    batch: &HostBatch,
    objective: Objective,
    kind: LossKind,
    device: &Device,
) -> Result<Tensor<1>> {
    let x = batch.image_tensor(device);
    let logits = model.forward(x);
    match objective {
        Objective::TaskHeads => {
            let mut total: Option<Tensor<1>> = None;
            for (task, l) in model.tasks().iter().zip(logits) {
                let organ = organ_of(task)?.label();
                let target = batch.target_tensor(device, |v| i64::from(v == organ));
                let loss = head_loss(kind, l, &target);
                total = Some(match total {
                    Some(t) => t + loss,
                    None => loss,
                });
            }
            total.ok_or_else(|| FedError::Config("the model has no head to train".into()))
        }
        Objective::PooledNaive | Objective::PooledMarginal { .. } => {
            let l = logits
                .into_iter()
                .next()
                .ok_or_else(|| FedError::Config("a pooled model needs its head".into()))?;
            let target = batch.target_tensor(device, i64::from);
            Ok(match objective {
                Objective::PooledMarginal { exclusion_weight } => {
                    let annotated: Vec<Vec<bool>> = batch
                        .annotated
                        .iter()
                        .map(|a| a.to_flags().to_vec())
                        .collect();
                    // The marginal loss is always Dice + cross-entropy on the merged classes.
                    MarginalLoss::new()
                        .with_exclusion_weight(exclusion_weight)
                        .forward(l, &target, &annotated)
                }
                _ => head_loss(kind, l, &target),
            })
        }
    }
}
