//! The federation server: the global model state, a strategy, and the round loop with
//! fault tolerance and per-round checkpoints.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use segviz_core::checkpoint::{read_checkpoint, write_atomically, write_checkpoint, Checkpoint};
use segviz_core::{ModelState, SegVizConfig};
use serde::{Deserialize, Serialize};

use crate::client::FederatedClient;
use crate::error::{FedError, Result};
use crate::messages::{ClientUpdate, EvaluateResult, FitInstructions};
use crate::strategy::AggregationStrategy;

/// Settings of the round loop.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Rounds to run (paper: 50).
    pub rounds: usize,
    /// Local epochs per round (paper: 10).
    pub local_epochs: usize,
    /// A client not done this long after the round started is left out of the round.
    pub round_deadline: Option<Duration>,
    /// Clients trained at the same time (threads); 1 trains them one after the other.
    pub parallel_clients: usize,
    /// Where the global model, the clients' local states and the history are checkpointed
    /// after every round; `None` keeps nothing on disk.
    ///
    /// A round's checkpoint is one folder, `round-NNNN/`, written as `.round-NNNN.partial/`
    /// and renamed into place when every file is in it: a run killed at any moment leaves
    /// either the previous round or the new one, never a mix of the two.
    pub checkpoint_dir: Option<PathBuf>,
    /// Everything else that determines the result (seed, data, training settings…), as the
    /// caller describes it. It is stored with every checkpoint; [`Server::resume`] refuses a
    /// checkpoint whose settings (or rounds, local epochs, strategy) differ, naming them.
    pub settings: serde_json::Value,
}

/// What happened in one round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// Round number, from 1.
    pub round: usize,
    /// Clients whose update was aggregated.
    pub aggregated: Vec<String>,
    /// Clients left out, with the reason.
    pub failed: Vec<(String, String)>,
    /// Mean training loss over the aggregated clients.
    pub train_loss: f64,
    /// Aggregated evaluation metrics (e.g. `dice/liver`).
    pub metrics: BTreeMap<String, f64>,
    /// Seconds the round took.
    pub seconds: f64,
}

/// Events the server reports while it runs (for progress bars and logs).
#[derive(Debug, Clone)]
pub enum ServerEvent<'a> {
    /// A round starts.
    RoundStarted {
        /// Round number.
        round: usize,
        /// Total rounds.
        total: usize,
    },
    /// A client finished (or failed) its local training.
    ClientDone {
        /// Client name.
        client: &'a str,
        /// Whether its update will be aggregated.
        ok: bool,
    },
    /// A round ended.
    RoundFinished(&'a RoundReport),
    /// Resumed from a checkpoint after this round.
    Resumed {
        /// The last finished round.
        round: usize,
    },
}

/// The server. See the module documentation.
pub struct Server {
    config: ServerConfig,
    model_config: SegVizConfig,
    strategy: Box<dyn AggregationStrategy>,
    global: ModelState,
    history: Vec<RoundReport>,
}

const GLOBAL_FILE: &str = "global.segviz";
const HISTORY_FILE: &str = "history.json";
const MANIFEST_FILE: &str = "manifest.json";
const ROUND_PREFIX: &str = "round-";
const PARTIAL_SUFFIX: &str = ".partial";

impl Server {
    /// A server starting from `initial` (the full global model's state).
    pub fn new(
        config: ServerConfig,
        model_config: SegVizConfig,
        strategy: Box<dyn AggregationStrategy>,
        initial: ModelState,
    ) -> Result<Self> {
        if config.rounds == 0 || config.local_epochs == 0 || config.parallel_clients == 0 {
            return Err(FedError::Config(
                "rounds, local_epochs and parallel_clients must be at least 1".into(),
            ));
        }
        Ok(Server {
            config,
            model_config,
            strategy,
            global: initial,
            history: Vec::new(),
        })
    }

    /// The current global state.
    pub fn global(&self) -> &ModelState {
        &self.global
    }

    /// The model configuration (all tasks).
    pub fn model_config(&self) -> &SegVizConfig {
        &self.model_config
    }

    /// Reports of the finished rounds.
    pub fn history(&self) -> &[RoundReport] {
        &self.history
    }

    /// The strategy's name.
    pub fn strategy_name(&self) -> &str {
        self.strategy.name()
    }

