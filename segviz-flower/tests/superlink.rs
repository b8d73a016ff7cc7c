//! Checks against a live flwr 1.42 SuperLink, run by `scripts/flower_loopback.sh` (which sets
//! `SEGVIZ_SUPERLINK=host:port` and starts a run while this probe waits):
//! - a request signed with another key than the one presented is refused, and so is a stale
//!   timestamp;
//! - once the probe is a node of the run, an object pushed with content that does not hash to
//!   its id is refused, while the genuine object is accepted.
//!
//! Ignored in `cargo test` (no SuperLink there); the loopback script runs it with `--ignored`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use segviz_flower::protocol::message::build_reply;
use segviz_flower::protocol::objects::{post_order, verify};
use segviz_flower::protocol::proto;
use segviz_flower::protocol::records::{MetricValue, Record, RecordDict};
use segviz_flower::{FleetClient, FlowerError, NodeIdentity, Transport};

#[test]
#[ignore = "needs a live SuperLink: run scripts/flower_loopback.sh"]
fn a_wrong_key_and_a_tampered_object_are_refused() {
    let Ok(address) = std::env::var("SEGVIZ_SUPERLINK") else {
        println!("skipped: SEGVIZ_SUPERLINK is not set");
        return;
    };
    let identity = NodeIdentity::generate().unwrap();
    let client = FleetClient::new(&address, &Transport::Insecure, identity.clone()).unwrap();

    // 1. The public key presented is ours, the signature another key's.
    let impostor = NodeIdentity::generate().unwrap();
    let stamp = segviz_flower::protocol::auth::now_iso8601();
    let mut headers = identity.headers_at(&stamp);
    headers[2] = impostor.headers_at(&stamp)[2].clone();
    let request = proto::RegisterNodeFleetRequest {
        public_key: identity.public_key_pem().to_vec(),
    };
    let wrong_key: Result<proto::RegisterNodeFleetResponse, _> =
        client.call_with_headers("register-node", &request, &headers);
    println!("probe: wrong-key request -> {wrong_key:?}");
    assert!(matches!(wrong_key, Err(FlowerError::Unauthorized { .. })));

    // 2. A correctly signed but stale timestamp.
    let stale = (chrono::Utc::now() - chrono::Duration::seconds(900))
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, false);
    let old: Result<proto::RegisterNodeFleetResponse, _> =
        client.call_with_headers("register-node", &request, &identity.headers_at(&stale));
    println!("probe: stale-timestamp request -> {old:?}");
    assert!(matches!(old, Err(FlowerError::Unauthorized { .. })));

    // 3. Join properly and wait for an instruction.
    client.register().unwrap();
    let node_id = client.activate(10.0).unwrap();
    println!("probe: connected as node {node_id}");
    let stop = Arc::new(AtomicBool::new(false));
    let beats = {
        let (client, stop) = (client.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let _ = client.heartbeat(node_id, 10.0);
                std::thread::sleep(Duration::from_secs(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(300);
    let (message, tree) = loop {
        let pulled = client.pull_messages(node_id).unwrap();
        if let (Some(m), Some(t)) = (
            pulled.messages_list.into_iter().next(),
            pulled.message_object_trees.into_iter().next(),
        ) {
            break (m, t);
        }
        assert!(Instant::now() < deadline, "no instruction within 300 s");
        std::thread::sleep(Duration::from_millis(300));
    };
    let metadata = message.metadata.unwrap();
    let run_id = metadata.run_id;
    let mut objects = HashMap::new();
    for id in post_order(&tree) {
        let content = loop {
            if let Some(c) = client.pull_object(node_id, run_id, &id).unwrap() {
                break c;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        verify(&id, &content).unwrap();
        objects.insert(id, content);
    }
    client
        .confirm_received(node_id, run_id, &metadata.message_id)
        .unwrap();
    println!(
        "probe: received a {} instruction with {} verified objects",
        metadata.message_type,
        objects.len()
    );

    // 4. Reply, pushing one object with tampered content, then the genuine one.
    let content = RecordDict {
        records: vec![(
            "metrics".into(),
            Record::Metrics(vec![("num-examples".into(), MetricValue::Int(1))]),
        )],
    };
    let reply = build_reply(&metadata, node_id, Ok(&content)).unwrap();
    let (wanted, session) = client
        .push_message(node_id, reply.message.clone(), reply.tree.clone(), 0.0)
        .unwrap();
    let id = post_order(&reply.tree)
        .into_iter()
        .find(|id| wanted.contains(id))
        .expect("the SuperLink wants the reply's objects");
    let genuine = reply.objects.get(&id).unwrap().to_vec();
    let mut tampered = genuine.clone();
    *tampered.last_mut().unwrap() ^= 0x55;
    let refused = client.push_object(node_id, run_id, &session, &id, tampered);
    println!("probe: tampered object -> {refused:?}");
    assert!(refused.is_err(), "the SuperLink accepted a tampered object");
    let accepted = client.push_object(node_id, run_id, &session, &id, genuine);
    println!("probe: genuine object -> {accepted:?}");
    assert!(accepted.is_ok());

    // 5. Leave, so the round closes without the probe.
    stop.store(true, Ordering::SeqCst);
    beats.join().unwrap();
    client.deactivate(node_id).unwrap();
    client.unregister(node_id).unwrap();
    println!("probe: left");
}
