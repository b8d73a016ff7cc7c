//! A site as a federation client: its data, its local model (representation + the heads
//! of its own organs) and local training — the in-process counterpart of a Flower node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use segviz_core::sliding_window::SlidingWindowConfig;
use segviz_core::{ModelState, SegVizModel};
use segviz_data::Organ;

use crate::client::FederatedClient;
use crate::error::{FedError, Result};
use crate::evaluate::{evaluate_site, mean_dice, Segmenter};
use crate::local::{
    train_alone, LocalTrainer, LocalTrainingConfig, Objective, ProximalAnchor, RoundExtras,
    TrainerOptions,
};
use crate::messages::{ClientUpdate, EvaluateResult, FitInstructions};
use crate::partial_labels::{
    PartialLabelConfig, KEY_DISTILLATION_TEMPERATURE, KEY_DISTILLATION_THRESHOLD,
    KEY_DISTILLATION_WEIGHT, KEY_EXCLUSION_WEIGHT, KEY_PARTIAL_LABELS,
};
use crate::strategy::ClientInfo;
use segviz_data::SiteData;

/// How [`SiteClient::fine_tuned`] fine-tunes a site's model after federation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FineTuning {
    /// Epochs over the site's training data.
    pub epochs: usize,
    /// Initial learning rate of a fresh Adam (cosine to a tenth of it).
    pub learning_rate: f64,
    /// Whether the representation block (weights and BatchNorm statistics) trains too;
    /// `false` trains the heads only (the paper).
    pub representation: bool,
}

/// A site client. See the module documentation.
///
/// The client keeps one [`LocalTrainer`] across rounds (its Adam moments and its place in
/// the cosine schedule); it is saved with the client's checkpoint so a resumed federation
/// repeats exactly.
pub struct SiteClient {
    site: Arc<SiteData>,
    tasks: Vec<String>,
    model: SegVizModel,
    training: LocalTrainingConfig,
    window: SlidingWindowConfig,
    seed: u64,
    trainer: Option<LocalTrainer>,
    /// A saved trainer state waiting for the trainer to be built (on the first fit).
    pending_trainer_state: Option<Vec<u8>>,
    /// Validation volumes scored in each round's evaluation (`None`: all of them).
    round_validation: Option<usize>,
}

impl SiteClient {
    /// A client for `site` whose local model is `global` restricted to the site's organs;
    /// the model must live on an autodiff device. Under the partial-label rule the client
    /// takes the other heads when the first instruction brings them.
    pub fn new(
        site: Arc<SiteData>,
        global: &SegVizModel,
        training: LocalTrainingConfig,
        window: SlidingWindowConfig,
        seed: u64,
    ) -> Result<SiteClient> {
        let tasks: Vec<String> = site
            .annotated()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        if tasks.is_empty() {
            return Err(FedError::client(site.name(), "the site annotates no organ"));
        }
        let model = global.subset(&tasks)?;
        Ok(SiteClient {
            site,
            tasks,
            model,
            training,
            window,
            seed,
            trainer: None,
            pending_trainer_state: None,
            round_validation: None,
        })
    }

    /// Scores only the first `volumes` validation volumes in each round's evaluation (the
    /// per-round monitoring); `None` scores all of them. Training is not affected.
    pub fn with_round_validation(mut self, volumes: Option<usize>) -> Self {
        self.round_validation = volumes;
        self
    }

    /// The client's current local model.
    pub fn model(&self) -> &SegVizModel {
        &self.model
    }

    /// The site's data.
    pub fn site(&self) -> &Arc<SiteData> {
        &self.site
    }

