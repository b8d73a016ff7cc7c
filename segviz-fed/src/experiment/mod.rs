//! The paper's comparisons (§4): per-organ baselines, central aggregation (naive and with
//! the marginal loss), FedAvg, FedBN (and FedProx), each with and without local
//! fine-tuning, evaluated on every site's validation split (Table 1) and on an external
//! test site (Table 2) with paired t-tests against the baselines — plus the partial-label
//! methods (`… + PL`), over one seed or several.
//!
//! Files: [`methods`] (what is compared), [`presets`] (settings), [`discovery`] (sites in
//! a folder), [`report`] (tables and statistics); this module runs it all.

mod discovery;
mod methods;
mod presets;
mod report;

pub use discovery::ExperimentData;
use methods::federation_strategy;
pub use methods::Method;
pub use presets::ExperimentConfig;
use report::make_table;
pub use report::{combine_seeds, format_table, Cell, SeedSummary, Table};

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::Device;
use segviz_core::checkpoint::{save_model, write_atomically};
use segviz_core::{SegVizConfig, SegVizModel};
use segviz_data::Organ;
use serde::{Deserialize, Serialize};

use crate::data_check::{check_cases, DataCheckProgress};
use crate::error::{FedError, Result};
use crate::evaluate::{score_case, Segmenter, VolumeScore};
use crate::local::{train_alone, Objective, TrainerOptions, POOLED_HEAD};
use crate::server::{check_checkpoint, RoundReport, Server, ServerConfig, ServerEvent};
use crate::site_client::{FineTuning, SiteClient};
use segviz_data::SiteData;

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
    /// and strategy: the configuration's [`federation_settings`] and a fingerprint of the
    /// data. Stored with every checkpoint and compared on resume.
    fn settings(&self) -> serde_json::Value {
        let mut settings = federation_settings(&self.config);
        if let Some(map) = settings.as_object_mut() {
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
                // A DICOM series is a folder: the sizes of its files.
                let size = |p: &Path| -> u64 {
                    segviz_data::dicom::scan_files(p)
                        .iter()
                        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
                        .sum()
                };
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
                        let mut fed = self.federate(strategy, &train_device, on_event)?;
                        if method.local_batch_norm() {
                            // FedBN sites keep their BatchNorm: re-estimate its statistics
                            // for the final averaged weights before fine-tuning and scoring.
                            for client in fed.0.iter_mut() {
                                client.recalibrate_batch_norm(
                                    self.config.batch_norm_recalibration_epochs,
                                    self.config.seed ^ 0xb4_7c,
                                )?;
                            }
                        }
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
            clients.push(
                SiteClient::new(
                    site.clone(),
                    &global,
                    self.config.training.clone(),
                    self.config.window.clone(),
                    self.config.seed,
                )?
                .with_round_validation(self.config.round_validation_volumes),
            );
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
                FineTuning {
                    epochs: self.config.fine_tune_epochs,
                    learning_rate: self.config.effective_fine_tune_learning_rate(),
                    representation: self.config.fine_tune_representation,
                },
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

    /// Scores every validation case of every site and every test case, `parallel_clients`
    /// volumes at a time (each volume's score does not depend on the others, so the order
    /// of the work changes nothing but the time).
    fn evaluate(
        &self,
        segmenter: &Segmenter,
        device: &Device,
        on_event: &Emit<'_>,
    ) -> Result<Evaluation> {
        let organs = segmenter.organs()?;
        // (site, case, is the test site)
        let sites = self.sites.iter().map(|s| (s, false));
        let mut jobs: Vec<(&SiteData, &str, bool)> = Vec::new();
        for (site, test) in sites.chain(self.test_site.iter().map(|s| (s, true))) {
            let cases = site.split.validation.iter();
            jobs.extend(cases.map(|c| (&**site, c.as_str(), test)));
        }
        let scored = parallel_map(&jobs, self.config.parallel_clients, |&(site, id, test)| {
            let (score, _, _, prediction) =
                score_case(segmenter, site, id, &organs, &self.config.window, device)?;
            on_event(ExperimentEvent::Advanced { units: 1 });
            Ok((score, test.then(|| prediction.labels())))
        })?;
        let (mut validation, mut test, mut predictions) = (Vec::new(), Vec::new(), Vec::new());
        for (score, labels) in scored {
            match labels {
                Some(labels) => {
                    predictions.push((score.case.clone(), labels));
                    test.push(score);
                }
                None => validation.push(score),
            }
        }
        Ok((validation, test, predictions))
    }

    /// Writes `results.json` and `results.csv` into the output folder, atomically.
    pub fn write_results(&self, results: &ExperimentResults) -> Result<()> {
        let json = serde_json::to_vec_pretty(results)
            .map_err(|e| FedError::Config(format!("cannot encode results: {e}")))?;
        write_atomically(&self.out.join("results.json"), &json)?;
        let csv = results_csv(results)
            .map_err(|e| FedError::Config(format!("cannot encode results.csv: {e}")))?;
        write_atomically(&self.out.join("results.csv"), &csv)?;
        Ok(())
    }
}

/// The settings a federation's checkpoints depend on: the whole configuration except what
/// only matters before or after the rounds — how many clients train at once, which methods
/// run, fine-tuning and the final BatchNorm re-estimation. So `--resume` can add a method
/// that shares a finished federation (e.g. `fedbn_pl_ft` after `fedbn_pl`) or fine-tune it
/// with other settings without training the rounds again.
fn federation_settings(config: &ExperimentConfig) -> serde_json::Value {
    let mut settings = serde_json::to_value(config).unwrap_or_default();
    if let Some(map) = settings.as_object_mut() {
        for key in [
            "parallel_clients",
            "methods",
            "fine_tune_epochs",
            "fine_tune_learning_rate",
            "fine_tune_representation",
            "batch_norm_recalibration_epochs",
        ] {
            map.remove(key);
        }
    }
    settings
}

/// Every per-volume figure as CSV (one row per method, table, volume and organ), quoted
/// where a field needs it (site and case names come from the user's folders).
fn results_csv(results: &ExperimentResults) -> std::result::Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record([
        "method",
        "table",
        "site",
        "case",
        "organ",
        "dice",
        "hd95_mm",
        "hd95_is_penalty",
        "head_dice",
    ])?;
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
                    let head = s
                        .head_dice
                        .get(organ)
                        .map_or(String::new(), |v| format!("{v:.5}"));
                    w.write_record([
                        r.method.name(),
                        table,
                        &s.site,
                        &s.case,
                        organ,
                        &format!("{d:.5}"),
                        &hd,
                        &s.hd95_penalised.contains(organ).to_string(),
                        &head,
                    ])?;
                }
            }
        }
    }
    w.into_inner().map_err(|e| e.into_error().into())
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

