//! Reading and writing single-file NIfTI-1 volumes (`.nii`, `.nii.gz`).
//!
//! The header is parsed by the `nifti` crate, and the stored values are typed by it
//! (datatype and byte order), from a buffer whose length has been checked against the header
//! first, so a truncated or corrupt file is an error and never a panic or a huge allocation.
//! Scaling and the affine stay here: nibabel applies `scl_slope`/`scl_inter` in floating
//! point (the crate rescales in the stored type), and the affine needs nibabel's fallbacks
//! and our warnings.
//!
//! The writer is ours too: the `nifti` crate's writer takes `ndarray` arrays and always sets
//! `scl_slope` 1 and `scl_inter` 0, so it cannot write the scaled int16 CT files that
//! [`write_volume_scaled`] writes.
//!
//! Conventions (the NIfTI-1 standard, as nibabel and ITK read it):
//! - voxels on disk are in Fortran order (`i` fastest); [`Volume`] is C order (`k` fastest),
//!   so both reading and writing transpose;
//! - stored values are scaled by `scl_slope`/`scl_inter` when `scl_slope` is non-zero;
//! - the affine is the one nibabel reads (`img.affine`): the sform when `sform_code != 0`,
//!   else the qform (quaternion, with `qfac = pixdim[0]` flipping the third axis) when
//!   `qform_code != 0`, else nibabel's fallback from `|pixdim|` (first axis flipped, origin at
//!   the volume centre). Where nibabel would carry on with an unusable or guessed affine
//!   (a singular sform, a zero spacing, no transform at all), the reader refuses or records a
//!   warning in [`NiftiInfo::warnings`]; see `header_affine`.
//!
//! Writing sets both sform and qform (code 1, scanner) from the affine, `pixdim` from the
//! column norms, units to millimetres, and compresses when the name ends in `.gz`. Files are
//! written atomically.

use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;
use rayon::prelude::*;

use crate::affine::{self, Affine};
use crate::atomic_write::write_bytes as write_atomically;
use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// Size of a NIfTI-1 header in bytes.
const NIFTI1_HEADER_SIZE: usize = 348;
/// Size of a NIfTI-2 header in bytes (recognised only to say it is unsupported).
const NIFTI2_HEADER_SIZE: usize = 540;
/// Where voxel data start in the files we write: header plus the 4-byte extension flag.
const WRITTEN_VOX_OFFSET: usize = 352;
/// `xyzt_units` for millimetres (spatial code 2, no time unit).
const UNITS_MM: u8 = 2;
/// `NIFTI_XFORM_SCANNER_ANAT`, the code we write for both sform and qform.
const XFORM_SCANNER: i16 = 1;

/// The voxel storage types segviz-data reads and writes (real-valued NIfTI-1 datatypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VoxelType {
    /// `DT_UINT8` (2).
    UInt8,
    /// `DT_INT8` (256).
    Int8,
    /// `DT_INT16` (4), the usual CT storage type.
    Int16,
    /// `DT_UINT16` (512).
    UInt16,
    /// `DT_INT32` (8).
    Int32,
    /// `DT_UINT32` (768).
    UInt32,
    /// `DT_INT64` (1024).
    Int64,
    /// `DT_UINT64` (1280).
    UInt64,
    /// `DT_FLOAT32` (16).
    Float32,
    /// `DT_FLOAT64` (64).
    Float64,
}

impl VoxelType {
    /// The NIfTI `datatype` code.
    pub fn code(self) -> i16 {
        match self {
            VoxelType::UInt8 => 2,
            VoxelType::Int16 => 4,
            VoxelType::Int32 => 8,
            VoxelType::Float32 => 16,
            VoxelType::Float64 => 64,
            VoxelType::Int8 => 256,
            VoxelType::UInt16 => 512,
            VoxelType::UInt32 => 768,
            VoxelType::Int64 => 1024,
            VoxelType::UInt64 => 1280,
        }
    }

    /// The type for a NIfTI `datatype` code, or `None` for codes we do not read (complex,
    /// RGB, float128, binary, unknown).
    pub fn from_code(code: i16) -> Option<Self> {
        Some(match code {
            2 => VoxelType::UInt8,
            4 => VoxelType::Int16,
            8 => VoxelType::Int32,
            16 => VoxelType::Float32,
            64 => VoxelType::Float64,
            256 => VoxelType::Int8,
            512 => VoxelType::UInt16,
            768 => VoxelType::UInt32,
            1024 => VoxelType::Int64,
            1280 => VoxelType::UInt64,
            _ => return None,
        })
    }

    /// Lower-case name, as numpy spells it (`"int16"`, `"float32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            VoxelType::UInt8 => "uint8",
            VoxelType::Int8 => "int8",
            VoxelType::Int16 => "int16",
            VoxelType::UInt16 => "uint16",
            VoxelType::Int32 => "int32",
            VoxelType::UInt32 => "uint32",
            VoxelType::Int64 => "int64",
            VoxelType::UInt64 => "uint64",
            VoxelType::Float32 => "float32",
            VoxelType::Float64 => "float64",
        }
    }

    /// Bytes per voxel.
    pub fn size(self) -> usize {
        match self {
            VoxelType::UInt8 | VoxelType::Int8 => 1,
            VoxelType::Int16 | VoxelType::UInt16 => 2,
            VoxelType::Int32 | VoxelType::UInt32 | VoxelType::Float32 => 4,
            VoxelType::Int64 | VoxelType::UInt64 | VoxelType::Float64 => 8,
        }
    }

    /// Whether the stored values are integers.
    pub fn is_integer(self) -> bool {
        !matches!(self, VoxelType::Float32 | VoxelType::Float64)
    }

    /// The representable range of an integer type, as `f64` (floats: the whole line).
    fn range(self) -> (f64, f64) {
        match self {
            VoxelType::UInt8 => (0.0, u8::MAX as f64),
            VoxelType::Int8 => (i8::MIN as f64, i8::MAX as f64),
            VoxelType::Int16 => (i16::MIN as f64, i16::MAX as f64),
            VoxelType::UInt16 => (0.0, u16::MAX as f64),
            VoxelType::Int32 => (i32::MIN as f64, i32::MAX as f64),
            VoxelType::UInt32 => (0.0, u32::MAX as f64),
            VoxelType::Int64 => (i64::MIN as f64, i64::MAX as f64),
            VoxelType::UInt64 => (0.0, u64::MAX as f64),
            VoxelType::Float32 | VoxelType::Float64 => (f64::NEG_INFINITY, f64::INFINITY),
        }
    }
}

/// Which header fields the affine of a file came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AffineSource {
    /// `srow_x/y/z` (`sform_code > 0`).
    Sform,
    /// The quaternion, offsets and `pixdim` (`qform_code > 0`).
    Qform,
    /// Only `pixdim` on the diagonal (both codes zero).
    Pixdim,
}

/// What the header of a NIfTI file says besides the voxel values.
#[derive(Debug, Clone, PartialEq)]
pub struct NiftiInfo {
    /// The file that was read.
    pub path: PathBuf,
    /// How voxels are stored on disk.
    pub datatype: VoxelType,
    /// Shape and affine.
    pub geometry: Geometry,
    /// `scl_slope` as stored (0 means no scaling).
    pub scl_slope: f32,
    /// `scl_inter` as stored.
    pub scl_inter: f32,
    /// Where the affine came from.
    pub affine_source: AffineSource,
    /// Geometry decisions worth telling the user (a guessed orientation, a fallback from a
    /// broken sform, a negative `pixdim` taken as its absolute value, ...). Empty for a
    /// well-formed header.
    pub warnings: Vec<String>,
}

impl NiftiInfo {
    /// Whether `scl_slope`/`scl_inter` change the stored values.
    pub fn is_scaled(&self) -> bool {
        self.scl_slope != 0.0
            && self.scl_slope.is_finite()
            && self.scl_inter.is_finite()
            && (self.scl_slope != 1.0 || self.scl_inter != 0.0)
    }
}

