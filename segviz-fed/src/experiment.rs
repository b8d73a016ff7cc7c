//! The paper's comparisons (§4): per-organ baselines, central aggregation (naive and with
//! the marginal loss), FedAvg, FedBN (and FedProx), each with and without local
//! fine-tuning, evaluated on every site's validation split (Table 1) and on an external
//! test site (Table 2) with paired t-tests against the baselines.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use segviz_core::checkpoint::{save_model, write_atomically};
use segviz_core::sliding_window::SlidingWindowConfig;
use segviz_core::{RepresentationConfig, SegVizConfig, SegVizModel};
use segviz_data::{AugmentConfig, Organ, PatchSamplerConfig, PreprocessConfig};
use serde::{Deserialize, Serialize};

use crate::data_check::{check_cases, DataCheckProgress};
use crate::error::{FedError, Result};
use crate::evaluate::{evaluate_site, Segmenter, VolumeScore};
use crate::local::{
    train_alone, LocalTrainingConfig, LossKind, Objective, OptimizerRestart, TrainerOptions,
    POOLED_HEAD,
};
use crate::partial_labels::PartialLabelConfig;
use crate::server::{check_checkpoint, RoundReport, Server, ServerConfig, ServerEvent};
use crate::site_client::SiteClient;
use crate::stats::{holm_adjust, mean_ci95, paired_t_test, PairedTTest};
use crate::strategy::{strategy_by_name, AggregationStrategy, PartialLabels, Weighting};
use segviz_data::SiteData;

/// A method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One model per organ, trained on its own site.
    Baseline,
    /// One multi-class model on all sites pooled, unannotated organs as background.
    Central,
    /// The same with the marginal (partial-label) loss.
    CentralMarginal,
    /// SegViz with FedAvg.
    Fedavg,
    /// FedAvg then local fine-tuning of the heads.
    FedavgFt,
    /// SegViz with FedBN.
    Fedbn,
    /// FedBN then local fine-tuning.
    FedbnFt,
    /// SegViz with FedProx.
    Fedprox,
    /// FedProx then local fine-tuning.
    FedproxFt,
    /// FedAvg with the partial-label rule (every site trains and averages every head).
    FedavgPl,
    /// FedAvg + PL then local fine-tuning.
    FedavgPlFt,
    /// FedBN with the partial-label rule.
    FedbnPl,
    /// FedBN + PL then local fine-tuning.
    FedbnPlFt,
    /// Ablation: FedBN + PL without the distillation term.
    FedbnPlNoDistillation,
    /// Ablation: FedBN + PL without the exclusion term.
    FedbnPlNoExclusion,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 15] = [
        Method::Baseline,
        Method::Central,
        Method::CentralMarginal,
        Method::Fedavg,
        Method::FedavgFt,
        Method::Fedbn,
        Method::FedbnFt,
        Method::Fedprox,
        Method::FedproxFt,
        Method::FedavgPl,
        Method::FedavgPlFt,
        Method::FedbnPl,
        Method::FedbnPlFt,
        Method::FedbnPlNoDistillation,
        Method::FedbnPlNoExclusion,
    ];

    /// What runs without `--methods`: the baselines, the marginal-loss upper bound, the
    /// paper's FedBN with and without fine-tuning, and FedBN + PL with and without it.
    pub const DEFAULT: [Method; 6] = [
        Method::Baseline,
        Method::CentralMarginal,
        Method::Fedbn,
        Method::FedbnFt,
        Method::FedbnPl,
        Method::FedbnPlFt,
    ];

    /// Command-line / file name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::Central => "central",
            Method::CentralMarginal => "central_marginal",
            Method::Fedavg => "fedavg",
            Method::FedavgFt => "fedavg_ft",
            Method::Fedbn => "fedbn",
            Method::FedbnFt => "fedbn_ft",
            Method::Fedprox => "fedprox",
            Method::FedproxFt => "fedprox_ft",
            Method::FedavgPl => "fedavg_pl",
            Method::FedavgPlFt => "fedavg_pl_ft",
            Method::FedbnPl => "fedbn_pl",
            Method::FedbnPlFt => "fedbn_pl_ft",
            Method::FedbnPlNoDistillation => "fedbn_pl_no_distillation",
            Method::FedbnPlNoExclusion => "fedbn_pl_no_exclusion",
        }
    }

    /// Row label in the tables; "+ PL" marks the partial-label rule, the others follow the
    /// paper's SegViz rule (heads from their owners).
    pub fn label(self) -> &'static str {
        match self {
            Method::Baseline => "Baseline (per organ)",
            Method::Central => "Central agg.",
            Method::CentralMarginal => "Central + marginal loss",
            Method::Fedavg => "FedAvg",
            Method::FedavgFt => "FedAvg + FT",
            Method::Fedbn => "FedBN",
            Method::FedbnFt => "FedBN + FT",
            Method::Fedprox => "FedProx",
            Method::FedproxFt => "FedProx + FT",
            Method::FedavgPl => "FedAvg + PL",
            Method::FedavgPlFt => "FedAvg + PL + FT",
            Method::FedbnPl => "FedBN + PL",
            Method::FedbnPlFt => "FedBN + PL + FT",
            Method::FedbnPlNoDistillation => "FedBN + PL − distillation",
            Method::FedbnPlNoExclusion => "FedBN + PL − exclusion",
        }
    }

    /// Parses a name from [`Method::name`].
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The federation behind a federated method (its checkpoint folder): a method and its
    /// fine-tuned variant share one.
    pub fn federation(self) -> Option<&'static str> {
        match self {
            Method::Fedavg | Method::FedavgFt => Some("fedavg"),
            Method::Fedbn | Method::FedbnFt => Some("fedbn"),
            Method::Fedprox | Method::FedproxFt => Some("fedprox"),
            Method::FedavgPl | Method::FedavgPlFt => Some("fedavg_pl"),
            Method::FedbnPl | Method::FedbnPlFt => Some("fedbn_pl"),
            Method::FedbnPlNoDistillation => Some("fedbn_pl_no_distillation"),
            Method::FedbnPlNoExclusion => Some("fedbn_pl_no_exclusion"),
            _ => None,
        }
    }

    /// Whether the method fine-tunes after federation.
    pub fn fine_tuned(self) -> bool {
        matches!(
            self,
            Method::FedavgFt
                | Method::FedbnFt
                | Method::FedproxFt
                | Method::FedavgPlFt
                | Method::FedbnPlFt
        )
    }
}

