//! SegViz model files: the configuration, every tensor with its path and role, and free-form
//! metadata, in one [safetensors](https://huggingface.co/docs/safetensors) file written
//! atomically.
//!
//! Any safetensors reader (Python's `safetensors`, Rust's `safetensors`, Burn's `burn-store`)
//! opens a model file. The tensors are float32 and named by their SegViz path
//! (`representation.down.0.units.0.conv.weight`, `heads.liver.block.upsample.weight`…); the
//! file's `__metadata__` holds, as JSON strings:
//!
//! | key | value |
//! |---|---|
//! | `format` | `"segviz"` |
//! | `format_version` | `"2"` |
//! | `config` | the [`SegVizConfig`] |
//! | `tensors` | `[{path, role, batch_norm, trainable, crc32}, …]` in path order: each tensor's classification and the CRC-32 of its little-endian bytes |
//! | `metadata` | whatever the writer attached (round, seed, training preprocessing…) |
//! | `preprocess` | a copy of `metadata.preprocess` when there is one, for tools that only need it |
//!
//! Federation and the Flower node need the classification (which tensors are the shared
//! representation, which a task head, which BatchNorm), so it is stored, never guessed from a
//! name. A truncated file is refused by the safetensors header check, a corrupted one by the
//! per-tensor CRC-32; both errors name the file.
//!
//! Files of the first SegViz format (magic `SEGVIZ\0\x01`, an FNV-1a checksum) still load;
//! saving them again writes the current format.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::model::{SegVizConfig, SegVizModel};
use crate::state::{ModelState, StateTensor, TensorRole};

/// The first eight bytes of a file of the first SegViz format (read, no longer written).
const LEGACY_MAGIC: &[u8; 8] = b"SEGVIZ\0\x01";
/// The `format` metadata value of SegViz safetensors files.
const FORMAT: &str = "segviz";
/// The `format_version` metadata value this code writes and reads.
const FORMAT_VERSION: &str = "2";

/// One tensor's entry in the `tensors` metadata list.
#[derive(Serialize, Deserialize)]
struct TensorEntry {
    path: String,
    role: TensorRole,
    batch_norm: bool,
    trainable: bool,
    crc32: u32,
}

/// The JSON header of the first SegViz format.
#[derive(Deserialize)]
struct LegacyHeader {
    config: SegVizConfig,
    metadata: serde_json::Value,
    tensors: Vec<LegacyTensorHeader>,
}

#[derive(Deserialize)]
struct LegacyTensorHeader {
    path: String,
    shape: Vec<usize>,
    role: TensorRole,
    batch_norm: bool,
    trainable: bool,
}

/// A model file's content, without a device: what federation needs to resume.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The model configuration.
    pub config: SegVizConfig,
    /// Every tensor.
    pub state: ModelState,
    /// Whatever the writer attached (round number, seed, metrics…).
    pub metadata: serde_json::Value,
}

impl Checkpoint {
    /// Builds the model on `device` from this checkpoint.
    ///
    /// # Errors
    /// [`CoreError::Config`] before anything is allocated when the state does not hold
    /// exactly the values its configuration declares (a partial state, such as a client's
    /// own heads, or a configuration that does not describe the tensors); any error of
    /// [`SegVizConfig::with_state`].
    pub fn into_model(self, device: &Device) -> Result<SegVizModel> {
        let held = self.state.num_values();
        let declared = self.config.value_count();
        if declared != Some(held) {
            return Err(CoreError::Config(format!(
                "the configuration (channels {:?}, num_res_units {}, {} head(s)) declares {} \
                 values but the state holds {held}: not a whole model of that configuration",
                self.config.representation.channels,
                self.config.representation.num_res_units,
                self.config.tasks.len(),
                declared.map_or_else(|| "too many".to_string(), |d| d.to_string()),
            )));
        }
        self.config.with_state(device, &self.state)
    }
}

/// Saves a model with its configuration and `metadata` to `path`, atomically.
pub fn save_model(path: &Path, model: &SegVizModel, metadata: serde_json::Value) -> Result<()> {
    write_checkpoint(
        path,
        &Checkpoint {
            config: model.config().clone(),
            state: model.state(),
            metadata,
        },
    )
}

/// Loads a model saved by [`save_model`] onto `device`, with its metadata.
pub fn load_model(path: &Path, device: &Device) -> Result<(SegVizModel, serde_json::Value)> {
    let checkpoint = read_checkpoint(path)?;
    let metadata = checkpoint.metadata.clone();
    let model = checkpoint
        .into_model(device)
        .map_err(|e| CoreError::file(path, e.to_string()))?;
    Ok((model, metadata))
}

/// Writes a checkpoint to `path` atomically, as safetensors (see the module documentation):
/// a temporary file in the same folder, flushed to disk, then renamed over `path`.
pub fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let bytes = encode_checkpoint(checkpoint).map_err(|reason| CoreError::file(path, reason))?;
    write_atomically(path, &bytes)
}

