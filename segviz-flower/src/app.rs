//! The SegViz side of a node: a site's [`SiteClient`] answering Flower `train` and
//! `evaluate` instructions, with the record layout documented in `docs/flower.md`.
//!
//! The node loads what the server sends into its local model (representation + its own
//! heads; other tasks' heads are ignored), trains with the same code as the in-process
//! federation, and replies with its model state, the classification of every tensor
//! (decided by `segviz_core::state` from the module structure), and metrics. Its local state
//! is saved after every round, so a restarted node keeps its own BatchNorm under FedBN.
//!
//! An instruction must carry every tensor the node needs (under FedBN after round 1, all but
//! the representation's BatchNorm): a node never trains or evaluates on leftover local state
//! because the server sent less than it should. A `query` instruction is answered with the
//! site's identity (name and tasks) only, so that the server can send each head to its owners.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use burn::tensor::Device;
use segviz_core::checkpoint::{read_checkpoint, write_checkpoint, Checkpoint};
use segviz_core::{ModelState, SegVizConfig, StateTensor, TensorRole};
use segviz_fed::experiment::ExperimentConfig;
use segviz_fed::partial_labels::{
    PartialLabelConfig, KEY_DISTILLATION_TEMPERATURE, KEY_DISTILLATION_THRESHOLD,
    KEY_DISTILLATION_WEIGHT, KEY_EXCLUSION_WEIGHT, KEY_PARTIAL_LABELS,
};
use segviz_fed::{FederatedClient, FitInstructions, SiteClient, SiteData};
use serde::Serialize;

use crate::error::{FlowerError, Result};
use crate::node::InstructionHandler;
use crate::protocol::records::{
    ArrayRecord, ConfigRecord, ConfigValue, MetricRecord, MetricValue, Record, RecordDict, Tensor,
};

/// Name of the state format announced in the `segviz` record.
pub const STATE_FORMAT: &str = "segviz-state/1";

/// A site answering Flower instructions. See the module documentation.
pub struct SegVizApp {
    client: SiteClient,
    work_dir: PathBuf,
    restored_run: Option<u64>,
    name: String,
    reply: ReplyLayout,
    data_warnings: Vec<String>,
}

/// What a node's replies look like.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ReplyLayout {
    /// The SegViz contract (docs/flower.md): a `train` reply carries the node's own state
    /// (representation and its own heads) and `dice/<organ>` for its own organs.
    #[default]
    PerSite,
    /// For Flower's stock strategies (e.g. `FedAvg`), which need every reply to carry the
    /// same array and metric names: a `train` reply also carries, unchanged, every head of
    /// another task that the instruction sent, and both replies report one `dice` (the mean
    /// over the node's organs) instead of `dice/<organ>`.
    Uniform,
}

/// How a site's data is prepared and its model trained (must match the server's model).
#[derive(Debug, Clone)]
pub struct SiteSettings {
    /// The experiment settings (model, preprocessing, training, seed).
    pub experiment: ExperimentConfig,
    /// Where splits, the preprocessing cache, the node key and local states are kept.
    pub work_dir: PathBuf,
    /// The site's name in the federation (the `client` of its replies); `None`: the data
    /// folder's name. The server refuses a second node with a name already taken. (Training
    /// seeds still derive from the data folder's name, as in the in-process federation.)
    pub site_name: Option<String>,
    /// What the replies look like.
    pub reply: ReplyLayout,
}

impl SegVizApp {
    /// Opens the site at `site_dir` (any layout `segviz_data` reads) and builds its local
    /// model on `device` (an autodiff device).
    pub fn open(site_dir: &Path, settings: &SiteSettings, device: &Device) -> Result<Self> {
        let e = &settings.experiment;
        e.validate()?;
        let work = &settings.work_dir;
        let site = SiteData::open(
            site_dir,
            e.preprocess.clone(),
            e.validation_fraction,
            e.seed,
            &work.join("splits"),
            &work.join("cache"),
        )
        .map_err(segviz_fed::FedError::from)?;
        if site.split.train.is_empty() {
            return Err(FlowerError::Config(format!(
                "{}: no training case after the split",
                site_dir.display()
            )));
        }
        // Every case read and checked before the node joins any federation, as the
        // in-process experiment does.
        let (problems, data_warnings) = segviz_fed::check_cases(&[&site], |_| {})?;
        if !problems.is_empty() {
            return Err(segviz_fed::FedError::BadData { problems }.into());
        }
        let tasks: Vec<String> = site
            .annotated()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        let config = SegVizConfig::new(e.representation.clone(), tasks);
        let model = config.init(device, e.seed)?;
        let client = SiteClient::new(
            Arc::new(site),
            &model,
            e.training.clone(),
            e.window.clone(),
            e.seed,
        )?;
        let name = match &settings.site_name {
            None => client.info().name,
            Some(name) => {
                let trimmed = name.trim();
                if trimmed.is_empty() || trimmed.chars().any(char::is_control) {
                    return Err(FlowerError::Config(format!(
                        "site name {name:?}: it must be non-empty, without control characters"
                    )));
                }
                trimmed.to_string()
            }
        };
        Ok(SegVizApp {
            client,
            work_dir: work.clone(),
            restored_run: None,
            name,
            reply: settings.reply,
            data_warnings,
        })
    }

