//! Strategy tests on hand-made states.

use std::collections::BTreeMap;

use segviz_core::{ModelState, StateTensor, TensorRole};

use super::*;
use crate::messages::ClientUpdate;
use crate::partial_labels::PartialLabelConfig;

fn tensor(values: &[f32], role: TensorRole, batch_norm: bool) -> StateTensor {
    StateTensor {
        shape: vec![values.len()],
        data: values.to_vec(),
        role,
        batch_norm,
        trainable: true,
    }
}

/// A state with one conv weight, one BatchNorm weight and the given heads' weights.
fn state(conv: f32, bn: f32, heads: &[(&str, f32)]) -> ModelState {
    let mut s = ModelState::default();
    s.tensors.insert(
        "representation.down.0.units.0.conv.weight".into(),
        tensor(&[conv, conv * 2.0], TensorRole::Representation, false),
    );
    s.tensors.insert(
        "representation.down.0.units.0.adn.norm.gamma".into(),
        tensor(&[bn], TensorRole::Representation, true),
    );
    for (task, v) in heads {
        s.tensors.insert(
            format!("heads.{task}.block.upsample.weight"),
            tensor(&[*v], TensorRole::Head(task.to_string()), false),
        );
    }
    s
}

fn update(client: &str, n: usize, state: ModelState) -> ClientUpdate {
    ClientUpdate {
        client: client.into(),
        tasks: state.tasks(),
        num_examples: n,
        state,
        metrics: BTreeMap::new(),
    }
}

fn value(s: &ModelState, path: &str) -> Vec<f32> {
    s.tensors[path].data.clone()
}

const CONV: &str = "representation.down.0.units.0.conv.weight";
const BN: &str = "representation.down.0.units.0.adn.norm.gamma";

#[test]
fn fedavg_weights_by_examples_or_uniformly() {
    let global = state(0.0, 0.0, &[("liver", 0.0), ("spleen", 0.0)]);
    let updates = [
        update("a", 1, state(1.0, 10.0, &[("liver", 5.0)])),
        update("b", 3, state(5.0, 20.0, &[("spleen", 7.0)])),
    ];
    let by_examples = FedAvg::default()
        .aggregate_fit(1, &global, &updates)
        .unwrap();
    // (1·1 + 3·5) / 4 = 4, and the second value doubles.
    assert_eq!(value(&by_examples, CONV), vec![4.0, 8.0]);
    assert_eq!(value(&by_examples, BN), vec![17.5]);
    let uniform = FedAvg {
        weighting: Weighting::Uniform,
    }
    .aggregate_fit(1, &global, &updates)
    .unwrap();
    assert_eq!(value(&uniform, CONV), vec![3.0, 6.0]);
}

#[test]
fn heads_come_from_their_owners_only() {
    let global = state(
        0.0,
        0.0,
        &[("liver", 0.5), ("spleen", 0.5), ("kidney", 9.0)],
    );
    let updates = [
        update("liver_site", 1, state(1.0, 1.0, &[("liver", 2.0)])),
        update("spleen_site", 1, state(1.0, 1.0, &[("spleen", 3.0)])),
        update("liver_too", 3, state(1.0, 1.0, &[("liver", 6.0)])),
    ];
    let next = FedAvg::default()
        .aggregate_fit(1, &global, &updates)
        .unwrap();
    // Liver: averaged over its two owners by examples: (2 + 18) / 4 = 5.
    assert_eq!(value(&next, "heads.liver.block.upsample.weight"), vec![5.0]);
    assert_eq!(
        value(&next, "heads.spleen.block.upsample.weight"),
        vec![3.0]
    );
    // Nobody trained the kidney head this round: it keeps its global value.
    assert_eq!(
        value(&next, "heads.kidney.block.upsample.weight"),
        vec![9.0]
    );
    // Each client is sent only its own heads.
    let view = FedAvg::default().configure_fit(
        2,
        &next,
        &ClientInfo {
            name: "spleen_site".into(),
            tasks: vec!["spleen".into()],
        },
    );
    assert_eq!(view.tasks(), vec!["spleen".to_string()]);
    assert!(view.tensors.contains_key(CONV) && view.tensors.contains_key(BN));
}

