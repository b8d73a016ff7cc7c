//! SegViz model files: the configuration, every tensor with its path and role, and free-form
//! metadata, in one file written atomically.
//!
//! Burn's own records carry tensors but not our configuration nor the classification of
//! each tensor, which federation and the Flower node need; so the format is ours and simple:
//!
//! ```text
//! b"SEGVIZ\0\x01"                  magic and format version 1
//! u64 little-endian                length of the JSON header
//! JSON header                      {"config": …, "metadata": …, "tensors": [{path, shape,
//!                                   role, batch_norm, trainable}, …]}
//! f32 little-endian values         every tensor in header order
//! u64 little-endian                FNV-1a checksum of everything above
//! ```
//!
//! A truncated or corrupted file is refused with an error naming the file.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};
use crate::model::{SegVizConfig, SegVizModel};
use crate::state::{ModelState, StateTensor, TensorRole};

const MAGIC: &[u8; 8] = b"SEGVIZ\0\x01";

#[derive(Serialize, Deserialize)]
struct Header {
    config: SegVizConfig,
    metadata: serde_json::Value,
    tensors: Vec<TensorHeader>,
}

#[derive(Serialize, Deserialize)]
struct TensorHeader {
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

/// Writes a checkpoint to `path` atomically: a temporary file in the same folder, flushed
/// to disk, then renamed over `path`.
pub fn write_checkpoint(path: &Path, checkpoint: &Checkpoint) -> Result<()> {
    let header = Header {
        config: checkpoint.config.clone(),
        metadata: checkpoint.metadata.clone(),
        tensors: checkpoint
            .state
            .tensors
            .iter()
            .map(|(p, t)| TensorHeader {
                path: p.clone(),
                shape: t.shape.clone(),
                role: t.role.clone(),
                batch_norm: t.batch_norm,
                trainable: t.trainable,
            })
            .collect(),
    };
    let json = serde_json::to_vec(&header)
        .map_err(|e| CoreError::file(path, format!("cannot encode header: {e}")))?;
    let mut bytes = Vec::with_capacity(24 + json.len() + 4 * checkpoint.state.num_values());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(json.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&json);
    for t in checkpoint.state.tensors.values() {
        for v in &t.data {
            bytes.extend_from_slice(&v.to_le_bytes());
        }
    }
    let sum = checksum(&bytes);
    bytes.extend_from_slice(&sum.to_le_bytes());
    write_atomically(path, &bytes)
}

/// Reads a checkpoint written by [`write_checkpoint`].
pub fn read_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = fs::read(path).map_err(|e| CoreError::io(path, e))?;
    let bad = |reason: String| CoreError::file(path, reason);
    if bytes.len() < MAGIC.len() + 16 || &bytes[..8] != MAGIC {
        return Err(bad(
            "not a SegViz model file (bad magic or too short)".into()
        ));
    }
    let (body, tail) = bytes.split_at(bytes.len() - 8);
    let stored = u64::from_le_bytes(tail.try_into().map_err(|_| bad("short checksum".into()))?);
    if checksum(body) != stored {
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
    let header: Header = serde_json::from_slice(&body[16..data_start])
        .map_err(|e| bad(format!("malformed header: {e}")))?;
    header
        .config
        .validate()
        .map_err(|e| bad(format!("stored configuration: {e}")))?;
    // The configuration decides what gets allocated when the model is built: check it
    // against the tensors, and the tensors against the file, before anything is built.
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
    let held = sizes
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
    // A file may hold part of its model (a client's local state, an update without the
    // BatchNorm layers), never more than the model has. A whole model is checked when it is
    // built (`Checkpoint::into_model`).
    let declared = header.config.value_count().unwrap_or(usize::MAX);
    if held > declared {
        return Err(bad(format!(
            "the stored configuration (channels {:?}, num_res_units {}, {} head(s)) declares \
             {declared} values but the file holds {held} in {} tensors",
            header.config.representation.channels,
            header.config.representation.num_res_units,
            header.config.tasks.len(),
            header.tensors.len()
        )));
    }
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

fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
