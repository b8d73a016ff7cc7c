//! MONAI interoperability: every SegViz tensor path has exactly one MONAI `UNet`
//! `state_dict` key, and a MONAI checkpoint (`.pt` state_dict) loads into a single-head
//! SegViz model.
//!
//! MONAI builds the U-Net recursively as `Sequential(down, SkipConnection(inner), up)`, so
//! level `l`'s modules live under `model` followed by `.1.submodule` repeated `l` times:
//! the encoder unit at `.0`, the decoder step at `.2`; the top level is `model.0` /
//! `model.2` and the bottom unit is the innermost `submodule` itself. Inside a unit,
//! `conv.unitN.conv` is the convolution, `conv.unitN.adn.N` the BatchNorm, `conv.unitN.adn.A`
//! the PReLU and `residual` the residual convolution; a decoder step is `0` (transposed
//! convolution with `conv` / `adn`) then `1` (a residual unit). The top decoder step
//! (`model.2`) is SegViz's task head.

use std::collections::BTreeSet;
use std::path::Path;

use burn::store::pytorch_reader::{DType, PickleValue, PytorchReader};
use burn::tensor::Device;

use crate::error::{CoreError, Result};
use crate::model::{SegVizConfig, SegVizModel};
use crate::state::{ModelState, StateTensor};
use crate::torch_save::{save_state_dict, TorchTensor};

/// The MONAI `state_dict` key of a SegViz tensor path, given the number of levels
/// (`strides.len()`). Returns `None` for a path that is not part of the model.
///
/// A head path maps to the top up-block `model.2` whatever the task is called: MONAI has a
/// single output block.
pub fn monai_key(path: &str, levels: usize) -> Option<String> {
    let parts: Vec<&str> = path.split('.').collect();
    let prefix = |l: usize| format!("model{}", ".1.submodule".repeat(l));
    let (base, rest): (String, &[&str]) = match parts.as_slice() {
        ["representation", "down", l, rest @ ..] => {
            let l: usize = l.parse().ok()?;
            (
                if l == 0 {
                    "model.0".into()
                } else {
                    format!("{}.0", prefix(l))
                },
                rest,
            )
        }
        ["representation", "bottom", rest @ ..] => (prefix(levels), rest),
        ["representation", "up", i, rest @ ..] => {
            // up[i] is the decoder step of level i + 1.
            let l: usize = i.parse::<usize>().ok()? + 1;
            (format!("{}.2", prefix(l)), rest)
        }
        ["heads", _task, "block", rest @ ..] => ("model.2".into(), rest),
        _ => return None,
    };
    let tail = match rest {
        // Residual unit: conv units and residual path.
        ["units", n, "conv", p] => format!("conv.unit{n}.conv.{p}"),
        ["units", n, "adn", "norm", p] => format!("conv.unit{n}.adn.N.{}", bn_name(p)?),
        ["units", n, "adn", "act", "alpha"] => format!("conv.unit{n}.adn.A.weight"),
        ["residual", p] => format!("residual.{p}"),
        // Decoder step: transposed conv unit, then a residual unit.
        ["upsample", p] => format!("0.conv.{p}"),
        ["upsample_adn", "norm", p] => format!("0.adn.N.{}", bn_name(p)?),
        ["upsample_adn", "act", "alpha"] => "0.adn.A.weight".into(),
        ["refine", "units", n, "conv", p] => format!("1.conv.unit{n}.conv.{p}"),
        ["refine", "units", n, "adn", "norm", p] => {
            format!("1.conv.unit{n}.adn.N.{}", bn_name(p)?)
        }
        ["refine", "units", n, "adn", "act", "alpha"] => format!("1.conv.unit{n}.adn.A.weight"),
        _ => return None,
    };
    Some(format!("{base}.{tail}"))
}

fn bn_name(field: &str) -> Option<&'static str> {
    match field {
        "gamma" => Some("weight"),
        "beta" => Some("bias"),
        "running_mean" => Some("running_mean"),
        "running_var" => Some("running_var"),
        _ => None,
    }
}

