//! The client side of a federation, as the server sees it.
//!
//! The server holds clients only through [`FederatedClient`]: it can hand them model state
//! and read back model state, counts and metrics. The trait has no method that yields a
//! sample, so server code cannot reach a client's data.

use std::time::Instant;

use segviz_core::ModelState;

use crate::error::Result;
use crate::messages::{ClientUpdate, EvaluateResult, FitInstructions};
use crate::strategy::ClientInfo;

/// A federation participant. See the module documentation.
pub trait FederatedClient: Send {
    /// Name and tasks.
    fn info(&self) -> ClientInfo;

    /// Loads `instructions.state` into the local model, trains for the given local epochs
    /// and replies with the new local state. Must give up with an error once `deadline`
    /// has passed.
    fn fit(
        &mut self,
        instructions: &FitInstructions,
        deadline: Option<Instant>,
    ) -> Result<ClientUpdate>;

    /// Loads `state` (the client's view of the global model) and evaluates it on the
    /// client's validation split; replies with metrics only.
    fn evaluate(&mut self, round: usize, state: &ModelState) -> Result<EvaluateResult>;

    /// The client's full local model state (what it keeps between rounds, e.g. its own
    /// BatchNorm under FedBN), for checkpoints.
    fn local_state(&self) -> ModelState;

    /// Restores a state returned by [`FederatedClient::local_state`] (on resume).
    fn restore_local_state(&mut self, state: &ModelState) -> Result<()>;

    /// What local training carries from round to round besides the model (an optimiser's
    /// state), as bytes for checkpoints; `None` when there is nothing.
    fn training_state(&self) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Restores bytes returned by [`FederatedClient::training_state`] (on resume).
    fn restore_training_state(&mut self, _bytes: &[u8]) -> Result<()> {
        Ok(())
    }
}

impl<T: FederatedClient + ?Sized> FederatedClient for Box<T> {
    fn info(&self) -> ClientInfo {
        (**self).info()
    }

    fn fit(
        &mut self,
        instructions: &FitInstructions,
        deadline: Option<Instant>,
    ) -> Result<ClientUpdate> {
        (**self).fit(instructions, deadline)
    }

    fn evaluate(&mut self, round: usize, state: &ModelState) -> Result<EvaluateResult> {
        (**self).evaluate(round, state)
    }

    fn local_state(&self) -> ModelState {
        (**self).local_state()
    }

    fn restore_local_state(&mut self, state: &ModelState) -> Result<()> {
        (**self).restore_local_state(state)
    }

    fn training_state(&self) -> Result<Option<Vec<u8>>> {
        (**self).training_state()
    }

    fn restore_training_state(&mut self, bytes: &[u8]) -> Result<()> {
        (**self).restore_training_state(bytes)
    }
}