/// The strategy of a federation named by [`Method::federation`].
fn federation_strategy(
    federation: &str,
    config: &ExperimentConfig,
) -> Result<Box<dyn AggregationStrategy>> {
    let unknown = || FedError::Config(format!("unknown federation {federation}"));
    let mut pl = config.partial_labels;
    let ablation = match federation {
        "fedbn_pl_no_distillation" => {
            pl.distillation_weight = 0.0;
            true
        }
        "fedbn_pl_no_exclusion" => {
            pl.exclusion_weight = 0.0;
            true
        }
        _ => false,
    };
    if ablation {
        let inner = strategy_by_name(
            "fedbn",
            config.weighting,
            config.proximal_mu,
            pl,
            config.rounds,
        )
        .ok_or_else(unknown)?;
        return Ok(Box::new(
            PartialLabels::new(inner, pl, config.rounds).named(federation),
        ));
    }
    strategy_by_name(
        federation,
        config.weighting,
        config.proximal_mu,
        pl,
        config.rounds,
    )
    .ok_or_else(unknown)
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
    /// The partial-label rule's terms ("+ PL" methods).
    #[serde(default)]
    pub partial_labels: PartialLabelConfig,
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
}

impl ExperimentConfig {
    /// The quick preset: a small U-Net (channels 8–64, three levels) on 4×4×5 mm volumes,
    /// 48×48×16 patches, 20 rounds of 2 local epochs, Dice + cross-entropy at lr 1e-3 —
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
            rounds: 20,
            local_epochs: 2,
            fine_tune_epochs: 5,
            fine_tune_learning_rate: None,
            partial_labels: PartialLabelConfig::default(),
            weighting: Weighting::Examples,
            proximal_mu: 0.01,
            exclusion_weight: 0.0,
            methods: Method::DEFAULT.to_vec(),
            seed: 0,
            // 11 cases a site: 5 validation, 6 training.
            validation_fraction: 0.45,
            parallel_clients: 2,
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
            validation_fraction: 0.2,
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

/// What [`Experiment::new`] does with the output folder of an earlier run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunMode {
    /// Start afresh. An output folder that holds checkpoints or results of an earlier run
    /// is refused, so nothing is deleted or mixed without being asked for.
    #[default]
    Fresh,
    /// Continue interrupted federations from their last committed round. Every setting
    /// that determines the result must be the one the checkpoints were written with.
    Resume,
    /// Start afresh after deleting the earlier run's checkpoints, splits and results.
    Overwrite,
}

/// Progress of a running experiment, for bars and logs.
#[derive(Debug, Clone)]
pub enum ExperimentEvent {
    /// A method starts.
    MethodStarted {
        /// The method.
        method: Method,
        /// Units of work it will report (training epochs or rounds, then evaluated volumes).
        total: u64,
    },
    /// One unit of work done.
    Advanced {
        /// Units done since the last event.
        units: u64,
    },
    /// A line worth printing (e.g. the per-round Dice).
    Line(String),
    /// A method finished.
    MethodFinished {
        /// The method.
        method: Method,
        /// Seconds it took (training and evaluation).
        seconds: f64,
    },
}

/// Per-method results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodResult {
    /// The method.
    pub method: Method,
    /// Scores on each training site's validation split (Table 1).
    pub validation: Vec<VolumeScore>,
    /// Scores on the external test site (Table 2).
    pub test: Vec<VolumeScore>,
    /// Per-round reports of a federated method.
    pub rounds: Vec<RoundReport>,
    /// Seconds of training.
    pub train_seconds: f64,
    /// Seconds of evaluation.
    pub eval_seconds: f64,
}

