//! Flower's records as Rust values, and their encoding as content-addressed objects.
//!
//! A [`RecordDict`] holds named records: arrays ([`ArrayRecord`], `float32` tensors here),
//! configuration values ([`ConfigRecord`]) and metrics ([`MetricRecord`]). The object bodies
//! follow flwr 1.42: JSON maps from names to child ids for `RecordDict` / `ArrayRecord`, JSON
//! metadata for `Array`, raw `.npy` bytes for `ArrayChunk`, and the protobuf `ConfigRecord` /
//! `MetricRecord` messages for the other two.

use std::collections::{BTreeMap, HashMap};

use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::error::{FlowerError, Result};
use crate::protocol::npy;
use crate::protocol::objects::{parse, ObjectStore, MAX_CHUNK_BYTES};
use crate::protocol::proto::{self, ObjectTree};

/// A `float32` tensor in C order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape, outermost first.
    pub shape: Vec<usize>,
    /// Values.
    pub values: Vec<f32>,
}

/// Named tensors, in order.
pub type ArrayRecord = Vec<(String, Tensor)>;

/// A configuration value (what a Flower `ConfigRecord` may hold).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigValue {
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// Boolean.
    Bool(bool),
    /// Text.
    Str(String),
    /// Bytes.
    Bytes(Vec<u8>),
    /// List of integers.
    IntList(Vec<i64>),
    /// List of floats.
    FloatList(Vec<f64>),
    /// List of booleans.
    BoolList(Vec<bool>),
    /// List of texts.
    StrList(Vec<String>),
    /// List of byte strings.
    BytesList(Vec<Vec<u8>>),
}

impl ConfigValue {
    /// The value as an integer, if it is one (unsigned values that fit included).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            ConfigValue::Int(v) => Some(*v),
            _ => None,
        }
    }

    /// The value as a float (integers are converted).
    pub fn as_float(&self) -> Option<f64> {
        match self {
            ConfigValue::Float(v) => Some(*v),
            ConfigValue::Int(v) => Some(*v as f64),
            _ => None,
        }
    }

    /// The value as text.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            ConfigValue::Str(v) => Some(v),
            _ => None,
        }
    }
}

/// Named configuration values, in order.
pub type ConfigRecord = Vec<(String, ConfigValue)>;

/// A metric value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    /// Integer.
    Int(i64),
    /// Float.
    Float(f64),
    /// List of integers.
    IntList(Vec<i64>),
    /// List of floats.
    FloatList(Vec<f64>),
}

/// Named metrics, in order.
pub type MetricRecord = Vec<(String, MetricValue)>;

/// One record of a [`RecordDict`].
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// Tensors.
    Arrays(ArrayRecord),
    /// Configuration.
    Config(ConfigRecord),
    /// Metrics.
    Metrics(MetricRecord),
}

/// A message's content: named records.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RecordDict {
    /// Records, in order.
    pub records: Vec<(String, Record)>,
}

impl RecordDict {
    /// The record called `name`.
    pub fn get(&self, name: &str) -> Option<&Record> {
        self.records.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }

    /// The array record called `name`.
    pub fn arrays(&self, name: &str) -> Option<&ArrayRecord> {
        match self.get(name) {
            Some(Record::Arrays(a)) => Some(a),
            _ => None,
        }
    }

    /// The config record called `name`.
    pub fn config(&self, name: &str) -> Option<&ConfigRecord> {
        match self.get(name) {
            Some(Record::Config(c)) => Some(c),
            _ => None,
        }
    }

    /// The metric record called `name`.
    pub fn metrics(&self, name: &str) -> Option<&MetricRecord> {
        match self.get(name) {
            Some(Record::Metrics(m)) => Some(m),
            _ => None,
        }
    }

    /// Adds the objects of this content to `store`; returns the `RecordDict`'s tree.
    pub fn store(&self, store: &mut ObjectStore) -> Result<ObjectTree> {
        let mut refs: BTreeMap<&str, String> = BTreeMap::new();
        let mut children = Vec::new();
        for (name, record) in &self.records {
            let tree = match record {
                Record::Arrays(arrays) => store_arrays(arrays, store)?,
                Record::Config(config) => {
                    let body = config_to_proto(config).encode_to_vec();
                    store.add("ConfigRecord", vec![], &body)
                }
                Record::Metrics(metrics) => {
                    let body = metrics_to_proto(metrics).encode_to_vec();
                    store.add("MetricRecord", vec![], &body)
                }
            };
            refs.insert(name, tree.object_id.clone());
            children.push(tree);
        }
        Ok(store.add("RecordDict", children, &json_body(&refs)?))
    }