/// Reads an image as `f32` (scaled values), rejecting NaN or infinite voxels.
///
/// # Errors
/// [`DataError::Io`] if the file cannot be read, [`DataError::Invalid`] for a corrupt or
/// truncated file (gzip included), [`DataError::Unsupported`] for NIfTI-2, 4-D series and
/// complex/RGB datatypes, [`DataError::NonFinite`] (with the counts) for NaN/Inf voxels.
///
/// Geometry warnings (see [`NiftiInfo::warnings`]) are not returned: use
/// [`read_volume_with_info`] or [`read_header`] to show them.
pub fn read_volume(path: impl AsRef<Path>) -> Result<Volume<f32>> {
    let (volume, info) = read_volume_with_info(path)?;
    check_finite(&volume, &info.path)?;
    Ok(volume)
}

/// Reads an image as `f32` (scaled values) together with its header facts.
///
/// Unlike [`read_volume`] this does not reject NaN or infinite voxels, so a caller such as
/// an inspector can report on them.
///
/// # Errors
/// As [`read_volume`], without [`DataError::NonFinite`].
pub fn read_volume_with_info(path: impl AsRef<Path>) -> Result<(Volume<f32>, NiftiInfo)> {
    let path = path.as_ref();
    let bytes = read_decompressed(path)?;
    let header = parse_header(path, &bytes)?;
    let data = decode_voxels(&voxels(path, &bytes, &header)?, |v| v);
    let info = header.info;
    let volume = Volume {
        data,
        geometry: info.geometry.clone(),
    };
    Ok((volume, info))
}

/// Reads only the header of a NIfTI file (decompressing just its first bytes): shape,
/// affine, datatype, scaling and the geometry [`NiftiInfo::warnings`]. Cheap enough to
/// run over a whole dataset.
///
/// # Errors
/// As [`read_volume`] for what the header can show (I/O, not NIfTI-1, unsupported or
/// inconsistent header fields); voxel problems are found only by reading the volume.
pub fn read_header(path: impl AsRef<Path>) -> Result<NiftiInfo> {
    let path = path.as_ref();
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut magic = [0u8; 2];
    let got = file.read(&mut magic).map_err(|e| DataError::io(path, e))?;
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    // The 348-byte header and the 4-byte extension flag.
    let wanted = NIFTI1_HEADER_SIZE as u64 + 4;
    let mut bytes = Vec::with_capacity(wanted as usize);
    let read = if got == 2 && magic == [0x1f, 0x8b] {
        MultiGzDecoder::new(file)
            .take(wanted)
            .read_to_end(&mut bytes)
    } else {
        file.take(wanted).read_to_end(&mut bytes)
    };
    read.map_err(|e| DataError::invalid(path, format!("cannot read the header: {e}")))?;
    Ok(parse_header(path, &bytes)?.info)
}

/// Reads a label map: every scaled value must be an integer in `0..=255`.
///
/// # Errors
/// As [`read_volume`], and [`DataError::Invalid`] (naming the file, the offending value and
/// how many voxels are affected) for NaN, infinite, negative, fractional or > 255 values.
pub fn read_labels(path: impl AsRef<Path>) -> Result<Volume<u8>> {
    let path = path.as_ref();
    let bytes = read_decompressed(path)?;
    let header = parse_header(path, &bytes)?;
    // Every value is checked in storage order before any is kept, so the labels are
    // decoded once, straight to bytes.
    let voxels = voxels(path, &bytes, &header)?;
    let (bad, first_bad) = non_labels(&voxels);
    if let Some(v) = first_bad {
        return Err(DataError::invalid(
            &header.info.path,
            format!("not a label map: {bad} voxel(s) are not integers in 0..=255 (first: {v})"),
        ));
    }
    // Every value is a label (checked above).
    let data = decode_voxels(&voxels, |v| v as u8);
    Ok(Volume {
        data,
        geometry: header.info.geometry,
    })
}

/// Whether `v` is a label value: an integer in `0..=255` (in that range, exactly when
/// truncating it to a byte keeps its value; cheaper than `fract`, a library call here).
#[inline]
fn is_label(v: f32) -> bool {
    (0.0..=255.0).contains(&v) && f32::from(v as u8) == v
}

/// Writes an image, storing `datatype` with `scl_slope = 1`, `scl_inter = 0`.
///
/// Integer types round to the nearest integer and clamp to the type's range (CT in HU fits
/// `Int16`); float types store the values as they are.
///
/// # Errors
/// [`DataError::Invalid`] for NaN/Inf values in an integer type, a shape that NIfTI-1
/// cannot hold (a side over 32767) or a data length that does not match the shape;
/// [`DataError::Io`] if the file cannot be written.
pub fn write_volume(
    path: impl AsRef<Path>,
    volume: &Volume<f32>,
    datatype: VoxelType,
) -> Result<()> {
    write_volume_scaled(path, volume, datatype, 1.0, 0.0)
}

/// Writes an image stored as `(value − scl_inter) / scl_slope` in `datatype`, so that a
/// reader applying the slope and intercept gets `value` back (up to the rounding of
/// integer types).
///
/// # Errors
/// As [`write_volume`], and [`DataError::Config`] for a zero or non-finite slope or a
/// non-finite intercept.
pub fn write_volume_scaled(
    path: impl AsRef<Path>,
    volume: &Volume<f32>,
    datatype: VoxelType,
    scl_slope: f32,
    scl_inter: f32,
) -> Result<()> {
    let path = path.as_ref();
    if scl_slope == 0.0 || !scl_slope.is_finite() || !scl_inter.is_finite() {
        return Err(DataError::Config(format!(
            "cannot write {}: scl_slope must be finite and non-zero and scl_inter finite \
             (got {scl_slope}, {scl_inter})",
            path.display()
        )));
    }
    let (slope, inter) = (scl_slope as f64, scl_inter as f64);
    if datatype.is_integer() {
        let non_finite = volume.data.iter().filter(|v| !v.is_finite()).count();
        if non_finite > 0 {
            return Err(DataError::invalid(
                path,
                format!(
                    "{non_finite} NaN/infinite voxel(s) cannot be stored as {}",
                    datatype.name()
                ),
            ));
        }
    }
    let stored = |v: f32| (v as f64 - inter) / slope;
    write_nifti(
        path,
        &volume.geometry,
        volume.data.len(),
        datatype,
        scl_slope,
        scl_inter,
        |c| stored(volume.data[c]),
    )
}

/// Writes a label map as `uint8`.
///
/// # Errors
/// As [`write_volume`].
pub fn write_labels(path: impl AsRef<Path>, labels: &Volume<u8>) -> Result<()> {
    write_nifti(
        path.as_ref(),
        &labels.geometry,
        labels.data.len(),
        VoxelType::UInt8,
        1.0,
        0.0,
        |c| labels.data[c] as f64,
    )
}

/// Counts NaN and infinite voxels and turns any into [`DataError::NonFinite`].
fn check_finite(volume: &Volume<f32>, path: &Path) -> Result<()> {
    let counts: Vec<(usize, usize)> = volume
        .data
        .par_chunks(CHECK_CHUNK)
        .map(|chunk| {
            if chunk.iter().all(|v| v.is_finite()) {
                return (0, 0);
            }
            let nan = chunk.iter().filter(|v| v.is_nan()).count();
            (nan, chunk.iter().filter(|v| v.is_infinite()).count())
        })
        .collect();
    let (nan, infinite) = counts.iter().fold((0, 0), |(n, i), &(a, b)| (n + a, i + b));
    if nan + infinite > 0 {
        return Err(DataError::NonFinite {
            path: path.to_path_buf(),
            nan,
            infinite,
            total: volume.data.len(),
        });
    }
    Ok(())
}