    /// The local model restricted to the heads of the site's own organs, fine-tuned for
    /// `tuning.epochs` epochs with a fresh optimiser at `tuning.learning_rate` (cosine to a
    /// tenth of it), as after federation (paper §4.3): the heads only, the representation
    /// block frozen (weights and BatchNorm statistics), unless `tuning.representation`. The
    /// client itself is left as it is.
    pub fn fine_tuned(&self, tuning: FineTuning, seed: u64) -> Result<SegVizModel> {
        let own = self.model.subset(&self.tasks)?;
        let own = if tuning.representation {
            own
        } else {
            own.freeze_representation()
        };
        let training = LocalTrainingConfig {
            learning_rate: tuning.learning_rate,
            min_learning_rate: tuning.learning_rate / 10.0,
            ..self.training.clone()
        };
        let (model, _) = train_alone(
            own,
            std::slice::from_ref(&self.site),
            TrainerOptions {
                objective: Objective::TaskHeads,
                training,
                total_epochs: tuning.epochs,
                restart_every: self.training.optimizer_restart.epochs(tuning.epochs),
                seed,
            },
            || {},
        )?;
        // Unfreezing a block that was never frozen changes nothing.
        Ok(model.unfreeze_representation())
    }

    /// Re-estimates the BatchNorm statistics of the local model for its current weights on
    /// the site's training data (see [`crate::local::recalibrate_batch_norm`]): what a FedBN
    /// site does after the last round, before fine-tuning and scoring.
    pub fn recalibrate_batch_norm(&mut self, epochs: usize, seed: u64) -> Result<()> {
        if epochs == 0 {
            return Ok(());
        }
        self.model = crate::local::recalibrate_batch_norm(
            self.model.clone(),
            std::slice::from_ref(&self.site),
            &self.training,
            epochs,
            seed,
        )?;
        Ok(())
    }

    /// Adds a head for every task of `tasks` the local model lacks (its values are
    /// overwritten by the state that brings it): what a client does under the
    /// partial-label rule, where every head comes to every site.
    pub fn take_heads(&mut self, tasks: &[String]) -> Result<()> {
        for task in tasks {
            if !self.model.tasks().contains(task) {
                self.model = self.model.clone().add_task(task, self.seed)?;
            }
        }
        Ok(())
    }

    fn device(&self) -> Device {
        crate::local::model_device(&self.model)
    }

    /// The objective an instruction asks for.
    fn objective(config: &BTreeMap<String, f64>) -> Objective {
        if config.get(KEY_PARTIAL_LABELS).copied().unwrap_or(0.0) > 0.0 {
            let get = |k: &str, default: f64| config.get(k).copied().unwrap_or(default);
            let d = PartialLabelConfig::default();
            Objective::PartialLabels {
                exclusion_weight: get(KEY_EXCLUSION_WEIGHT, d.exclusion_weight),
                distillation_weight: get(KEY_DISTILLATION_WEIGHT, 0.0),
                temperature: get(KEY_DISTILLATION_TEMPERATURE, d.temperature),
                // Absent: every unannotated voxel, as before the key existed.
                distillation_threshold: get(KEY_DISTILLATION_THRESHOLD, 0.0),
            }
        } else {
            Objective::TaskHeads
        }
    }
}

impl FederatedClient for SiteClient {
    fn info(&self) -> ClientInfo {
        ClientInfo {
            name: self.site.name().to_string(),
            tasks: self.tasks.clone(),
        }
    }