#[test]
fn fedbn_keeps_every_batchnorm_tensor_local() {
    let global = state(0.0, 0.0, &[("liver", 0.0)]);
    let info = ClientInfo {
        name: "a".into(),
        tasks: vec!["liver".into()],
    };
    let fedbn = FedBn::default();
    // Round 1 hands out the common initial model, BatchNorm included…
    assert!(fedbn
        .configure_fit(1, &global, &info)
        .tensors
        .contains_key(BN));
    // …later rounds never send a BatchNorm tensor.
    let view = fedbn.configure_fit(2, &global, &info);
    assert!(!view.tensors.values().any(|t| t.batch_norm));
    assert!(view.tensors.contains_key(CONV));
    // Non-BatchNorm tensors are averaged as in FedAvg.
    let updates = [
        update("a", 1, state(1.0, 10.0, &[("liver", 1.0)])),
        update("b", 1, state(3.0, 30.0, &[("liver", 3.0)])),
    ];
    let next = fedbn.aggregate_fit(1, &global, &updates).unwrap();
    assert_eq!(value(&next, CONV), vec![2.0, 4.0]);
}

#[test]
fn after_a_round_every_client_shares_the_global_non_batchnorm_tensors() {
    let global = state(0.0, 0.0, &[("liver", 0.0), ("spleen", 0.0)]);
    let updates = [
        update("a", 2, state(1.0, 10.0, &[("liver", 1.0)])),
        update("b", 1, state(4.0, 40.0, &[("spleen", 3.0)])),
    ];
    for strategy in [
        Box::new(FedAvg::default()) as Box<dyn AggregationStrategy>,
        Box::new(FedBn::default()),
        Box::new(FedProx {
            weighting: Weighting::Examples,
            mu: 0.1,
        }),
    ] {
        let next = strategy.aggregate_fit(1, &global, &updates).unwrap();
        for u in &updates {
            let info = ClientInfo {
                name: u.client.clone(),
                tasks: u.tasks.clone(),
            };
            let view = strategy.configure_fit(2, &next, &info);
            for (path, t) in &view.tensors {
                if !t.batch_norm {
                    assert_eq!(
                        t.data,
                        next.tensors[path].data,
                        "{} {path}",
                        strategy.name()
                    );
                }
            }
            assert_eq!(view.tasks(), u.tasks);
        }
    }
}

#[test]
fn fedprox_sends_mu_and_no_update_is_an_error() {
    let p = FedProx {
        weighting: Weighting::Examples,
        mu: 0.25,
    };
    assert_eq!(p.fit_config(1)["proximal_mu"], 0.25);
    let global = state(0.0, 0.0, &[]);
    assert!(p.aggregate_fit(3, &global, &[]).is_err());
    let pl = PartialLabelConfig::default();
    assert!(strategy_by_name("fedbn", Weighting::Uniform, 0.0, pl, 3).is_some());
    assert!(strategy_by_name("fedsomething", Weighting::Uniform, 0.0, pl, 3).is_none());
    assert!(strategy_by_name("fedbn_pl_pl", Weighting::Uniform, 0.0, pl, 3).is_none());
    assert_eq!(
        strategy_by_name("fedbn_pl", Weighting::Uniform, 0.0, pl, 3)
            .unwrap()
            .name(),
        "fedbn_pl"
    );
}