    /// Rebuilds a `RecordDict` from its object `id` and the objects pulled with it.
    pub fn load(id: &str, objects: &HashMap<String, Vec<u8>>) -> Result<RecordDict> {
        let object = expect(objects, id, "RecordDict")?;
        let refs: BTreeMap<String, String> = json_parse(object.body, "RecordDict")?;
        check_children(&object.children, refs.values(), "RecordDict")?;
        let mut records = Vec::new();
        for (name, child) in refs {
            let content = fetch(objects, &child)?;
            let parsed = parse(content)?;
            let record = match parsed.type_name {
                "ArrayRecord" => Record::Arrays(load_arrays(&child, objects)?),
                "ConfigRecord" => Record::Config(config_from_proto(
                    proto::ConfigRecord::decode(parsed.body)
                        .map_err(|e| FlowerError::protocol(format!("ConfigRecord {name}: {e}")))?,
                )?),
                "MetricRecord" => Record::Metrics(metrics_from_proto(
                    proto::MetricRecord::decode(parsed.body)
                        .map_err(|e| FlowerError::protocol(format!("MetricRecord {name}: {e}")))?,
                )?),
                other => {
                    return Err(FlowerError::protocol(format!(
                        "record {name} has unknown type {other}"
                    )))
                }
            };
            records.push((name, record));
        }
        Ok(RecordDict { records })
    }
}

#[derive(Serialize, Deserialize)]
struct ArrayMetadata {
    dtype: String,
    shape: Vec<usize>,
    stype: String,
    arraychunk_ids: Vec<usize>,
}

fn store_arrays(arrays: &ArrayRecord, store: &mut ObjectStore) -> Result<ObjectTree> {
    let mut refs: BTreeMap<&str, String> = BTreeMap::new();
    let mut children = Vec::new();
    for (name, tensor) in arrays {
        let expected: usize = tensor.shape.iter().product();
        if expected != tensor.values.len() {
            return Err(FlowerError::protocol(format!(
                "array {name}: shape {:?} does not hold {} values",
                tensor.shape,
                tensor.values.len()
            )));
        }
        let bytes = npy::encode_f32(&tensor.shape, &tensor.values);
        let chunks: Vec<ObjectTree> = bytes
            .chunks(MAX_CHUNK_BYTES)
            .map(|chunk| store.add("ArrayChunk", vec![], chunk))
            .collect();
        // The body lists every chunk by its index among the distinct chunk ids.
        let mut unique: Vec<&str> = Vec::new();
        let mut indices = Vec::with_capacity(chunks.len());
        for c in &chunks {
            let at = match unique.iter().position(|u| *u == c.object_id) {
                Some(at) => at,
                None => {
                    unique.push(&c.object_id);
                    unique.len() - 1
                }
            };
            indices.push(at);
        }
        let metadata = ArrayMetadata {
            dtype: "float32".into(),
            shape: tensor.shape.clone(),
            stype: "numpy.ndarray".into(),
            arraychunk_ids: indices,
        };
        let tree = store.add("Array", chunks.clone(), &json_body(&metadata)?);
        refs.insert(name, tree.object_id.clone());
        children.push(tree);
    }
    Ok(store.add("ArrayRecord", children, &json_body(&refs)?))
}

fn load_arrays(id: &str, objects: &HashMap<String, Vec<u8>>) -> Result<ArrayRecord> {
    let object = expect(objects, id, "ArrayRecord")?;
    let refs: BTreeMap<String, String> = json_parse(object.body, "ArrayRecord")?;
    check_children(&object.children, refs.values(), "ArrayRecord")?;
    let mut out = Vec::with_capacity(refs.len());
    for (name, array_id) in refs {
        let array = expect(objects, &array_id, "Array")?;
        let metadata: ArrayMetadata = json_parse(array.body, "Array")?;
        if metadata.stype != "numpy.ndarray" {
            return Err(FlowerError::protocol(format!(
                "array {name}: serialization {:?} (expected numpy.ndarray)",
                metadata.stype
            )));
        }
        let mut bytes = Vec::new();
        for index in &metadata.arraychunk_ids {
            let chunk_id = array.children.get(*index).ok_or_else(|| {
                FlowerError::protocol(format!("array {name}: chunk index {index} out of range"))
            })?;
            bytes.extend_from_slice(expect(objects, chunk_id, "ArrayChunk")?.body);
        }
        let (shape, values) = npy::decode_f32(&bytes)
            .map_err(|e| FlowerError::protocol(format!("array {name}: {e}")))?;
        if shape != metadata.shape {
            return Err(FlowerError::protocol(format!(
                "array {name}: metadata shape {:?} but data shape {shape:?}",
                metadata.shape
            )));
        }
        out.push((name, Tensor { shape, values }));
    }
    Ok(out)
}