    fn fit(
        &mut self,
        instructions: &FitInstructions,
        deadline: Option<Instant>,
    ) -> Result<ClientUpdate> {
        let name = self.site.name().to_string();
        let objective = Self::objective(&instructions.config);
        if matches!(objective, Objective::PartialLabels { .. }) {
            self.take_heads(&instructions.state.tasks())?;
        }
        let model = self.model.clone().load_state(&instructions.state)?;
        // FedProx's term whenever the strategy sends μ (with μ = 0 it adds exact zeros).
        let anchor = instructions
            .config
            .get("proximal_mu")
            .map(|mu| ProximalAnchor::new(&instructions.state, *mu, &self.device()));
        let teacher = match objective {
            Objective::PartialLabels {
                distillation_weight,
                ..
            // The teacher normalises with the statistics of each batch, as the student
            // does: under FedBN the site's running statistics were gathered with its own
            // weights of the previous round, not with the averaged ones it just received.
            // It records no graph (`no_grad`): nothing flows back into it.
            } if distillation_weight > 0.0 => Some(model.deep_copy()?.no_grad()),
            _ => None,
        };
        let epochs = instructions.local_epochs;
        let trainer = match self.trainer.as_mut() {
            Some(t) => t,
            None => {
                let mut trainer = LocalTrainer::new(TrainerOptions {
                    objective,
                    training: self.training.clone(),
                    total_epochs: instructions.total_rounds * epochs,
                    restart_every: self.training.optimizer_restart.epochs(epochs),
                    seed: self.seed ^ segviz_core_hash(&name),
                });
                if let Some(bytes) = self.pending_trainer_state.take() {
                    trainer.restore_state(&bytes)?;
                }
                self.trainer.insert(trainer)
            }
        };
        trainer.set_objective(objective);
        // The schedule follows the rounds, also for a client that missed one.
        trainer.set_epoch((instructions.round - 1) * epochs);
        let (model, stats) = trainer
            .train(
                model,
                std::slice::from_ref(&self.site),
                epochs,
                &RoundExtras {
                    proximal: anchor.as_ref(),
                    teacher: teacher.as_ref(),
                    deadline,
                },
                |_| {},
            )
            .map_err(|e| FedError::client(&name, e.to_string()))?;
        self.model = model;
        Ok(ClientUpdate {
            client: name,
            tasks: self.tasks.clone(),
            num_examples: stats.examples,
            state: self.model.state(),
            metrics: BTreeMap::from([
                ("loss".to_string(), stats.mean_loss),
                ("steps".to_string(), stats.steps as f64),
            ]),
        })
    }

    fn evaluate(&mut self, _round: usize, state: &ModelState) -> Result<EvaluateResult> {
        let model = self.model.clone().load_state(state)?;
        self.model = model;
        let eval_model = self.model.valid();
        let organs: Vec<Organ> = self
            .tasks
            .iter()
            .filter_map(|t| Organ::from_name(t))
            .collect();
        let device = crate::local::model_device(&eval_model);
        // The site's own heads, fused: under the partial-label rule the model also holds
        // every other organ's head, which the experiment takes from that organ's owner.
        let segmenter =
            Segmenter::PerOrgan(organs.iter().map(|o| (*o, eval_model.clone())).collect());
        let scores = evaluate_site(
            &segmenter,
            &self.site,
            &self.site.split.validation[..self
                .round_validation
                .map_or(self.site.split.validation.len(), |n| {
                    n.min(self.site.split.validation.len())
                })],
            &organs,
            &self.window,
            &device,
            |_, _, _, _| {},
        )?;
        Ok(EvaluateResult {
            client: self.site.name().to_string(),
            num_examples: scores.len(),
            metrics: mean_dice(&scores)
                .into_iter()
                .map(|(organ, d)| (format!("dice/{organ}"), d))
                .collect(),
        })
    }

    fn local_state(&self) -> ModelState {
        self.model.state()
    }

    fn restore_local_state(&mut self, state: &ModelState) -> Result<()> {
        self.take_heads(&state.tasks())?;
        self.model = self.model.clone().load_state(state)?;
        Ok(())
    }

    fn training_state(&self) -> Result<Option<Vec<u8>>> {
        match &self.trainer {
            Some(t) => t.save_state().map(Some),
            None => Ok(self.pending_trainer_state.clone()),
        }
    }

    fn restore_training_state(&mut self, bytes: &[u8]) -> Result<()> {
        match self.trainer.as_mut() {
            Some(t) => t.restore_state(bytes),
            None => {
                self.pending_trainer_state = Some(bytes.to_vec());
                Ok(())
            }
        }
    }
}

/// A stable hash of a client name for seeding.
fn segviz_core_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
