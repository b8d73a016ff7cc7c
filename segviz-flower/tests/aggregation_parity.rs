//! The Flower server app's aggregation (Python, `flower/`) gives the same global model as
//! the Rust `AggregationStrategy` on the same saved updates.
//!
//! Needs a Python with numpy: set `SEGVIZ_FLOWER_PYTHON` (`.ci/run` points it at the flwr
//! virtual environment). Without it the test prints why and skips, except under CI (`CI`
//! set), where a missing or unusable Python is a failure: a check that silently stopped
//! running would look like a pass.

use std::path::{Path, PathBuf};
use std::process::Command;

use segviz_core::checkpoint::{read_checkpoint, write_checkpoint, Checkpoint};
use segviz_core::{ModelState, RepresentationConfig, SegVizConfig};
use segviz_fed::partial_labels::PartialLabelConfig;
use segviz_fed::strategy::{PartialLabels, ServerLearningRate};
use segviz_fed::{AggregationStrategy, ClientUpdate, FedAvg, FedBn, Weighting};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-parity-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config() -> SegVizConfig {
    SegVizConfig::new(
        RepresentationConfig::new()
            .with_channels(vec![2, 4])
            .with_strides(vec![2]),
        vec!["liver".into(), "spleen".into(), "kidney".into()],
    )
}

/// A client's state: the global restricted to its tasks, moved by a client-specific amount.
fn update(
    global: &ModelState,
    client: &str,
    tasks: &[&str],
    examples: usize,
    k: f32,
) -> ClientUpdate {
    let mut state = global.filter(|_, t| match &t.role {
        segviz_core::TensorRole::Representation => true,
        segviz_core::TensorRole::Head(h) => tasks.contains(&h.as_str()),
    });
    for (j, t) in state.tensors.values_mut().enumerate() {
        for (i, v) in t.data.iter_mut().enumerate() {
            *v += 0.01 * ((i as f32 * 0.37 + j as f32) * k).sin();
        }
    }
    ClientUpdate {
        client: client.into(),
        tasks: tasks.iter().map(|s| s.to_string()).collect(),
        num_examples: examples,
        state,
        metrics: Default::default(),
    }
}

fn save(path: &Path, config: &SegVizConfig, state: &ModelState, metadata: serde_json::Value) {
    write_checkpoint(
        path,
        &Checkpoint {
            config: config.clone(),
            state: state.clone(),
            metadata,
        },
    )
    .unwrap();
}

