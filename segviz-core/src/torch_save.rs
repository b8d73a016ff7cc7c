//! Writing PyTorch `state_dict` files as `torch.save` does (its zip format), so that a SegViz
//! model can be loaded by `torch.load` and `module.load_state_dict(…, strict=True)`.
//!
//! Burn reads PyTorch files (`burn::store::pytorch_reader`) but writes none, and no Rust crate
//! writes the pickled tensor records PyTorch expects, so the small writer is ours. A file is a
//! zip archive (entries stored, not compressed) under one folder, `archive/`:
//!
//! ```text
//! archive/data.pkl     pickle (protocol 2) of an OrderedDict: key -> tensor, each tensor
//!                      rebuilt by torch._utils._rebuild_tensor_v2 from a persistent storage
//!                      reference ("storage", torch.FloatStorage, "<n>", "cpu", numel)
//! archive/byteorder    "little"
//! archive/data/<n>     the n-th storage's raw little-endian bytes (64-byte aligned)
//! archive/version      "3"
//! ```
//!
//! Only what a `torch.load(weights_only=True)` allows is pickled: `collections.OrderedDict`,
//! `torch._utils._rebuild_tensor_v2` and the `FloatStorage` / `LongStorage` classes.

use std::io::{Cursor, Write};
use std::path::Path;

use zip::write::SimpleFileOptions;
use zip::{CompressionMethod, DateTime, ZipWriter};

use crate::checkpoint::write_atomically;
use crate::error::{CoreError, Result};

/// A tensor of a PyTorch `state_dict`, C-contiguous.
#[derive(Debug, Clone, PartialEq)]
pub enum TorchTensor {
    /// `torch.float32` values.
    F32 {
        /// The shape (empty for a scalar).
        shape: Vec<usize>,
        /// The values in C order.
        data: Vec<f32>,
    },
    /// `torch.int64` values (BatchNorm's `num_batches_tracked`).
    I64 {
        /// The shape (empty for a scalar).
        shape: Vec<usize>,
        /// The values in C order.
        data: Vec<i64>,
    },
}

impl TorchTensor {
    fn shape(&self) -> &[usize] {
        match self {
            TorchTensor::F32 { shape, .. } | TorchTensor::I64 { shape, .. } => shape,
        }
    }

    fn len(&self) -> usize {
        match self {
            TorchTensor::F32 { data, .. } => data.len(),
            TorchTensor::I64 { data, .. } => data.len(),
        }
    }

    fn storage_class(&self) -> &'static str {
        match self {
            TorchTensor::F32 { .. } => "FloatStorage",
            TorchTensor::I64 { .. } => "LongStorage",
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            TorchTensor::F32 { data, .. } => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
            TorchTensor::I64 { data, .. } => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }
}

/// Writes `entries` (key, tensor), in this order, as a PyTorch `state_dict` file at `path`,
/// atomically.
///
/// # Errors
/// [`CoreError::File`] naming `path` when a tensor's values do not fill its shape, and any
/// error writing the file.
pub fn save_state_dict(path: &Path, entries: &[(String, TorchTensor)]) -> Result<()> {
    let bytes = encode_state_dict(entries).map_err(|reason| CoreError::file(path, reason))?;
    write_atomically(path, &bytes)
}

/// The bytes of a `torch.save` file holding `entries`.
fn encode_state_dict(entries: &[(String, TorchTensor)]) -> std::result::Result<Vec<u8>, String> {
    for (key, t) in entries {
        if t.shape().iter().product::<usize>() != t.len() {
            return Err(format!(
                "tensor {key}: {} values for shape {:?}",
                t.len(),
                t.shape()
            ));
        }
    }
    let zip_err = |e: zip::result::ZipError| format!("cannot write the zip archive: {e}");
    let io_err = |e: std::io::Error| format!("cannot write the zip archive: {e}");
    // A fixed date: the same state_dict always gives the same bytes.
    let stored = SimpleFileOptions::default()
        .compression_method(CompressionMethod::Stored)
        .last_modified_time(DateTime::default());
    let mut zip = ZipWriter::new(Cursor::new(Vec::new()));
    zip.start_file("archive/data.pkl", stored)
        .map_err(zip_err)?;
    zip.write_all(&pickle_state_dict(entries)).map_err(io_err)?;
    zip.start_file("archive/byteorder", stored)
        .map_err(zip_err)?;
    zip.write_all(b"little").map_err(io_err)?;
    for (n, (_, t)) in entries.iter().enumerate() {
        zip.start_file(format!("archive/data/{n}"), stored.with_alignment(64))
            .map_err(zip_err)?;
        zip.write_all(&t.bytes()).map_err(io_err)?;
    }
    zip.start_file("archive/version", stored).map_err(zip_err)?;
    zip.write_all(b"3\n").map_err(io_err)?;
    Ok(zip.finish().map_err(zip_err)?.into_inner())
}