fn fetch<'a>(objects: &'a HashMap<String, Vec<u8>>, id: &str) -> Result<&'a [u8]> {
    objects
        .get(id)
        .map(Vec::as_slice)
        .ok_or_else(|| FlowerError::protocol(format!("object {id} missing from the message")))
}

fn expect<'a>(
    objects: &'a HashMap<String, Vec<u8>>,
    id: &str,
    type_name: &str,
) -> Result<crate::protocol::objects::ParsedObject<'a>> {
    let parsed = parse(fetch(objects, id)?)?;
    if parsed.type_name != type_name {
        return Err(FlowerError::protocol(format!(
            "object {id} is a {} where a {type_name} was expected",
            parsed.type_name
        )));
    }
    Ok(parsed)
}

fn check_children<'a>(
    declared: &[String],
    referenced: impl Iterator<Item = &'a String>,
    what: &str,
) -> Result<()> {
    let mut referenced: Vec<&String> = referenced.collect();
    referenced.sort();
    referenced.dedup();
    let mut declared: Vec<&String> = declared.iter().collect();
    declared.sort();
    if referenced != declared {
        return Err(FlowerError::protocol(format!(
            "{what}: body references other objects than its header lists"
        )));
    }
    Ok(())
}

fn json_body<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| FlowerError::protocol(format!("cannot encode JSON: {e}")))
}

fn json_parse<T: for<'de> Deserialize<'de>>(body: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| FlowerError::protocol(format!("{what} body: {e}")))
}

fn config_to_proto(config: &ConfigRecord) -> proto::ConfigRecord {
    use proto::config_record_value::Value as V;
    let items = config
        .iter()
        .map(|(key, value)| {
            let value = match value.clone() {
                ConfigValue::Int(v) => V::Sint64(v),
                ConfigValue::Float(v) => V::Double(v),
                ConfigValue::Bool(v) => V::Bool(v),
                ConfigValue::Str(v) => V::String(v),
                ConfigValue::Bytes(v) => V::Bytes(v),
                ConfigValue::IntList(vals) => V::SintList(proto::SintList { vals }),
                ConfigValue::FloatList(vals) => V::DoubleList(proto::DoubleList { vals }),
                ConfigValue::BoolList(vals) => V::BoolList(proto::BoolList { vals }),
                ConfigValue::StrList(vals) => V::StringList(proto::StringList { vals }),
                ConfigValue::BytesList(vals) => V::BytesList(proto::BytesList { vals }),
            };
            proto::config_record::Item {
                key: key.clone(),
                value: Some(proto::ConfigRecordValue { value: Some(value) }),
            }
        })
        .collect();
    proto::ConfigRecord { items }
}

fn unsigned(v: u64, key: &str) -> Result<i64> {
    i64::try_from(v).map_err(|_| FlowerError::protocol(format!("{key}: {v} does not fit in i64")))
}

fn config_from_proto(record: proto::ConfigRecord) -> Result<ConfigRecord> {
    use proto::config_record_value::Value as V;
    record
        .items
        .into_iter()
        .map(|item| {
            let key = item.key;
            let value = match item.value.and_then(|v| v.value) {
                Some(V::Sint64(v)) => ConfigValue::Int(v),
                Some(V::Uint64(v)) => ConfigValue::Int(unsigned(v, &key)?),
                Some(V::Double(v)) => ConfigValue::Float(v),
                Some(V::Bool(v)) => ConfigValue::Bool(v),
                Some(V::String(v)) => ConfigValue::Str(v),
                Some(V::Bytes(v)) => ConfigValue::Bytes(v),
                Some(V::SintList(l)) => ConfigValue::IntList(l.vals),
                Some(V::UintList(l)) => ConfigValue::IntList(
                    l.vals
                        .into_iter()
                        .map(|v| unsigned(v, &key))
                        .collect::<Result<_>>()?,
                ),
                Some(V::DoubleList(l)) => ConfigValue::FloatList(l.vals),
                Some(V::BoolList(l)) => ConfigValue::BoolList(l.vals),
                Some(V::StringList(l)) => ConfigValue::StrList(l.vals),
                Some(V::BytesList(l)) => ConfigValue::BytesList(l.vals),
                None => return Err(FlowerError::protocol(format!("config {key} has no value"))),
            };
            Ok((key, value))
        })
        .collect()
}

