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

use std::path::Path;

use burn::store::pytorch_reader::{DType, PytorchReader};
use burn::tensor::Device;

use crate::error::{CoreError, Result};
use crate::model::{SegVizConfig, SegVizModel};
use crate::state::{ModelState, StateTensor};

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
/// file with the same shape. Extra keys (`num_batches_tracked`) are ignored.
pub fn load_monai_checkpoint(
    path: &Path,
    config: &SegVizConfig,
    task: &str,
    device: &Device,
) -> Result<SegVizModel> {
    let mut config = config.clone();
    config.tasks = vec![task.to_string()];
    let model = config.init(device, 0)?;
    let reader = PytorchReader::new(path)
        .map_err(|e| CoreError::file(path, format!("not a readable PyTorch checkpoint: {e}")))?;
    let levels = config.representation.strides.len();
    let mut state = ModelState::default();
    for (our_path, entry) in model.layout().tensors {
        let key = monai_key(&our_path, levels)
            .ok_or_else(|| CoreError::State(format!("no MONAI key for tensor {our_path:?}")))?;
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
    model.load_state(&state)
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
