//! The partial-label rule on top of a strategy ("+ PL"): every head goes to every client and
//! comes back averaged over all of them; the representation block follows the wrapped
//! strategy. The paper's SegViz rule (heads only from and to their owners) is the plain
//! strategy.

use std::collections::BTreeMap;

use segviz_core::ModelState;

use super::{AggregationStrategy, ClientInfo};
use crate::error::Result;
use crate::messages::ClientUpdate;
use crate::partial_labels::{
    PartialLabelConfig, KEY_DISTILLATION_TEMPERATURE, KEY_DISTILLATION_WEIGHT,
    KEY_EXCLUSION_WEIGHT, KEY_PARTIAL_LABELS,
};

/// A strategy with the partial-label rule. See the module documentation.
pub struct PartialLabels {
    inner: Box<dyn AggregationStrategy>,
    name: String,
    config: PartialLabelConfig,
    rounds: usize,
}

impl PartialLabels {
    /// `inner` with the partial-label rule, for a federation of `rounds` rounds (the
    /// distillation weight ramps over them).
    pub fn new(
        inner: Box<dyn AggregationStrategy>,
        config: PartialLabelConfig,
        rounds: usize,
    ) -> Self {
        let name = format!("{}_pl", inner.name());
        PartialLabels {
            inner,
            name,
            config,
            rounds,
        }
    }
}

impl PartialLabels {
    /// The same under another name (for an ablation's own checkpoints and logs).
    pub fn named(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }
}

impl AggregationStrategy for PartialLabels {
    fn name(&self) -> &str {
        &self.name
    }

    fn configure_fit(&self, round: usize, global: &ModelState, client: &ClientInfo) -> ModelState {
        let every_head = ClientInfo {
            name: client.name.clone(),
            tasks: global.tasks(),
        };
        self.inner.configure_fit(round, global, &every_head)
    }

    fn fit_config(&self, round: usize) -> BTreeMap<String, f64> {
        let mut config = self.inner.fit_config(round);
        config.insert(KEY_PARTIAL_LABELS.into(), 1.0);
        config.insert(KEY_EXCLUSION_WEIGHT.into(), self.config.exclusion_weight);
        config.insert(
            KEY_DISTILLATION_WEIGHT.into(),
            self.config.distillation_weight_at(round, self.rounds),
        );
        config.insert(KEY_DISTILLATION_TEMPERATURE.into(), self.config.temperature);
        config
    }

    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState> {
        // Heads are averaged over the updates that carry them: here, every update.
        self.inner.aggregate_fit(round, global, updates)
    }
}