/// Values per parallel task of the checks that run over a whole volume.
const CHECK_CHUNK: usize = 1 << 18;

/// The whole file, gunzipped when it starts with the gzip magic bytes (whatever its name).
fn read_decompressed(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        // A gzip member ends with its uncompressed size (mod 2³²): reserved at once, the
        // output is not copied as it grows. Only a hint, bounded by deflate's largest
        // ratio (about 1032:1) so that a corrupt trailer cannot reserve more.
        let stated = raw
            .len()
            .checked_sub(4)
            .map(|at| u32::from_le_bytes([raw[at], raw[at + 1], raw[at + 2], raw[at + 3]]) as usize)
            .unwrap_or(0);
        let capacity = stated
            .max(raw.len().saturating_mul(3))
            .min(raw.len().saturating_mul(1032));
        let mut out = Vec::with_capacity(capacity);
        MultiGzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| {
                DataError::invalid(path, format!("corrupt or truncated gzip stream: {e}"))
            })?;
        Ok(out)
    } else if path.extension().is_some_and(|e| e == "gz") {
        Err(DataError::invalid(
            path,
            "named .gz but not gzip-compressed (no gzip magic bytes)",
        ))
    } else {
        Ok(raw)
    }
}

/// A checked header: what the decoder needs plus the public facts.
struct Header {
    info: NiftiInfo,
    endianness: nifti::Endianness,
    vox_offset: usize,
}

/// Checks and parses the header at the start of `bytes`.
fn parse_header(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 4 {
        return Err(DataError::invalid(
            path,
            format!("{} bytes, too short to be a NIfTI file", bytes.len()),
        ));
    }
    let first = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let sizeof_hdr = [i32::from_le_bytes(first), i32::from_be_bytes(first)];
    if sizeof_hdr.contains(&(NIFTI2_HEADER_SIZE as i32)) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: "NIfTI-2 file (sizeof_hdr = 540); only NIfTI-1 is read".into(),
        });
    }
    if !sizeof_hdr.contains(&(NIFTI1_HEADER_SIZE as i32)) {
        return Err(DataError::invalid(
            path,
            format!(
                "not a NIfTI-1 file: sizeof_hdr is {} (must be 348)",
                sizeof_hdr[0]
            ),
        ));
    }
    if bytes.len() < NIFTI1_HEADER_SIZE {
        return Err(DataError::invalid(
            path,
            format!("truncated header: {} of 348 bytes", bytes.len()),
        ));
    }
    let h = nifti::NiftiHeader::from_reader(&bytes[..NIFTI1_HEADER_SIZE])
        .map_err(|e| DataError::invalid(path, format!("bad NIfTI-1 header: {e}")))?;
    if &h.magic != b"n+1\0" {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "magic {:?} is not a single-file NIfTI-1 (\"n+1\"); .hdr/.img pairs are not read",
                String::from_utf8_lossy(&h.magic)
            ),
        });
    }
    let shape = spatial_shape(path, &h.dim)?;
    let datatype = VoxelType::from_code(h.datatype).ok_or_else(|| DataError::Unsupported {
        path: path.to_path_buf(),
        reason: format!(
            "datatype {} ({}); only real integer and float types are read",
            h.datatype,
            datatype_description(h.datatype)
        ),
    })?;
    if !h.vox_offset.is_finite() || h.vox_offset < NIFTI1_HEADER_SIZE as f32 {
        return Err(DataError::invalid(
            path,
            format!(
                "vox_offset {} is before the end of the header",
                h.vox_offset
            ),
        ));
    }
    // Checks the datatype code; the value itself is `datatype`.
    h.data_type()
        .map_err(|e| DataError::invalid(path, format!("datatype: {e}")))?;
    let (affine, affine_source, warnings) = header_affine(path, &h)?;
    Ok(Header {
        info: NiftiInfo {
            path: path.to_path_buf(),
            datatype,
            geometry: Geometry { shape, affine },
            scl_slope: h.scl_slope,
            scl_inter: h.scl_inter,
            affine_source,
            warnings,
        },
        endianness: h.endianness,
        vox_offset: h.vox_offset as usize,
    })
}

/// The three spatial sizes, refusing more than one volume along dimensions 4..7.
fn spatial_shape(path: &Path, dim: &[u16; 8]) -> Result<[usize; 3]> {
    let ndim = dim[0] as usize;
    if !(1..=7).contains(&ndim) {
        return Err(DataError::invalid(
            path,
            format!("dim[0] = {ndim} (must be 1..=7)"),
        ));
    }
    if let Some(extra) = (4..=ndim).find(|&d| dim[d] > 1) {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!(
                "{ndim}-D data (dim[{extra}] = {}): only single 3-D volumes are read",
                dim[extra]
            ),
        });
    }
    let mut shape = [1usize; 3];
    for (a, s) in shape.iter_mut().enumerate() {
        if a < ndim {
            *s = dim[a + 1] as usize;
        }
        if *s == 0 {
            return Err(DataError::invalid(path, format!("dim[{}] is zero", a + 1)));
        }
    }
    Ok(shape)
}

/// Names the datatype codes we refuse, for the error message.
fn datatype_description(code: i16) -> &'static str {
    match code {
        1 => "binary",
        32 => "complex64",
        128 => "RGB24",
        1536 => "float128",
        1792 => "complex128",
        2048 => "complex256",
        2304 => "RGBA32",
        _ => "unknown code",
    }
}

/// The NIfTI-1 `xform` codes (0 unknown .. 5 template); nibabel resets any other to 0.
const XFORM_CODES: std::ops::RangeInclusive<i16> = 0..=5;
/// nibabel's tolerance on `1 − |(b, c, d)|²` (three float32 epsilons): inside it the
/// quaternion's `a` is taken as 0, below it the quaternion is refused.
const QUATERNION_TOLERANCE: f64 = 3.0 * f32::EPSILON as f64;

/// The affine as nibabel reads it (`img.affine`, i.e. `get_best_affine()` after nibabel's
/// load-time header fixes), and what had to be decided on the way.
///
/// Precedence: the sform when `sform_code != 0`, else the qform when `qform_code != 0`, else
/// nibabel's fallback from `pixdim` (x flipped, origin at the volume centre). As nibabel:
/// a code outside 0..=5 counts as 0, negative `pixdim[1..=3]` are taken as their absolute
/// values, and `qfac = pixdim[0]` other than ±1 counts as 1. Where nibabel would go on
/// silently with something unusable, SegViz refuses or warns:
/// - a singular or non-finite sform falls back to a usable qform with a warning (nibabel
///   returns the singular matrix), and is an error without one;
/// - a zero or non-finite spacing the affine depends on is an error (nibabel reads 1 mm);
/// - a quaternion `(b, c, d)` longer than 1 is an error (as in nibabel);
/// - the `pixdim` fallback always warns: the orientation is a guess.
fn header_affine(
    path: &Path,
    h: &nifti::NiftiHeader,
) -> Result<(Affine, AffineSource, Vec<String>)> {
    let mut warnings = Vec::new();
    let mut code = |name: &str, code: i16| {
        if XFORM_CODES.contains(&code) {
            code
        } else {
            warnings.push(format!(
                "{name} {code} is not a NIfTI code (0..=5); read as 0, as nibabel does"
            ));
            0
        }
    };
    let sform_code = code("sform_code", h.sform_code);
    let qform_code = code("qform_code", h.qform_code);

    let qform = if qform_code != 0 {
        Some(qform_affine(path, h, &mut warnings)?)
    } else {
        None
    };
    if sform_code != 0 {
        let mut a = affine::identity();
        for (r, row) in [h.srow_x, h.srow_y, h.srow_z].iter().enumerate() {
            for c in 0..4 {
                a[r][c] = row[c] as f64;
            }
        }
        if a.iter().flatten().all(|v| v.is_finite()) && affine::invert(&a).is_some() {
            return Ok((a, AffineSource::Sform, warnings));
        }
        let Some(q) = qform else {
            return Err(DataError::invalid(
                path,
                format!(
                    "sform_code {sform_code} but srow_x/y/z is singular or not finite \
                     ({:?}, {:?}, {:?}) and there is no qform (qform_code 0): the voxel grid \
                     cannot be placed in the world",
                    h.srow_x, h.srow_y, h.srow_z
                ),
            ));
        };
        warnings.push(format!(
            "sform_code {sform_code} but srow_x/y/z is singular or not finite; the qform \
             (qform_code {qform_code}) is used instead"
        ));
        return Ok((q, AffineSource::Qform, warnings));
    }
    if let Some(q) = qform {
        return Ok((q, AffineSource::Qform, warnings));
    }

    // nibabel's `shape_zoom_affine(shape, zooms, x_flip=True)`: the voxel at the centre of
    // the volume sits at the world origin and the first axis runs to the left.
    let ndim = (h.dim[0] as usize).min(3);
    let mut a = affine::identity();
    for (axis, row) in a.iter_mut().take(3).enumerate() {
        let (size, zoom) = if axis < ndim {
            (
                h.dim[axis + 1] as f64,
                spacing(path, h, axis, &mut warnings)?,
            )
        } else {
            (1.0, 1.0)
        };
        let zoom = if axis == 0 { -zoom } else { zoom };
        row[axis] = zoom;
        row[3] = -(size - 1.0) / 2.0 * zoom;
    }
    warnings.push(format!(
        "no sform or qform (both codes 0): the affine is built from pixdim as nibabel does \
         (first axis flipped to the left, origin at the volume centre, spacing {:?}); the \
         orientation is a guess",
        [a[0][0].abs(), a[1][1], a[2][2]]
    ));
    Ok((a, AffineSource::Pixdim, warnings))
}

