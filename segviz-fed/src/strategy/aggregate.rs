//! The arithmetic shared by the strategies: weighted means of tensors and the SegViz
//! task-head rule.

use std::collections::BTreeMap;

use segviz_core::{ModelState, StateTensor, TensorRole};

use super::Weighting;
use crate::error::{FedError, Result};
use crate::messages::ClientUpdate;

/// Weighted mean, over the updates that carry it, of every tensor that `select` accepts.
///
/// Returns the averaged tensors only. Updates disagreeing on a tensor's shape are an error.
pub fn average(
    round: usize,
    updates: &[ClientUpdate],
    weighting: Weighting,
    select: impl Fn(&str, &StateTensor) -> bool,
) -> Result<ModelState> {
    average_by(round, updates, |u| weighting.weight(u), select)
}

/// Like [`average`], with the weight of each update given by `weight` (an update whose
/// weight is not positive contributes nothing).
pub fn average_by(
    round: usize,
    updates: &[ClientUpdate],
    weight: impl Fn(&ClientUpdate) -> f64,
    select: impl Fn(&str, &StateTensor) -> bool,
) -> Result<ModelState> {
    // Sums in f64 and rounds once to f32 at the end, so the only rounding error is that
    // last one; the Flower server app (flower/) does the same and gets the same bits.
    let mut sums: BTreeMap<String, (Vec<f64>, f64)> = BTreeMap::new();
    let mut out = ModelState::default();
    for u in updates {
        let w = weight(u);
        if w.is_nan() || w <= 0.0 {
            continue;
        }
        for (path, t) in &u.state.tensors {
            if !select(path, t) {
                continue;
            }
            let template = out
                .tensors
                .entry(path.clone())
                .or_insert_with(|| StateTensor {
                    shape: t.shape.clone(),
                    data: Vec::new(),
                    role: t.role.clone(),
                    batch_norm: t.batch_norm,
                    trainable: t.trainable,
                });
            let (acc, total) = sums
                .entry(path.clone())
                .or_insert_with(|| (vec![0.0; t.data.len()], 0.0));
            if template.shape != t.shape || acc.len() != t.data.len() {
                return Err(FedError::Round {
                    round,
                    reason: format!(
                        "client {} sent {path} with shape {:?}, others {:?}",
                        u.client, t.shape, template.shape
                    ),
                });
            }
            for (a, v) in acc.iter_mut().zip(&t.data) {
                *a += w * f64::from(*v);
            }
            *total += w;
        }
    }
    for (path, t) in out.tensors.iter_mut() {
        if let Some((acc, total)) = sums.remove(path) {
            t.data = acc.into_iter().map(|v| (v / total) as f32).collect();
        }
    }
    Ok(out)
}

/// The SegViz task rule: each head's tensors, averaged over the clients that own the task.
pub fn route_heads(
    round: usize,
    updates: &[ClientUpdate],
    weighting: Weighting,
) -> Result<ModelState> {
    average(round, updates, weighting, |_, t| {
        matches!(t.role, TensorRole::Head(_))
    })
}

/// The common shape of every strategy's `aggregate_fit`: representation tensors chosen by
/// `shared` are averaged, heads are routed, everything else keeps the global value.
pub(crate) fn aggregate_with(
    round: usize,
    global: &ModelState,
    updates: &[ClientUpdate],
    weighting: Weighting,
    shared: impl Fn(&StateTensor) -> bool,
) -> Result<ModelState> {
    if updates.is_empty() {
        return Err(FedError::Round {
            round,
            reason: "no client finished the round".into(),
        });
    }
    let mut next = global.clone();
    next.merge(average(round, updates, weighting, |_, t| {
        t.role == TensorRole::Representation && shared(t)
    })?);
    next.merge(route_heads(round, updates, weighting)?);
    Ok(next)
}

/// The representation tensors chosen by `shared` plus the heads of the client's tasks.
pub(crate) fn client_view(
    global: &ModelState,
    tasks: &[String],
    shared: impl Fn(&StateTensor) -> bool,
) -> ModelState {
    global.filter(|_, t| match &t.role {
        TensorRole::Representation => shared(t),
        TensorRole::Head(task) => tasks.contains(task),
    })
}
