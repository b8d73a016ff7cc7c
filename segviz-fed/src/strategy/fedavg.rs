//! FedAvg over the representation block (McMahan et al. 2017) with SegViz head routing.

use segviz_core::ModelState;

use super::aggregate::{aggregate_with, client_view};
use super::{AggregationStrategy, ClientInfo, Weighting};
use crate::error::Result;
use crate::messages::ClientUpdate;

/// FedAvg: every representation tensor, BatchNorm included, is averaged.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FedAvg {
    /// How clients are weighted.
    pub weighting: Weighting,
}

impl AggregationStrategy for FedAvg {
    fn name(&self) -> &str {
        "fedavg"
    }

    fn configure_fit(&self, _round: usize, global: &ModelState, client: &ClientInfo) -> ModelState {
        client_view(global, &client.tasks, |_| true)
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