/// `|pixdim[axis + 1]|`, warning when it was negative; an error when zero or not finite.
fn spacing(
    path: &Path,
    h: &nifti::NiftiHeader,
    axis: usize,
    warnings: &mut Vec<String>,
) -> Result<f64> {
    let v = h.pixdim[axis + 1];
    if !v.is_finite() || v == 0.0 {
        return Err(DataError::invalid(
            path,
            format!(
                "pixdim[{}] = {v}: no voxel spacing along axis {axis}, and the affine depends \
                 on it (nibabel would read 1 mm)",
                axis + 1
            ),
        ));
    }
    if v < 0.0 && !warnings.iter().any(|w| w.starts_with("negative pixdim")) {
        warnings.push(format!(
            "negative pixdim {:?}: read as their absolute values, as nibabel does",
            &h.pixdim[1..4]
        ));
    }
    Ok(v.abs() as f64)
}

/// The qform affine: rotation from the quaternion, then `|pixdim|` with `qfac` on the third
/// axis, then the offsets (nibabel's `get_qform`).
fn qform_affine(path: &Path, h: &nifti::NiftiHeader, warnings: &mut Vec<String>) -> Result<Affine> {
    let (b, c, d) = (h.quatern_b as f64, h.quatern_c as f64, h.quatern_d as f64);
    let offset = [h.quatern_x as f64, h.quatern_y as f64, h.quatern_z as f64];
    if ![b, c, d].iter().chain(&offset).all(|v| v.is_finite()) {
        return Err(DataError::invalid(
            path,
            format!(
                "qform_code {} but the quaternion or its offsets are not finite",
                h.qform_code
            ),
        ));
    }
    let rotation = quaternion_to_rotation(b, c, d).ok_or_else(|| {
        DataError::invalid(
            path,
            format!(
                "qform quaternion (b, c, d) = ({b}, {c}, {d}) has a norm above 1: not a rotation"
            ),
        )
    })?;
    let q = h.pixdim[0];
    let qfac = if q == -1.0 {
        -1.0
    } else if q == 1.0 || q == 0.0 {
        1.0
    } else {
        warnings.push(format!(
            "pixdim[0] (qfac) = {q} is neither 1 nor -1; read as 1, as nibabel does"
        ));
        1.0
    };
    let scale = [
        spacing(path, h, 0, warnings)?,
        spacing(path, h, 1, warnings)?,
        qfac * spacing(path, h, 2, warnings)?,
    ];
    let mut a = affine::identity();
    for r in 0..3 {
        for c in 0..3 {
            a[r][c] = rotation[r][c] * scale[c];
        }
        a[r][3] = offset[r];
    }
    Ok(a)
}

/// Rotation matrix of the quaternion `(a, b, c, d)` with `a = √(1 − b² − c² − d²)`, or
/// `None` when `|(b, c, d)|` exceeds 1 by more than rounding (nibabel's `fillpositive`).
fn quaternion_to_rotation(b: f64, c: f64, d: f64) -> Option<[[f64; 3]; 3]> {
    let w2 = 1.0 - (b * b + c * c + d * d);
    let a = if w2.abs() < QUATERNION_TOLERANCE {
        0.0
    } else if w2 < 0.0 {
        return None;
    } else {
        w2.sqrt()
    };
    // Normalised as nibabel's `quat2mat`, which absorbs the rounding tolerated above.
    let n = a * a + b * b + c * c + d * d;
    let s = 2.0 / n;
    Some([
        [
            1.0 - s * (c * c + d * d),
            s * (b * c - a * d),
            s * (b * d + a * c),
        ],
        [
            s * (b * c + a * d),
            1.0 - s * (b * b + d * d),
            s * (c * d - a * b),
        ],
        [
            s * (b * d - a * c),
            s * (c * d + a * b),
            1.0 - s * (b * b + c * c),
        ],
    ])
}

/// The voxels of a file as stored: raw bytes, their type, byte order and scaling.
struct Voxels<'a> {
    bytes: &'a [u8],
    datatype: VoxelType,
    shape: [usize; 3],
    big: bool,
    slope: f64,
    inter: f64,
}

impl Voxels<'_> {
    /// A stored value (as `f64`) scaled as nibabel scales it: in `f64`, then to `f32`.
    #[inline]
    fn scaled(&self, v: f64) -> f32 {
        (v * self.slope + self.inter) as f32
    }
}

/// Runs `$body` with `$t` the Rust type of the stored `VoxelType` `$datatype`.
macro_rules! with_stored_type {
    ($datatype:expr, $t:ident => $body:expr) => {
        with_stored_type!(@each $datatype, $t, $body;
            UInt8 u8, Int8 i8, Int16 i16, UInt16 u16, Int32 i32,
            UInt32 u32, Int64 i64, UInt64 u64, Float32 f32, Float64 f64)
    };
    (@each $datatype:expr, $t:ident, $body:expr; $($variant:ident $stored:ty),*) => {
        match $datatype {
            $(VoxelType::$variant => {
                type $t = $stored;
                $body
            })*
        }
    };
}

/// The voxel block of a parsed file, checked to be all there.
fn voxels<'a>(path: &Path, bytes: &'a [u8], header: &Header) -> Result<Voxels<'a>> {
    let info = &header.info;
    let [nx, ny, nz] = info.geometry.shape;
    let count = nx
        .checked_mul(ny)
        .and_then(|n| n.checked_mul(nz))
        .ok_or_else(|| DataError::invalid(path, "voxel count overflows"))?;
    let size = info.datatype.size();
    let needed = count
        .checked_mul(size)
        .and_then(|n| n.checked_add(header.vox_offset))
        .ok_or_else(|| DataError::invalid(path, "data size overflows"))?;
    if bytes.len() < needed {
        return Err(DataError::invalid(
            path,
            format!(
                "truncated data: {} bytes after vox_offset {}, expected {} ({}×{}×{} {})",
                bytes.len().saturating_sub(header.vox_offset),
                header.vox_offset,
                count * size,
                nx,
                ny,
                nz,
                info.datatype.name()
            ),
        ));
    }
    // nibabel's rule: a zero (or non-finite) slope means unscaled values.
    let scaled = info.scl_slope != 0.0 && info.scl_slope.is_finite() && info.scl_inter.is_finite();
    let (slope, inter) = if scaled {
        (info.scl_slope as f64, info.scl_inter as f64)
    } else {
        (1.0, 0.0)
    };
    Ok(Voxels {
        bytes: &bytes[header.vox_offset..needed],
        datatype: info.datatype,
        shape: [nx, ny, nz],
        big: header.endianness == nifti::Endianness::Big,
        slope,
        inter,
    })
}

