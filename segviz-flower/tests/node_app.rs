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
use segviz_flower::{InstructionHandler, SegVizApp, SiteSettings};

fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("segviz-flower-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn liver_site(dir: &std::path::Path) -> PathBuf {
    let mut config = PhantomConfig::tiny(dir.join("phantoms"));
    config.cases_per_site = 3;
    write_sites(&config).unwrap();
    dir.join("phantoms").join("Task03_Liver")
}

fn global_state() -> ModelState {
    let tasks = Organ::ALL.iter().map(|o| o.name().to_string()).collect();
    SegVizConfig::new(ExperimentConfig::tiny().representation, tasks)
        .init(&burn::tensor::Device::flex(), 0)
        .unwrap()
        .state()
}

fn instruction(arrays: Vec<(String, Tensor)>, round: i64) -> RecordDict {
    RecordDict {
        records: vec![
            ("arrays".into(), Record::Arrays(arrays)),
            (
                "config".into(),
                Record::Config(vec![
                    ("server-round".into(), ConfigValue::Int(round)),
                    ("num-server-rounds".into(), ConfigValue::Int(2)),
                    ("local-epochs".into(), ConfigValue::Int(1)),
                    ("strategy".into(), ConfigValue::Str("fedbn".into())),
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
    SegVizApp::open(
        site,
        &SiteSettings {
            experiment: ExperimentConfig::tiny(),
            work_dir: work.to_path_buf(),
        },
        &burn::tensor::Device::flex().autodiff(),
    )
    .unwrap()
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
    let evaluation = app.handle(5, "evaluate", &instruction(vec![], 1)).unwrap();
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
    assert!(app.handle(5, "query", &RecordDict::default()).is_err());
    // No config record.
    let bare = RecordDict {
        records: vec![("arrays".into(), Record::Arrays(to_arrays(&global)))],
    };
    assert!(app.handle(5, "train", &bare).is_err());

    // Train once; a new process on the same work folder gets the same local state back
    // (its own BatchNorm statistics included) at its first instruction of the run.
    app.handle(5, "train", &instruction(to_arrays(&global), 1))
        .unwrap();
    let trained = app.local_state();
    let mut restarted = open(&site, &work);
    assert_ne!(restarted.local_state(), trained);
    restarted
        .handle(5, "evaluate", &instruction(vec![], 1))
        .unwrap();
    assert_eq!(restarted.local_state(), trained);
    let _ = std::fs::remove_dir_all(&dir);
}