    /// The geometry warnings the start-up data check found in the site's files (one line
    /// per warning, naming the file), for the operator to see.
    pub fn data_warnings(&self) -> &[String] {
        &self.data_warnings
    }

    /// The site's name in the federation (`--site-name`, else the data folder's name).
    pub fn site_name(&self) -> String {
        self.name.clone()
    }

    /// The tasks (organs) this site owns heads for.
    pub fn tasks(&self) -> Vec<String> {
        self.client.info().tasks
    }

    /// The node's current local model state.
    pub fn local_state(&self) -> ModelState {
        self.client.local_state()
    }

    fn state_path(&self, run_id: u64) -> PathBuf {
        self.work_dir
            .join("runs")
            .join(format!("run-{run_id}"))
            .join("local.segviz")
    }

    /// On the first instruction of a run, restores the local state saved by an earlier
    /// process of this node (if any).
    fn restore(&mut self, run_id: u64) -> Result<()> {
        if self.restored_run == Some(run_id) {
            return Ok(());
        }
        let path = self.state_path(run_id);
        if path.exists() {
            let saved = read_checkpoint(&path)?;
            self.client.restore_local_state(&saved.state)?;
        }
        self.restored_run = Some(run_id);
        Ok(())
    }

    fn save(&self, run_id: u64, round: usize) -> Result<()> {
        write_checkpoint(
            &self.state_path(run_id),
            &Checkpoint {
                // The model's own configuration: under the partial-label rule it holds
                // every head, not only the site's.
                config: self.client.model().config().clone(),
                state: self.client.local_state(),
                metadata: serde_json::json!({
                    "run_id": run_id,
                    "round": round,
                    "client": self.site_name(),
                }),
            },
        )?;
        Ok(())
    }

    /// Answers a `train` instruction.
    pub fn train(&mut self, run_id: u64, content: &RecordDict) -> Result<RecordDict> {
        self.restore(run_id)?;
        let config = required_config(content)?;
        let round = positive(config, "server-round")?;
        let total_rounds = positive(config, "num-server-rounds")?.max(round);
        let local_epochs = positive(config, "local-epochs")?;
        let strategy = lookup(config, "strategy")
            .and_then(ConfigValue::as_str)
            .unwrap_or("fedavg");
        let base = strategy.strip_suffix("_pl").unwrap_or(strategy);
        let partial_labels = base != strategy;
        let mut fit_config = BTreeMap::new();
        let number = |key: &str, default: f64| {
            lookup(config, key)
                .and_then(|v| v.as_float().or_else(|| v.as_int().map(|i| i as f64)))
                .unwrap_or(default)
        };
        if base == "fedprox" {
            fit_config.insert("proximal_mu".to_string(), number("proximal-mu", 0.0));
        }
        if partial_labels {
            // The partial-label rule: this node trains every head the server sends.
            let defaults = PartialLabelConfig::default();
            fit_config.insert(KEY_PARTIAL_LABELS.to_string(), 1.0);
            fit_config.insert(
                KEY_EXCLUSION_WEIGHT.to_string(),
                number("exclusion-weight", defaults.exclusion_weight),
            );
            fit_config.insert(
                KEY_DISTILLATION_WEIGHT.to_string(),
                number("distillation-weight", 0.0),
            );
            fit_config.insert(
                KEY_DISTILLATION_TEMPERATURE.to_string(),
                number("distillation-temperature", defaults.temperature),
            );
            fit_config.insert(
                KEY_DISTILLATION_THRESHOLD.to_string(),
                number("distillation-threshold", 0.0),
            );
            self.client.take_heads(&sent_heads(content))?;
        }
        let withheld_batch_norm = base == "fedbn" && round > 1;
        let received = self.received_state("train", content, withheld_batch_norm)?;
        let update = self.client.fit(
            &FitInstructions {
                round,
                total_rounds,
                state: received.state,
                local_epochs,
                config: fit_config,
            },
            None,
        )?;
        self.save(run_id, round)?;
        let evaluation = self.client.evaluate(round, &ModelState::default())?;

        let mut metrics: MetricRecord = vec![
            (
                "num-examples".into(),
                MetricValue::Int(update.num_examples as i64),
            ),
            (
                "loss".into(),
                MetricValue::Float(update.metrics.get("loss").copied().unwrap_or(f64::NAN)),
            ),
            (
                "steps".into(),
                MetricValue::Int(update.metrics.get("steps").copied().unwrap_or(0.0) as i64),
            ),
        ];
        metrics.extend(self.dice_metrics(&evaluation.metrics));
        let mut arrays = to_arrays(&update.state);
        if self.reply == ReplyLayout::Uniform {
            arrays.extend(received.other_heads);
        }
        Ok(RecordDict {
            records: vec![
                ("arrays".into(), Record::Arrays(arrays)),
                ("metrics".into(), Record::Metrics(metrics)),
                (
                    "segviz".into(),
                    Record::Config(self.description(&update.state)?),
                ),
            ],
        })
    }