#[test]
fn mismatched_shapes_are_refused() {
    let global = state(0.0, 0.0, &[]);
    let mut bad = state(1.0, 1.0, &[]);
    bad.tensors.get_mut(CONV).unwrap().shape = vec![1, 2];
    bad.tensors.get_mut(CONV).unwrap().data = vec![1.0, 2.0];
    let mut bad2 = state(1.0, 1.0, &[]);
    bad2.tensors.get_mut(CONV).unwrap().data = vec![1.0, 2.0, 3.0];
    bad2.tensors.get_mut(CONV).unwrap().shape = vec![3];
    let updates = [update("a", 1, bad), update("b", 1, bad2)];
    let err = FedAvg::default()
        .aggregate_fit(4, &global, &updates)
        .unwrap_err()
        .to_string();
    assert!(err.contains("round 4") && err.contains("client b"), "{err}");
}

#[test]
fn evaluation_metrics_are_weighted_by_examples() {
    let results = [
        crate::messages::EvaluateResult {
            client: "a".into(),
            num_examples: 1,
            metrics: BTreeMap::from([("dice/liver".to_string(), 0.5)]),
        },
        crate::messages::EvaluateResult {
            client: "b".into(),
            num_examples: 3,
            metrics: BTreeMap::from([
                ("dice/liver".to_string(), 0.9),
                ("dice/spleen".to_string(), 0.7),
            ]),
        },
    ];
    let m = FedAvg::default().aggregate_evaluate(1, &results);
    assert!((m["dice/liver"] - 0.8).abs() < 1e-12);
    assert!((m["dice/spleen"] - 0.7).abs() < 1e-12);
}

#[test]
fn the_partial_label_rule_sends_and_averages_every_head() {
    let global = state(
        0.0,
        0.0,
        &[("liver", 0.5), ("spleen", 0.5), ("kidney", 9.0)],
    );
    let ramped = PartialLabelConfig {
        distillation_start: 0.01,
        ..PartialLabelConfig::default()
    };
    let pl = PartialLabels::new(Box::new(FedBn::default()), ramped, 5, Weighting::Examples);
    assert_eq!(pl.name(), "fedbn_pl");
    let info = ClientInfo {
        name: "liver_site".into(),
        tasks: vec!["liver".into()],
    };
    // Every head goes to every client; BatchNorm stays local after round 1 (FedBN).
    let view = pl.configure_fit(2, &global, &info);
    assert_eq!(view.tasks(), global.tasks());
    assert!(!view.tensors.values().any(|t| t.batch_norm));
    let config = pl.fit_config(1);
    assert_eq!(config["partial_labels"], 1.0);
    assert!((config["distillation_weight"] - 0.01).abs() < 1e-12);
    assert!((pl.fit_config(5)["distillation_weight"] - 1.0).abs() < 1e-12);
    // Every head is averaged over every client that sent it (here: all of them).
    let updates = [
        update(
            "liver_site",
            1,
            state(
                1.0,
                1.0,
                &[("liver", 2.0), ("spleen", 4.0), ("kidney", 0.0)],
            ),
        ),
        update(
            "spleen_site",
            3,
            state(
                1.0,
                1.0,
                &[("liver", 6.0), ("spleen", 8.0), ("kidney", 4.0)],
            ),
        ),
    ];
    let next = pl.aggregate_fit(2, &global, &updates).unwrap();
    assert_eq!(value(&next, "heads.liver.block.upsample.weight"), vec![5.0]);
    assert_eq!(
        value(&next, "heads.spleen.block.upsample.weight"),
        vec![7.0]
    );
    assert_eq!(
        value(&next, "heads.kidney.block.upsample.weight"),
        vec![3.0]
    );
}

