//! The experiment's settings and their presets (`tiny`, `quick`, `paper`).

use segviz_core::sliding_window::SlidingWindowConfig;
use segviz_core::RepresentationConfig;
use segviz_data::{AugmentConfig, PatchSamplerConfig, PreprocessConfig};
use serde::{Deserialize, Serialize};

use super::Method;
use crate::error::{FedError, Result};
use crate::local::{LocalTrainingConfig, LossKind, OptimizerRestart};
use crate::partial_labels::PartialLabelConfig;
use crate::strategy::{check_server_learning_rate, Weighting};

/// The serde default of [`ExperimentConfig::server_learning_rate`]: runs saved before the
/// setting existed used the plain average.
fn one() -> f64 {
    1.0
}

/// Everything an experiment needs to know (saved with the results).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentConfig {
    /// Preset this configuration started from.
    pub preset: String,
    /// The U-Net body.
    pub representation: RepresentationConfig,
    /// Preprocessing (one intensity window for all sites, so one model sees one scale).
    pub preprocess: PreprocessConfig,
    /// Local training.
    pub training: LocalTrainingConfig,
    /// Sliding-window inference.
    pub window: SlidingWindowConfig,
    /// Federated rounds (paper: 50).
    pub rounds: usize,
    /// Local epochs per round (paper: 10). Non-federated methods train
    /// `rounds × local_epochs` epochs.
    pub local_epochs: usize,
    /// Fine-tuning epochs after federation (paper: 150).
    pub fine_tune_epochs: usize,
    /// Learning rate of fine-tuning (a fresh Adam, cosine to a tenth of it). Absent: the
    /// federation's final rate × 10, or a tenth of its initial rate when that final rate
    /// is 0.
    #[serde(default)]
    pub fine_tune_learning_rate: Option<f64>,
    /// Whether fine-tuning also trains the representation block (and its BatchNorm
    /// statistics) of each site's model, a personalised model per site; `false` (the
    /// paper's §4.3 and the default) trains the task heads only, the representation frozen.
    #[serde(default)]
    pub fine_tune_representation: bool,
    /// Epochs of forward passes with which each FedBN site re-estimates its BatchNorm
    /// statistics for the final averaged weights, before fine-tuning and scoring (see
    /// `segviz_fed::local::recalibrate_batch_norm`); 0 keeps the statistics of the last
    /// local training, as runs before this setting did.
    #[serde(default)]
    pub batch_norm_recalibration_epochs: usize,
    /// The partial-label rule's terms ("+ PL" methods).
    #[serde(default)]
    pub partial_labels: PartialLabelConfig,
    /// Server learning rate `η` of the federated methods on the representation block,
    /// `w ← g + η · (mean − g)` (see [`crate::strategy::ServerLearningRate`]); 1 is the
    /// plain average of the paper. The quick preset uses 2: each of its four sites
    /// annotates one organ, so the average holds each organ's update to the shared block at
    /// about a quarter of its size, and 16 short rounds cannot wait for that; 4 (the number
    /// of sites) overshoots, with a validation Dice that swings from round to round.
    #[serde(default = "one")]
    pub server_learning_rate: f64,
    /// Client weighting of the averages.
    pub weighting: Weighting,
    /// FedProx μ.
    pub proximal_mu: f64,
    /// Exclusion-term weight of the marginal loss.
    pub exclusion_weight: f64,
    /// Methods to run.
    pub methods: Vec<Method>,
    /// Seed of everything.
    pub seed: u64,
    /// Validation fraction of each site's split.
    pub validation_fraction: f64,
    /// Clients trained at once.
    pub parallel_clients: usize,
    /// Validation volumes a site scores after each round (the per-round Dice of the log and
    /// figure); `None`: all. The tables always score every validation volume.
    #[serde(default)]
    pub round_validation_volumes: Option<usize>,
}

impl ExperimentConfig {
    /// The quick preset: a small U-Net (channels 8–64, three levels) on 4×4×5 mm volumes,
    /// 48×48×16 patches, 16 rounds of 2 local epochs, Dice + cross-entropy at lr 1e-3 —
    /// every method of the comparison in minutes on a 2-core CPU.
    pub fn quick() -> Self {
        ExperimentConfig {
            preset: "quick".into(),
            representation: RepresentationConfig::new()
                .with_channels(vec![8, 16, 32, 64])
                .with_strides(vec![2, 2, 2]),
            preprocess: PreprocessConfig {
                pixdim: [4.0, 4.0, 5.0],
                a_min: -200.0,
                a_max: 250.0,
                pad_multiple: 8,
                ..PreprocessConfig::default()
            },
            training: LocalTrainingConfig {
                sampler: PatchSamplerConfig {
                    patch_size: [48, 48, 16],
                    ..PatchSamplerConfig::default()
                },
                augment: Some(AugmentConfig::phase_invariant()),
                batch_size: 2,
                loss: LossKind::DiceCe,
                learning_rate: 1e-3,
                min_learning_rate: 1e-5,
                optimizer_restart: OptimizerRestart::EveryRound,
            },
            window: SlidingWindowConfig::new([96, 96, 48]).with_sw_batch_size(1),
            rounds: 16,
            local_epochs: 2,
            fine_tune_epochs: 5,
            fine_tune_learning_rate: None,
            fine_tune_representation: false,
            batch_norm_recalibration_epochs: 3,
            partial_labels: PartialLabelConfig::default(),
            server_learning_rate: 2.0,
            weighting: Weighting::Examples,
            proximal_mu: 0.01,
            exclusion_weight: 0.0,
            methods: Method::DEFAULT.to_vec(),
            seed: 0,
            // 11 cases a site: 5 validation, 6 training.
            validation_fraction: 0.45,
            parallel_clients: 2,
            round_validation_volumes: Some(1),
        }
    }

