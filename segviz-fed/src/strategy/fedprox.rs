//! FedProx (Li et al. 2020): FedAvg aggregation with a proximal term in local training.

use std::collections::BTreeMap;

use segviz_core::ModelState;

use super::aggregate::{aggregate_with, client_view};
use super::{AggregationStrategy, ClientInfo, Weighting};
use crate::error::Result;
use crate::messages::ClientUpdate;

/// FedProx: aggregation as FedAvg; every fit instruction carries `proximal_mu`, and clients
/// add `μ/2 · ‖w − w_global‖²` over the shared representation to their loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FedProx {
    /// How clients are weighted.
    pub weighting: Weighting,
    /// Strength μ of the proximal term.
    pub mu: f64,
}

impl AggregationStrategy for FedProx {
    fn name(&self) -> &str {
        "fedprox"
    }

    fn configure_fit(&self, _round: usize, global: &ModelState, client: &ClientInfo) -> ModelState {
        client_view(global, &client.tasks, |_| true)
    }

    fn fit_config(&self, _round: usize) -> BTreeMap<String, f64> {
        BTreeMap::from([("proximal_mu".to_string(), self.mu)])
    }

    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState> {
        aggregate_with(round, global, updates, self.weighting, |_| true)
    }
}