fn metrics_to_proto(metrics: &MetricRecord) -> proto::MetricRecord {
    use proto::metric_record_value::Value as V;
    let items = metrics
        .iter()
        .map(|(key, value)| {
            let value = match value.clone() {
                MetricValue::Int(v) => V::Sint64(v),
                MetricValue::Float(v) => V::Double(v),
                MetricValue::IntList(vals) => V::SintList(proto::SintList { vals }),
                MetricValue::FloatList(vals) => V::DoubleList(proto::DoubleList { vals }),
            };
            proto::metric_record::Item {
                key: key.clone(),
                value: Some(proto::MetricRecordValue { value: Some(value) }),
            }
        })
        .collect();
    proto::MetricRecord { items }
}

fn metrics_from_proto(record: proto::MetricRecord) -> Result<MetricRecord> {
    use proto::metric_record_value::Value as V;
    record
        .items
        .into_iter()
        .map(|item| {
            let key = item.key;
            let value = match item.value.and_then(|v| v.value) {
                Some(V::Sint64(v)) => MetricValue::Int(v),
                Some(V::Uint64(v)) => MetricValue::Int(unsigned(v, &key)?),
                Some(V::Double(v)) => MetricValue::Float(v),
                Some(V::SintList(l)) => MetricValue::IntList(l.vals),
                Some(V::UintList(l)) => MetricValue::IntList(
                    l.vals
                        .into_iter()
                        .map(|v| unsigned(v, &key))
                        .collect::<Result<_>>()?,
                ),
                Some(V::DoubleList(l)) => MetricValue::FloatList(l.vals),
                None => return Err(FlowerError::protocol(format!("metric {key} has no value"))),
            };
            Ok((key, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RecordDict {
        RecordDict {
            records: vec![
                (
                    "arrays".into(),
                    Record::Arrays(vec![
                        (
                            "a.weight".into(),
                            Tensor {
                                shape: vec![2, 3],
                                values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                            },
                        ),
                        // Same content as another array: stored once, listed under both names.
                        (
                            "b.weight".into(),
                            Tensor {
                                shape: vec![2, 3],
                                values: vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                            },
                        ),
                    ]),
                ),
                (
                    "config".into(),
                    Record::Config(vec![
                        ("server-round".into(), ConfigValue::Int(2)),
                        ("strategy".into(), ConfigValue::Str("fedbn".into())),
                        ("tasks".into(), ConfigValue::StrList(vec!["liver".into()])),
                    ]),
                ),
                (
                    "metrics".into(),
                    Record::Metrics(vec![("loss".into(), MetricValue::Float(0.5))]),
                ),
            ],
        }
    }

    #[test]
    fn a_record_dict_round_trips_through_objects() {
        let content = sample();
        let mut store = ObjectStore::default();
        let tree = content.store(&mut store).unwrap();
        let objects: HashMap<String, Vec<u8>> =
            store.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (id, bytes) in &objects {
            crate::protocol::objects::verify(id, bytes).unwrap();
        }
        let back = RecordDict::load(&tree.object_id, &objects).unwrap();
        // Loaded records come back sorted by name (JSON maps); compare by name.
        for (name, record) in &content.records {
            assert_eq!(back.get(name), Some(record), "{name}");
        }
    }

    #[test]
    fn a_large_array_is_split_into_5_mib_chunks() {
        let n = 3 * 1024 * 1024; // 12 MiB of float32
        let content = RecordDict {
            records: vec![(
                "arrays".into(),
                Record::Arrays(vec![(
                    "big".into(),
                    Tensor {
                        shape: vec![n],
                        values: (0..n).map(|i| i as f32).collect(),
                    },
                )]),
            )],
        };
        let mut store = ObjectStore::default();
        let tree = content.store(&mut store).unwrap();
        let array = &tree.children[0].children[0];
        assert_eq!(array.children.len(), 3);
        let objects: HashMap<String, Vec<u8>> =
            store.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        assert_eq!(
            RecordDict::load(&tree.object_id, &objects).unwrap(),
            content
        );
    }

    #[test]
    fn a_missing_object_is_an_error() {
        let mut store = ObjectStore::default();
        let tree = sample().store(&mut store).unwrap();
        let mut objects: HashMap<String, Vec<u8>> =
            store.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        objects.remove(&tree.children[0].object_id);
        assert!(RecordDict::load(&tree.object_id, &objects).is_err());
    }
}