    /// Answers an `evaluate` instruction: loads the sent tensors, returns metrics only.
    pub fn evaluate(&mut self, run_id: u64, content: &RecordDict) -> Result<RecordDict> {
        self.restore(run_id)?;
        let config = content.config("config");
        let round = config
            .and_then(|c| lookup(c, "server-round"))
            .and_then(ConfigValue::as_int)
            .unwrap_or(0)
            .max(0) as usize;
        // An evaluation carries what the next round's training will start from: under
        // FedBN that is never round 1, so the representation's BatchNorm stays local.
        let strategy = config
            .and_then(|c| lookup(c, "strategy"))
            .and_then(ConfigValue::as_str);
        let withheld_batch_norm = matches!(strategy, Some("fedbn" | "fedbn_pl"));
        if strategy.is_some_and(|s| s.ends_with("_pl")) {
            self.client.take_heads(&sent_heads(content))?;
        }
        let received = self.received_state("evaluate", content, withheld_batch_norm)?;
        let evaluation = self.client.evaluate(round, &received.state)?;
        let mut metrics: MetricRecord = vec![(
            "num-examples".into(),
            MetricValue::Int(evaluation.num_examples as i64),
        )];
        metrics.extend(self.dice_metrics(&evaluation.metrics));
        Ok(RecordDict {
            records: vec![("metrics".into(), Record::Metrics(metrics))],
        })
    }

    /// Answers a `query` instruction: who this site is (`segviz` record: `client`, `tasks`,
    /// `format`), nothing about its data or model.
    pub fn identify(&self) -> RecordDict {
        RecordDict {
            records: vec![(
                "segviz".into(),
                Record::Config(vec![
                    ("client".into(), ConfigValue::Str(self.site_name())),
                    ("tasks".into(), ConfigValue::StrList(self.tasks())),
                    ("format".into(), ConfigValue::Str(STATE_FORMAT.into())),
                ]),
            )],
        }
    }

    /// Dice metrics as the reply layout names them.
    fn dice_metrics(&self, values: &BTreeMap<String, f64>) -> Vec<(String, MetricValue)> {
        match self.reply {
            ReplyLayout::PerSite => as_metrics(values).collect(),
            ReplyLayout::Uniform => {
                // One key that every node has, whatever its organs: their mean.
                let dice: Vec<f64> = values
                    .iter()
                    .filter(|(k, _)| k.starts_with("dice/"))
                    .map(|(_, v)| *v)
                    .collect();
                let mean = if dice.is_empty() {
                    f64::NAN
                } else {
                    dice.iter().sum::<f64>() / dice.len() as f64
                };
                vec![("dice".into(), MetricValue::Float(mean))]
            }
        }
    }

    /// The tensors of the `arrays` record that this node's model has, with the model's own
    /// classification, and (kept aside, unchanged) the heads of other tasks. Any other
    /// unknown tensor, or a shape mismatch, means the server's model is not this node's: an
    /// error. So is an instruction that lacks a tensor of this node's model, except the
    /// representation's BatchNorm when `withheld_batch_norm` (FedBN after round 1).
    fn received_state(
        &self,
        message_type: &str,
        content: &RecordDict,
        withheld_batch_norm: bool,
    ) -> Result<Received> {
        let arrays = content.arrays("arrays").ok_or_else(|| {
            FlowerError::protocol("the instruction has no `arrays` record".to_string())
        })?;
        let layout = self.client.local_state();
        let mut state = ModelState::default();
        let mut other_heads = ArrayRecord::new();
        for (path, tensor) in arrays {
            let Some(own) = layout.tensors.get(path) else {
                if path.starts_with("heads.") {
                    other_heads.push((path.clone(), tensor.clone()));
                    continue;
                }
                return Err(FlowerError::Config(format!(
                    "the server sent {path}, which this node's model does not have: the \
                     server's model configuration differs from the node's (--preset)"
                )));
            };
            if own.shape != tensor.shape {
                return Err(FlowerError::Config(format!(
                    "{path}: the server sent shape {:?}, this node's model has {:?} (check \
                     --preset on both sides)",
                    tensor.shape, own.shape
                )));
            }
            state.tensors.insert(
                path.clone(),
                StateTensor {
                    data: tensor.values.clone(),
                    ..own.clone()
                },
            );
        }
        // The representation first: the error should name what matters most.
        let mut missing: Vec<(bool, String)> = layout
            .tensors
            .iter()
            .filter(|(path, t)| {
                let withheld =
                    withheld_batch_norm && t.batch_norm && t.role == TensorRole::Representation;
                !withheld && !state.tensors.contains_key(*path)
            })
            .map(|(path, t)| (t.role != TensorRole::Representation, path.clone()))
            .collect();
        missing.sort();
        let missing: Vec<String> = missing.into_iter().map(|(_, path)| path).collect();
        if !missing.is_empty() {
            return Err(FlowerError::MissingTensors {
                message_type: message_type.to_string(),
                expected: layout.tensors.len(),
                missing,
            });
        }
        Ok(Received { state, other_heads })
    }

