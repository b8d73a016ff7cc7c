//! Messages as objects: reading an instruction's content, and building a reply.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message as _;

use crate::error::{FlowerError, Result};
use crate::protocol::objects::{parse, ObjectStore};
use crate::protocol::proto::{self, Metadata, ObjectTree};
use crate::protocol::records::RecordDict;

/// Flower's error code for an exception in a client app.
pub const CLIENT_APP_RAISED_EXCEPTION: i64 = 1;

/// Seconds since the Unix epoch.
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Seconds left before `metadata`'s message expires (negative once expired).
pub fn seconds_left(metadata: &Metadata) -> f64 {
    metadata.created_at + metadata.ttl - unix_now()
}

/// The content of an instruction whose objects (all verified against their ids) are in
/// `objects`. `root` is the message object's id (its `message_id`).
pub fn instruction_content(root: &str, objects: &HashMap<String, Vec<u8>>) -> Result<RecordDict> {
    let content = objects
        .get(root)
        .ok_or_else(|| FlowerError::protocol(format!("message object {root} was not pulled")))?;
    let parsed = parse(content)?;
    if parsed.type_name != "Message" {
        return Err(FlowerError::protocol(format!(
            "object {root} is a {}, not a Message",
            parsed.type_name
        )));
    }
    let body = proto::Message::decode(parsed.body)
        .map_err(|e| FlowerError::protocol(format!("message {root}: {e}")))?;
    if let Some(error) = body.error {
        return Err(FlowerError::protocol(format!(
            "instruction {root} carries an error ({}): {}",
            error.code, error.reason
        )));
    }
    let [record_dict] = parsed.children.as_slice() else {
        return Err(FlowerError::protocol(format!(
            "message {root} has {} children (expected one RecordDict)",
            parsed.children.len()
        )));
    };
    RecordDict::load(record_dict, objects)
}

/// A reply ready to push: the message (metadata only, its id set), its object tree, and the
/// objects.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The message as sent in `push-messages` (no content).
    pub message: proto::Message,
    /// Its object tree.
    pub tree: ObjectTree,
    /// Every object of the tree.
    pub objects: ObjectStore,
}

/// The reply of node `node_id` to `instruction`: `content`, or an error with `reason`.
pub fn build_reply(
    instruction: &Metadata,
    node_id: u64,
    content: std::result::Result<&RecordDict, &str>,
) -> Result<Reply> {
    let now = unix_now();
    let mut metadata = Metadata {
        run_id: instruction.run_id,
        message_id: String::new(),
        src_node_id: node_id,
        dst_node_id: instruction.src_node_id,
        reply_to_message_id: instruction.message_id.clone(),
        group_id: instruction.group_id.clone(),
        // A reply may not outlive its instruction.
        ttl: (instruction.created_at + instruction.ttl - now).max(1e-3),
        message_type: instruction.message_type.clone(),
        created_at: now,
        src_task_id: instruction.dst_task_id,
        dst_task_id: instruction.src_task_id,
    };
    let mut objects = ObjectStore::default();
    let (children, error) = match content {
        Ok(records) => (vec![records.store(&mut objects)?], None),
        Err(reason) => (
            vec![],
            Some(proto::Error {
                code: CLIENT_APP_RAISED_EXCEPTION,
                reason: reason.to_string(),
            }),
        ),
    };
    // The message object's body is the message without content and with an empty id; its
    // hash becomes the id.
    let body = proto::Message {
        metadata: Some(metadata.clone()),
        content: None,
        error: error.clone(),
    }
    .encode_to_vec();
    let tree = objects.add("Message", children, &body);
    metadata.message_id = tree.object_id.clone();
    // In push-messages the content travels as objects; the message itself carries an empty
    // RecordDict (or nothing, for an error reply), as the SuperLink expects.
    let content = error.is_none().then(proto::RecordDict::default);
    Ok(Reply {
        message: proto::Message {
            metadata: Some(metadata),
            content,
            error,
        },
        tree,
        objects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::records::{MetricValue, Record};

    fn instruction() -> Metadata {
        Metadata {
            run_id: 7,
            message_id: "abc".into(),
            src_node_id: 1,
            dst_node_id: 42,
            reply_to_message_id: String::new(),
            group_id: "1".into(),
            ttl: 3600.0,
            message_type: "train".into(),
            created_at: unix_now(),
            src_task_id: Some(11),
            dst_task_id: Some(12),
        }
    }

    #[test]
    fn a_reply_addresses_the_instruction_and_is_its_own_id() {
        let content = RecordDict {
            records: vec![(
                "metrics".into(),
                Record::Metrics(vec![("num-examples".into(), MetricValue::Int(3))]),
            )],
        };
        let reply = build_reply(&instruction(), 42, Ok(&content)).unwrap();
        let m = reply.message.metadata.clone().unwrap();
        assert_eq!((m.src_node_id, m.dst_node_id, m.run_id), (42, 1, 7));
        assert_eq!(m.reply_to_message_id, "abc");
        assert_eq!((m.src_task_id, m.dst_task_id), (Some(12), Some(11)));
        assert!(m.ttl > 3500.0 && m.ttl <= 3600.0);
        assert_eq!(m.message_id, reply.tree.object_id);
        let objects: HashMap<String, Vec<u8>> = reply
            .objects
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            instruction_content(&m.message_id, &objects).unwrap(),
            content
        );
    }

    #[test]
    fn an_error_reply_has_no_content() {
        let reply = build_reply(&instruction(), 42, Err("no data")).unwrap();
        assert!(reply.tree.children.is_empty());
        assert_eq!(reply.message.error.unwrap().reason, "no data");
    }
}
