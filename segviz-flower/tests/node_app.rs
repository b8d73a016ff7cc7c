//! The SegViz node handler on a tiny phantom site: what it sends (every object of its reply
//! is inspected: model state, classification and metrics, nothing else), what it refuses,
//! and that a restarted node gets its own local state back.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use prost::Message as _;
use segviz_core::{ModelState, SegVizConfig};
use segviz_data::phantom::{write_sites, PhantomConfig};
use segviz_data::Organ;
use segviz_fed::experiment::ExperimentConfig;
use segviz_flower::app::to_arrays;
use segviz_flower::protocol::message::{build_reply, unix_now};
use segviz_flower::protocol::objects::{parse, post_order, verify};
use segviz_flower::protocol::proto;
use segviz_flower::protocol::records::{ConfigValue, Record, RecordDict, Tensor};
use segviz_flower::{InstructionHandler, ReplyLayout, SegVizApp, SiteSettings};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-flower-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn liver_site(dir: &std::path::Path) -> PathBuf {
    phantom_site(dir, "Task03_Liver")
}

/// One of the tiny phantom sites (`Task03_Liver`, `Task09_Spleen`, …) under `dir`.
fn phantom_site(dir: &std::path::Path, name: &str) -> PathBuf {
    let root = dir.join("phantoms");
    if !root.join(name).exists() {
        let mut config = PhantomConfig::tiny(root.clone());
        config.cases_per_site = 3;
        write_sites(&config).unwrap();
    }
    root.join(name)
}

fn global_state() -> ModelState {
    let tasks = Organ::ALL.iter().map(|o| o.name().to_string()).collect();
    SegVizConfig::new(ExperimentConfig::tiny().representation, tasks)
        .init(&burn::tensor::Device::flex(), 0)
        .unwrap()
        .state()
}

fn instruction(arrays: Vec<(String, Tensor)>, round: i64) -> RecordDict {
    instruction_with(arrays, round, "fedbn")
}

fn instruction_with(arrays: Vec<(String, Tensor)>, round: i64, strategy: &str) -> RecordDict {
    RecordDict {
        records: vec![
            ("arrays".into(), Record::Arrays(arrays)),
            (
                "config".into(),
                Record::Config(vec![
                    ("server-round".into(), ConfigValue::Int(round)),
                    ("num-server-rounds".into(), ConfigValue::Int(2)),
                    ("local-epochs".into(), ConfigValue::Int(1)),
                    ("strategy".into(), ConfigValue::Str(strategy.into())),
                ]),
            ),
        ],
    }
}

fn metadata() -> proto::Metadata {
    proto::Metadata {
        run_id: 5,
        message_id: "instruction".into(),
        src_node_id: 1,
        dst_node_id: 9,
        group_id: "1".into(),
        ttl: 600.0,
        message_type: "train".into(),
        created_at: unix_now(),
        ..Default::default()
    }
}

fn open(site: &std::path::Path, work: &std::path::Path) -> SegVizApp {
    open_with(site, work, None, ReplyLayout::PerSite).unwrap()
}

fn open_with(
    site: &std::path::Path,
    work: &std::path::Path,
    site_name: Option<&str>,
    reply: ReplyLayout,
) -> segviz_flower::Result<SegVizApp> {
    SegVizApp::open(
        site,
        &SiteSettings {
            experiment: ExperimentConfig::tiny(),
            work_dir: work.to_path_buf(),
            site_name: site_name.map(str::to_string),
            reply,
        },
        &burn::tensor::Device::flex().autodiff(),
    )
}

/// The global model as the SegViz server shows it to a node at `round` under FedBN: without
/// the representation's BatchNorm after round 1.
fn fedbn_view(global: &ModelState, round: i64) -> Vec<(String, Tensor)> {
    to_arrays(&global.filter(|_, t| {
        round == 1 || !(t.batch_norm && t.role == segviz_core::TensorRole::Representation)
    }))
}

fn metric_keys(content: &RecordDict) -> BTreeSet<String> {
    let Some(Record::Metrics(metrics)) = content.get("metrics") else {
        panic!("no metrics record")
    };
    metrics.iter().map(|(k, _)| k.clone()).collect()
}

