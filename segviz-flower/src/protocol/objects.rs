//! Flower's content-addressed objects.
//!
//! Everything a message carries travels as objects: `"<Type> <child ids> <body length>\0"`
//! followed by the body, identified by the hex SHA-256 of those bytes. A message is a tree:
//! `Message` → `RecordDict` → `ArrayRecord` / `ConfigRecord` / `MetricRecord`, and an
//! `ArrayRecord` → `Array` → `ArrayChunk` (the `.npy` bytes, split every 5 MiB).
//! [`ObjectStore`] builds such trees for replies; [`parse`] and [`verify`] read the ones the
//! SuperLink sends, refusing any object whose content does not hash to its id.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::error::{FlowerError, Result};
use crate::protocol::proto::ObjectTree;

/// Largest `ArrayChunk` body (Flower's `FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE` default).
pub const MAX_CHUNK_BYTES: usize = 5 * 1024 * 1024;

/// The hex SHA-256 of an object's bytes: its id.
pub fn object_id(content: &[u8]) -> String {
    let digest = Sha256::digest(content);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Checks that `content` hashes to `id`.
pub fn verify(id: &str, content: &[u8]) -> Result<()> {
    if object_id(content) == id {
        Ok(())
    } else {
        Err(FlowerError::Tampered { id: id.to_string() })
    }
}

/// An object's bytes: header, then body.
pub fn encode(type_name: &str, children: &[String], body: &[u8]) -> Vec<u8> {
    let header = format!("{type_name} {} {}", children.join(","), body.len());
    let mut out = Vec::with_capacity(header.len() + 1 + body.len());
    out.extend_from_slice(header.as_bytes());
    out.push(0);
    out.extend_from_slice(body);
    out
}

/// An object split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedObject<'a> {
    /// `Message`, `RecordDict`, `ArrayRecord`, `Array`, `ArrayChunk`, `ConfigRecord`, …
    pub type_name: &'a str,
    /// Ids of the children, in header order.
    pub children: Vec<String>,
    /// The body.
    pub body: &'a [u8],
}

/// Splits an object into type, children and body, checking the declared body length.
pub fn parse(content: &[u8]) -> Result<ParsedObject<'_>> {
    let bad = |why: &str| FlowerError::protocol(format!("malformed object: {why}"));
    let split = content
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| bad("no header terminator"))?;
    let header = std::str::from_utf8(&content[..split]).map_err(|_| bad("header not UTF-8"))?;
    let mut parts = header.split(' ');
    let (Some(type_name), Some(children), Some(length), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad(&format!(
            "header {header:?} is not '<type> <children> <length>'"
        )));
    };
    let length: usize = length
        .parse()
        .map_err(|_| bad("body length not a number"))?;
    let body = &content[split + 1..];
    if body.len() != length {
        return Err(bad(&format!(
            "{type_name} declares {length} body bytes but has {}",
            body.len()
        )));
    }
    let children = if children.is_empty() {
        Vec::new()
    } else {
        children.split(',').map(str::to_string).collect()
    };
    Ok(ParsedObject {
        type_name,
        children,
        body,
    })
}

/// Objects of one outgoing message, by id, with the tree the SuperLink is told about.
#[derive(Debug, Default, Clone)]
pub struct ObjectStore {
    objects: BTreeMap<String, Vec<u8>>,
}

impl ObjectStore {
    /// Adds an object whose children are the roots of `children` (duplicates are listed
    /// once, in first-seen order, as Flower does); returns its tree.
    pub fn add(&mut self, type_name: &str, children: Vec<ObjectTree>, body: &[u8]) -> ObjectTree {
        let mut unique: Vec<ObjectTree> = Vec::new();
        for child in children {
            if !unique.iter().any(|c| c.object_id == child.object_id) {
                unique.push(child);
            }
        }
        let ids: Vec<String> = unique.iter().map(|c| c.object_id.clone()).collect();
        let content = encode(type_name, &ids, body);
        let id = object_id(&content);
        self.objects.insert(id.clone(), content);
        ObjectTree {
            object_id: id,
            children: unique,
        }
    }

    /// The bytes of object `id`.
    pub fn get(&self, id: &str) -> Option<&[u8]> {
        self.objects.get(id).map(Vec::as_slice)
    }

    /// Number of distinct objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Every object, by id.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &Vec<u8>)> {
        self.objects.iter()
    }
}

/// Ids of a tree, children before parents (the order Flower pulls and pushes in).
pub fn post_order(tree: &ObjectTree) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(t: &ObjectTree, out: &mut Vec<String>) {
        for c in &t.children {
            walk(c, out);
        }
        if !out.contains(&t.object_id) {
            out.push(t.object_id.clone());
        }
    }
    walk(tree, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_like_flower_and_parses_back() {
        // ArrayChunk with body b"abc": header "ArrayChunk  3", NUL, body.
        let content = encode("ArrayChunk", &[], b"abc");
        assert_eq!(content, b"ArrayChunk  3\0abc");
        let parsed = parse(&content).unwrap();
        assert_eq!(parsed.type_name, "ArrayChunk");
        assert!(parsed.children.is_empty());
        assert_eq!(parsed.body, b"abc");
        let with_children = encode("Array", &["a".into(), "b".into()], b"{}");
        assert_eq!(parse(&with_children).unwrap().children, vec!["a", "b"]);
    }

    #[test]
    fn ids_are_sha256_and_tampering_is_detected() {
        // sha256("") is well known.
        assert_eq!(
            object_id(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let content = encode("ArrayChunk", &[], b"abc");
        let id = object_id(&content);
        assert!(verify(&id, &content).is_ok());
        let mut tampered = content.clone();
        *tampered.last_mut().unwrap() ^= 1;
        assert!(matches!(
            verify(&id, &tampered),
            Err(FlowerError::Tampered { .. })
        ));
    }

    #[test]
    fn refuses_malformed_objects() {
        assert!(parse(b"no terminator").is_err());
        assert!(parse(b"ArrayChunk  5\0abc").is_err());
        assert!(parse(b"ArrayChunk 3\0abc").is_err());
    }

    #[test]
    fn store_lists_duplicate_children_once_and_walks_children_first() {
        let mut store = ObjectStore::default();
        let a = store.add("ArrayChunk", vec![], b"same");
        let b = store.add("ArrayChunk", vec![], b"same");
        assert_eq!(a, b);
        let parent = store.add("Array", vec![a.clone(), b], b"{}");
        assert_eq!(parent.children.len(), 1);
        assert_eq!(store.len(), 2);
        assert_eq!(
            post_order(&parent),
            vec![a.object_id, parent.object_id.clone()]
        );
    }
}