/// Decodes the voxels into C order, each scaled value through `convert`.
///
/// Values are read straight from the decompressed bytes in their stored type and byte order
/// (no typed copy of the whole block); scaling is applied in f64, as nibabel does, rather
/// than in the stored integer type. (`v as f64` is a cast for every stored type but `f64`
/// itself, hence the `allow`.)
#[allow(clippy::unnecessary_cast)]
fn decode_voxels<O: Copy + Default + Send>(
    voxels: &Voxels<'_>,
    convert: impl Fn(f32) -> O + Sync,
) -> Vec<O> {
    with_stored_type!(voxels.datatype, T => scatter_fortran::<T, O>(
        voxels.bytes,
        voxels.shape,
        voxels.big,
        |v: T| convert(voxels.scaled(v as f64)),
    ))
}

/// How many scaled voxels are not labels (integers in `0..=255`), and the first of them in
/// storage order.
#[allow(clippy::unnecessary_cast)]
fn non_labels(voxels: &Voxels<'_>) -> (usize, Option<f32>) {
    with_stored_type!(voxels.datatype, T => first_flagged::<T>(voxels.bytes, voxels.big, |v: T| {
        Some(voxels.scaled(v as f64)).filter(|&f| !is_label(f))
    }))
}

/// How many of the values stored in `bytes` `flag` (it returns what to report of a value,
/// or `None` for a good one), and the report of the first in storage order.
fn first_flagged<T: Stored>(
    bytes: &[u8],
    big: bool,
    flag: impl Fn(T) -> Option<f32> + Sync,
) -> (usize, Option<f32>) {
    let per_chunk: Vec<(usize, Option<f32>)> = bytes
        .par_chunks(CHECK_CHUNK * T::SIZE)
        .map(|chunk| {
            let mut count = 0;
            let mut first = None;
            for raw in chunk.chunks_exact(T::SIZE) {
                if let Some(v) = flag(T::read(raw, big)) {
                    count += 1;
                    first.get_or_insert(v);
                }
            }
            (count, first)
        })
        .collect();
    per_chunk
        .into_iter()
        .fold((0, None), |(n, first), (c, f)| (n + c, first.or(f)))
}

/// A stored voxel type, read from its bytes in either byte order.
trait Stored: Copy {
    /// Bytes per value.
    const SIZE: usize;
    /// The value in `bytes` (exactly [`Stored::SIZE`] of them), big-endian when `big`.
    fn read(bytes: &[u8], big: bool) -> Self;
}

macro_rules! stored {
    ($($t:ty),*) => {$(
        impl Stored for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            #[inline]
            fn read(bytes: &[u8], big: bool) -> Self {
                let mut raw = [0u8; std::mem::size_of::<$t>()];
                raw.copy_from_slice(bytes);
                if big {
                    <$t>::from_be_bytes(raw)
                } else {
                    <$t>::from_le_bytes(raw)
                }
            }
        }
    )*};
}
stored!(u8, i8, i16, u16, i32, u32, i64, u64, f32, f64);

/// Values stored in NIfTI's Fortran order (`i` fastest) as raw bytes into C order (`k`
/// fastest), each through `convert`. `bytes` holds exactly `nx·ny·nz` values of `T`.
///
/// The threads take blocks of `i` ([`SCATTER_TASKS`] of them). In each, for every `j` the
/// `(k, i)` plane is transposed into a buffer small enough for the cache, whose `i` rows are
/// then copied whole. Writing values one by one at their C index instead
/// lands every write `ny·nz` floats from the last; with CT sizes that stride is a multiple of
/// 4 KiB, so the writes also collide in the same cache sets (3 to 4 times slower, measured).
fn scatter_fortran<T: Stored, O: Copy + Default + Send>(
    bytes: &[u8],
    [nx, ny, nz]: [usize; 3],
    big: bool,
    convert: impl Fn(T) -> O + Sync,
) -> Vec<O> {
    let count = nx * ny * nz;
    let mut out = vec![O::default(); count];
    if count == 0 {
        return out;
    }
    let row_bytes = nx * T::SIZE;
    // Blocks of `i` are independent: each reads its part of every stored row and writes
    // its own run of the output.
    let block = nx.div_ceil(SCATTER_TASKS);
    out.par_chunks_mut(block * ny * nz)
        .enumerate()
        .for_each(|(b, run)| {
            let (i0, width) = (b * block, run.len() / (ny * nz));
            let mut plane = vec![O::default(); width * nz];
            for j in 0..ny {
                for k in 0..nz {
                    let row = &bytes[(k * ny + j) * row_bytes + i0 * T::SIZE..][..width * T::SIZE];
                    for (i, v) in row.chunks_exact(T::SIZE).enumerate() {
                        plane[i * nz + k] = convert(T::read(v, big));
                    }
                }
                for (i, column) in plane.chunks_exact(nz).enumerate() {
                    let start = (i * ny + j) * nz;
                    run[start..start + nz].copy_from_slice(column);
                }
            }
        });
    out
}

/// Blocks of the first axis [`scatter_fortran`] splits a volume into, for the threads.
const SCATTER_TASKS: usize = 8;

/// Appends one value in `dtype` (little-endian), rounding and clamping integer types.
#[inline]
fn encode_one(out: &mut Vec<u8>, v: f64, dtype: VoxelType) {
    let (lo, hi) = dtype.range();
    let int = v.round().clamp(lo, hi);
    match dtype {
        VoxelType::UInt8 => out.push(int as u8),
        VoxelType::Int8 => out.extend_from_slice(&(int as i8).to_le_bytes()),
        VoxelType::Int16 => out.extend_from_slice(&(int as i16).to_le_bytes()),
        VoxelType::UInt16 => out.extend_from_slice(&(int as u16).to_le_bytes()),
        VoxelType::Int32 => out.extend_from_slice(&(int as i32).to_le_bytes()),
        VoxelType::UInt32 => out.extend_from_slice(&(int as u32).to_le_bytes()),
        VoxelType::Int64 => out.extend_from_slice(&(int as i64).to_le_bytes()),
        VoxelType::UInt64 => out.extend_from_slice(&(int as u64).to_le_bytes()),
        VoxelType::Float32 => out.extend_from_slice(&(v as f32).to_le_bytes()),
        VoxelType::Float64 => out.extend_from_slice(&v.to_le_bytes()),
    }
}