/// Pickle protocol 2 opcodes used here.
mod op {
    pub const PROTO: u8 = 0x80;
    pub const GLOBAL: u8 = b'c';
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const REDUCE: u8 = b'R';
    pub const BINPERSID: u8 = b'Q';
    pub const BININT1: u8 = b'K';
    pub const BININT: u8 = b'J';
    pub const LONG1: u8 = 0x8a;
    pub const BINUNICODE: u8 = b'X';
    pub const NEWFALSE: u8 = 0x89;
    pub const SETITEMS: u8 = b'u';
    pub const STOP: u8 = b'.';
}

/// A pickle being written.
struct Pickle(Vec<u8>);

impl Pickle {
    fn global(&mut self, module: &str, name: &str) {
        self.0.push(op::GLOBAL);
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn string(&mut self, s: &str) {
        self.0.push(op::BINUNICODE);
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    fn int(&mut self, v: usize) {
        if let Ok(b) = u8::try_from(v) {
            self.0.extend_from_slice(&[op::BININT1, b]);
        } else if let Ok(i) = i32::try_from(v) {
            self.0.push(op::BININT);
            self.0.extend_from_slice(&i.to_le_bytes());
        } else {
            // Eight bytes of two's complement: every usize fits with its sign bit clear
            // after one more zero byte.
            self.0.extend_from_slice(&[op::LONG1, 9]);
            self.0.extend_from_slice(&(v as u64).to_le_bytes());
            self.0.push(0);
        }
    }

    fn tuple_of(&mut self, values: &[usize]) {
        if values.is_empty() {
            self.0.push(op::EMPTY_TUPLE);
            return;
        }
        self.0.push(op::MARK);
        for &v in values {
            self.int(v);
        }
        self.0.push(op::TUPLE);
    }

    /// An empty `collections.OrderedDict()`.
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.0.extend_from_slice(&[op::EMPTY_TUPLE, op::REDUCE]);
    }
}

/// `data.pkl`: an OrderedDict of tensors whose storages are `data/<n>` in entry order.
fn pickle_state_dict(entries: &[(String, TorchTensor)]) -> Vec<u8> {
    let mut p = Pickle(vec![op::PROTO, 2]);
    p.ordered_dict();
    p.0.push(op::MARK);
    for (n, (key, t)) in entries.iter().enumerate() {
        p.string(key);
        // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad,
        // backward_hooks)
        p.global("torch._utils", "_rebuild_tensor_v2");
        p.0.push(op::MARK);
        p.0.push(op::MARK);
        p.string("storage");
        p.global("torch", t.storage_class());
        p.string(&n.to_string());
        p.string("cpu");
        p.int(t.len());
        p.0.extend_from_slice(&[op::TUPLE, op::BINPERSID]);
        p.int(0);
        let shape = t.shape();
        p.tuple_of(shape);
        let strides: Vec<usize> = (0..shape.len())
            .map(|i| shape[i + 1..].iter().product())
            .collect();
        p.tuple_of(&strides);
        p.0.push(op::NEWFALSE);
        p.ordered_dict();
        p.0.extend_from_slice(&[op::TUPLE, op::REDUCE]);
    }
    p.0.extend_from_slice(&[op::SETITEMS, op::STOP]);
    p.0
}