/// One cell of a results table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Mean Dice.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Volumes.
    pub n: usize,
    /// Mean HD95 (mm) of the fused map over volumes where it is defined, the empty-mask
    /// penalty included (see [`crate::evaluate::hd95_penalty`]).
    pub hd95: Option<f64>,
    /// Volumes whose HD95 is the empty-mask penalty (organ predicted but absent, or
    /// present but not predicted).
    #[serde(default)]
    pub hd95_penalised: usize,
    /// Mean Dice of each head's own mask, before fusion (secondary).
    #[serde(default)]
    pub head_dice: Option<f64>,
    /// The 95 % confidence interval of the mean Dice (Student's t over the volumes).
    #[serde(default)]
    pub ci95: Option<(f64, f64)>,
    /// Paired t-test against the baseline on the same volumes.
    pub vs_baseline: Option<PairedTTest>,
    /// Its p-value after Holm's correction over every test of the table (all methods,
    /// organs and both comparisons); the `*` of the printed tables uses this one.
    #[serde(default)]
    pub p_holm: Option<f64>,
    /// Paired t-test against FedBN + FT (the paper's SegViz) on the same volumes.
    #[serde(default)]
    pub vs_fedbn_ft: Option<PairedTTest>,
    /// Its Holm-corrected p-value (same family as [`Cell::p_holm`]); the `†` of the tables.
    #[serde(default)]
    pub p_holm_fedbn_ft: Option<f64>,
}

/// A results table: method → organ → cell.
pub type Table = BTreeMap<Method, BTreeMap<String, Cell>>;

/// All results of an experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentResults {
    /// The configuration.
    pub config: ExperimentConfig,
    /// Organs of the experiment, in label order.
    pub organs: Vec<String>,
    /// Per-method results.
    pub methods: Vec<MethodResult>,
    /// Table 1: in-federation validation.
    pub table_validation: Table,
    /// Table 2: external test site.
    pub table_test: Table,
}

/// The trained model(s) of one method, kept for writing predictions and figures.
pub struct TrainedMethod {
    /// The method.
    pub method: Method,
    /// How it segments.
    pub segmenter: Segmenter,
    /// Fused label maps of the external test cases (case id, labels on the preprocessed
    /// grid).
    pub test_predictions: Vec<(String, Vec<u8>)>,
}

/// Runs an experiment. See the module documentation.
pub struct Experiment {
    config: ExperimentConfig,
    sites: Vec<Arc<SiteData>>,
    test_site: Option<Arc<SiteData>>,
    out: PathBuf,
    data_warnings: Vec<String>,
}

impl Experiment {
    /// Opens the data (splits saved in `out/splits`, cache in `out/cache`) and checks every
    /// case of every site; see [`Experiment::with_progress`].
    pub fn new(
        config: ExperimentConfig,
        data: &ExperimentData,
        out: &Path,
        mode: RunMode,
    ) -> Result<Self> {
        Self::with_progress(config, data, out, mode, |_| {})
    }

    /// Opens the data and checks it, reporting each checked case to `on_progress`.
    ///
    /// Before any training: every training site and the test site is opened, and every one
    /// of their cases (training, validation and test) is read and preprocessed — file
    /// presence and readability, image/label shape and affine, label values against the
    /// dataset's map, finite voxels. The preprocessed volumes stay in the cache, so training
    /// reads them from there. Any problem fails the experiment with one error that lists
    /// every bad site and case.
    ///
    /// # Errors
    /// [`FedError::BadData`] listing every problem; [`FedError::Config`] for a bad
    /// configuration, an output folder of an earlier run in [`RunMode::Fresh`], or (in
    /// [`RunMode::Resume`]) a checkpoint written with other settings.
    pub fn with_progress(
        config: ExperimentConfig,
        data: &ExperimentData,
        out: &Path,
        mode: RunMode,
        mut on_progress: impl FnMut(DataCheckProgress),
    ) -> Result<Self> {
        config.validate()?;
        if data.training_sites.is_empty() {
            return Err(FedError::Config("no training site given".into()));
        }
        prepare_output(out, mode)?;
        let split_dir = out.join("splits");
        let cache_dir = out.join("cache");
        let mut problems = Vec::new();
        let mut sites = Vec::new();
        for dir in &data.training_sites {
            match SiteData::open(
                dir,
                config.preprocess.clone(),
                config.validation_fraction,
                config.seed,
                &split_dir,
                &cache_dir,
            ) {
                Ok(site) if site.split.train.is_empty() => problems.push(format!(
                    "site {} ({}): no training case after the split",
                    site.name(),
                    dir.display()
                )),
                Ok(site) => sites.push(Arc::new(site)),
                Err(e) => problems.push(e.to_string()),
            }
        }
        let test_site = match &data.test_site {
            Some(dir) => match SiteData::open_test(dir, config.preprocess.clone(), &cache_dir) {
                Ok(site) => Some(Arc::new(site)),
                Err(e) => {
                    problems.push(e.to_string());
                    None
                }
            },
            None => None,
        };
        let checked: Vec<&SiteData> = sites
            .iter()
            .chain(test_site.iter())
            .map(|s| s.as_ref())
            .collect();
        let (bad, warnings) = check_cases(&checked, &mut on_progress)?;
        problems.extend(bad);
        if !problems.is_empty() {
            return Err(FedError::BadData { problems });
        }
        let experiment = Experiment {
            config,
            sites,
            test_site,
            out: out.to_path_buf(),
            data_warnings: warnings,
        };
        if mode == RunMode::Resume {
            // Refuse checkpoints of other settings now, not after hours of other methods.
            for method in &experiment.config.methods {
                if let Some(strategy) = method.federation() {
                    check_checkpoint(&experiment.server_config(strategy), strategy)?;
                }
            }
        }
        Ok(experiment)
    }