/// Serialises header + voxels (value of C index `c` given by `stored`) and writes atomically.
fn write_nifti(
    path: &Path,
    geometry: &Geometry,
    data_len: usize,
    datatype: VoxelType,
    scl_slope: f32,
    scl_inter: f32,
    stored: impl Fn(usize) -> f64,
) -> Result<()> {
    let [nx, ny, nz] = geometry.shape;
    if data_len != geometry.len() {
        return Err(DataError::invalid(
            path,
            format!(
                "cannot write: {data_len} values for shape {:?} ({} voxels)",
                geometry.shape,
                geometry.len()
            ),
        ));
    }
    if geometry
        .shape
        .iter()
        .any(|&s| s == 0 || s > i16::MAX as usize)
    {
        return Err(DataError::invalid(
            path,
            format!(
                "cannot write shape {:?}: NIfTI-1 sizes are 1..=32767",
                geometry.shape
            ),
        ));
    }
    if affine::invert(&geometry.affine).is_none() {
        return Err(DataError::invalid(
            path,
            "cannot write a singular or non-finite affine",
        ));
    }
    let mut bytes = Vec::with_capacity(WRITTEN_VOX_OFFSET + data_len * datatype.size());
    bytes.extend_from_slice(&header_bytes(geometry, datatype, scl_slope, scl_inter));
    bytes.extend_from_slice(&[0u8; 4]); // no extensions
    for k in 0..nz {
        for j in 0..ny {
            for i in 0..nx {
                encode_one(&mut bytes, stored((i * ny + j) * nz + k), datatype);
            }
        }
    }
    let gz = path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().to_ascii_lowercase().ends_with(".gz"));
    if gz {
        let mut encoder = GzEncoder::new(Vec::with_capacity(bytes.len() / 2), Compression::fast());
        std::io::Write::write_all(&mut encoder, &bytes).map_err(|e| DataError::io(path, e))?;
        let compressed = encoder.finish().map_err(|e| DataError::io(path, e))?;
        write_atomically(path, &compressed)
    } else {
        write_atomically(path, &bytes)
    }
}

/// The 348 header bytes (little-endian) for a volume written by this module.
fn header_bytes(
    geometry: &Geometry,
    datatype: VoxelType,
    scl_slope: f32,
    scl_inter: f32,
) -> [u8; NIFTI1_HEADER_SIZE] {
    let mut h = [0u8; NIFTI1_HEADER_SIZE];
    let put = |h: &mut [u8; NIFTI1_HEADER_SIZE], at: usize, b: &[u8]| {
        h[at..at + b.len()].copy_from_slice(b)
    };
    put(&mut h, 0, &(NIFTI1_HEADER_SIZE as i32).to_le_bytes());
    h[38] = b'r'; // "regular", as other writers set it
    let mut dim = [1i16; 8];
    dim[0] = 3;
    for a in 0..3 {
        dim[a + 1] = geometry.shape[a] as i16;
    }
    for (n, d) in dim.iter().enumerate() {
        put(&mut h, 40 + 2 * n, &d.to_le_bytes());
    }
    put(&mut h, 70, &datatype.code().to_le_bytes());
    put(&mut h, 72, &((datatype.size() * 8) as i16).to_le_bytes());

    let q = Qform::from_affine(&geometry.affine);
    let spacing = geometry.spacing();
    let mut pixdim = [0.0f32; 8];
    pixdim[0] = q.qfac as f32;
    for a in 0..3 {
        pixdim[a + 1] = spacing[a] as f32;
    }
    for (n, p) in pixdim.iter().enumerate() {
        put(&mut h, 76 + 4 * n, &p.to_le_bytes());
    }
    put(&mut h, 108, &(WRITTEN_VOX_OFFSET as f32).to_le_bytes());
    put(&mut h, 112, &scl_slope.to_le_bytes());
    put(&mut h, 116, &scl_inter.to_le_bytes());
    h[123] = UNITS_MM;
    let description = b"segviz";
    put(&mut h, 148, description);
    put(&mut h, 252, &XFORM_SCANNER.to_le_bytes());
    put(&mut h, 254, &XFORM_SCANNER.to_le_bytes());
    let quatern = [q.b, q.c, q.d, q.offset[0], q.offset[1], q.offset[2]];
    for (n, v) in quatern.iter().enumerate() {
        put(&mut h, 256 + 4 * n, &(*v as f32).to_le_bytes());
    }
    for r in 0..3 {
        for c in 0..4 {
            put(
                &mut h,
                280 + 16 * r + 4 * c,
                &(geometry.affine[r][c] as f32).to_le_bytes(),
            );
        }
    }
    put(&mut h, 344, b"n+1\0");
    h
}

/// The qform parameters that best represent an affine (exactly, when its columns are
/// orthogonal; a shear is dropped, and the sform keeps the exact affine).
struct Qform {
    b: f64,
    c: f64,
    d: f64,
    qfac: f64,
    offset: [f64; 3],
}

impl Qform {
    fn from_affine(a: &Affine) -> Self {
        // Unit columns, made orthonormal (Gram–Schmidt) in case the affine has a shear.
        let mut cols = [
            affine::column(a, 0),
            affine::column(a, 1),
            affine::column(a, 2),
        ];
        for n in 0..3 {
            for m in 0..n {
                let dot: f64 = (0..3).map(|r| cols[n][r] * cols[m][r]).sum();
                let previous = cols[m];
                for (x, p) in cols[n].iter_mut().zip(previous) {
                    *x -= dot * p;
                }
            }
            let norm = cols[n].iter().map(|v| v * v).sum::<f64>().sqrt();
            if norm > 0.0 {
                cols[n].iter_mut().for_each(|v| *v /= norm);
            }
        }
        let det = cols[0][0] * (cols[1][1] * cols[2][2] - cols[2][1] * cols[1][2])
            - cols[1][0] * (cols[0][1] * cols[2][2] - cols[2][1] * cols[0][2])
            + cols[2][0] * (cols[0][1] * cols[1][2] - cols[1][1] * cols[0][2]);
        // A left-handed voxel grid is stored as a rotation plus qfac = -1 on the k axis.
        let qfac = if det < 0.0 { -1.0 } else { 1.0 };
        if qfac < 0.0 {
            cols[2].iter_mut().for_each(|v| *v = -*v);
        }
        let r = |row: usize, col: usize| cols[col][row];
        let trace = r(0, 0) + r(1, 1) + r(2, 2);
        // Shepperd's method: divide by the largest of the four candidates for stability.
        let (qa, qb, qc, qd) = if trace > 0.0 {
            let s = (trace + 1.0).sqrt() * 2.0;
            (
                0.25 * s,
                (r(2, 1) - r(1, 2)) / s,
                (r(0, 2) - r(2, 0)) / s,
                (r(1, 0) - r(0, 1)) / s,
            )
        } else if r(0, 0) > r(1, 1) && r(0, 0) > r(2, 2) {
            let s = (1.0 + r(0, 0) - r(1, 1) - r(2, 2)).sqrt() * 2.0;
            (
                (r(2, 1) - r(1, 2)) / s,
                0.25 * s,
                (r(0, 1) + r(1, 0)) / s,
                (r(0, 2) + r(2, 0)) / s,
            )
        } else if r(1, 1) > r(2, 2) {
            let s = (1.0 + r(1, 1) - r(0, 0) - r(2, 2)).sqrt() * 2.0;
            (
                (r(0, 2) - r(2, 0)) / s,
                (r(0, 1) + r(1, 0)) / s,
                0.25 * s,
                (r(1, 2) + r(2, 1)) / s,
            )
        } else {
            let s = (1.0 + r(2, 2) - r(0, 0) - r(1, 1)).sqrt() * 2.0;
            (
                (r(1, 0) - r(0, 1)) / s,
                (r(0, 2) + r(2, 0)) / s,
                (r(1, 2) + r(2, 1)) / s,
                0.25 * s,
            )
        };
        // The file stores only b, c, d and recovers a ≥ 0: flip the sign if needed.
        let sign = if qa < 0.0 { -1.0 } else { 1.0 };
        Qform {
            b: sign * qb,
            c: sign * qc,
            d: sign * qd,
            qfac,
            offset: [a[0][3], a[1][3], a[2][3]],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An oblique, left-handed, non-isotropic affine (LPS-like with a small rotation).
    fn oblique_affine() -> Affine {
        let (s, c) = (0.3f64.sin(), 0.3f64.cos());
        [
            [-0.8 * c, -0.9 * s, 0.0, 120.5],
            [-0.8 * s, 0.9 * c, 0.0, -80.25],
            [0.0, 0.0, -2.5, 40.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    }

    fn ramp(shape: [usize; 3], f: impl Fn(usize, usize, usize) -> f32) -> Volume<f32> {
        let geometry = Geometry {
            shape,
            affine: oblique_affine(),
        };
        let mut data = Vec::with_capacity(geometry.len());
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                for k in 0..shape[2] {
                    data.push(f(i, j, k));
                }
            }
        }
        Volume { data, geometry }
    }

    fn assert_geometry_close(a: &Geometry, b: &Geometry) {
        assert_eq!(a.shape, b.shape);
        let d = affine::max_abs_difference(&a.affine, &b.affine);
        assert!(
            d < 1e-4,
            "affines differ by {d}: {:?} vs {:?}",
            a.affine,
            b.affine
        );
    }

    #[test]
    fn round_trip_keeps_data_and_geometry_for_every_datatype() {
        let dir = tempfile::tempdir().expect("temp dir");
        let shape = [9, 8, 10];
        type Case = (VoxelType, fn(usize, usize, usize) -> f32);
        let cases: [Case; 8] = [
            (VoxelType::UInt8, |i, j, k| {
                ((i * 7 + j * 3 + k) % 256) as f32
            }),
            (VoxelType::Int8, |i, j, k| (i as f32) - (j + k) as f32),
            (VoxelType::Int16, |i, j, k| {
                -1000.0 + (i * 100 + j * 10 + k) as f32
            }),
            (VoxelType::UInt16, |i, j, k| (i * 6000 + j * 10 + k) as f32),
            (VoxelType::Int32, |i, j, k| {
                -100_000.0 + (i * 9000 + j * 100 + k) as f32
            }),
            (VoxelType::UInt32, |i, j, k| (i * 70_000 + j + k) as f32),
            (VoxelType::Float32, |i, j, k| {
                (i as f32).sin() * 3.5 + j as f32 * 0.1 - k as f32
            }),
            (VoxelType::Float64, |i, j, k| {
                1e-3 * (i * j * k) as f32 - 0.5
            }),
        ];
        for (dtype, f) in cases {
            let volume = ramp(shape, f);
            for ext in ["nii", "nii.gz"] {
                let path = dir.path().join(format!("v_{}.{ext}", dtype.name()));
                write_volume(&path, &volume, dtype).expect("write");
                let (back, info) = read_volume_with_info(&path).expect("read");
                assert_eq!(info.datatype, dtype);
                assert_eq!(info.affine_source, AffineSource::Sform);
                assert_geometry_close(&back.geometry, &volume.geometry);
                assert_eq!(back.data, volume.data, "{} {ext}", dtype.name());
            }
        }
    }

    #[test]
    fn int16_with_slope_and_intercept_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        // HU values on a 0.5 grid: representable exactly with slope 0.5, intercept -1024.
        let volume = ramp([8, 9, 8], |i, j, k| {
            -1024.0 + 0.5 * (i * 300 + j * 20 + k) as f32
        });
        let path = dir.path().join("ct.nii.gz");
        write_volume_scaled(&path, &volume, VoxelType::Int16, 0.5, -1024.0).expect("write");
        let (back, info) = read_volume_with_info(&path).expect("read");
        assert!(info.is_scaled());
        assert_eq!((info.scl_slope, info.scl_inter), (0.5, -1024.0));
        assert_eq!(back.data, volume.data);
        assert_geometry_close(&back.geometry, &volume.geometry);
    }

    #[test]
    fn int16_rounds_and_clamps() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut volume = ramp([8, 8, 8], |_, _, _| 0.0);
        volume.data[0] = 1e6;
        volume.data[1] = -1e6;
        volume.data[2] = 2.6;
        volume.data[3] = -2.6;
        let path = dir.path().join("clamped.nii");
        write_volume(&path, &volume, VoxelType::Int16).expect("write");
        let back = read_volume(&path).expect("read");
        assert_eq!(&back.data[..4], &[32767.0, -32768.0, 3.0, -3.0]);
    }

