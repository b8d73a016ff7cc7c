//! Local training: what a site (or a pooled, central trainer) does with its own data —
//! epochs of patch batches, the objective for the model's heads, Adam with a cosine
//! schedule, an optional FedProx pull towards the global weights, and a deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Bytes, Device, Int, Tensor};
use segviz_core::loss::{DiceLoss, MarginalLoss};
use segviz_core::train::{CosineAnnealing, OptimizerConfig};
use segviz_core::{ModelState, SegVizModel, TensorRole};
use segviz_data::{AugmentConfig, Organ, PatchSamplerConfig};
use serde::{Deserialize, Serialize};

use crate::batches::BatchTensors;
use crate::error::{FedError, Result};
use crate::partial_labels::{
    batch_annotation, distillation_loss, exclusion_loss, head_masks, teacher_positive,
};
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
    /// SegViz + PL: every head of the model learns at every site — its own organs
    /// supervised, the other organs from known negatives (exclusion) and from a frozen
    /// teacher on the unannotated voxels (distillation). See [`crate::partial_labels`].
    PartialLabels {
        /// Weight of the exclusion term (0: off).
        exclusion_weight: f64,
        /// Weight of the distillation term this round (0: off; needs a teacher otherwise).
        distillation_weight: f64,
        /// Distillation temperature.
        temperature: f64,
        /// Distil only where the teacher's organ probability exceeds this (0: on every
        /// unannotated voxel).
        distillation_threshold: f64,
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
    /// When Adam starts afresh (its moments and step counts); one rule for every method.
    #[serde(default)]
    pub optimizer_restart: OptimizerRestart,
}

/// When a [`LocalTrainer`] restarts its optimiser. The same rule applies to every method
/// of a comparison: baselines and central models count their epochs in rounds of
/// `local_epochs` epochs like the federated clients do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerRestart {
    /// A fresh Adam at the start of every round (every `local_epochs` epochs). The default:
    /// on the tiny federation test (one initial seed, 12 and 20 rounds) it learned the
    /// external liver better than one Adam kept across rounds, whose moments belong to the
    /// weights before averaging.
    #[default]
    EveryRound,
    /// One Adam for the whole run, moments kept across rounds.
    Never,
}

impl OptimizerRestart {
    /// The restart period in epochs for rounds of `local_epochs` epochs (`None`: never).
    pub fn epochs(self, local_epochs: usize) -> Option<usize> {
        match self {
            OptimizerRestart::EveryRound => Some(local_epochs.max(1)),
            OptimizerRestart::Never => None,
        }
    }
}

impl LocalTrainingConfig {
    /// The optimiser settings.
    pub fn optimizer(&self) -> OptimizerConfig {
        OptimizerConfig::new()
            .with_learning_rate(self.learning_rate)
            .with_min_learning_rate(self.min_learning_rate)
    }
}

/// What a call to [`LocalTrainer::train`] did.
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

/// Adds FedProx's gradient `μ·(w − w₀)` (of the term `μ/2 · ‖w − w₀‖²`) to the gradient of
/// every anchored weight, before the optimiser sees it.
struct ProximalGradient<'a> {
    anchor: &'a ProximalAnchor,
    grads: &'a mut GradientsParams,
    path: Vec<String>,
}

impl ModuleVisitor for ProximalGradient<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let Some(w0) = self.anchor.weights.get(&self.path.join(".")) else {
            return;
        };
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let w = param.val().detach().inner();
        let w0: Tensor<D> = w0.clone().reshape(w.dims()).to_device(&grad.device());
        let w = w.to_device(&grad.device());
        self.grads
            .register(param.id, grad + (w - w0).mul_scalar(self.anchor.mu));
    }
}

/// What one call of [`LocalTrainer::train`] may add to plain local training.
#[derive(Default)]
pub struct RoundExtras<'a> {
    /// FedProx: the global weights and μ.
    pub proximal: Option<&'a ProximalAnchor>,
    /// The frozen teacher of [`Objective::PartialLabels`]' distillation term (the round's
    /// global model, with every head the student has, on the non-autodiff device).
    pub teacher: Option<&'a SegVizModel>,
    /// Give up with an error once passed.
    pub deadline: Option<Instant>,
}