/// The bytes of a model file holding `checkpoint`.
fn encode_checkpoint(checkpoint: &Checkpoint) -> std::result::Result<Vec<u8>, String> {
    let tensors = &checkpoint.state.tensors;
    let mut raw: Vec<(&String, Vec<u8>)> = Vec::with_capacity(tensors.len());
    let mut entries = Vec::with_capacity(tensors.len());
    for (p, t) in tensors {
        let bytes: Vec<u8> = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
        entries.push(TensorEntry {
            path: p.clone(),
            role: t.role.clone(),
            batch_norm: t.batch_norm,
            trainable: t.trainable,
            crc32: crc32fast::hash(&bytes),
        });
        raw.push((p, bytes));
    }
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    meta.insert("format_version".to_string(), FORMAT_VERSION.to_string());
    meta.insert(
        "config".to_string(),
        json("configuration", &checkpoint.config)?,
    );
    meta.insert("tensors".to_string(), json("tensor list", &entries)?);
    meta.insert(
        "metadata".to_string(),
        json("metadata", &checkpoint.metadata)?,
    );
    if let Some(pre) = checkpoint.metadata.get("preprocess") {
        meta.insert("preprocess".to_string(), json("preprocessing", pre)?);
    }
    let views = raw
        .iter()
        .map(|(p, bytes)| {
            let shape = tensors[*p].shape.clone();
            TensorView::new(Dtype::F32, shape, bytes)
                .map(|v| (p.as_str(), v))
                .map_err(|e| format!("tensor {p}: {e}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| format!("cannot encode: {e}"))?;
    canonical_header(bytes)
}

/// The same safetensors bytes with the header's keys sorted: the crate writes its metadata
/// map in hash order, and the same checkpoint must always give the same file.
fn canonical_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let bad = |e: &dyn std::fmt::Display| format!("cannot encode the safetensors header: {e}");
    let n = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(|b: [u8; 8]| u64::from_le_bytes(b) as usize)
        .filter(|&n| 8 + n <= bytes.len())
        .ok_or_else(|| bad(&"short header"))?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).map_err(|e| bad(&e))?;
    if let Some(meta) = header.get_mut("__metadata__") {
        let sorted: BTreeMap<String, String> =
            serde_json::from_value(meta.take()).map_err(|e| bad(&e))?;
        *meta = serde_json::to_value(sorted).map_err(|e| bad(&e))?;
    }
    let mut json = serde_json::to_vec(&header).map_err(|e| bad(&e))?;
    // Like the crate, pad the header with spaces so that the data starts 8-byte aligned.
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// Reads a checkpoint written by [`write_checkpoint`] (or by the first SegViz format).
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = fs::read(path).map_err(|e| CoreError::io(path, e))?;
    let checkpoint = if bytes.starts_with(LEGACY_MAGIC) {
        read_legacy(path, &bytes)?
    } else {
        decode_safetensors(&bytes).map_err(|reason| CoreError::file(path, reason))?
    };
    check_against_config(&checkpoint).map_err(|reason| CoreError::file(path, reason))?;
    Ok(checkpoint)
}

/// `value` as a JSON string for the file's metadata.
fn json<T: Serialize + ?Sized>(what: &str, value: &T) -> std::result::Result<String, String> {
    serde_json::to_string(value).map_err(|e| format!("cannot encode the {what}: {e}"))
}

/// Parses a safetensors model file.
fn decode_safetensors(bytes: &[u8]) -> std::result::Result<Checkpoint, String> {
    let file = SafeTensors::deserialize(bytes).map_err(|e| {
        format!("not a SegViz model file (safetensors: {e}); is it truncated or corrupted?")
    })?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| format!("not a SegViz model file (safetensors: {e})"))?;
    let meta = header.metadata().as_ref().ok_or_else(|| {
        "a safetensors file without SegViz metadata (no __metadata__): not a SegViz model \
         file; a MONAI or PyTorch checkpoint is imported with the import_monai example"
            .to_string()
    })?;
    let field = |key: &str| {
        meta.get(key).ok_or_else(|| {
            format!("a safetensors file without the SegViz metadata key {key:?}: not a SegViz model file")
        })
    };
    if field("format")? != FORMAT {
        return Err(format!(
            "metadata format is {:?}, not {FORMAT:?}: not a SegViz model file",
            field("format")?
        ));
    }
    if field("format_version")? != FORMAT_VERSION {
        return Err(format!(
            "SegViz format version {:?}; this SegViz reads version {FORMAT_VERSION}: a newer \
             SegViz wrote it",
            field("format_version")?
        ));
    }
    let parse_err = |key: &str, e: serde_json::Error| format!("malformed metadata {key:?}: {e}");
    let config: SegVizConfig =
        serde_json::from_str(field("config")?).map_err(|e| parse_err("config", e))?;
    let entries: Vec<TensorEntry> =
        serde_json::from_str(field("tensors")?).map_err(|e| parse_err("tensors", e))?;
    let metadata: serde_json::Value =
        serde_json::from_str(field("metadata")?).map_err(|e| parse_err("metadata", e))?;
    config
        .validate()
        .map_err(|e| format!("stored configuration: {e}"))?;
    if entries.len() != file.len() {
        return Err(format!(
            "the metadata lists {} tensors but the file holds {}",
            entries.len(),
            file.len()
        ));
    }
    let mut state = ModelState::default();
    for e in entries {
        let view = file
            .tensor(&e.path)
            .map_err(|_| format!("tensor {} is listed in the metadata but not stored", e.path))?;
        if view.dtype() != Dtype::F32 {
            return Err(format!(
                "tensor {}: dtype {:?}, float32 expected",
                e.path,
                view.dtype()
            ));
        }
        if crc32fast::hash(view.data()) != e.crc32 {
            return Err(format!(
                "tensor {}: CRC-32 mismatch: the file is corrupted",
                e.path
            ));
        }
        let data = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let tensor = StateTensor {
            shape: view.shape().to_vec(),
            data,
            role: e.role,
            batch_norm: e.batch_norm,
            trainable: e.trainable,
        };
        if state.tensors.insert(e.path.clone(), tensor).is_some() {
            return Err(format!("tensor {} is listed twice in the metadata", e.path));
        }
    }
    Ok(Checkpoint {
        config,
        state,
        metadata,
    })
}

/// A file may hold part of its model (a client's local state, an update without the
/// BatchNorm layers), never more than the model has. A whole model is checked when it is
/// built ([`Checkpoint::into_model`]).
fn check_against_config(checkpoint: &Checkpoint) -> std::result::Result<(), String> {
    let config = &checkpoint.config;
    let held = checkpoint.state.num_values();
    let declared = config.value_count().unwrap_or(usize::MAX);
    if held > declared {
        return Err(format!(
            "the stored configuration (channels {:?}, num_res_units {}, {} head(s)) declares \
             {declared} values but the file holds {held} in {} tensors",
            config.representation.channels,
            config.representation.num_res_units,
            config.tasks.len(),
            checkpoint.state.tensors.len()
        ));
    }
    Ok(())
}

/// Reads a file of the first SegViz format (magic, JSON header, values, FNV-1a checksum).
fn read_legacy(path: &Path, bytes: &[u8]) -> Result<Checkpoint> {
    let bad = |reason: String| CoreError::file(path, reason);
    if bytes.len() < LEGACY_MAGIC.len() + 16 {
        return Err(bad(
            "not a SegViz model file (bad magic or too short)".into()
        ));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().map_err(|_| bad("short checksum".into()))?);
    if fnv1a(body) != stored {
        return Err(bad(
            "checksum mismatch: the file is truncated or corrupted".into()
        ));
    }
    let header_len = u64::from_le_bytes(
        body[8..16]
            .try_into()
            .map_err(|_| bad("short header length".into()))?,
    ) as usize;
    let data_start = 16usize
        .checked_add(header_len)
        .filter(|&e| e <= body.len())
        .ok_or_else(|| bad("header length runs past the end of the file".into()))?;
    let header: LegacyHeader = serde_json::from_slice(&body[16..data_start])
        .map_err(|e| bad(format!("malformed header: {e}")))?;
    header
        .config
        .validate()
        .map_err(|e| bad(format!("stored configuration: {e}")))?;
    // The configuration decides what gets allocated when the model is built: check the
    // tensors against the file before anything is read.
    let mut sizes = Vec::with_capacity(header.tensors.len());
    for t in &header.tensors {
        let n = t
            .shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .filter(|n| n.checked_mul(4).is_some())
            .ok_or_else(|| {
                bad(format!(
                    "tensor {} has an impossible shape {:?}",
                    t.path, t.shape
                ))
            })?;
        sizes.push(n);
    }
    sizes
        .iter()
        .try_fold(0usize, |total, &n| total.checked_add(n))
        .filter(|&total| {
            total
                .checked_mul(4)
                .is_some_and(|b| b <= body.len() - data_start)
        })
        .ok_or_else(|| {
            bad(format!(
                "the header declares more tensor values than the file's {} data bytes hold",
                body.len() - data_start
            ))
        })?;
    let mut offset = data_start;
    let mut state = ModelState::default();
    for (t, n) in header.tensors.into_iter().zip(sizes) {
        let end = offset
            .checked_add(4 * n)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| bad(format!("tensor {} runs past the end of the file", t.path)))?;
        let data = body[offset..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        offset = end;
        state.tensors.insert(
            t.path,
            StateTensor {
                shape: t.shape,
                data,
                role: t.role,
                batch_norm: t.batch_norm,
                trainable: t.trainable,
            },
        );
    }
    if offset != body.len() {
        return Err(bad(format!(
            "{} unexpected bytes after the last tensor",
            body.len() - offset
        )));
    }
    Ok(Checkpoint {
        config: header.config,
        state,
        metadata: header.metadata,
    })
}

/// Writes `bytes` to `path` through a temporary sibling file and a rename, so a reader never
/// sees a half-written file and an interrupted write loses nothing already there.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    fs::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "checkpoint".into());
    // Unique per process and per write: two threads may write the same file.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(".{name}.tmp-{}-{n}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        CoreError::io(path, e)
    })
}

/// FNV-1a 64, the checksum of the first SegViz format.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