/// Reads a MONAI `UNet` checkpoint (a PyTorch `state_dict` saved with `torch.save`) into
/// a single-head SegViz model whose head is named `task`.
///
/// `config` must describe the same U-Net (channels, strides, `num_res_units`, and
/// `head_out_channels` = MONAI's `out_channels`); every tensor of the model must be in the
/// file with the same shape, and every tensor of the file must be used: a key the model has
/// no place for (say the third conv units of a `num_res_units=3` U-Net) is an error naming
/// it, never silently dropped. Only BatchNorm's `num_batches_tracked` counters are skipped.
///
/// The `state_dict` may be the file's root or sit under one of [`STATE_DICT_WRAPPERS`]
/// (`{"state_dict": …}` from PyTorch Lightning or a MONAI bundle, `{"model": …}` from MONAI's
/// `CheckpointSaver`); the other entries of a wrapper (optimiser, epoch, …) are not read.
pub fn load_monai_checkpoint(
    path: &Path,
    config: &SegVizConfig,
    task: &str,
    device: &Device,
) -> Result<SegVizModel> {
    let mut config = config.clone();
    config.tasks = vec![task.to_string()];
    let model = config.init(device, 0)?;
    let reader = open_state_dict(path)?;
    let levels = config.representation.strides.len();
    let mut state = ModelState::default();
    let mut unused: BTreeSet<String> = reader
        .keys()
        .into_iter()
        .filter(|k| !k.ends_with("num_batches_tracked"))
        .collect();
    for (our_path, entry) in model.layout().tensors {
        let key = monai_key(&our_path, levels)
            .ok_or_else(|| CoreError::State(format!("no MONAI key for tensor {our_path:?}")))?;
        unused.remove(&key);
        let tensor = reader.get(&key).ok_or_else(|| {
            CoreError::file(
                path,
                format!("missing key {key:?} (SegViz tensor {our_path}); is the U-Net configuration the same?"),
            )
        })?;
        if tensor.shape() != entry.shape.as_slice() {
            return Err(CoreError::file(
                path,
                format!(
                    "{key}: shape {:?} in the file, {:?} expected by the configuration",
                    tensor.shape(),
                    entry.shape
                ),
            ));
        }
        let data = tensor
            .read()
            .map_err(|e| CoreError::file(path, format!("{key}: {e}")))?;
        let values =
            decode_f32(&data, tensor.dtype(), entry.shape.iter().product()).ok_or_else(|| {
                CoreError::file(
                    path,
                    format!(
                        "{key}: unsupported dtype {:?} (float32 expected)",
                        tensor.dtype()
                    ),
                )
            })?;
        state.tensors.insert(
            our_path,
            StateTensor {
                data: values,
                ..entry
            },
        );
    }
    if !unused.is_empty() {
        return Err(CoreError::file(
            path,
            format!(
                "{} tensor(s) in the checkpoint are not used by this configuration (channels \
                 {:?}, strides {:?}, num_res_units {}, out_channels {}): {}; is the U-Net \
                 configuration the same?",
                unused.len(),
                config.representation.channels,
                config.representation.strides,
                config.representation.num_res_units,
                config.head_out_channels,
                list_keys(&unused)
            ),
        ));
    }
    model.load_state(&state)
}

/// The MONAI `UNet` `state_dict` of the representation block and the head of `task`, keys in
/// SegViz path order: what `UNet(spatial_dims=3, in_channels, out_channels=head_out_channels,
/// channels, strides, num_res_units, norm="batch")` loads with `strict=True`.
///
/// Every BatchNorm also gets its `num_batches_tracked` counter, which SegViz does not keep:
/// it is written as 0 (MONAI's BatchNorm uses a fixed momentum, so the counter changes
/// nothing in training or inference).
///
/// # Errors
/// [`CoreError::Task`] when the state has no head `task`; [`CoreError::State`] for a tensor
/// with no MONAI key.
pub fn monai_state_dict(
    state: &ModelState,
    config: &SegVizConfig,
    task: &str,
) -> Result<Vec<(String, TorchTensor)>> {
    if state.head(task).tensors.is_empty() {
        return Err(CoreError::Task {
            name: task.to_string(),
            reason: format!("no such head in the model (heads: {:?})", state.tasks()),
        });
    }
    let levels = config.representation.strides.len();
    let mut entries = Vec::new();
    let mut tensors = state.representation();
    tensors.tensors.extend(state.head(task).tensors);
    for (path, t) in tensors.tensors {
        let key = monai_key(&path, levels)
            .ok_or_else(|| CoreError::State(format!("no MONAI key for tensor {path:?}")))?;
        if let Some(prefix) = key.strip_suffix(".running_mean") {
            entries.push((
                format!("{prefix}.num_batches_tracked"),
                TorchTensor::I64 {
                    shape: vec![],
                    data: vec![0],
                },
            ));
        }
        entries.push((
            key,
            TorchTensor::F32 {
                shape: t.shape,
                data: t.data,
            },
        ));
    }
    Ok(entries)
}