    /// The `segviz` record: who this is and what every tensor is.
    fn description(&self, state: &ModelState) -> Result<ConfigRecord> {
        #[derive(Serialize)]
        struct Class<'a> {
            role: &'a TensorRole,
            batch_norm: bool,
            trainable: bool,
        }
        let classes: BTreeMap<&String, Class<'_>> = state
            .tensors
            .iter()
            .map(|(p, t)| {
                (
                    p,
                    Class {
                        role: &t.role,
                        batch_norm: t.batch_norm,
                        trainable: t.trainable,
                    },
                )
            })
            .collect();
        let classification = serde_json::to_string(&classes)
            .map_err(|e| FlowerError::protocol(format!("cannot encode the classification: {e}")))?;
        Ok(vec![
            ("client".into(), ConfigValue::Str(self.site_name())),
            ("tasks".into(), ConfigValue::StrList(self.tasks())),
            ("classification".into(), ConfigValue::Str(classification)),
            ("format".into(), ConfigValue::Str(STATE_FORMAT.into())),
        ])
    }
}

/// What an instruction's `arrays` hold for this node.
struct Received {
    /// The tensors of this node's model.
    state: ModelState,
    /// Heads of tasks this node does not own, as sent.
    other_heads: ArrayRecord,
}

impl InstructionHandler for SegVizApp {
    fn handle(
        &mut self,
        run_id: u64,
        message_type: &str,
        content: &RecordDict,
    ) -> std::result::Result<RecordDict, String> {
        let outcome = match message_type {
            "train" => self.train(run_id, content),
            "evaluate" => self.evaluate(run_id, content),
            "query" => Ok(self.identify()),
            other => Err(FlowerError::protocol(format!(
                "message type {other:?} is not supported by SegViz nodes (train, evaluate, query)"
            ))),
        };
        outcome.map_err(|e| format!("{}: {e}", self.site_name()))
    }
}

/// A model state as an `ArrayRecord` (names are the parameter paths).
pub fn to_arrays(state: &ModelState) -> ArrayRecord {
    state
        .tensors
        .iter()
        .map(|(path, t)| {
            (
                path.clone(),
                Tensor {
                    shape: t.shape.clone(),
                    values: t.data.clone(),
                },
            )
        })
        .collect()
}

fn required_config(content: &RecordDict) -> Result<&ConfigRecord> {
    content
        .config("config")
        .ok_or_else(|| FlowerError::protocol("the instruction has no `config` record".to_string()))
}

fn lookup<'a>(config: &'a ConfigRecord, key: &str) -> Option<&'a ConfigValue> {
    config.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

fn positive(config: &ConfigRecord, key: &str) -> Result<usize> {
    match lookup(config, key).and_then(ConfigValue::as_int) {
        Some(v) if v >= 1 => Ok(v as usize),
        Some(v) => Err(FlowerError::protocol(format!(
            "config {key} = {v}, expected ≥ 1"
        ))),
        None => Err(FlowerError::protocol(format!(
            "the instruction's config has no integer {key}"
        ))),
    }
}

/// Evaluation results (per-organ Dice) as MetricRecord entries.
fn as_metrics(values: &BTreeMap<String, f64>) -> impl Iterator<Item = (String, MetricValue)> + '_ {
    values
        .iter()
        .map(|(k, v)| (k.clone(), MetricValue::Float(*v)))
}

/// The tasks whose heads an instruction carries (`heads.<task>.…` arrays).
fn sent_heads(content: &RecordDict) -> Vec<String> {
    let mut tasks: Vec<String> = content
        .arrays("arrays")
        .into_iter()
        .flatten()
        .filter_map(|(path, _)| path.strip_prefix("heads.")?.split('.').next())
        .map(str::to_string)
        .collect();
    tasks.sort();
    tasks.dedup();
    tasks
}