/// How a [`LocalTrainer`] trains, for its whole life.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerOptions {
    /// What the model learns.
    pub objective: Objective,
    /// Sampling, augmentation, batch size, loss and learning rates.
    pub training: LocalTrainingConfig,
    /// Epochs of the whole cosine schedule (e.g. rounds × local epochs).
    pub total_epochs: usize,
    /// Restart the optimiser at every epoch that is a multiple of this (`None`: never);
    /// see [`OptimizerRestart`].
    pub restart_every: Option<usize>,
    /// Seed of case order, patches and augmentation (each epoch draws its own from it).
    pub seed: u64,
}

/// The one local trainer of every method: baselines, central models, federated clients and
/// fine-tuning all train through it.
///
/// It owns its Adam optimiser and its place in the cosine schedule for its whole life:
/// successive calls of [`LocalTrainer::train`] continue one optimisation (moments, step
/// counts, learning rate), whether the model object in between was rebuilt or reloaded (the
/// model's parameters are identified by their paths, see
/// [`SegVizModel::with_path_ids`]). [`LocalTrainer::save_state`] and
/// [`LocalTrainer::restore_state`] carry that across processes, so a resumed federation
/// repeats exactly.
pub struct LocalTrainer {
    options: TrainerOptions,
    optimizer: ModuleOptimizer,
    cosine: CosineAnnealing,
    epochs_done: usize,
}

impl LocalTrainer {
    /// A trainer at epoch 0 with a fresh optimiser.
    pub fn new(options: TrainerOptions) -> Self {
        let optimizer = options.training.optimizer();
        LocalTrainer {
            cosine: CosineAnnealing::new(&optimizer, options.total_epochs),
            optimizer: optimizer.adam(),
            epochs_done: 0,
            options,
        }
    }

    /// The options.
    pub fn options(&self) -> &TrainerOptions {
        &self.options
    }

    /// Epochs trained so far.
    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Moves the schedule (learning rate and epoch seeds) to `epoch`; the optimiser's
    /// moments stay.
    pub fn set_epoch(&mut self, epoch: usize) {
        self.epochs_done = epoch;
    }

    /// Replaces the objective for the next calls (e.g. this round's distillation weight);
    /// the optimiser and the schedule go on.
    pub fn set_objective(&mut self, objective: Objective) {
        self.options.objective = objective;
    }

    /// Trains `model` for `epochs` more epochs on the training split of `sites`, continuing
    /// the optimiser and the schedule of earlier calls. `on_step` is called after every step
    /// with its loss.
    ///
    /// On an error (divergence, the deadline, bad data) the trainer is left as it was
    /// before the call.
    pub fn train(
        &mut self,
        model: SegVizModel,
        sites: &[Arc<SiteData>],
        epochs: usize,
        extras: &RoundExtras<'_>,
        on_step: impl FnMut(f64),
    ) -> Result<(SegVizModel, TrainStats)> {
        let saved = (self.optimizer.clone(), self.epochs_done);
        let result = self.train_inner(model, sites, epochs, extras, on_step);
        if result.is_err() {
            (self.optimizer, self.epochs_done) = saved;
        }
        result
    }

    fn train_inner(
        &mut self,
        model: SegVizModel,
        sites: &[Arc<SiteData>],
        epochs: usize,
        extras: &RoundExtras<'_>,
        mut on_step: impl FnMut(f64),
    ) -> Result<(SegVizModel, TrainStats)> {
        let mut model = model.with_path_ids();
        let device = model_device(&model);
        let config = &self.options.training;
        let mut stats = TrainStats {
            examples: 0,
            steps: 0,
            mean_loss: 0.0,
        };
        let mut loss_sum = 0.0;
        for _ in 0..epochs {
            let epoch = self.epochs_done;
            if self
                .options
                .restart_every
                .is_some_and(|n| n > 0 && epoch.is_multiple_of(n))
            {
                self.optimizer = self.options.training.optimizer().adam();
            }
            let lr = self.cosine.at(epoch);
            let plan = EpochPlan {
                sampler: config.sampler.clone(),
                augment: config.augment.clone(),
                batch_size: config.batch_size,
                seed: self
                    .options
                    .seed
                    .wrapping_add(epoch as u64)
                    .wrapping_mul(0x9e37_79b9_7f4a_7c15),
            };
            for batch in BatchStream::start(sites.to_vec(), plan) {
                let batch = batch?;
                let loss = objective_loss(
                    &model,
                    &batch,
                    self.options.objective,
                    config.loss,
                    extras.teacher,
                    &device,
                )?;
                let value = loss.clone().into_scalar::<f32>() as f64;
                if !value.is_finite() {
                    return Err(FedError::Config(format!(
                        "training diverged (loss {value}) at epoch {epoch}; lower the learning rate"
                    )));
                }
                let mut grads = GradientsParams::from_grads(loss.backward(), &model);
                if let Some(anchor) = extras.proximal {
                    model.visit(&mut ProximalGradient {
                        anchor,
                        grads: &mut grads,
                        path: Vec::new(),
                    });
                }
                model = self.optimizer.step(lr, model, grads);
                stats.examples += batch.len();
                stats.steps += 1;
                loss_sum += value;
                on_step(value);
                if extras.deadline.is_some_and(|d| Instant::now() > d) {
                    return Err(FedError::Config(format!(
                        "deadline passed after {} step(s)",
                        stats.steps
                    )));
                }
            }
            self.epochs_done += 1;
        }
        stats.mean_loss = if stats.steps == 0 {
            f64::NAN
        } else {
            loss_sum / stats.steps as f64
        };
        Ok((model, stats))
    }