    /// The round loop's settings for a federation with `strategy`.
    fn server_config(&self, strategy: &str) -> ServerConfig {
        ServerConfig {
            rounds: self.config.rounds,
            local_epochs: self.config.local_epochs,
            round_deadline: None,
            parallel_clients: self.config.parallel_clients,
            checkpoint_dir: Some(self.out.join("checkpoints").join(strategy)),
            settings: self.settings(),
        }
    }

    /// Everything that determines a federation's result besides its rounds, local epochs
    /// and strategy: the configuration (except how many clients train at once) and a
    /// fingerprint of the data. Stored with every checkpoint and compared on resume.
    fn settings(&self) -> serde_json::Value {
        let mut settings = serde_json::to_value(&self.config).unwrap_or_default();
        if let Some(map) = settings.as_object_mut() {
            map.remove("parallel_clients");
            map.insert(
                "data".into(),
                serde_json::Value::String(self.data_fingerprint()),
            );
        }
        settings
    }

    /// The sites, their cases and the sizes of their files, hashed (64-bit FNV-1a, in hex).
    fn data_fingerprint(&self) -> String {
        let mut text = String::new();
        for site in self.sites.iter().chain(&self.test_site) {
            text.push_str(&format!("site {} {}\n", site.name(), site.dataset.layout));
            for case in &site.dataset.cases {
                let size = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
                text.push_str(&format!(
                    "{} {} {}\n",
                    case.id,
                    size(&case.image),
                    size(&case.label)
                ));
            }
        }
        let hash = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        format!("{hash:016x}")
    }

    /// What the data check found worth telling but not fatal: geometry read with a
    /// guess or a fallback (see [`segviz_data::nifti_io::NiftiInfo::warnings`]), one line
    /// per file, naming it.
    pub fn data_warnings(&self) -> &[String] {
        &self.data_warnings
    }

    /// The training sites.
    pub fn sites(&self) -> &[Arc<SiteData>] {
        &self.sites
    }

    /// The external test site.
    pub fn test_site(&self) -> Option<&Arc<SiteData>> {
        self.test_site.as_ref()
    }

    /// Organs annotated by at least one training site, in label order.
    pub fn organs(&self) -> Vec<Organ> {
        Organ::ALL
            .into_iter()
            .filter(|o| self.sites.iter().any(|s| s.annotated().contains(*o)))
            .collect()
    }

    fn global_config(&self) -> SegVizConfig {
        SegVizConfig::new(
            self.config.representation.clone(),
            self.organs().iter().map(|o| o.name().to_string()).collect(),
        )
    }

    fn epochs(&self) -> usize {
        self.config.rounds * self.config.local_epochs
    }

    /// Trains and evaluates every configured method. `device` is the compute device
    /// (training runs on its autodiff version).
    pub fn run(
        &self,
        device: &Device,
        on_event: impl FnMut(ExperimentEvent) + Send,
    ) -> Result<(ExperimentResults, Vec<TrainedMethod>)> {
        let events = std::sync::Mutex::new(on_event);
        let emit = |e: ExperimentEvent| {
            if let Ok(mut f) = events.lock() {
                f(e)
            }
        };
        let on_event: &Emit<'_> = &emit;
        let train_device = device.clone().autodiff();
        let mut results = Vec::new();
        let mut trained = Vec::new();
        let mut pooled: BTreeMap<Method, Segmenter> = BTreeMap::new();
        // A federation serves both the plain and the fine-tuned method.
        let mut federations: BTreeMap<&'static str, (Vec<SiteClient>, Vec<RoundReport>, f64)> =
            BTreeMap::new();
        for &method in &self.config.methods {
            let start = Instant::now();
            let evaluate_units = self.evaluation_units();
            let train_units = match method.federation() {
                Some(s) if federations.contains_key(s) => 0,
                Some(_) => self.config.rounds as u64,
                None => match method {
                    Method::Baseline => (self.epochs() * self.sites.len()) as u64,
                    _ if pooled.contains_key(&method) => 0,
                    Method::Central if self.config.methods.contains(&Method::CentralMarginal) => {
                        2 * self.epochs() as u64
                    }
                    _ => self.epochs() as u64,
                },
            } + if method.fine_tuned() {
                self.sites.len() as u64
            } else {
                0
            };
            on_event(ExperimentEvent::MethodStarted {
                method,
                total: train_units + evaluate_units,
            });
            let (segmenter, rounds) = match method {
                Method::Baseline => (self.train_baselines(&train_device, on_event)?, vec![]),
                Method::Central | Method::CentralMarginal => {
                    if let Some(done) = pooled.remove(&method) {
                        (done, vec![])
                    } else {
                        // The two pooled variants are independent: train them side by side.
                        let both = [Method::Central, Method::CentralMarginal];
                        let together: Vec<Method> = both
                            .into_iter()
                            .filter(|m| *m == method || self.config.methods.contains(m))
                            .collect();
                        let threads = self.config.parallel_clients;
                        let mut models = parallel_map(&together, threads, |m| {
                            self.train_central(*m, &train_device, on_event)
                        })?
                        .into_iter()
                        .zip(together.iter().copied());
                        let mut mine = None;
                        for (seg, m) in models.by_ref() {
                            if m == method {
                                mine = Some(seg);
                            } else {
                                pooled.insert(m, seg);
                            }
                        }
                        let seg =
                            mine.ok_or_else(|| FedError::Config("central model missing".into()))?;
                        (seg, vec![])
                    }
                }
                _ => {
                    let strategy = method.federation().unwrap_or("fedavg");
                    if !federations.contains_key(strategy) {
                        let fed = self.federate(strategy, &train_device, on_event)?;
                        federations.insert(strategy, fed);
                    }
                    let (clients, rounds, _) = &federations[strategy];
                    let clients = if method.fine_tuned() {
                        self.fine_tune(clients, on_event)?
                    } else {
                        clients.iter().map(|c| c.model().clone()).collect()
                    };
                    self.save_client_models(method, &clients)?;
                    (self.per_organ(&clients)?, rounds.clone())
                }
            };
            let train_seconds = start.elapsed().as_secs_f64();
            let eval_start = Instant::now();
            let segmenter = valid_segmenter(segmenter);
            let (validation, test, test_predictions) =
                self.evaluate(&segmenter, device, on_event)?;
            let eval_seconds = eval_start.elapsed().as_secs_f64();
            on_event(ExperimentEvent::MethodFinished {
                method,
                seconds: start.elapsed().as_secs_f64(),
            });
            results.push(MethodResult {
                method,
                validation,
                test,
                rounds,
                train_seconds,
                eval_seconds,
            });
            trained.push(TrainedMethod {
                method,
                segmenter,
                test_predictions,
            });
        }
        let organs: Vec<String> = self.organs().iter().map(|o| o.name().to_string()).collect();
        let table_validation = make_table(&results, &organs, |r| &r.validation);
        let table_test = make_table(&results, &organs, |r| &r.test);
        Ok((
            ExperimentResults {
                config: self.config.clone(),
                organs,
                methods: results,
                table_validation,
                table_test,
            },
            trained,
        ))
    }