/// The Python of `SEGVIZ_FLOWER_PYTHON`, checked to import numpy and flwr. `None` (skip)
/// when unset outside CI.
///
/// # Panics
/// Under CI (`CI` set) when the variable is unset or the Python cannot import them.
fn flower_python() -> Option<String> {
    let under_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
    let Ok(python) = std::env::var("SEGVIZ_FLOWER_PYTHON") else {
        assert!(
            !under_ci,
            "CI is set but SEGVIZ_FLOWER_PYTHON is not: point it at the flwr virtual \
             environment's python (python3 -m venv V && V/bin/pip install -r flower/requirements.txt)"
        );
        println!("skipped: set SEGVIZ_FLOWER_PYTHON to a Python with flower/requirements.txt");
        return None;
    };
    let works = Command::new(&python)
        .args(["-c", "import numpy, flwr"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        works,
        "SEGVIZ_FLOWER_PYTHON={python} cannot import numpy and flwr: install flower/requirements.txt into it"
    );
    Some(python)
}

/// Saves `global` and `updates` in `dir`, runs the Python aggregation tool on them with
/// `strategy` and `weighting` for round 2, and reads back its global model.
#[allow(clippy::too_many_arguments)] // the tool's own arguments, one for one
fn python_aggregate(
    python: &str,
    dir: &Path,
    config: &SegVizConfig,
    global: &ModelState,
    updates: &[ClientUpdate],
    strategy: &str,
    weighting: &str,
    owner_weight: &str,
    server_rate: f64,
) -> ModelState {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flower/tools/aggregate_updates.py");
    save(
        &dir.join("global.segviz"),
        config,
        global,
        serde_json::json!({}),
    );
    let mut files = Vec::new();
    for u in updates {
        let path = dir.join(format!("{}.segviz", u.client));
        save(
            &path,
            config,
            &u.state,
            serde_json::json!({"client": u.client, "tasks": u.tasks, "num_examples": u.num_examples}),
        );
        files.push(path);
    }
    let out = dir.join(format!(
        "python-{strategy}-{weighting}-{owner_weight}-{server_rate}.segviz"
    ));
    let status = Command::new(python)
        .arg(&tool)
        .arg("--global")
        .arg(dir.join("global.segviz"))
        .arg("--updates")
        .args(&files)
        .args([
            "--strategy",
            strategy,
            "--weighting",
            weighting,
            "--round",
            "2",
            "--owner-weight",
            owner_weight,
            "--server-learning-rate",
            &server_rate.to_string(),
            "--out",
        ])
        .arg(&out)
        .status()
        .expect("cannot run the Python aggregation tool");
    assert!(status.success(), "{strategy}: the Python tool failed");
    read_checkpoint(&out).unwrap().state
}

#[test]
fn python_and_rust_aggregate_saved_updates_identically() {
    let Some(python) = flower_python() else {
        return;
    };
    let dir = tempdir("aggregate");
    let config = config();
    let global = config
        .init(&burn::tensor::Device::flex(), 3)
        .unwrap()
        .state();
    let updates = vec![
        update(&global, "Task03_Liver", &["liver"], 24, 1.0),
        update(&global, "Task09_Spleen", &["spleen"], 8, 2.0),
        update(&global, "kits19", &["kidney", "liver"], 40, 3.0),
        update(&global, "idle", &["spleen"], 0, 4.0),
    ];

    let fedbn = || {
        Box::new(FedBn {
            weighting: Weighting::Examples,
        })
    };
    let strategies: Vec<(&str, Weighting, f64, Box<dyn AggregationStrategy>)> = vec![
        ("fedbn", Weighting::Examples, 1.0, fedbn()),
        (
            "fedavg",
            Weighting::Examples,
            1.0,
            Box::new(FedAvg {
                weighting: Weighting::Examples,
            }),
        ),
        (
            "fedavg",
            Weighting::Uniform,
            1.0,
            Box::new(FedAvg {
                weighting: Weighting::Uniform,
            }),
        ),
        // A server learning rate on the representation block (fractional, so that the
        // f64 step and its rounding are exercised).
        (
            "fedbn",
            Weighting::Examples,
            2.7,
            Box::new(ServerLearningRate::new(fedbn(), 2.7).unwrap()),
        ),
    ];
    for (name, weighting, rate, strategy) in strategies {
        let rust = strategy.aggregate_fit(2, &global, &updates).unwrap();
        let weighting_name = match weighting {
            Weighting::Examples => "examples",
            Weighting::Uniform => "uniform",
        };
        let python_state = python_aggregate(
            &python,
            &dir,
            &config,
            &global,
            &updates,
            name,
            weighting_name,
            "plain",
            rate,
        );
        assert_eq!(
            python_state.tensors.keys().collect::<Vec<_>>(),
            rust.tensors.keys().collect::<Vec<_>>()
        );
        let mut moved = 0;
        for (path, r) in &rust.tensors {
            let p = &python_state.tensors[path];
            assert_eq!(
                (&p.shape, &p.role, p.batch_norm),
                (&r.shape, &r.role, r.batch_norm)
            );
            // Both sum in float64 in the same order and round once: the same bits.
            assert_eq!(
                p.data, r.data,
                "{name} {weighting_name} rate {rate}: {path} differs"
            );
            moved += usize::from(r.data != global.tensors[path].data);
        }
        assert!(moved > 0, "{name}: the aggregation changed nothing");
        println!(
            "{name}/{weighting_name}: {} tensors identical, {moved} moved",
            rust.tensors.len()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn python_and_rust_apply_the_partial_label_rule_identically() {
    let Some(python) = flower_python() else {
        return;
    };
    let dir = tempdir("aggregate-pl");
    let config = config();
    let global = config
        .init(&burn::tensor::Device::flex(), 5)
        .unwrap()
        .state();
    // Under the partial-label rule every site sends every head, and owns one organ (two
    // sites the liver, so that the owners' mean is a weighted one too).
    let every = ["liver", "spleen", "kidney"];
    let site = |name: &str, owns: &str, n: usize, k: f32| ClientUpdate {
        tasks: vec![owns.to_string()],
        ..update(&global, name, &every, n, k)
    };
    let updates = vec![
        site("Task03_Liver", "liver", 24, 1.0),
        site("Task09_Spleen", "spleen", 8, 2.0),
        site("kits19", "kidney", 40, 3.0),
        site("liver_too", "liver", 16, 4.0),
    ];
    for (owner_weight, name, rate) in [
        (None, "plain", 1.0),
        (Some(0.75), "0.75", 1.0),
        (Some(0.3), "0.3", 1.0),
        (Some(0.75), "0.75", 3.0),
        (Some(1.0), "1", 2.0),
    ] {
        let strategy = PartialLabels::new(
            Box::new(FedBn {
                weighting: Weighting::Examples,
            }),
            PartialLabelConfig {
                owner_weight,
                ..PartialLabelConfig::default()
            },
            3,
            Weighting::Examples,
        );
        let rust = ServerLearningRate::wrap(Box::new(strategy), rate)
            .unwrap()
            .aggregate_fit(2, &global, &updates)
            .unwrap();
        let python_state = python_aggregate(
            &python, &dir, &config, &global, &updates, "fedbn_pl", "examples", name, rate,
        );
        assert_eq!(
            python_state.tensors.keys().collect::<Vec<_>>(),
            rust.tensors.keys().collect::<Vec<_>>()
        );
        for task in every {
            let head = rust.head(task);
            assert!(!head.tensors.is_empty());
            assert_ne!(head, global.head(task), "{task}: not averaged");
        }
        for (path, r) in &rust.tensors {
            assert_eq!(
                python_state.tensors[path].data, r.data,
                "fedbn_pl, owner weight {name}, rate {rate}: {path} differs"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