#[test]
fn an_owner_weight_takes_that_share_of_each_head_from_its_owners() {
    let global = state(
        0.0,
        0.0,
        &[("liver", 0.5), ("spleen", 0.5), ("kidney", 9.0)],
    );
    let every = [("liver", 0.0), ("spleen", 0.0), ("kidney", 0.0)];
    let site = |name: &str, task: &str, n: usize, v: f32| {
        let heads: Vec<(&str, f32)> = every.iter().map(|(t, _)| (*t, v)).collect();
        ClientUpdate {
            tasks: vec![task.to_string()],
            ..update(name, n, state(v, v, &heads))
        }
    };
    let updates = [
        site("liver_site", "liver", 1, 2.0),
        site("spleen_site", "spleen", 1, 3.0),
        site("liver_too", "liver", 2, 6.0),
    ];
    let pl = |owner_weight| {
        PartialLabels::new(
            Box::new(FedBn::default()),
            PartialLabelConfig {
                owner_weight,
                ..PartialLabelConfig::default()
            },
            5,
            Weighting::Examples,
        )
        .aggregate_fit(2, &global, &updates)
        .unwrap()
    };
    let head = |s: &ModelState, task: &str| {
        f64::from(s.tensors[&format!("heads.{task}.block.upsample.weight")].data[0])
    };
    let weighted = pl(Some(0.75));
    // Spleen: its owner's 3 at 0.75, the others' (1·2 + 2·6)/3 at 0.25.
    assert!((head(&weighted, "spleen") - (0.75 * 3.0 + 0.25 * 14.0 / 3.0)).abs() < 1e-6);
    assert!((head(&weighted, "liver") - (0.75 * 14.0 / 3.0 + 0.25 * 3.0)).abs() < 1e-6);
    // Nobody owns the kidney: the plain mean (1·2 + 1·3 + 2·6) / 4.
    assert_eq!(head(&weighted, "kidney"), 4.25);
    // The representation does not change with the owner weight.
    assert_eq!(value(&weighted, CONV), vec![4.25, 8.5]);
    assert_eq!(head(&pl(Some(1.0)), "spleen"), 3.0);
    assert!((head(&pl(Some(0.0)), "spleen") - 14.0 / 3.0).abs() < 1e-6);
    // None: one plain mean over every site.
    assert_eq!(head(&pl(None), "spleen"), 4.25);
}

#[test]
fn a_server_learning_rate_scales_the_representation_step_only() {
    let global = state(1.0, 2.0, &[("liver", 3.0), ("spleen", 4.0)]);
    let updates = [
        update("a", 1, state(2.0, 10.0, &[("liver", 5.0)])),
        update("b", 1, state(4.0, 20.0, &[("spleen", 7.0)])),
    ];
    let inner = || -> Box<dyn AggregationStrategy> {
        Box::new(FedAvg {
            weighting: Weighting::Uniform,
        })
    };
    let plain = inner().aggregate_fit(1, &global, &updates).unwrap();
    let stepped = ServerLearningRate::new(inner(), 3.0)
        .unwrap()
        .aggregate_fit(1, &global, &updates)
        .unwrap();
    // The mean conv is (3, 6) from (1, 2): three times that step is (7, 14).
    assert_eq!(value(&plain, CONV), vec![3.0, 6.0]);
    assert_eq!(value(&stepped, CONV), vec![7.0, 14.0]);
    // BatchNorm and the heads are the plain strategy's.
    assert_eq!(value(&stepped, BN), value(&plain, BN));
    assert_eq!(
        value(&stepped, "heads.liver.block.upsample.weight"),
        vec![5.0]
    );
    assert_eq!(
        value(&stepped, "heads.spleen.block.upsample.weight"),
        vec![7.0]
    );
    // The wrapper keeps the name and what a client receives.
    let wrapped = ServerLearningRate::wrap(inner(), 3.0).unwrap();
    assert_eq!(wrapped.name(), "fedavg");
    let client = ClientInfo {
        name: "a".into(),
        tasks: vec!["liver".into()],
    };
    assert_eq!(
        wrapped.configure_fit(2, &global, &client),
        inner().configure_fit(2, &global, &client)
    );
    // Rate 1 is the strategy itself; a rate that is not positive is refused.
    let one = ServerLearningRate::wrap(inner(), 1.0).unwrap();
    assert_eq!(one.aggregate_fit(1, &global, &updates).unwrap(), plain);
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(ServerLearningRate::new(inner(), bad).is_err(), "{bad}");
    }
}