    /// The optimiser's state and the epochs done, as bytes (for checkpoints).
    pub fn save_state(&self) -> Result<Vec<u8>> {
        let optimizer = self
            .optimizer
            .into_bytes()
            .map_err(|e| FedError::Config(format!("cannot encode the optimiser state: {e}")))?;
        let mut bytes = (self.epochs_done as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(&optimizer);
        Ok(bytes)
    }

    /// Restores a state written by [`LocalTrainer::save_state`].
    pub fn restore_state(&mut self, bytes: &[u8]) -> Result<()> {
        let bad = |why: String| FedError::Config(format!("bad optimiser state: {why}"));
        if bytes.len() < 8 {
            return Err(bad(format!("{} bytes", bytes.len())));
        }
        let (epochs, optimizer) = bytes.split_at(8);
        let mut count = [0u8; 8];
        count.copy_from_slice(epochs);
        let fresh = self.options.training.optimizer().adam();
        self.optimizer = fresh
            .from_bytes(Bytes::from_bytes_vec(optimizer.to_vec()))
            .map_err(|e| bad(e.to_string()))?;
        self.epochs_done = u64::from_le_bytes(count) as usize;
        Ok(())
    }
}

/// Re-estimates the BatchNorm running statistics of `model` (representation and heads) for
/// its current weights, on the training split of `sites`: forward passes in training mode
/// over `epochs` epochs of the same patches and augmentations as training (seeded by
/// `seed`), without a gradient step. Nothing else changes.
///
/// Why: under FedBN a site keeps its own BatchNorm, but the statistics it holds after a
/// round were gathered with its *local* weights, before the server averaged them. The
/// averaged model that the site keeps, fine-tunes and is scored with would otherwise
/// normalise with statistics of weights it no longer has (and fine-tuning with a frozen
/// representation would never update them). Each batch moves the running statistics by
/// BatchNorm's momentum (0.1), so after `k` batches the stale ones keep a weight of
/// 0.9^k (about 2 % after three epochs of 12 batches).
///
/// `model` must be on an autodiff device (training mode), as the trainer's models are.
pub fn recalibrate_batch_norm(
    model: SegVizModel,
    sites: &[Arc<SiteData>],
    training: &LocalTrainingConfig,
    epochs: usize,
    seed: u64,
) -> Result<SegVizModel> {
    let device = model_device(&model);
    if !device.is_autodiff() {
        return Err(FedError::Config(
            "BatchNorm recalibration needs the model on an autodiff (training) device".into(),
        ));
    }
    for epoch in 0..epochs {
        let plan = EpochPlan {
            sampler: training.sampler.clone(),
            augment: training.augment.clone(),
            batch_size: training.batch_size,
            seed: seed
                .wrapping_add(epoch as u64)
                .wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        for batch in BatchStream::start(sites.to_vec(), plan) {
            let batch = batch?;
            // The forward pass in training mode updates the running statistics; the
            // outputs (and their graph) are dropped unused.
            drop(model.forward(batch.image_tensor(&device)));
        }
    }
    Ok(model)
}

/// Trains a fresh model of a non-federated method for `epochs` epochs with one
/// [`LocalTrainer`] (one optimiser for the whole run), calling `on_epoch` after each epoch.
pub fn train_alone(
    model: SegVizModel,
    sites: &[Arc<SiteData>],
    options: TrainerOptions,
    mut on_epoch: impl FnMut(),
) -> Result<(SegVizModel, TrainStats)> {
    let epochs = options.total_epochs;
    let mut trainer = LocalTrainer::new(options);
    let mut model = model;
    let mut total = TrainStats {
        examples: 0,
        steps: 0,
        mean_loss: f64::NAN,
    };
    for _ in 0..epochs {
        let (m, stats) = trainer.train(model, sites, 1, &RoundExtras::default(), |_| {})?;
        model = m;
        total.examples += stats.examples;
        total.steps += stats.steps;
        total.mean_loss = stats.mean_loss;
        on_epoch();
    }
    Ok((model, total))
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
    teacher: Option<&SegVizModel>,
    device: &Device,
) -> Result<Tensor<1>> {
    let x = batch.image_tensor(device);
    let logits = model.forward(x);
    match objective {
        Objective::PartialLabels {
            exclusion_weight,
            distillation_weight,
            temperature,
            distillation_threshold,
        } => {
            let annotated = batch_annotation(batch)?;
            let masks = head_masks(batch, annotated, device);
            let teacher_logits = match teacher {
                Some(t) if distillation_weight > 0.0 => {
                    // Only the heads of the organs this batch did not annotate are distilled.
                    let features = t.features(batch.image_tensor(&t.device()));
                    let mut by_task: HashMap<&str, Tensor<5>> = HashMap::new();
                    for (task, head) in t.tasks().iter().zip(&t.heads) {
                        if !annotated.contains(organ_of(task)?) {
                            by_task.insert(task.as_str(), head.forward(features.clone()));
                        }
                    }
                    Some(by_task)
                }
                Some(_) => None,
                None if distillation_weight > 0.0 => {
                    return Err(FedError::Config(
                        "the distillation term needs the round's global model as teacher".into(),
                    ))
                }
                None => None,
            };
            let mut total: Option<Tensor<1>> = None;
            for (task, l) in model.tasks().iter().zip(logits) {
                let organ = organ_of(task)?;
                let loss = if annotated.contains(organ) {
                    let label = organ.label();
                    let target = batch.target_tensor(device, |v| i64::from(v == label));
                    head_loss(kind, l, &target)
                } else {
                    let mut loss: Option<Tensor<1>> = None;
                    let mut add = |term: Tensor<1>| {
                        loss = Some(match loss.take() {
                            Some(t) => t + term,
                            None => term,
                        })
                    };
                    if exclusion_weight > 0.0 {
                        add(exclusion_loss(
                            l.clone(),
                            masks.known_negative.clone(),
                            masks.known_negative_count,
                        )
                        .mul_scalar(exclusion_weight));
                    }
                    if let Some(teacher) = teacher_logits.as_ref() {
                        let t = teacher.get(task.as_str()).ok_or_else(|| {
                            FedError::Config(format!("the teacher has no {task} head"))
                        })?;
                        let t = Tensor::<5>::from_data(t.clone().into_data(), device);
                        let mask = if distillation_threshold > 0.0 {
                            masks.unannotated.clone()
                                * teacher_positive(t.clone(), distillation_threshold)
                        } else {
                            masks.unannotated.clone()
                        };
                        // Averaged over all unannotated voxels either way, so a threshold
                        // only removes terms and never inflates the rest.
                        add(distillation_loss(
                            l.clone(),
                            t,
                            mask,
                            masks.unannotated_count,
                            temperature,
                        )
                        .mul_scalar(distillation_weight));
                    }
                    match loss {
                        Some(loss) => loss,
                        // Neither term: the head only keeps the gradient path alive.
                        None => l.sum().mul_scalar(0.0),
                    }
                };
                total = Some(match total {
                    Some(t) => t + loss,
                    None => loss,
                });
            }
            total.ok_or_else(|| FedError::Config("the model has no head to train".into()))
        }
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
                    // The same loss as every other method: Dice, with or without CE.
                    MarginalLoss::new()
                        .with_exclusion_weight(exclusion_weight)
                        .with_cross_entropy(kind == LossKind::DiceCe)
                        .forward(l, &target, &annotated)
                }
                _ => head_loss(kind, l, &target),
            })
        }
    }
}
