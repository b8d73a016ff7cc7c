//! The partial-label rule on top of a strategy ("+ PL"): every head goes to every client and
//! comes back averaged over all of them; the representation block follows the wrapped
//! strategy. The paper's SegViz rule (heads only from and to their owners) is the plain
//! strategy.

use std::collections::BTreeMap;

use segviz_core::{ModelState, StateTensor, TensorRole};

use super::{average_by, AggregationStrategy, ClientInfo, Weighting};
use crate::error::Result;
use crate::messages::ClientUpdate;
use crate::partial_labels::{
    PartialLabelConfig, KEY_DISTILLATION_TEMPERATURE, KEY_DISTILLATION_THRESHOLD,
    KEY_DISTILLATION_WEIGHT, KEY_EXCLUSION_WEIGHT, KEY_PARTIAL_LABELS,
};

/// A strategy with the partial-label rule. See the module documentation.
pub struct PartialLabels {
    inner: Box<dyn AggregationStrategy>,
    name: String,
    config: PartialLabelConfig,
    rounds: usize,
    weighting: Weighting,
}

impl PartialLabels {
    /// `inner` with the partial-label rule, for a federation of `rounds` rounds (the
    /// distillation weight ramps over them). `weighting` must be the one of `inner`: it
    /// weights the sites within the owners and within the others when
    /// [`PartialLabelConfig::owner_weight`] is set.
    pub fn new(
        inner: Box<dyn AggregationStrategy>,
        config: PartialLabelConfig,
        rounds: usize,
        weighting: Weighting,
    ) -> Self {
        let name = format!("{}_pl", inner.name());
        PartialLabels {
            inner,
            name,
            config,
            rounds,
            weighting,
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
        config.insert(
            KEY_DISTILLATION_THRESHOLD.into(),
            self.config.distillation_threshold,
        );
        config
    }

    fn aggregate_fit(
        &self,
        round: usize,
        global: &ModelState,
        updates: &[ClientUpdate],
    ) -> Result<ModelState> {
        // Heads are averaged over the updates that carry them: here, every update.
        let mut next = self.inner.aggregate_fit(round, global, updates)?;
        if let Some(alpha) = self.config.owner_weight {
            for task in global.tasks() {
                next.merge(owner_weighted_head(
                    round,
                    updates,
                    self.weighting,
                    &task,
                    alpha,
                )?);
            }
        }
        Ok(next)
    }
}

/// The head of `task` as `alpha` × the mean over the updates of its owners plus
/// (1 − `alpha`) × the mean over the other updates carrying it, each mean weighted by
/// `weighting`. Computed as one weighted mean (weights `alpha·w/W_owners` and
/// `(1 − alpha)·w/W_others`), so the Flower server app gets the same bits. Empty when no
/// update carries the head; the plain mean when only owners or only others carry it.
pub(crate) fn owner_weighted_head(
    round: usize,
    updates: &[ClientUpdate],
    weighting: Weighting,
    task: &str,
    alpha: f64,
) -> Result<ModelState> {
    let is_head = |t: &StateTensor| matches!(&t.role, TensorRole::Head(h) if h == task);
    let carries = |u: &ClientUpdate| u.state.tensors.values().any(is_head);
    let owns = |u: &ClientUpdate| u.tasks.iter().any(|t| t == task);
    let total = |owner: bool| -> f64 {
        updates
            .iter()
            .filter(|u| carries(u) && owns(u) == owner)
            .map(|u| weighting.weight(u))
            .filter(|w| *w > 0.0)
            .sum()
    };
    let (owners, others) = (total(true), total(false));
    let weight = |u: &ClientUpdate| {
        let w = weighting.weight(u);
        match (owners > 0.0, others > 0.0) {
            (true, true) if owns(u) => alpha * w / owners,
            (true, true) => (1.0 - alpha) * w / others,
            _ => w,
        }
    };
    average_by(round, updates, weight, |_, t| is_head(t))
}
