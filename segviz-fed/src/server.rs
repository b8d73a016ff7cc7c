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
    pub checkpoint_dir: Option<PathBuf>,
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
    /// every client's local state from it; returns the last finished round (0 if none).
    pub fn resume<C: FederatedClient>(
        &mut self,
        clients: &mut [C],
        mut on_event: impl FnMut(ServerEvent<'_>),
    ) -> Result<usize> {
        let Some(dir) = self.config.checkpoint_dir.clone() else {
            return Ok(0);
        };
        let global_path = dir.join(GLOBAL_FILE);
        if !global_path.exists() {
            return Ok(0);
        }
        let checkpoint = read_checkpoint(&global_path)?;
        let round = checkpoint.metadata["round"].as_u64().unwrap_or(0) as usize;
        if checkpoint.config != self.model_config {
            return Err(FedError::Config(format!(
                "{} was written for another model configuration; use another --out folder",
                global_path.display()
            )));
        }
        let history_path = dir.join(HISTORY_FILE);
        let history: Vec<RoundReport> = match std::fs::read(&history_path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                FedError::Config(format!(
                    "{}: malformed history: {e}",
                    history_path.display()
                ))
            })?,
            Err(e) => return Err(FedError::io(history_path, e)),
        };
        for client in clients.iter_mut() {
            let name = client.info().name;
            let path = client_state_path(&dir, &name);
            let local = read_checkpoint(&path)?;
            client.restore_local_state(&local.state)?;
        }
        self.global = checkpoint.state;
        self.history = history.into_iter().take(round).collect();
        on_event(ServerEvent::Resumed { round });
        Ok(round)
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
            let outcomes: Vec<(String, Result<ClientUpdate>, Instant)> =
                std::thread::scope(|scope| {
                    let handles: Vec<_> = group
                        .iter_mut()
                        .map(|(client, instr)| {
                            let name = client.info().name;
                            let handle = scope.spawn(move || {
                                let outcome = client.fit(instr, deadline);
                                (outcome, Instant::now())
                            });
                            (name, handle)
                        })
                        .collect();
                    handles
                        .into_iter()
                        .map(|(name, h)| match h.join() {
                            Ok((outcome, at)) => (name, outcome, at),
                            Err(_) => {
                                let e = FedError::client(&name, "local training panicked");
                                (name, Err(e), Instant::now())
                            }
                        })
                        .collect()
                });
            for (name, outcome, _) in &outcomes {
                on_event(ServerEvent::ClientDone {
                    client: name,
                    ok: outcome.is_ok(),
                });
            }
            results.extend(outcomes);
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

        // Every client evaluates its view of the new global model on its validation split.
        let mut evaluations: Vec<EvaluateResult> = Vec::new();
        for client in clients.iter_mut() {
            let info = client.info();
            let view = self.strategy.configure_fit(round + 1, &self.global, &info);
            match client.evaluate(round, &view) {
                Ok(r) => evaluations.push(r),
                Err(e) => failed.push((info.name, format!("evaluation failed: {e}"))),
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

    /// Writes the global model, each client's local state and the history.
    fn checkpoint<C: FederatedClient>(&self, round: usize, clients: &[C]) -> Result<()> {
        let Some(dir) = &self.config.checkpoint_dir else {
            return Ok(());
        };
        for client in clients {
            let name = client.info().name;
            write_checkpoint(
                &client_state_path(dir, &name),
                &Checkpoint {
                    config: self.model_config.clone(),
                    state: client.local_state(),
                    metadata: serde_json::json!({ "round": round, "client": name }),
                },
            )?;
        }
        let history = serde_json::to_vec_pretty(&self.history)
            .map_err(|e| FedError::Config(format!("cannot encode history: {e}")))?;
        write_atomically(&dir.join(HISTORY_FILE), &history)?;
        // The global model last: its round number marks the checkpoint as complete.
        write_checkpoint(
            &dir.join(GLOBAL_FILE),
            &Checkpoint {
                config: self.model_config.clone(),
                state: self.global.clone(),
                metadata: serde_json::json!({
                    "round": round,
                    "strategy": self.strategy.name(),
                }),
            },
        )?;
        Ok(())
    }
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