    #[test]
    fn labels_round_trip_as_uint8() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = ramp([8, 10, 9], |i, j, k| ((i + j + k) % 4) as f32);
        let labels = Volume {
            data: image.data.iter().map(|&v| v as u8).collect(),
            geometry: image.geometry.clone(),
        };
        let path = dir.path().join("seg.nii.gz");
        write_labels(&path, &labels).expect("write");
        let (_, info) = read_volume_with_info(&path).expect("read");
        assert_eq!(info.datatype, VoxelType::UInt8);
        let back = read_labels(&path).expect("labels");
        assert_eq!(back.data, labels.data);
        assert_geometry_close(&back.geometry, &labels.geometry);
    }

    #[test]
    fn qform_alone_gives_the_same_affine_as_the_sform() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([8, 8, 8], |i, _, _| i as f32);
        let path = dir.path().join("q.nii");
        write_volume(&path, &volume, VoxelType::Float32).expect("write");
        // Zero the sform code: the reader must rebuild the affine from the quaternion + qfac.
        let mut bytes = std::fs::read(&path).expect("read bytes");
        bytes[254..256].copy_from_slice(&0i16.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        let (back, info) = read_volume_with_info(&path).expect("read");
        assert_eq!(info.affine_source, AffineSource::Qform);
        assert_geometry_close(&back.geometry, &volume.geometry);
        assert!(info.warnings.is_empty(), "{:?}", info.warnings);
        // And with neither code, nibabel's fallback: pixdim on the diagonal, first axis
        // flipped, origin at the centre voxel, and a warning that the orientation is a guess.
        bytes[252..254].copy_from_slice(&0i16.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        let (back, info) = read_volume_with_info(&path).expect("read");
        assert_eq!(info.affine_source, AffineSource::Pixdim);
        assert_eq!(info.warnings.len(), 1, "{:?}", info.warnings);
        let spacing = volume.geometry.spacing();
        for (a, s) in spacing.iter().enumerate() {
            let sign = if a == 0 { -1.0 } else { 1.0 };
            assert!((back.geometry.affine[a][a] - sign * s).abs() < 1e-5);
            assert!((back.geometry.affine[a][3] + sign * s * 3.5).abs() < 1e-5);
        }
    }

    #[test]
    fn fortran_order_on_disk_is_transposed_to_c_order() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([2, 3, 4], |i, j, k| (100 * i + 10 * j + k) as f32);
        let path = dir.path().join("order.nii");
        write_volume(&path, &volume, VoxelType::Int16).expect("write");
        let bytes = std::fs::read(&path).expect("bytes");
        let at = |f: usize| i16::from_le_bytes([bytes[352 + 2 * f], bytes[353 + 2 * f]]);
        // On disk i is fastest: the second stored value is voxel (1, 0, 0).
        assert_eq!(at(0), 0);
        assert_eq!(at(1), 100);
        assert_eq!(at(2), 10);
        assert_eq!(at(6), 1);
    }

    #[test]
    fn missing_file_is_an_io_error_naming_it() {
        let err = read_volume("/definitely/not/here.nii.gz").unwrap_err();
        assert!(matches!(err, DataError::Io { .. }));
        assert!(err.to_string().contains("here.nii.gz"), "{err}");
    }

    #[test]
    fn truncated_gzip_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([16, 16, 16], |i, j, k| (i * j + k) as f32);
        let path = dir.path().join("cut.nii.gz");
        write_volume(&path, &volume, VoxelType::Float32).expect("write");
        let bytes = std::fs::read(&path).expect("bytes");
        std::fs::write(&path, &bytes[..bytes.len() / 2]).expect("truncate");
        let err = read_volume(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("cut.nii.gz") && message.contains("gzip"),
            "{message}"
        );
        // Corrupt (not merely short) compressed bytes are an error too.
        let mut corrupt = bytes.clone();
        for b in corrupt[20..60].iter_mut() {
            *b ^= 0x5a;
        }
        std::fs::write(&path, &corrupt).expect("corrupt");
        assert!(read_volume(&path).is_err());
    }

    #[test]
    fn truncated_voxel_data_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([8, 8, 8], |i, _, _| i as f32);
        let path = dir.path().join("short.nii");
        write_volume(&path, &volume, VoxelType::Int16).expect("write");
        let bytes = std::fs::read(&path).expect("bytes");
        std::fs::write(&path, &bytes[..bytes.len() - 10]).expect("truncate");
        let message = read_volume(&path).unwrap_err().to_string();
        assert!(
            message.contains("short.nii") && message.contains("truncated"),
            "{message}"
        );
        std::fs::write(&path, &bytes[..200]).expect("truncate header");
        assert!(read_volume(&path)
            .unwrap_err()
            .to_string()
            .contains("short.nii"));
    }

    #[test]
    fn nan_voxels_are_counted_and_the_file_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut volume = ramp([8, 8, 8], |_, _, _| 1.0);
        volume.data[5] = f32::NAN;
        volume.data[9] = f32::NAN;
        volume.data[11] = f32::INFINITY;
        let path = dir.path().join("nan.nii.gz");
        write_volume(&path, &volume, VoxelType::Float32).expect("write");
        let err = read_volume(&path).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::NonFinite {
                    nan: 2,
                    infinite: 1,
                    total: 512,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("nan.nii.gz"));
        // The inspector's path still reads them.
        assert!(read_volume_with_info(&path).is_ok());
        // Labels refuse them as well.
        assert!(read_labels(&path)
            .unwrap_err()
            .to_string()
            .contains("nan.nii.gz"));
    }

    #[test]
    fn four_d_series_is_unsupported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([8, 8, 8], |i, _, _| i as f32);
        let path = dir.path().join("series.nii");
        write_volume(&path, &volume, VoxelType::Int16).expect("write");
        let mut bytes = std::fs::read(&path).expect("bytes");
        bytes[40..42].copy_from_slice(&4i16.to_le_bytes());
        bytes[48..50].copy_from_slice(&2i16.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        let err = read_volume(&path).unwrap_err();
        assert!(matches!(err, DataError::Unsupported { .. }), "{err:?}");
        assert!(err.to_string().contains("series.nii"));
        // dim[0] = 4 with a single time point is just a 3-D volume.
        bytes[48..50].copy_from_slice(&1i16.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        assert_eq!(read_volume(&path).expect("3-D").data, volume.data);
    }

    #[test]
    fn nifti2_bad_header_and_complex_types_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([8, 8, 8], |i, _, _| i as f32);
        let path = dir.path().join("odd.nii");
        write_volume(&path, &volume, VoxelType::Float32).expect("write");
        let good = std::fs::read(&path).expect("bytes");

        let mut bytes = good.clone();
        bytes[0..4].copy_from_slice(&540i32.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        let err = read_volume(&path).unwrap_err();
        assert!(err.to_string().contains("NIfTI-2") && err.to_string().contains("odd.nii"));

        let mut bytes = good.clone();
        bytes[0..4].copy_from_slice(&123i32.to_le_bytes());
        std::fs::write(&path, &bytes).expect("rewrite");
        assert!(read_volume(&path)
            .unwrap_err()
            .to_string()
            .contains("sizeof_hdr"));

        let mut bytes = good.clone();
        bytes[70..72].copy_from_slice(&32i16.to_le_bytes()); // complex64
        std::fs::write(&path, &bytes).expect("rewrite");
        let err = read_volume(&path).unwrap_err();
        assert!(err.to_string().contains("complex64"), "{err}");

        let mut bytes = good;
        bytes[70..72].copy_from_slice(&128i16.to_le_bytes()); // RGB24
        std::fs::write(&path, &bytes).expect("rewrite");
        assert!(matches!(
            read_volume(&path),
            Err(DataError::Unsupported { .. })
        ));

        std::fs::write(&path, b"hello").expect("rewrite");
        assert!(read_volume(&path)
            .unwrap_err()
            .to_string()
            .contains("odd.nii"));
    }

    #[test]
    fn big_endian_files_are_read() {
        let dir = tempfile::tempdir().expect("temp dir");
        let volume = ramp([3, 4, 5], |i, j, k| (i * 20 + j * 5 + k) as f32 - 30.0);
        let path = dir.path().join("be.nii");
        write_volume(&path, &volume, VoxelType::Int16).expect("write");
        let le = std::fs::read(&path).expect("bytes");
        // Rebuild the file big-endian, field by field (sizes from the NIfTI-1 layout).
        let mut be = le.clone();
        let swap = |be: &mut Vec<u8>, at: usize, n: usize| be[at..at + n].reverse();
        swap(&mut be, 0, 4);
        for n in 0..8 {
            swap(&mut be, 40 + 2 * n, 2);
        }
        for at in [70, 72, 252, 254] {
            swap(&mut be, at, 2);
        }
        for n in 0..8 {
            swap(&mut be, 76 + 4 * n, 4);
        }
        for at in [108, 112, 116] {
            swap(&mut be, at, 4);
        }
        for n in 0..(6 + 12) {
            swap(&mut be, 256 + 4 * n, 4);
        }
        for f in 0..volume.data.len() {
            swap(&mut be, 352 + 2 * f, 2);
        }
        std::fs::write(&path, &be).expect("rewrite");
        let back = read_volume(&path).expect("read big-endian");
        assert_eq!(back.data, volume.data);
        assert_geometry_close(&back.geometry, &volume.geometry);
    }

    #[test]
    fn non_integer_or_out_of_range_labels_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        for (name, bad) in [("half", 1.5f32), ("negative", -1.0), ("big", 300.0)] {
            let mut volume = ramp([8, 8, 8], |_, _, _| 1.0);
            volume.data[3] = bad;
            let path = dir.path().join(format!("{name}.nii"));
            write_volume(&path, &volume, VoxelType::Float32).expect("write");
            let message = read_labels(&path).unwrap_err().to_string();
            assert!(message.contains(&format!("{name}.nii")), "{message}");
            assert!(message.contains("1 voxel(s)"), "{message}");
            assert!(message.contains(&format!("(first: {bad})")), "{message}");
        }
        // Counted over the whole volume (checked in parallel blocks), the first in storage
        // order reported.
        let mut volume = ramp([70, 90, 60], |i, j, k| ((i + j + k) % 7) as f32);
        let n = volume.data.len();
        volume.data[n - 1] = 2.5;
        volume.data[n / 2] = 999.0;
        let path = dir.path().join("many.nii.gz");
        write_volume(&path, &volume, VoxelType::Float32).expect("write");
        let message = read_labels(&path).unwrap_err().to_string();
        assert!(message.contains("2 voxel(s)"), "{message}");
        // The file stores voxels in Fortran order (x fastest): the one with the smaller
        // Fortran index is reported.
        let fortran = |c: usize| {
            let (i, j, k) = (c / (90 * 60), (c / 60) % 90, c % 60);
            (k * 90 + j) * 70 + i
        };
        let first = if fortran(n - 1) < fortran(n / 2) {
            2.5
        } else {
            999.0
        };
        assert!(message.contains(&format!("(first: {first})")), "{message}");
    }

    #[test]
    fn labels_decode_to_the_values_of_the_image_path_at_odd_sizes() {
        let dir = tempfile::tempdir().expect("temp dir");
        for shape in [[1, 1, 1], [3, 5, 7], [17, 4, 9], [9, 2, 33]] {
            let volume = ramp(shape, |i, j, k| ((3 * i + 5 * j + 7 * k) % 11) as f32);
            let path = dir.path().join("odd.nii.gz");
            write_volume(&path, &volume, VoxelType::UInt8).expect("write");
            let labels = read_labels(&path).expect("labels");
            let values = read_volume(&path).expect("values");
            assert_eq!(labels.geometry.shape, shape);
            let as_f32: Vec<f32> = labels.data.iter().map(|&v| f32::from(v)).collect();
            assert_eq!(as_f32, values.data, "{shape:?}");
            assert_eq!(values.data, volume.data, "{shape:?}");
        }
    }
}
