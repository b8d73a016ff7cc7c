//! The methods of the comparison, their names and labels, and the federation behind each.

use serde::{Deserialize, Serialize};

use crate::error::{FedError, Result};
use crate::strategy::{strategy_by_name, AggregationStrategy, PartialLabels, ServerLearningRate};

use super::ExperimentConfig;

/// A method of the comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// One model per organ, trained on its own site.
    Baseline,
    /// One multi-class model on all sites pooled, unannotated organs as background.
    Central,
    /// The same with the marginal (partial-label) loss.
    CentralMarginal,
    /// SegViz with FedAvg.
    Fedavg,
    /// FedAvg then local fine-tuning of the heads.
    FedavgFt,
    /// SegViz with FedBN.
    Fedbn,
    /// FedBN then local fine-tuning.
    FedbnFt,
    /// SegViz with FedProx.
    Fedprox,
    /// FedProx then local fine-tuning.
    FedproxFt,
    /// FedAvg with the partial-label rule (every site trains and averages every head).
    FedavgPl,
    /// FedAvg + PL then local fine-tuning.
    FedavgPlFt,
    /// FedBN with the partial-label rule.
    FedbnPl,
    /// FedBN + PL then local fine-tuning.
    FedbnPlFt,
    /// Ablation: FedBN + PL without the distillation term.
    FedbnPlNoDistillation,
    /// Ablation: FedBN + PL without the exclusion term.
    FedbnPlNoExclusion,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 15] = [
        Method::Baseline,
        Method::Central,
        Method::CentralMarginal,
        Method::Fedavg,
        Method::FedavgFt,
        Method::Fedbn,
        Method::FedbnFt,
        Method::Fedprox,
        Method::FedproxFt,
        Method::FedavgPl,
        Method::FedavgPlFt,
        Method::FedbnPl,
        Method::FedbnPlFt,
        Method::FedbnPlNoDistillation,
        Method::FedbnPlNoExclusion,
    ];

    /// What runs without `--methods` (within 15 minutes on 2 cores in the quick preset):
    /// the baselines, the paper's FedBN + FT and FedBN + PL + FT.
    pub const DEFAULT: [Method; 3] = [Method::Baseline, Method::FedbnFt, Method::FedbnPlFt];

    /// Command-line / file name.
    pub fn name(self) -> &'static str {
        match self {
            Method::Baseline => "baseline",
            Method::Central => "central",
            Method::CentralMarginal => "central_marginal",
            Method::Fedavg => "fedavg",
            Method::FedavgFt => "fedavg_ft",
            Method::Fedbn => "fedbn",
            Method::FedbnFt => "fedbn_ft",
            Method::Fedprox => "fedprox",
            Method::FedproxFt => "fedprox_ft",
            Method::FedavgPl => "fedavg_pl",
            Method::FedavgPlFt => "fedavg_pl_ft",
            Method::FedbnPl => "fedbn_pl",
            Method::FedbnPlFt => "fedbn_pl_ft",
            Method::FedbnPlNoDistillation => "fedbn_pl_no_distillation",
            Method::FedbnPlNoExclusion => "fedbn_pl_no_exclusion",
        }
    }

    /// Row label in the tables; "+ PL" marks the partial-label rule, the others follow the
    /// paper's SegViz rule (heads from their owners).
    pub fn label(self) -> &'static str {
        match self {
            Method::Baseline => "Baseline (per organ)",
            Method::Central => "Central agg.",
            Method::CentralMarginal => "Central + marginal loss",
            Method::Fedavg => "FedAvg",
            Method::FedavgFt => "FedAvg + FT",
            Method::Fedbn => "FedBN",
            Method::FedbnFt => "FedBN + FT",
            Method::Fedprox => "FedProx",
            Method::FedproxFt => "FedProx + FT",
            Method::FedavgPl => "FedAvg + PL",
            Method::FedavgPlFt => "FedAvg + PL + FT",
            Method::FedbnPl => "FedBN + PL",
            Method::FedbnPlFt => "FedBN + PL + FT",
            Method::FedbnPlNoDistillation => "FedBN + PL − distillation",
            Method::FedbnPlNoExclusion => "FedBN + PL − exclusion",
        }
    }

    /// Parses a name from [`Method::name`].
    pub fn from_name(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The federation behind a federated method (its checkpoint folder): a method and its
    /// fine-tuned variant share one.
    pub fn federation(self) -> Option<&'static str> {
        match self {
            Method::Fedavg | Method::FedavgFt => Some("fedavg"),
            Method::Fedbn | Method::FedbnFt => Some("fedbn"),
            Method::Fedprox | Method::FedproxFt => Some("fedprox"),
            Method::FedavgPl | Method::FedavgPlFt => Some("fedavg_pl"),
            Method::FedbnPl | Method::FedbnPlFt => Some("fedbn_pl"),
            Method::FedbnPlNoDistillation => Some("fedbn_pl_no_distillation"),
            Method::FedbnPlNoExclusion => Some("fedbn_pl_no_exclusion"),
            _ => None,
        }
    }

    /// Whether the method's sites keep their own BatchNorm (FedBN and its variants), and so
    /// re-estimate it for the final averaged weights after federation.
    pub fn local_batch_norm(self) -> bool {
        matches!(
            self,
            Method::Fedbn
                | Method::FedbnFt
                | Method::FedbnPl
                | Method::FedbnPlFt
                | Method::FedbnPlNoDistillation
                | Method::FedbnPlNoExclusion
        )
    }

    /// Whether the method fine-tunes after federation.
    pub fn fine_tuned(self) -> bool {
        matches!(
            self,
            Method::FedavgFt
                | Method::FedbnFt
                | Method::FedproxFt
                | Method::FedavgPlFt
                | Method::FedbnPlFt
        )
    }
}

/// The strategy of a federation named by [`Method::federation`].
pub(super) fn federation_strategy(
    federation: &str,
    config: &ExperimentConfig,
) -> Result<Box<dyn AggregationStrategy>> {
    let unknown = || FedError::Config(format!("unknown federation {federation}"));
    let mut pl = config.partial_labels;
    let ablation = match federation {
        "fedbn_pl_no_distillation" => {
            pl.distillation_weight = 0.0;
            true
        }
        "fedbn_pl_no_exclusion" => {
            pl.exclusion_weight = 0.0;
            true
        }
        _ => false,
    };
    let strategy: Box<dyn AggregationStrategy> = if ablation {
        let inner = strategy_by_name(
            "fedbn",
            config.weighting,
            config.proximal_mu,
            pl,
            config.rounds,
        )
        .ok_or_else(unknown)?;
        Box::new(PartialLabels::new(inner, pl, config.rounds, config.weighting).named(federation))
    } else {
        strategy_by_name(
            federation,
            config.weighting,
            config.proximal_mu,
            pl,
            config.rounds,
        )
        .ok_or_else(unknown)?
    };
    ServerLearningRate::wrap(strategy, config.server_learning_rate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_the_fedbn_federations_keep_local_batch_norm() {
        for m in Method::ALL {
            let fedbn = m
                .federation()
                .is_some_and(|f| f == "fedbn" || f.starts_with("fedbn_"));
            assert_eq!(m.local_batch_norm(), fedbn, "{}", m.name());
        }
    }
}