/// Writes the head `task` of `model` (with the representation block) as a MONAI `UNet`
/// `state_dict` (`.pt`) at `path`, atomically; see [`monai_state_dict`].
///
/// # Errors
/// As [`monai_state_dict`], and any error writing the file.
pub fn export_monai(model: &SegVizModel, task: &str, path: &Path) -> Result<()> {
    let entries = monai_state_dict(&model.state(), model.config(), task)?;
    save_state_dict(path, &entries)
}

/// The keyword arguments of MONAI's `UNet` constructor for a head of `config`, as JSON:
/// `UNet(**kwargs)` builds the network [`export_monai`] files load into.
pub fn monai_unet_kwargs(config: &SegVizConfig) -> serde_json::Value {
    let r = &config.representation;
    serde_json::json!({
        "spatial_dims": 3,
        "in_channels": r.in_channels,
        "out_channels": config.head_out_channels,
        "channels": r.channels,
        "strides": r.strides,
        "num_res_units": r.num_res_units,
        "norm": "batch",
    })
}

/// Top-level keys under which a checkpoint may hold the `state_dict`, tried in this order.
pub const STATE_DICT_WRAPPERS: [&str; 2] = ["state_dict", "model"];

/// Opens the `state_dict` of a PyTorch file: the root, or the one wrapper entry of
/// [`STATE_DICT_WRAPPERS`] that holds a dictionary.
fn open_state_dict(path: &Path) -> Result<PytorchReader> {
    let unreadable = |e| CoreError::file(path, format!("not a readable PyTorch checkpoint: {e}"));
    // A plain state_dict has dotted tensor names at the root ("model.0.conv…"), never a
    // bare "state_dict" or "model" entry holding another dictionary.
    let root = PytorchReader::read_pickle_data(path, None).map_err(unreadable)?;
    let wrappers: Vec<&str> = match &root {
        PickleValue::Dict(entries) => STATE_DICT_WRAPPERS
            .into_iter()
            .filter(|w| matches!(entries.get(*w), Some(PickleValue::Dict(_))))
            .collect(),
        _ => Vec::new(),
    };
    match wrappers.as_slice() {
        [] => PytorchReader::new(path).map_err(unreadable),
        [key] => PytorchReader::with_top_level_key(path, key).map_err(unreadable),
        _ => Err(CoreError::file(
            path,
            format!(
                "ambiguous checkpoint: both {:?} hold a dictionary; save the state_dict alone",
                wrappers
            ),
        )),
    }
}

/// `"a", "b", … and N more` for error messages (at most eight keys).
fn list_keys(keys: &BTreeSet<String>) -> String {
    const SHOWN: usize = 8;
    let mut text = keys
        .iter()
        .take(SHOWN)
        .map(|k| format!("{k:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    if keys.len() > SHOWN {
        text.push_str(&format!(" and {} more", keys.len() - SHOWN));
    }
    text
}

/// Little-endian float32 (or float64, narrowed) bytes to values; `None` for another dtype
/// or a wrong byte count.
fn decode_f32(bytes: &[u8], dtype: DType, n: usize) -> Option<Vec<f32>> {
    match dtype {
        DType::F32 if bytes.len() == 4 * n => Some(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        DType::F64 if bytes.len() == 8 * n => Some(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(c);
                    f64::from_le_bytes(b) as f32
                })
                .collect(),
        ),
        _ => None,
    }
}
