//! A server learning rate on the representation block: the server step of FedOpt (Reddi et
//! al., "Adaptive federated optimization", 2021) with plain SGD.
//!
//! The wrapped strategy aggregates as usual; then every trainable, non-BatchNorm tensor of
//! the representation block moves from the round's global value `g` along the averaged
//! client update by a factor `η`:
//!
//! ```text
//! w ← g + η · (mean − g)
//! ```
//!
//! `η = 1` is the wrapped strategy itself (FedAvg's rule). With sites that each annotate a
//! different organ, the mean of their updates holds each organ's share of the shared block
//! about `1/K` times (`K` sites); `η > 1` gives it back. Heads and BatchNorm tensors are
//! left as the wrapped strategy made them. The mean is the wrapped strategy's, already
//! rounded to f32; the step is computed in f64 and rounded once, as the Flower server app
//! does (`flower/segviz_flower/aggregate.py`), so both give the same bits.

use std::collections::BTreeMap;

use segviz_core::{ModelState, StateTensor, TensorRole};

use super::{AggregationStrategy, ClientInfo};
use crate::error::{FedError, Result};
use crate::messages::ClientUpdate;

/// A strategy whose representation step is scaled by a server learning rate. See the
/// module documentation.
pub struct ServerLearningRate {
    inner: Box<dyn AggregationStrategy>,
    rate: f64,
}

impl ServerLearningRate {
    /// `inner` with the server learning rate `rate` (finite and positive).
    ///
    /// # Errors
    /// A rate that is not a finite positive number.
    pub fn new(inner: Box<dyn AggregationStrategy>, rate: f64) -> Result<Self> {
        check_server_learning_rate(rate)?;
        Ok(ServerLearningRate { inner, rate })
    }

    /// `inner` itself when `rate` is 1, otherwise `inner` wrapped with it.
    ///
    /// # Errors
    /// A rate that is not a finite positive number.
    pub fn wrap(
        inner: Box<dyn AggregationStrategy>,
        rate: f64,
    ) -> Result<Box<dyn AggregationStrategy>> {
        if rate == 1.0 {
            return Ok(inner);
        }
        Ok(Box::new(Self::new(inner, rate)?))
    }
}

/// Refuses a server learning rate that is not a finite positive number.
pub fn check_server_learning_rate(rate: f64) -> Result<()> {
    if rate.is_finite() && rate > 0.0 {
        Ok(())
    } else {
        Err(FedError::Config(format!(
            "the server learning rate must be a finite positive number, not {rate}"
        )))
    }
}

/// Whether the server learning rate moves `t`: trainable representation tensors outside
/// BatchNorm.
fn stepped(t: &StateTensor) -> bool {
    t.role == TensorRole::Representation && t.trainable && !t.batch_norm
}

/// `next ← global + rate · (next − global)` on the tensors [`stepped`] accepts, in f64 with
/// one rounding to f32. A tensor missing from `global`, or of another length, is left alone.
pub fn apply_server_learning_rate(global: &ModelState, next: &mut ModelState, rate: f64) {
    for (path, t) in next.tensors.iter_mut() {
        if !stepped(t) {
            continue;
        }
        let Some(g) = global.tensors.get(path) else {
            continue;
        };
        if g.data.len() != t.data.len() {
            continue;
        }
        for (m, &g) in t.data.iter_mut().zip(&g.data) {
            let g = f64::from(g);
            *m = (g + rate * (f64::from(*m) - g)) as f32;
        }
    }
}

impl AggregationStrategy for ServerLearningRate {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn configure_fit(&self, round: usize, global: &ModelState, client: &ClientInfo) -> ModelState {
        self.inner.configure_fit(round, global, client)
    }

    fn fit_config(&self, round: usize) -> BTreeMap<String, f64> {
        self.inner.fit_config(round)
    }

    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState> {
        let mut next = self.inner.aggregate_fit(round, global, updates)?;
        apply_server_learning_rate(global, &mut next, self.rate);
        Ok(next)
    }
}