/// `f` over `items` on `threads` threads, results in item order; the first error (in item
/// order) wins. The threads take the next item as soon as they finish one, so a slow item
/// does not hold the others back; after an error no new item is started.
pub(crate) fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> Result<R> + Sync,
) -> Result<Vec<R>> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let slots: Vec<Mutex<Option<Result<R>>>> = items.iter().map(|_| Mutex::new(None)).collect();
    let work = || loop {
        if failed.load(Ordering::Relaxed) {
            return;
        }
        let i = next.fetch_add(1, Ordering::Relaxed);
        let Some(item) = items.get(i) else {
            return;
        };
        let result = f(item);
        if result.is_err() {
            failed.store(true, Ordering::Relaxed);
        }
        if let Ok(mut slot) = slots[i].lock() {
            *slot = Some(result);
        }
    };
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads.clamp(1, items.len().max(1)))
            .map(|_| scope.spawn(work))
            .collect();
        for h in handles {
            if h.join().is_err() {
                failed.store(true, Ordering::Relaxed);
            }
        }
    });
    let mut out = Vec::with_capacity(items.len());
    for slot in slots {
        match slot.into_inner().ok().flatten() {
            Some(Ok(r)) => out.push(r),
            Some(Err(e)) => return Err(e),
            // Not run: an earlier item failed (its error comes first) or a thread panicked.
            None => {
                return Err(FedError::Config(
                    "a worker thread panicked before finishing its item".into(),
                ))
            }
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

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn a_federation_checkpoint_ignores_what_happens_after_the_rounds() {
        let quick = ExperimentConfig::quick();
        let after = ExperimentConfig {
            methods: vec![Method::FedbnPlFt],
            fine_tune_epochs: 9,
            fine_tune_learning_rate: Some(3e-4),
            fine_tune_representation: true,
            batch_norm_recalibration_epochs: 0,
            parallel_clients: 1,
            ..quick.clone()
        };
        assert_eq!(federation_settings(&quick), federation_settings(&after));
        let reseeded = ExperimentConfig {
            seed: 1,
            ..quick.clone()
        };
        let plain_average = ExperimentConfig {
            server_learning_rate: 1.0,
            ..quick.clone()
        };
        for other in [reseeded, plain_average] {
            assert_ne!(federation_settings(&quick), federation_settings(&other));
        }
    }

    #[test]
    fn settings_read_back_from_a_checkpoint_equal_the_settings_that_wrote_it() {
        // The augmentation's f32 settings widened to f64 need 17 digits; a parser that is
        // not correctly rounded reads some of them back one unit off, and every resume of
        // such a run would be refused as "other settings".
        for config in [ExperimentConfig::quick(), ExperimentConfig::paper()] {
            let settings = federation_settings(&config);
            let text = serde_json::to_vec_pretty(&settings).unwrap();
            let back: serde_json::Value = serde_json::from_slice(&text).unwrap();
            assert_eq!(back, settings);
        }
    }
}

#[cfg(test)]
mod csv_tests {
    use super::*;

    #[test]
    fn results_csv_quotes_fields_that_need_it() {
        let score = VolumeScore {
            site: "Hospital \"A\", ward 3".into(),
            case: "case,1".into(),
            dice: [("liver".to_string(), 0.5)].into_iter().collect(),
            head_dice: [("liver".to_string(), 0.25)].into_iter().collect(),
            hd95: [("liver".to_string(), None)].into_iter().collect(),
            hd95_penalised: vec![],
        };
        let results = ExperimentResults {
            config: ExperimentConfig::tiny(),
            organs: vec!["liver".into()],
            methods: vec![MethodResult {
                method: Method::Baseline,
                validation: vec![score.clone()],
                test: vec![],
                rounds: vec![],
                train_seconds: 0.0,
                eval_seconds: 0.0,
            }],
            table_validation: Default::default(),
            table_test: Default::default(),
        };
        let bytes = results_csv(&results).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(
            text.contains(r#""Hospital ""A"", ward 3","case,1""#),
            "{text}"
        );
        let mut reader = csv::Reader::from_reader(bytes.as_slice());
        let row = reader.records().next().unwrap().unwrap();
        assert_eq!(&row[2], score.site.as_str());
        assert_eq!(&row[3], "case,1");
        assert_eq!(&row[5], "0.50000");
        assert_eq!(&row[6], "");
    }
}

#[cfg(test)]
mod parallel_map_tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn results_keep_item_order_whatever_finishes_first() {
        // The first items are the slowest, so later items finish before them.
        let items: Vec<u64> = (0..7).collect();
        let out = parallel_map(&items, 3, |&i| {
            std::thread::sleep(Duration::from_millis(30 - 4 * i));
            Ok(i * 10)
        })
        .unwrap();
        assert_eq!(out, vec![0, 10, 20, 30, 40, 50, 60]);
    }

    #[test]
    fn the_first_error_in_item_order_wins_and_stops_new_items() {
        let items: Vec<usize> = (0..50).collect();
        let started = AtomicUsize::new(0);
        let err = parallel_map(&items, 2, |&i| {
            started.fetch_add(1, Ordering::Relaxed);
            if i == 3 || i == 4 {
                return Err(FedError::Config(format!("item {i} failed")));
            }
            Ok(i)
        })
        .unwrap_err();
        assert!(err.to_string().contains("item 3 failed"), "{err}");
        assert!(started.load(Ordering::Relaxed) < items.len());
    }

    #[test]
    fn no_items_and_more_threads_than_items_are_fine() {
        let none: Vec<u8> = Vec::new();
        assert!(parallel_map(&none, 4, |&v| Ok(v)).unwrap().is_empty());
        assert_eq!(parallel_map(&[5u8], 8, |&v| Ok(v + 1)).unwrap(), vec![6]);
    }
}
