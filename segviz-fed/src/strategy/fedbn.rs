//! FedBN (Li et al. 2021): BatchNorm stays local, everything else is averaged.

use segviz_core::ModelState;

use super::aggregate::{aggregate_with, average, client_view};
use super::{AggregationStrategy, ClientInfo, Weighting};
use crate::error::Result;
use crate::messages::ClientUpdate;

/// FedBN: like [`super::FedAvg`], but no BatchNorm tensor of the representation block is
/// ever sent to a client after the first round; each client keeps its own normalisation.
///
/// The global model still needs BatchNorm values to be usable on its own (e.g. on an
/// external test site): it holds the mean of the clients' BatchNorm tensors, which no client
/// ever loads. Per-site evaluation should use each site's own model.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FedBn {
    /// How clients are weighted.
    pub weighting: Weighting,
}

impl AggregationStrategy for FedBn {
    fn name(&self) -> &str {
        "fedbn"
    }

    fn configure_fit(&self, round: usize, global: &ModelState, client: &ClientInfo) -> ModelState {
        // Round 1 starts every client from the same initial model, BatchNorm included.
        client_view(global, &client.tasks, |t| round == 1 || !t.batch_norm)
    }

    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState> {
        let mut next = aggregate_with(round, global, updates, self.weighting, |t| !t.batch_norm)?;
        // The global copy of BatchNorm: a summary for stand-alone use, never sent back.
        next.merge(average(round, updates, self.weighting, |_, t| {
            t.batch_norm && t.role == segviz_core::TensorRole::Representation
        })?);
        Ok(next)
    }
}