    /// The paper's settings (§3.1, NOTES.md §2): the full U-Net (channels 16–256), 1.5×1.5×2
    /// mm, 128×128×32 patches, batch 2, Adam 1e-4 with cosine annealing, Dice loss,
    /// 50 rounds × 10 local epochs, 150 fine-tuning epochs, 160³ sliding windows. Meant for a
    /// GPU.
    pub fn paper() -> Self {
        ExperimentConfig {
            preset: "paper".into(),
            representation: RepresentationConfig::new(),
            preprocess: PreprocessConfig {
                a_min: -200.0,
                a_max: 250.0,
                ..PreprocessConfig::default()
            },
            training: LocalTrainingConfig {
                sampler: PatchSamplerConfig::default(),
                augment: Some(AugmentConfig::phase_invariant()),
                batch_size: 2,
                loss: LossKind::Dice,
                learning_rate: 1e-4,
                min_learning_rate: 0.0,
                optimizer_restart: OptimizerRestart::EveryRound,
            },
            window: SlidingWindowConfig::new([160, 160, 160]),
            rounds: 50,
            local_epochs: 10,
            fine_tune_epochs: 150,
            batch_norm_recalibration_epochs: 1,
            validation_fraction: 0.2,
            server_learning_rate: 1.0,
            ..ExperimentConfig::quick()
        }
    }

    /// The tiny preset: a U-Net with 4–16 channels on 11.5×11.5×15 mm volumes, 16×16×8
    /// patches, 2 rounds of 1 local epoch. Seconds per round: for smoke tests and the Flower
    /// loopback test, not for results.
    pub fn tiny() -> Self {
        ExperimentConfig {
            preset: "tiny".into(),
            representation: RepresentationConfig::new()
                .with_channels(vec![4, 8, 16])
                .with_strides(vec![2, 2]),
            preprocess: PreprocessConfig {
                pixdim: [11.5, 11.5, 15.0],
                a_min: -200.0,
                a_max: 250.0,
                pad_multiple: 8,
                ..PreprocessConfig::default()
            },
            training: LocalTrainingConfig {
                sampler: PatchSamplerConfig {
                    patch_size: [16, 16, 8],
                    samples_per_volume: 4,
                    ..PatchSamplerConfig::default()
                },
                augment: Some(AugmentConfig::phase_invariant()),
                batch_size: 2,
                loss: LossKind::DiceCe,
                learning_rate: 3e-3,
                min_learning_rate: 1e-4,
                optimizer_restart: OptimizerRestart::EveryRound,
            },
            window: SlidingWindowConfig::new([32, 32, 16]).with_sw_batch_size(1),
            rounds: 2,
            local_epochs: 1,
            fine_tune_epochs: 1,
            batch_norm_recalibration_epochs: 1,
            validation_fraction: 0.34,
            ..ExperimentConfig::quick()
        }
    }

    /// A preset by name: `tiny`, `quick` or `paper`.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "tiny" => Ok(Self::tiny()),
            "quick" => Ok(Self::quick()),
            "paper" => Ok(Self::paper()),
            other => Err(FedError::Config(format!(
                "unknown preset {other:?} (use tiny, quick or paper)"
            ))),
        }
    }

    /// The learning rate fine-tuning uses (see
    /// [`ExperimentConfig::fine_tune_learning_rate`]).
    pub fn effective_fine_tune_learning_rate(&self) -> f64 {
        self.fine_tune_learning_rate.unwrap_or({
            let t = &self.training;
            if t.min_learning_rate > 0.0 {
                t.min_learning_rate * 10.0
            } else {
                t.learning_rate / 10.0
            }
        })
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        self.representation.validate()?;
        self.preprocess.validate()?;
        self.window.validate()?;
        if self.rounds == 0 || self.local_epochs == 0 || self.training.batch_size == 0 {
            return Err(FedError::Config(
                "rounds, local epochs and batch size must be at least 1".into(),
            ));
        }
        if self.methods.is_empty() {
            return Err(FedError::Config("no method to run".into()));
        }
        self.partial_labels.validate()?;
        check_server_learning_rate(self.server_learning_rate)?;
        if self
            .fine_tune_learning_rate
            .is_some_and(|lr| !(lr.is_finite() && lr > 0.0))
        {
            return Err(FedError::Config(
                "the fine-tuning learning rate must be a positive number".into(),
            ));
        }
        let k = self.representation.size_divisor();
        let patch = self.training.sampler.patch_size;
        let roi = self.window.roi_size;
        if patch.iter().chain(roi.iter()).any(|s| s % k != 0) {
            return Err(FedError::Config(format!(
                "patch size {patch:?} and window {roi:?} must be multiples of {k} (the strides' product)"
            )));
        }
        Ok(())
    }
}
