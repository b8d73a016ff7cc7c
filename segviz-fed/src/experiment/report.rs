//! Results tables: per-organ cells with confidence intervals, paired tests against the
//! baselines and FedBN + FT with Holm's correction, pooling over seeds, Markdown.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{ExperimentResults, Method, MethodResult};
use crate::error::{FedError, Result};
use crate::evaluate::VolumeScore;
use crate::stats::{holm_adjust, mean_ci95, paired_t_test, PairedTTest};

/// One cell of a results table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cell {
    /// Mean Dice.
    pub mean: f64,
    /// Sample standard deviation.
    pub sd: f64,
    /// Volumes.
    pub n: usize,
    /// Mean HD95 (mm) of the fused map over volumes where it is defined, the empty-mask
    /// penalty included (see [`crate::evaluate::hd95_penalty`]).
    pub hd95: Option<f64>,
    /// Volumes whose HD95 is the empty-mask penalty (organ predicted but absent, or
    /// present but not predicted).
    #[serde(default)]
    pub hd95_penalised: usize,
    /// Mean Dice of each head's own mask, before fusion (secondary).
    #[serde(default)]
    pub head_dice: Option<f64>,
    /// The 95 % confidence interval of the mean Dice (Student's t over the volumes).
    #[serde(default)]
    pub ci95: Option<(f64, f64)>,
    /// Paired t-test against the baseline on the same volumes.
    pub vs_baseline: Option<PairedTTest>,
    /// Its p-value after Holm's correction over every test of the table (all methods,
    /// organs and both comparisons); the `*` of the printed tables uses this one.
    #[serde(default)]
    pub p_holm: Option<f64>,
    /// Paired t-test against FedBN + FT (the paper's SegViz) on the same volumes.
    #[serde(default)]
    pub vs_fedbn_ft: Option<PairedTTest>,
    /// Its Holm-corrected p-value (same family as [`Cell::p_holm`]); the `†` of the tables.
    #[serde(default)]
    pub p_holm_fedbn_ft: Option<f64>,
}

/// A results table: method → organ → cell.
pub type Table = BTreeMap<Method, BTreeMap<String, Cell>>;

/// Builds a table from per-volume scores, with t-tests against the baseline on the same
/// volumes.
pub(super) fn make_table(
    results: &[MethodResult],
    organs: &[String],
    scores: impl Fn(&MethodResult) -> &Vec<VolumeScore>,
) -> Table {
    let values = |r: &MethodResult, organ: &str| -> Vec<(String, f64, Option<f64>)> {
        scores(r)
            .iter()
            .filter_map(|s| {
                s.dice.get(organ).map(|d| {
                    (
                        format!("{}/{}", s.site, s.case),
                        *d,
                        s.hd95.get(organ).copied().flatten(),
                    )
                })
            })
            .collect()
    };
    let head_dice = |r: &MethodResult, organ: &str| -> Option<f64> {
        let d: Vec<f64> = scores(r)
            .iter()
            .filter_map(|s| s.head_dice.get(organ).copied())
            .collect();
        (!d.is_empty()).then(|| d.iter().sum::<f64>() / d.len() as f64)
    };
    let penalised = |r: &MethodResult, organ: &str| -> usize {
        scores(r)
            .iter()
            .filter(|s| s.hd95_penalised.iter().any(|o| o == organ))
            .count()
    };
    let reference = |method: Method| results.iter().find(|r| r.method == method);
    let test_against = |r: &MethodResult, other: Option<&MethodResult>, organ: &str| {
        let other = other.filter(|o| o.method != r.method)?;
        let theirs: BTreeMap<String, f64> = values(other, organ)
            .into_iter()
            .map(|x| (x.0, x.1))
            .collect();
        let (a, b): (Vec<f64>, Vec<f64>) = values(r, organ)
            .iter()
            .filter_map(|x| theirs.get(&x.0).map(|t| (x.1, *t)))
            .unzip();
        paired_t_test(&a, &b)
    };
    let mut table = Table::new();
    for r in results {
        let mut row = BTreeMap::new();
        for organ in organs {
            let v = values(r, organ);
            if v.is_empty() {
                continue;
            }
            let dice: Vec<f64> = v.iter().map(|x| x.1).collect();
            let (mean, sd) = segviz_core::metrics::mean_sd(&dice);
            let hds: Vec<f64> = v.iter().filter_map(|x| x.2).collect();
            let hd95 = (!hds.is_empty()).then(|| hds.iter().sum::<f64>() / hds.len() as f64);
            row.insert(
                organ.clone(),
                Cell {
                    mean,
                    sd,
                    n: dice.len(),
                    hd95,
                    hd95_penalised: penalised(r, organ),
                    head_dice: head_dice(r, organ),
                    ci95: mean_ci95(&dice),
                    vs_baseline: test_against(r, reference(Method::Baseline), organ),
                    p_holm: None,
                    vs_fedbn_ft: test_against(r, reference(Method::FedbnFt), organ),
                    p_holm_fedbn_ft: None,
                },
            );
        }
        table.insert(r.method, row);
    }
    // One family: every test of the table, against either reference.
    let mut cells: Vec<&mut Cell> = table
        .values_mut()
        .flat_map(|row| row.values_mut())
        .collect();
    let mut tested: Vec<(usize, bool, f64)> = Vec::new();
    for (i, c) in cells.iter().enumerate() {
        if let Some(t) = c.vs_baseline {
            tested.push((i, false, t.p_value));
        }
        if let Some(t) = c.vs_fedbn_ft {
            tested.push((i, true, t.p_value));
        }
    }
    let adjusted = holm_adjust(&tested.iter().map(|x| x.2).collect::<Vec<_>>());
    for ((i, against_fedbn_ft, _), p) in tested.into_iter().zip(adjusted) {
        if against_fedbn_ft {
            cells[i].p_holm_fedbn_ft = Some(p);
        } else {
            cells[i].p_holm = Some(p);
        }
    }
    table
}

