//! What crosses between the server and the clients: model state, counts and metrics —
//! never samples.

use std::collections::BTreeMap;

use segviz_core::ModelState;
use serde::{Deserialize, Serialize};

/// What the server tells a client at the start of a round.
#[derive(Debug, Clone, PartialEq)]
pub struct FitInstructions {
    /// Round number, from 1.
    pub round: usize,
    /// Total rounds of the run (for learning-rate schedules).
    pub total_rounds: usize,
    /// The part of the global state this client loads before training: the shared
    /// representation (without BatchNorm under FedBN) and the heads of its own tasks.
    pub state: ModelState,
    /// Local epochs to train.
    pub local_epochs: usize,
    /// Strategy-specific numbers (e.g. `proximal_mu` for FedProx).
    pub config: BTreeMap<String, f64>,
}

/// A client's reply to [`FitInstructions`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClientUpdate {
    /// The client's name.
    pub client: String,
    /// Tasks (organs) the client owns heads for.
    pub tasks: Vec<String>,
    /// Training examples (patches) seen this round: the FedAvg weight.
    pub num_examples: usize,
    /// The client's model state after local training (representation + its own heads).
    pub state: ModelState,
    /// Training metrics (e.g. `loss`).
    pub metrics: BTreeMap<String, f64>,
}

/// A client's evaluation reply: metrics only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateResult {
    /// The client's name.
    pub client: String,
    /// Validation volumes evaluated.
    pub num_examples: usize,
    /// Metrics, e.g. `dice/liver`.
    pub metrics: BTreeMap<String, f64>,
}
