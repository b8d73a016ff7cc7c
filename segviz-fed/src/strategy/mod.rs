//! Aggregation strategies, shaped after Flower's server `Strategy`: configure a round for
//! each client, aggregate the replies into the new global state, aggregate evaluations.
//!
//! Every strategy applies the **SegViz task rule** (paper §3): each task head of the global
//! model is taken from the client(s) that own that task — averaged among them when several
//! do — and is sent back only to them. What differs is the representation block:
//! - [`FedAvg`]: every representation tensor is averaged (by examples or uniformly);
//! - [`FedBn`]: the same, except that every BatchNorm tensor (weight, bias, running
//!   statistics) stays local to each client — BatchNorm is recognised by module structure
//!   (see [`segviz_core::state`]);
//! - [`FedProx`]: FedAvg aggregation, and clients add a proximal term `μ/2 · ‖w − w_global‖²`
//!   to their local loss.
//!
//! [`PartialLabels`] wraps any of them with the partial-label rule ("+ PL"): every head is
//! sent to every client and averaged over all of them (see [`crate::partial_labels`]).
//! [`ServerLearningRate`] wraps any of them with a server step size on the representation
//! block (`w ← g + η · (mean − g)`).

mod aggregate;
mod fedavg;
mod fedbn;
mod fedprox;
mod partial_labels;
mod server_rate;

use std::collections::BTreeMap;

use segviz_core::ModelState;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::messages::{ClientUpdate, EvaluateResult};
use crate::partial_labels::PartialLabelConfig;

pub use aggregate::{average, average_by, route_heads};
pub use fedavg::FedAvg;
pub use fedbn::FedBn;
pub use fedprox::FedProx;
pub use partial_labels::PartialLabels;
pub use server_rate::{apply_server_learning_rate, check_server_learning_rate, ServerLearningRate};

/// How client contributions are weighted in an average.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weighting {
    /// By the number of training examples of each client (FedAvg's rule).
    #[default]
    Examples,
    /// Every client counts the same (the authors' notebooks).
    Uniform,
}

impl Weighting {
    /// The weight of `update` in every mean: its examples, or 1.
    pub fn weight(self, update: &ClientUpdate) -> f64 {
        match self {
            Weighting::Examples => update.num_examples as f64,
            Weighting::Uniform => 1.0,
        }
    }
}

/// What the server knows about a client: its name and its tasks. Never its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's name.
    pub name: String,
    /// The tasks it owns.
    pub tasks: Vec<String>,
}

/// A federated aggregation strategy. See the module documentation.
pub trait AggregationStrategy: Send + Sync {
    /// A short name for logs and results (e.g. `"fedbn"`).
    fn name(&self) -> &str;

    /// The part of `global` that `client` loads at the start of `round` (1-based).
    fn configure_fit(&self, round: usize, global: &ModelState, client: &ClientInfo) -> ModelState;

    /// Strategy-specific numbers sent with every fit instruction.
    fn fit_config(&self, _round: usize) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }

    /// The new global state from the replies of the clients that finished the round.
    /// Tensors no reply carries keep their value from `global`.
    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState>;

    /// Summary metrics from the clients' evaluation replies: each metric's mean weighted by
    /// the number of evaluated examples.
    fn aggregate_evaluate(
        &self,
        _round: usize,
        results: &[EvaluateResult],
    ) -> BTreeMap<String, f64> {
        let mut sums: BTreeMap<String, (f64, f64)> = BTreeMap::new();
        for r in results {
            let w = r.num_examples.max(1) as f64;
            for (k, v) in &r.metrics {
                if v.is_finite() {
                    let e = sums.entry(k.clone()).or_insert((0.0, 0.0));
                    e.0 += w * v;
                    e.1 += w;
                }
            }
        }
        sums.into_iter().map(|(k, (s, w))| (k, s / w)).collect()
    }
}

/// The strategy named on a command line: `fedavg`, `fedbn` or `fedprox`, or one of them with
/// `_pl` appended for the partial-label rule with `partial_labels` over `rounds` rounds.
pub fn strategy_by_name(
    name: &str,
    weighting: Weighting,
    proximal_mu: f64,
    partial_labels: PartialLabelConfig,
    rounds: usize,
) -> Option<Box<dyn AggregationStrategy>> {
    if let Some(inner) = name.strip_suffix("_pl") {
        if inner.ends_with("_pl") {
            return None;
        }
        let inner = strategy_by_name(inner, weighting, proximal_mu, partial_labels, rounds)?;
        return Some(Box::new(PartialLabels::new(
            inner,
            partial_labels,
            rounds,
            weighting,
        )));
    }
    match name {
        "fedavg" => Some(Box::new(FedAvg { weighting })),
        "fedbn" => Some(Box::new(FedBn { weighting })),
        "fedprox" => Some(Box::new(FedProx {
            weighting,
            mu: proximal_mu,
        })),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