    fn evaluation_units(&self) -> u64 {
        let val: usize = self.sites.iter().map(|s| s.split.validation.len()).sum();
        let test = self
            .test_site
            .as_ref()
            .map_or(0, |t| t.split.validation.len());
        (val + test) as u64
    }

    /// Each organ's baseline model, trained on its own site alone.
    fn train_baselines(&self, device: &Device, on_event: &Emit<'_>) -> Result<Segmenter> {
        let global = self.global_config().init(device, self.config.seed)?;
        // Sites train independently: run them in parallel groups.
        let trained = parallel_map(&self.sites, self.config.parallel_clients, |site| {
            let tasks: Vec<String> = site
                .annotated()
                .iter()
                .map(|o| o.name().to_string())
                .collect();
            let model = global.subset(&tasks)?;
            let (model, _) = self.train_local(
                model,
                std::slice::from_ref(site),
                Objective::TaskHeads,
                self.config.seed ^ 0xba5e,
                on_event,
            )?;
            save_model(
                &self
                    .out
                    .join("models/baseline")
                    .join(format!("{}.segviz", site.name())),
                &model,
                self.model_metadata("baseline"),
            )?;
            Ok(model)
        })?;
        let mut models = Vec::new();
        for (site, model) in self.sites.iter().zip(trained) {
            for organ in site.annotated().iter() {
                models.push((organ, model.clone()));
            }
        }
        Ok(Segmenter::PerOrgan(models))
    }

    /// The pooled multi-class model.
    fn train_central(
        &self,
        method: Method,
        device: &Device,
        on_event: &Emit<'_>,
    ) -> Result<Segmenter> {
        let config =
            SegVizConfig::new(self.config.representation.clone(), vec![POOLED_HEAD.into()])
                .with_head_out_channels(Organ::ALL.len() + 1);
        let model = config.init(device, self.config.seed)?;
        let objective = if method == Method::CentralMarginal {
            Objective::PooledMarginal {
                exclusion_weight: self.config.exclusion_weight,
            }
        } else {
            Objective::PooledNaive
        };
        let (model, _) = self.train_local(
            model,
            &self.sites,
            objective,
            self.config.seed ^ 0xce47,
            on_event,
        )?;
        save_model(
            &self
                .out
                .join("models")
                .join(method.name())
                .join("global.segviz"),
            &model,
            self.model_metadata(method.name()),
        )?;
        Ok(Segmenter::Single(Box::new(model)))
    }

    fn train_local(
        &self,
        model: SegVizModel,
        sites: &[Arc<SiteData>],
        objective: Objective,
        seed: u64,
        on_event: &Emit<'_>,
    ) -> Result<(SegVizModel, crate::local::TrainStats)> {
        // One trainer (one optimiser) for the whole run; progress after every epoch.
        train_alone(
            model,
            sites,
            TrainerOptions {
                objective,
                training: self.config.training.clone(),
                total_epochs: self.epochs(),
                restart_every: self
                    .config
                    .training
                    .optimizer_restart
                    .epochs(self.config.local_epochs),
                seed,
            },
            || on_event(ExperimentEvent::Advanced { units: 1 }),
        )
    }