fn array_keys(content: &RecordDict) -> BTreeSet<String> {
    let Some(Record::Arrays(arrays)) = content.get("arrays") else {
        panic!("no arrays record")
    };
    arrays.iter().map(|(k, _)| k.clone()).collect()
}

#[test]
fn a_node_sends_only_its_model_state_classification_and_metrics() {
    let dir = tempdir("privacy");
    let site = liver_site(&dir);
    let mut app = open(&site, &dir.join("node"));
    assert_eq!(app.tasks(), vec!["liver"]);

    // The server sends the whole global model; the node keeps its own head only.
    let content = app
        .handle(5, "train", &instruction(to_arrays(&global_state()), 1))
        .unwrap();
    let reply = build_reply(&metadata(), 9, Ok(&content)).unwrap();
    let local = app.local_state();

    let mut types = BTreeMap::new();
    let mut chunk_bytes = 0usize;
    for id in post_order(&reply.tree) {
        let bytes = reply.objects.get(&id).unwrap();
        verify(&id, bytes).unwrap();
        let object = parse(bytes).unwrap();
        *types.entry(object.type_name.to_string()).or_insert(0) += 1;
        match object.type_name {
            "ArrayChunk" => chunk_bytes += object.body.len(),
            "ConfigRecord" => {
                let record = proto::ConfigRecord::decode(object.body).unwrap();
                let keys: BTreeSet<&str> = record.items.iter().map(|i| i.key.as_str()).collect();
                assert_eq!(
                    keys,
                    BTreeSet::from(["classification", "client", "format", "tasks"])
                );
            }
            "MetricRecord" => {
                let record = proto::MetricRecord::decode(object.body).unwrap();
                for item in &record.items {
                    assert!(
                        ["num-examples", "loss", "steps"].contains(&item.key.as_str())
                            || item.key.starts_with("dice/"),
                        "unexpected metric {}",
                        item.key
                    );
                }
            }
            "Message" | "RecordDict" | "ArrayRecord" | "Array" => {}
            other => panic!("unexpected object type {other}"),
        }
    }
    assert_eq!(types["ArrayRecord"], 1);
    assert_eq!(types["MetricRecord"], 1);
    assert_eq!(types["ConfigRecord"], 1);

    // The arrays are exactly the local model (representation + the liver head)...
    let Some(Record::Arrays(arrays)) = content.get("arrays") else {
        panic!("no arrays in the reply")
    };
    let names: BTreeSet<&String> = arrays.iter().map(|(n, _)| n).collect();
    assert_eq!(names, local.tensors.keys().collect());
    assert!(names
        .iter()
        .all(|n| !n.starts_with("heads.") || n.starts_with("heads.liver.")));
    // ...and the chunks hold nothing but those values (plus one .npy header each).
    let values: usize = local.tensors.values().map(|t| t.len()).sum();
    assert!(chunk_bytes >= 4 * values && chunk_bytes <= 4 * values + 128 * arrays.len());

    // The classification is the model's own.
    let segviz = content.get("segviz").unwrap();
    let Record::Config(config) = segviz else {
        panic!()
    };
    let classification = config
        .iter()
        .find(|(k, _)| k == "classification")
        .and_then(|(_, v)| v.as_str())
        .unwrap();
    let classes: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(classification).unwrap();
    for (path, t) in &local.tensors {
        assert_eq!(classes[path]["batch_norm"], t.batch_norm, "{path}");
        assert_eq!(
            classes[path]["role"],
            serde_json::to_value(&t.role).unwrap(),
            "{path}"
        );
    }

    // An evaluate reply carries metrics only.
    let evaluation = app
        .handle(
            5,
            "evaluate",
            &instruction(fedbn_view(&global_state(), 2), 1),
        )
        .unwrap();
    assert_eq!(evaluation.records.len(), 1);
    assert!(matches!(
        evaluation.get("metrics"),
        Some(Record::Metrics(_))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_node_refuses_another_model_and_restores_its_state_after_a_restart() {
    let dir = tempdir("refuse");
    let site = liver_site(&dir);
    let work = dir.join("node");
    let mut app = open(&site, &work);
    let global = global_state();

    // A tensor this model does not have (not another task's head) is refused, by name.
    let mut foreign = to_arrays(&global);
    foreign.push((
        "representation.extra.weight".into(),
        Tensor {
            shape: vec![1],
            values: vec![0.0],
        },
    ));
    let Err(err) = app.handle(5, "train", &instruction(foreign, 1)) else {
        panic!("a foreign tensor must be refused");
    };
    assert!(err.contains("representation.extra.weight"), "{err}");
    // So is a shape mismatch.
    let mut reshaped = to_arrays(&global);
    let conv = reshaped
        .iter()
        .position(|(n, _)| n.starts_with("representation.") && n.ends_with("conv.weight"))
        .unwrap();
    reshaped[conv].1.shape = vec![reshaped[conv].1.values.len()];
    let Err(err) = app.handle(5, "train", &instruction(reshaped, 1)) else {
        panic!("a reshaped tensor must be refused");
    };
    assert!(err.contains("shape"), "{err}");
    // A message type nodes do not serve.
    assert!(app
        .handle(5, "get-weights", &RecordDict::default())
        .is_err());
    // No config record.
    let bare = RecordDict {
        records: vec![("arrays".into(), Record::Arrays(to_arrays(&global)))],
    };
    assert!(app.handle(5, "train", &bare).is_err());

    // Train once; a new process on the same work folder gets the same local state back
    // (its own BatchNorm statistics included) at its first instruction of the run: under
    // FedBN the evaluation does not send the representation's BatchNorm, so the restarted
    // node evaluates with the trained statistics, not its fresh model's.
    app.handle(5, "train", &instruction(to_arrays(&global), 1))
        .unwrap();
    let trained = app.local_state();
    let batch_norm = |state: &ModelState| {
        state.filter(|_, t| t.batch_norm && t.role == segviz_core::TensorRole::Representation)
    };
    assert!(!batch_norm(&trained).tensors.is_empty());
    let mut restarted = open(&site, &work);
    assert_ne!(batch_norm(&restarted.local_state()), batch_norm(&trained));
    restarted
        .handle(5, "evaluate", &instruction(fedbn_view(&global, 2), 1))
        .unwrap();
    assert_eq!(batch_norm(&restarted.local_state()), batch_norm(&trained));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_instruction_without_the_models_tensors_is_refused() {
    let dir = tempdir("incomplete");
    let site = liver_site(&dir);
    let mut app = open(&site, &dir.join("node"));
    let global = global_state();
    let before = app.local_state();

    // An empty ArrayRecord: nothing to train from.
    let Err(err) = app.handle(5, "train", &instruction(vec![], 1)) else {
        panic!("a train instruction with no tensor must be refused");
    };
    assert!(
        err.contains("lacks") && err.contains("representation."),
        "{err}"
    );
    assert_eq!(app.local_state(), before, "a refused instruction trained");
    let Err(err) = app.handle(5, "evaluate", &instruction(vec![], 1)) else {
        panic!("an evaluate instruction with no tensor must be refused");
    };
    assert!(err.contains("lacks"), "{err}");

    // Only the node's own head missing (the representation is there).
    let no_head =
        to_arrays(&global.filter(|_, t| t.role != segviz_core::TensorRole::Head("liver".into())));
    let Err(err) = app.handle(5, "train", &instruction(no_head, 1)) else {
        panic!("a train instruction without the node's head must be refused");
    };
    assert!(err.contains("heads.liver."), "{err}");

    // FedBN withholds the representation's BatchNorm after round 1 only.
    let Err(err) = app.handle(5, "train", &instruction(fedbn_view(&global, 2), 1)) else {
        panic!("round 1 must carry the BatchNorm tensors");
    };
    assert!(err.contains("lacks"), "{err}");
    let Err(_) = app.handle(
        5,
        "train",
        &instruction_with(fedbn_view(&global, 2), 2, "fedavg"),
    ) else {
        panic!("FedAvg always sends the BatchNorm tensors");
    };
    app.handle(5, "train", &instruction(fedbn_view(&global, 2), 2))
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_site_name_is_explicit_and_a_query_returns_the_identity_only() {
    let dir = tempdir("identity");
    let site = liver_site(&dir);
    let mut default = open(&site, &dir.join("a"));
    assert_eq!(default.site_name(), "Task03_Liver");
    let mut named = open_with(
        &site,
        &dir.join("b"),
        Some(" hospital-b "),
        ReplyLayout::PerSite,
    )
    .unwrap();
    assert_eq!(named.site_name(), "hospital-b");
    for bad in ["", "  ", "a\nb"] {
        let Err(e) = open_with(&site, &dir.join("c"), Some(bad), ReplyLayout::PerSite) else {
            panic!("site name {bad:?} must be refused");
        };
        assert!(e.to_string().contains("site name"), "{e}");
    }

    for (app, name) in [(&mut default, "Task03_Liver"), (&mut named, "hospital-b")] {
        let reply = app.handle(5, "query", &RecordDict::default()).unwrap();
        assert_eq!(reply.records.len(), 1);
        let Some(Record::Config(config)) = reply.get("segviz") else {
            panic!("no segviz record")
        };
        let values: BTreeMap<&str, &ConfigValue> =
            config.iter().map(|(k, v)| (k.as_str(), v)).collect();
        assert_eq!(values["client"], &ConfigValue::Str(name.into()));
        assert_eq!(values["tasks"], &ConfigValue::StrList(vec!["liver".into()]));
        assert_eq!(values.len(), 3, "{values:?}");
    }
    // The train reply names the site by its federation name.
    let reply = named
        .handle(5, "train", &instruction(to_arrays(&global_state()), 1))
        .unwrap();
    let Some(Record::Config(segviz)) = reply.get("segviz") else {
        panic!("no segviz record")
    };
    assert!(segviz.contains(&("client".into(), ConfigValue::Str("hospital-b".into()))));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn uniform_replies_of_sites_with_different_organs_have_the_same_names() {
    let dir = tempdir("uniform");
    let global = global_state();
    let all = to_arrays(&global);
    let mut replies = Vec::new();
    for name in ["Task03_Liver", "Task09_Spleen"] {
        let site = phantom_site(&dir, name);
        let mut app = open_with(&site, &dir.join(name), None, ReplyLayout::Uniform).unwrap();
        let train = app
            .handle(5, "train", &instruction_with(all.clone(), 1, "fedavg"))
            .unwrap();
        let evaluate = app
            .handle(5, "evaluate", &instruction_with(all.clone(), 1, "fedavg"))
            .unwrap();
        // Other tasks' heads come back exactly as sent.
        let Some(Record::Arrays(arrays)) = train.get("arrays") else {
            panic!("no arrays")
        };
        let own = app.local_state();
        for (path, tensor) in arrays {
            if !own.tensors.contains_key(path) {
                let sent = &all.iter().find(|(p, _)| p == path).unwrap().1;
                assert_eq!(tensor, sent, "{path} was changed");
            }
        }
        replies.push((train, evaluate));
    }
    let (a, b) = (&replies[0], &replies[1]);
    assert_eq!(array_keys(&a.0), array_keys(&b.0));
    assert_eq!(
        array_keys(&a.0),
        global.tensors.keys().cloned().collect::<BTreeSet<_>>()
    );
    assert_eq!(metric_keys(&a.0), metric_keys(&b.0));
    assert_eq!(
        metric_keys(&a.0),
        BTreeSet::from(["dice", "loss", "num-examples", "steps"].map(String::from))
    );
    assert_eq!(metric_keys(&a.1), metric_keys(&b.1));
    assert_eq!(
        metric_keys(&a.1),
        BTreeSet::from(["dice", "num-examples"].map(String::from))
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_site_with_a_bad_case_is_refused_at_start_up_naming_the_file() {
    let dir = tempdir("bad-case");
    let site = phantom_site(&dir, "Task09_Spleen");
    let ds = segviz_data::SiteDataset::detect(&site).unwrap();
    let label = ds.cases[1].label.clone();
    let bytes = std::fs::read(&label).unwrap();
    std::fs::write(&label, &bytes[..bytes.len() / 2]).unwrap();
    let e = open_with(&site, &dir.join("work"), None, ReplyLayout::PerSite)
        .err()
        .expect("a truncated label must stop the node before it joins")
        .to_string();
    assert!(e.contains(&label.display().to_string()), "{e}");
}