    /// If `checkpoint_dir` holds a finished round, loads the global state, the history and
    /// every client's local state from the newest one; returns that round (0 if none).
    ///
    /// # Errors
    /// [`FedError::Config`] when the checkpoint was written with other settings (model,
    /// strategy, rounds, local epochs or [`ServerConfig::settings`]: each difference is
    /// named) or lacks a client's state; any error reading its files.
    pub fn resume<C: FederatedClient>(
        &mut self,
        clients: &mut [C],
        mut on_event: impl FnMut(ServerEvent<'_>),
    ) -> Result<usize> {
        let Some((round, round_dir)) = check_checkpoint(&self.config, self.strategy.name())? else {
            return Ok(0);
        };
        let global_path = round_dir.join(GLOBAL_FILE);
        let checkpoint = read_checkpoint(&global_path)?;
        if checkpoint.config != self.model_config {
            return Err(FedError::Config(format!(
                "{} was written for another model configuration; use another output folder",
                global_path.display()
            )));
        }
        let history: Vec<RoundReport> = read_json(&round_dir.join(HISTORY_FILE))?;
        let mut states = Vec::new();
        for client in clients.iter() {
            let name = client.info().name;
            let path = client_state_path(&round_dir, &name);
            if !path.is_file() {
                return Err(FedError::Config(format!(
                    "{} has no state for client {name}: the checkpoint was written by a \
                     federation with other sites",
                    round_dir.display()
                )));
            }
            let training_path = training_state_path(&round_dir, &name);
            let training = if training_path.is_file() {
                let bytes =
                    std::fs::read(&training_path).map_err(|e| FedError::io(&training_path, e))?;
                Some((training_path, bytes))
            } else {
                None
            };
            states.push((read_checkpoint(&path)?.state, training));
        }
        for (client, (state, training)) in clients.iter_mut().zip(&states) {
            client.restore_local_state(state)?;
            if let Some((path, bytes)) = training {
                client
                    .restore_training_state(bytes)
                    .map_err(|e| FedError::Config(format!("{}: {e}", path.display())))?;
            }
        }
        self.global = checkpoint.state;
        self.history = history.into_iter().take(round).collect();
        on_event(ServerEvent::Resumed { round });
        Ok(round)
    }

    /// What a checkpoint of `round` records about the run that wrote it.
    fn manifest(&self, round: usize) -> serde_json::Value {
        manifest(&self.config, self.strategy.name(), round)
    }

    /// Runs rounds `first..=rounds`, checkpointing after each.
    pub fn run<C: FederatedClient>(
        &mut self,
        clients: &mut [C],
        first: usize,
        on_event: impl FnMut(ServerEvent<'_>),
    ) -> Result<()> {
        let last = self.config.rounds;
        self.run_rounds(clients, first, last, on_event)
    }

    /// Runs rounds `first..=last` of the configured schedule (e.g. part of a run that is
    /// continued later with [`Server::resume`]), checkpointing after each.
    pub fn run_rounds<C: FederatedClient>(
        &mut self,
        clients: &mut [C],
        first: usize,
        last: usize,
        mut on_event: impl FnMut(ServerEvent<'_>),
    ) -> Result<()> {
        for round in first.max(1)..=last.min(self.config.rounds) {
            on_event(ServerEvent::RoundStarted {
                round,
                total: self.config.rounds,
            });
            let report = self.round(round, clients, &mut on_event)?;
            self.checkpoint(round, clients)?;
            on_event(ServerEvent::RoundFinished(&report));
        }
        Ok(())
    }

    /// One round: configure, fit (concurrently), aggregate, evaluate.
    fn round<C: FederatedClient>(
        &mut self,
        round: usize,
        clients: &mut [C],
        on_event: &mut impl FnMut(ServerEvent<'_>),
    ) -> Result<RoundReport> {
        let start = Instant::now();
        let deadline = self.config.round_deadline.map(|d| start + d);
        let instructions: Vec<FitInstructions> = clients
            .iter()
            .map(|c| FitInstructions {
                round,
                total_rounds: self.config.rounds,
                state: self.strategy.configure_fit(round, &self.global, &c.info()),
                local_epochs: self.config.local_epochs,
                config: self.strategy.fit_config(round),
            })
            .collect();

        // Each outcome with the moment the client finished, so a slow client in the same
        // group cannot make the others look late.
        let mut results: Vec<(String, Result<ClientUpdate>, Instant)> = Vec::new();
        let chunk = self.config.parallel_clients;
        let mut pairs: Vec<(&mut C, &FitInstructions)> =
            clients.iter_mut().zip(&instructions).collect();
        for group in pairs.chunks_mut(chunk) {
            let outcomes = in_threads(group, |(client, instr)| {
                let outcome = client.fit(instr, deadline);
                (outcome, Instant::now())
            });
            for ((client, _), outcome) in group.iter().zip(outcomes) {
                let name = client.info().name;
                let (outcome, at) = outcome.unwrap_or_else(|| {
                    let e = FedError::client(&name, "local training panicked");
                    (Err(e), Instant::now())
                });
                on_event(ServerEvent::ClientDone {
                    client: &name,
                    ok: outcome.is_ok(),
                });
                results.push((name, outcome, at));
            }
        }

        let mut updates = Vec::new();
        let mut failed = Vec::new();
        for (name, outcome, finished) in results {
            match outcome {
                Ok(_) if deadline.is_some_and(|d| finished > d) => {
                    failed.push((name, "missed the round deadline".to_string()));
                }
                Ok(update) => updates.push(update),
                Err(e) => failed.push((name, e.to_string())),
            }
        }
        self.global = self.strategy.aggregate_fit(round, &self.global, &updates)?;
        let train_loss = mean(
            updates
                .iter()
                .filter_map(|u| u.metrics.get("loss").copied()),
        );

        // Every client evaluates its view of the new global model on its validation split,
        // `parallel_clients` at a time; the results keep the clients' order.
        let views: Vec<ModelState> = clients
            .iter()
            .map(|c| {
                self.strategy
                    .configure_fit(round + 1, &self.global, &c.info())
            })
            .collect();
        let mut evaluations: Vec<EvaluateResult> = Vec::new();
        let mut pairs: Vec<(&mut C, &ModelState)> = clients.iter_mut().zip(&views).collect();
        for group in pairs.chunks_mut(chunk) {
            let outcomes = in_threads(group, |(client, view)| client.evaluate(round, view));
            for ((client, _), outcome) in group.iter().zip(outcomes) {
                let outcome = outcome.unwrap_or_else(|| {
                    Err(FedError::client(&client.info().name, "evaluation panicked"))
                });
                match outcome {
                    Ok(r) => evaluations.push(r),
                    Err(e) => failed.push((client.info().name, format!("evaluation failed: {e}"))),
                }
            }
        }
        let report = RoundReport {
            round,
            aggregated: updates.iter().map(|u| u.client.clone()).collect(),
            failed,
            train_loss,
            metrics: self.strategy.aggregate_evaluate(round, &evaluations),
            seconds: start.elapsed().as_secs_f64(),
        };
        self.history.push(report.clone());
        Ok(report)
    }

    /// Writes the global model, each client's local state, the history and the manifest
    /// into `.round-NNNN.partial/`, renames it to `round-NNNN/` (the commit), then removes
    /// the older rounds.
    fn checkpoint<C: FederatedClient>(&self, round: usize, clients: &[C]) -> Result<()> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        let final_dir = round_dir(dir, round);
        let partial = dir.join(format!(".{ROUND_PREFIX}{round:04}{PARTIAL_SUFFIX}"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(|e| FedError::io(&partial, e))?;
        }
        for client in clients {
            let name = client.info().name;
            write_checkpoint(
                &client_state_path(&partial, &name),
                &Checkpoint {
                    config: self.model_config.clone(),
                    state: client.local_state(),
                    metadata: serde_json::json!({ "round": round, "client": name }),
                },
            )?;
            if let Some(bytes) = client.training_state()? {
                write_atomically(&training_state_path(&partial, &name), &bytes)?;
            }
        }
        write_checkpoint(
            &partial.join(GLOBAL_FILE),
            &Checkpoint {
                config: self.model_config.clone(),
                state: self.global.clone(),
                metadata: serde_json::json!({
                    "round": round,
                    "strategy": self.strategy.name(),
                }),
            },
        )?;
        write_json(&partial.join(HISTORY_FILE), &self.history)?;
        write_json(&partial.join(MANIFEST_FILE), &self.manifest(round))?;
        if final_dir.exists() {
            // Only when rounds are rerun by hand over an existing checkpoint.
            std::fs::remove_dir_all(&final_dir).map_err(|e| FedError::io(&final_dir, e))?;
        }
        std::fs::rename(&partial, &final_dir).map_err(|e| FedError::io(&final_dir, e))?;
        // The new round is committed: older rounds and leftovers of killed runs can go.
        for entry in std::fs::read_dir(dir).map_err(|e| FedError::io(dir, e))? {
            let path = entry.map_err(|e| FedError::io(dir, e))?.path();
            let stale = match round_number(&path) {
                Some((r, complete)) => r != round || !complete,
                None => false,
            };
            if stale {
                std::fs::remove_dir_all(&path).map_err(|e| FedError::io(&path, e))?;
            }
        }
        Ok(())
    }
}

/// The newest committed round in `config.checkpoint_dir` and its folder, if there is one
/// and it was written by a run of `strategy` with the same rounds, local epochs and
/// settings; `None` when there is nothing to resume. Lets a caller refuse an incompatible
/// `--resume` before it trains anything.
///
/// # Errors
/// [`FedError::Config`] naming every setting that differs; errors reading the manifest.
pub fn check_checkpoint(config: &ServerConfig, strategy: &str) -> Result<Option<(usize, PathBuf)>> {
    let Some(dir) = &config.checkpoint_dir else {
        return Ok(None);
    };
    let Some((round, round_dir)) = latest_round(dir)? else {
        return Ok(None);
    };
    let stored: serde_json::Value = read_json(&round_dir.join(MANIFEST_FILE))?;
    let differences = differences(&manifest(config, strategy, round), &stored);
    if !differences.is_empty() {
        return Err(FedError::Config(format!(
            "{} was written with other settings ({}); resume with the same settings, or \
             start afresh with --overwrite or in another output folder",
            round_dir.display(),
            differences.join("; ")
        )));
    }
    Ok(Some((round, round_dir)))
}

/// What a checkpoint of `round` records about the run that wrote it.
fn manifest(config: &ServerConfig, strategy: &str, round: usize) -> serde_json::Value {
    serde_json::json!({
        "round": round,
        "strategy": strategy,
        "rounds": config.rounds,
        "local_epochs": config.local_epochs,
        "settings": config.settings,
    })
}

/// The folder of round `round`'s committed checkpoint.
fn round_dir(dir: &Path, round: usize) -> PathBuf {
    dir.join(format!("{ROUND_PREFIX}{round:04}"))
}

/// `Some((round, committed))` for a `round-NNNN` folder (committed) or a
/// `.round-NNNN.partial` one (a commit that never finished).
fn round_number(path: &Path) -> Option<(usize, bool)> {
    if !path.is_dir() {
        return None;
    }
    let name = path.file_name()?.to_str()?;
    if let Some(rest) = name.strip_prefix(ROUND_PREFIX) {
        return rest.parse().ok().map(|r| (r, true));
    }
    let rest = name.strip_prefix('.')?.strip_prefix(ROUND_PREFIX)?;
    rest.strip_suffix(PARTIAL_SUFFIX)?
        .parse()
        .ok()
        .map(|r| (r, false))
}

/// The newest committed round in `dir`, if any.
fn latest_round(dir: &Path) -> Result<Option<(usize, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(FedError::io(dir, e)),
    };
    let mut latest = None;
    for entry in entries {
        let path = entry.map_err(|e| FedError::io(dir, e))?.path();
        if let Some((round, true)) = round_number(&path) {
            if latest.as_ref().is_none_or(|(r, _)| round > *r) {
                latest = Some((round, path));
            }
        }
    }
    Ok(latest)
}

/// Every top-level field (and every field of `settings`) whose value differs, as
/// `name: checkpoint X, now Y`; the round number is not compared.
fn differences(now: &serde_json::Value, stored: &serde_json::Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut compare = |skip: &[&str], a: &serde_json::Value, b: &serde_json::Value| {
        let keys: std::collections::BTreeSet<&String> = a
            .as_object()
            .into_iter()
            .chain(b.as_object())
            .flat_map(|o| o.keys())
            .collect();
        for key in keys {
            if skip.contains(&key.as_str()) {
                continue;
            }
            let (x, y) = (a.get(key), b.get(key));
            if x != y {
                let show = |v: Option<&serde_json::Value>| {
                    v.map_or_else(|| "absent".to_string(), |v| v.to_string())
                };
                out.push(format!("{key}: checkpoint {}, now {}", show(y), show(x)));
            }
        }
    };
    compare(&["round", "settings"], now, stored);
    let null = serde_json::Value::Null;
    let (a, b) = (
        now.get("settings").unwrap_or(&null),
        stored.get("settings").unwrap_or(&null),
    );
    if a.is_object() && b.is_object() {
        compare(&[], a, b);
    } else if a != b {
        out.push(format!("settings: checkpoint {b}, now {a}"));
    }
    // A setting may be both the server's and the caller's (e.g. rounds): say it once.
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|line| seen.insert(line.clone()));
    out
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let bytes = std::fs::read(path).map_err(|e| FedError::io(path, e))?;
    serde_json::from_slice(&bytes)
        .map_err(|e| FedError::Config(format!("{}: malformed: {e}", path.display())))
}

fn write_json<T: Serialize + ?Sized>(path: &Path, value: &T) -> Result<()> {
    let bytes = serde_json::to_vec_pretty(value)
        .map_err(|e| FedError::Config(format!("cannot encode {}: {e}", path.display())))?;
    write_atomically(path, &bytes)?;
    Ok(())
}

/// A client's optimiser state in a round's checkpoint.
fn training_state_path(dir: &Path, client: &str) -> PathBuf {
    dir.join("clients").join(format!("{client}.optimizer"))
}

fn client_state_path(dir: &Path, client: &str) -> PathBuf {
    dir.join("clients").join(format!("{client}.segviz"))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        s / n as f64
    }
}

/// `f` on every item of `group`, each on its own thread; `None` where `f` panicked.
fn in_threads<T: Send, R: Send>(group: &mut [T], f: impl Fn(&mut T) -> R + Sync) -> Vec<Option<R>> {
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = group
            .iter_mut()
            .map(|item| scope.spawn(move || f(item)))
            .collect();
        handles.into_iter().map(|h| h.join().ok()).collect()
    })
}