    /// Runs a federation with `strategy`; returns the clients after the last round.
    fn federate(
        &self,
        strategy: &'static str,
        device: &Device,
        on_event: &Emit<'_>,
    ) -> Result<(Vec<SiteClient>, Vec<RoundReport>, f64)> {
        let start = Instant::now();
        let global = self.global_config().init(device, self.config.seed)?;
        let mut clients: Vec<SiteClient> = Vec::new();
        for site in &self.sites {
            clients.push(SiteClient::new(
                site.clone(),
                &global,
                self.config.training.clone(),
                self.config.window.clone(),
                self.config.seed,
            )?);
        }
        let strategy_box = federation_strategy(strategy, &self.config)?;
        let mut server = Server::new(
            self.server_config(strategy),
            global.config().clone(),
            strategy_box,
            global.state(),
        )?;
        let mut forward = |event: ServerEvent<'_>| match event {
            ServerEvent::RoundFinished(report) => {
                on_event(ExperimentEvent::Advanced { units: 1 });
                on_event(ExperimentEvent::Line(round_line(strategy, report)));
            }
            ServerEvent::Resumed { round } => {
                on_event(ExperimentEvent::Advanced {
                    units: round as u64,
                });
                on_event(ExperimentEvent::Line(format!(
                    "{strategy}: resumed after round {round}"
                )));
            }
            _ => {}
        };
        let done = server.resume(&mut clients, &mut forward)?;
        server.run(&mut clients, done + 1, &mut forward)?;
        let model = global.config().with_state(device, server.global())?;
        save_model(
            &self.out.join("models").join(strategy).join("global.segviz"),
            &model,
            self.model_metadata(strategy),
        )?;
        let history = server.history().to_vec();
        Ok((clients, history, start.elapsed().as_secs_f64()))
    }

    fn fine_tune(&self, clients: &[SiteClient], on_event: &Emit<'_>) -> Result<Vec<SegVizModel>> {
        let mut models = Vec::new();
        for client in clients {
            let tuned = client.fine_tuned(
                self.config.fine_tune_epochs,
                self.config.effective_fine_tune_learning_rate(),
                self.config.seed ^ 0xf17e,
            )?;
            on_event(ExperimentEvent::Advanced { units: 1 });
            models.push(tuned);
        }
        Ok(models)
    }

    fn save_client_models(&self, method: Method, models: &[SegVizModel]) -> Result<()> {
        for (site, model) in self.sites.iter().zip(models) {
            save_model(
                &self
                    .out
                    .join("models")
                    .join(method.name())
                    .join(format!("{}.segviz", site.name())),
                model,
                self.model_metadata(method.name()),
            )?;
        }
        Ok(())
    }

    /// Each organ segmented by the model of the site that owns it.
    fn per_organ(&self, models: &[SegVizModel]) -> Result<Segmenter> {
        let mut list = Vec::new();
        for (site, model) in self.sites.iter().zip(models) {
            for organ in site.annotated().iter() {
                list.push((organ, model.clone()));
            }
        }
        Ok(Segmenter::PerOrgan(list))
    }

    /// What `predict` needs to use a saved model: preprocessing and window.
    pub fn model_metadata(&self, method: &str) -> serde_json::Value {
        serde_json::json!({
            "method": method,
            "seed": self.config.seed,
            "preprocess": self.config.preprocess,
            "window": self.config.window,
        })
    }

    fn evaluate(
        &self,
        segmenter: &Segmenter,
        device: &Device,
        on_event: &Emit<'_>,
    ) -> Result<Evaluation> {
        let organs = segmenter.organs()?;
        let mut validation = Vec::new();
        for site in &self.sites {
            validation.extend(evaluate_site(
                segmenter,
                site,
                &site.split.validation,
                &organs,
                &self.config.window,
                device,
                |_, _, _, _| on_event(ExperimentEvent::Advanced { units: 1 }),
            )?);
        }
        let mut test = Vec::new();
        let mut predictions = Vec::new();
        if let Some(site) = &self.test_site {
            test = evaluate_site(
                segmenter,
                site,
                &site.split.validation,
                &organs,
                &self.config.window,
                device,
                |id, _, _, prediction| {
                    predictions.push((id.to_string(), prediction.labels()));
                    on_event(ExperimentEvent::Advanced { units: 1 });
                },
            )?;
        }
        Ok((validation, test, predictions))
    }

    /// Writes `results.json` and `results.csv` into the output folder, atomically.
    pub fn write_results(&self, results: &ExperimentResults) -> Result<()> {
        let json = serde_json::to_vec_pretty(results)
            .map_err(|e| FedError::Config(format!("cannot encode results: {e}")))?;
        write_atomically(&self.out.join("results.json"), &json)?;
        let mut csv =
            String::from("method,table,site,case,organ,dice,hd95_mm,hd95_is_penalty,head_dice\n");
        for r in &results.methods {
            for (table, scores) in [("validation", &r.validation), ("test", &r.test)] {
                for s in scores {
                    for (organ, d) in &s.dice {
                        let hd = s
                            .hd95
                            .get(organ)
                            .copied()
                            .flatten()
                            .map_or(String::new(), |v| format!("{v:.3}"));
                        let penalty = s.hd95_penalised.contains(organ);
                        let head = s
                            .head_dice
                            .get(organ)
                            .map_or(String::new(), |v| format!("{v:.5}"));
                        csv.push_str(&format!(
                            "{},{table},{},{},{organ},{d:.5},{hd},{penalty},{head}\n",
                            r.method.name(),
                            s.site,
                            s.case
                        ));
                    }
                }
            }
        }
        write_atomically(&self.out.join("results.csv"), csv.as_bytes())?;
        Ok(())
    }
}