/// The comparison over several seeds: each seed's run (phantoms, splits, initial weights
/// and sampling all drawn from it) and the tables over every (seed, volume) pair.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedSummary {
    /// The seeds, in run order.
    pub seeds: Vec<u64>,
    /// Organs, in label order.
    pub organs: Vec<String>,
    /// Table 1 over all seeds.
    pub table_validation: Table,
    /// Table 2 over all seeds.
    pub table_test: Table,
    /// Every seed's full results (per-volume figures included).
    pub runs: Vec<ExperimentResults>,
}

/// Pools the runs of several seeds: a volume of seed `s` counts as its own observation
/// (`seed-s/site/case`), and tests pair each method with the references on the same
/// (seed, volume).
///
/// # Errors
/// When no run is given or the runs disagree on their methods or organs.
pub fn combine_seeds(runs: Vec<ExperimentResults>) -> Result<SeedSummary> {
    let first = runs
        .first()
        .ok_or_else(|| FedError::Config("no run to combine".into()))?;
    let organs = first.organs.clone();
    let methods: Vec<Method> = first.methods.iter().map(|m| m.method).collect();
    let mut pooled: Vec<MethodResult> = Vec::new();
    for run in &runs {
        let these: Vec<Method> = run.methods.iter().map(|m| m.method).collect();
        if these != methods || run.organs != organs {
            return Err(FedError::Config(format!(
                "seed {} ran other methods or organs than seed {}",
                run.config.seed, first.config.seed
            )));
        }
        for m in &run.methods {
            let tag = |scores: &[VolumeScore]| -> Vec<VolumeScore> {
                scores
                    .iter()
                    .map(|v| VolumeScore {
                        case: format!("seed-{}/{}", run.config.seed, v.case),
                        ..v.clone()
                    })
                    .collect()
            };
            match pooled.iter_mut().find(|p| p.method == m.method) {
                Some(p) => {
                    p.validation.extend(tag(&m.validation));
                    p.test.extend(tag(&m.test));
                    p.train_seconds += m.train_seconds;
                    p.eval_seconds += m.eval_seconds;
                }
                None => pooled.push(MethodResult {
                    validation: tag(&m.validation),
                    test: tag(&m.test),
                    rounds: Vec::new(),
                    ..m.clone()
                }),
            }
        }
    }
    Ok(SeedSummary {
        seeds: runs.iter().map(|r| r.config.seed).collect(),
        table_validation: make_table(&pooled, &organs, |r| &r.validation),
        table_test: make_table(&pooled, &organs, |r| &r.test),
        organs,
        runs,
    })
}

/// A table as Markdown: `mean (SD)` per organ, then the 95 % confidence interval of the
/// mean; `*` marks a Holm-corrected p < 0.05 against the baseline, `†` against FedBN + FT
/// (paired t-tests on the same volumes).
pub fn format_table(title: &str, table: &Table, organs: &[String]) -> String {
    let mut s = format!("{title}\n\n| Method |");
    for o in organs {
        s.push_str(&format!(" {o} |"));
    }
    s.push_str("\n|---|");
    for _ in organs {
        s.push_str("---|");
    }
    s.push('\n');
    for (method, row) in table {
        s.push_str(&format!("| {} |", method.label()));
        for o in organs {
            match row.get(o) {
                Some(c) => {
                    let significant = |p: Option<f64>, mark: &'static str| {
                        p.filter(|p| *p < 0.05).map_or("", |_| mark)
                    };
                    let ci = c
                        .ci95
                        .map_or(String::new(), |(lo, hi)| format!(" [{lo:.2}, {hi:.2}]"));
                    s.push_str(&format!(
                        " {:.2} ({:.2}){ci}{}{} |",
                        c.mean,
                        c.sd,
                        significant(c.p_holm, "*"),
                        significant(c.p_holm_fedbn_ft, "†")
                    ));
                }
                None => s.push_str(" - |"),
            }
        }
        s.push('\n');
    }
    s
}