/// Validation scores, test scores and the test predictions (case, labels) of a method.
type Evaluation = (Vec<VolumeScore>, Vec<VolumeScore>, Vec<(String, Vec<u8>)>);

/// The progress callback as the training code shares it between threads.
type Emit<'a> = dyn Fn(ExperimentEvent) + Sync + 'a;

/// What an earlier run leaves in an output folder and [`RunMode::Overwrite`] deletes.
const EARLIER_RUN: [&str; 4] = ["checkpoints", "splits", "results.json", "results.csv"];

/// Applies `mode` to the output folder: refuses (fresh) or clears (overwrite) the
/// checkpoints, splits and results of an earlier run; resume keeps them.
fn prepare_output(out: &Path, mode: RunMode) -> Result<()> {
    let found: Vec<PathBuf> = EARLIER_RUN
        .iter()
        .map(|name| out.join(name))
        .filter(|p| {
            p.is_file() || std::fs::read_dir(p).is_ok_and(|mut entries| entries.next().is_some())
        })
        .collect();
    match mode {
        RunMode::Resume => Ok(()),
        RunMode::Fresh if found.is_empty() => Ok(()),
        RunMode::Fresh => Err(FedError::Config(format!(
            "{} holds an earlier run ({}); continue it with --resume, or start afresh with \
             --overwrite (which deletes them) or another --out folder",
            out.display(),
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
        RunMode::Overwrite => {
            for path in found {
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|e| FedError::io(&path, e))?;
            }
            Ok(())
        }
    }
}

/// `f` over `items`, `threads` at a time, results in item order; the first error wins.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let mut out = Vec::with_capacity(items.len());
    for group in items.chunks(threads.max(1)) {
        let results: Vec<Result<R>> = std::thread::scope(|scope| {
            let handles: Vec<_> = group.iter().map(|item| scope.spawn(|| f(item))).collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(FedError::Config("a training thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            out.push(r?);
        }
    }
    Ok(out)
}

/// Moves the models of a segmenter off the autodiff device for evaluation.
fn valid_segmenter(segmenter: Segmenter) -> Segmenter {
    match segmenter {
        Segmenter::Single(m) => Segmenter::Single(Box::new(m.valid())),
        Segmenter::PerOrgan(list) => {
            Segmenter::PerOrgan(list.into_iter().map(|(o, m)| (o, m.valid())).collect())
        }
    }
}

/// One log line per round: loss and validation Dice per organ.
fn round_line(strategy: &str, report: &RoundReport) -> String {
    let dice: Vec<String> = report
        .metrics
        .iter()
        .filter_map(|(k, v)| k.strip_prefix("dice/").map(|o| format!("{o} {v:.3}")))
        .collect();
    let failed = if report.failed.is_empty() {
        String::new()
    } else {
        format!(
            "  left out: {}",
            report
                .failed
                .iter()
                .map(|(c, why)| format!("{c} ({why})"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    format!(
        "{strategy} round {:>3}: loss {:.4}  val Dice {}  ({:.1} s){failed}",
        report.round,
        report.train_loss,
        dice.join(", "),
        report.seconds
    )
}

/// Builds a table from per-volume scores, with t-tests against the baseline on the same
/// volumes.
fn make_table(
    results: &[MethodResult],
    organs: &[String],
    scores: impl Fn(&MethodResult) -> &Vec<VolumeScore>,
) -> Table {
    let values = |r: &MethodResult, organ: &str| -> Vec<(String, f64, Option<f64>)> {
        scores(r)
            .iter()
            .filter_map(|s| {
                s.dice.get(organ).map(|d| {
                    (
                        format!("{}/{}", s.site, s.case),
                        *d,
                        s.hd95.get(organ).copied().flatten(),
                    )
                })
            })
            .collect()
    };
    let head_dice = |r: &MethodResult, organ: &str| -> Option<f64> {
        let d: Vec<f64> = scores(r)
            .iter()
            .filter_map(|s| s.head_dice.get(organ).copied())
            .collect();
        (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
    };
    let penalised = |r: &MethodResult, organ: &str| -> usize {
        scores(r)
            .iter()
            .filter(|s| s.hd95_penalised.iter().any(|o| o == organ))
            .count()
    };
    let reference = |method: Method| results.iter().find(|r| r.method == method);
    let test_against = |r: &MethodResult, other: Option<&MethodResult>, organ: &str| {
        let other = other.filter(|o| o.method != r.method)?;
        let theirs: BTreeMap<String, f64> = values(other, organ)
            .into_iter()
            .map(|x| (x.0, x.1))
            .collect();
        let (a, b): (Vec<f64>, Vec<f64>) = values(r, organ)
            .iter()
            .filter_map(|x| theirs.get(&x.0).map(|t| (x.1, *t)))
            .unzip();
        paired_t_test(&a, &b)
    };
    let mut table = Table::new();
    for r in results {
        let mut row = BTreeMap::new();
        for organ in organs {
            let v = values(r, organ);
            if v.is_empty() {
                continue;
            }
            let dice: Vec<f64> = v.iter().map(|x| x.1).collect();
            let (mean, sd) = segviz_core::metrics::mean_sd(&dice);
            let hds: Vec<f64> = v.iter().filter_map(|x| x.2).collect();
            let hd95 = (!hds.is_empty()).then(|| hds.iter().sum::<f64>() / hds.len() as f64);
            row.insert(
                organ.clone(),
                Cell {
                    mean,
                    sd,
                    n: dice.len(),
                    hd95,
                    hd95_penalised: penalised(r, organ),
                    head_dice: head_dice(r, organ),
                    ci95: mean_ci95(&dice),
                    vs_baseline: test_against(r, reference(Method::Baseline), organ),
                    p_holm: None,
                    vs_fedbn_ft: test_against(r, reference(Method::FedbnFt), organ),
                    p_holm_fedbn_ft: None,
                },
            );
        }
        table.insert(r.method, row);
    }
    // One family: every test of the table, against either reference.
    let mut cells: Vec<&mut Cell> = table
        .values_mut()
        .flat_map(|row| row.values_mut())
        .collect();
    let mut tested: Vec<(usize, bool, f64)> = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        if let Some(t) = c.vs_baseline {
            tested.push((i, false, t.p_value));
        }
        if let Some(t) = c.vs_fedbn_ft {
            tested.push((i, true, t.p_value));
        }
    }
    let adjusted = holm_adjust(&tested.iter().map(|x| x.2).collect::<Vec<_>>());
    for ((i, against_fedbn_ft, _), p) in tested.into_iter().zip(adjusted) {
        if against_fedbn_ft {
            cells[i].p_holm_fedbn_ft = Some(p);
        } else {
            cells[i].p_holm = Some(p);
        }
    }
    table
}

/// The comparison over several seeds: each seed's run (phantoms, splits, initial weights
/// and sampling all drawn from it) and the tables over every (seed, volume) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedSummary {
    /// The seeds, in run order.
    pub seeds: Vec<u64>,
    /// Organs, in label order.
    pub organs: Vec<String>,
    /// Table 1 over all seeds.
    pub table_validation: Table,
    /// Table 2 over all seeds.
    pub table_test: Table,
    /// Every seed's full results (per-volume figures included).
    pub runs: Vec<ExperimentResults>,
}

/// Pools the runs of several seeds: a volume of seed `s` counts as its own observation
/// (`seed-s/site/case`), and tests pair each method with the references on the same
/// (seed, volume).
///
/// # Errors
/// When no run is given or the runs disagree on their methods or organs.
pub fn combine_seeds(runs: Vec<ExperimentResults>) -> Result<SeedSummary> {
    let first = runs
        .first()
        .ok_or_else(|| FedError::Config("no run to combine".into()))?;
    let organs = first.organs.clone();
    let methods: Vec<Method> = first.methods.iter().map(|m| m.method).collect();
    let mut pooled: Vec<MethodResult> = Vec::new();
    for run in &runs {
        let these: Vec<Method> = run.methods.iter().map(|m| m.method).collect();
        if these != methods || run.organs != organs {
            return Err(FedError::Config(format!(
                "seed {} ran other methods or organs than seed {}",
                run.config.seed, first.config.seed
            )));
        }
        for m in &run.methods {
            let tag = |scores: &[VolumeScore]| -> Vec<VolumeScore> {
                scores
                    .iter()
                    .map(|v| VolumeScore {
                        case: format!("seed-{}/{}", run.config.seed, v.case),
                        ..v.clone()
                    })
                    .collect()
            };
            match pooled.iter_mut().find(|p| p.method == m.method) {
                Some(p) => {
                    p.validation.extend(tag(&m.validation));
                    p.test.extend(tag(&m.test));
                    p.train_seconds += m.train_seconds;
                    p.eval_seconds += m.eval_seconds;
                }
                None => pooled.push(MethodResult {
                    validation: tag(&m.validation),
                    test: tag(&m.test),
                    rounds: Vec::new(),
                    ..m.clone()
                }),
            }
        }
    }
    Ok(SeedSummary {
        seeds: runs.iter().map(|r| r.config.seed).collect(),
        table_validation: make_table(&pooled, &organs, |r| &r.validation),
        table_test: make_table(&pooled, &organs, |r| &r.test),
        organs,
        runs,
    })
}

/// A table as Markdown: `mean (SD)` per organ, then the 95 % confidence interval of the
/// mean; `*` marks a Holm-corrected p < 0.05 against the baseline, `†` against FedBN + FT
/// (paired t-tests on the same volumes).
pub fn format_table(title: &str, table: &Table, organs: &[String]) -> String {
    let mut s = format!("{title}\n\n| Method |");
    for o in organs {
        s.push_str(&format!(" {o} |"));
    }
    s.push_str("\n|---|");
    for _ in organs {
        s.push_str("---|");
    }
    s.push('\n');
    for (method, row) in table {
        s.push_str(&format!("| {} |", method.label()));
        for o in organs {
            match row.get(o) {
                Some(c) => {
                    let significant = |p: Option<f64>, mark: &'static str| {
                        p.filter(|p| *p < 0.05).map_or("", |_| mark)
                    };
                    let ci = c
                        .ci95
                        .map_or(String::new(), |(lo, hi)| format!(" [{lo:.2}, {hi:.2}]"));
                    s.push_str(&format!(
                        " {:.2} ({:.2}){ci}{}{} |",
                        c.mean,
                        c.sd,
                        significant(c.p_holm, "*"),
                        significant(c.p_holm_fedbn_ft, "†")
                    ));
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}
