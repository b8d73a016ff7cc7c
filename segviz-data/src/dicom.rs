//! DICOM CT series in: a folder of single-frame slices read into a [`Volume`] with the
//! geometry a NIfTI conversion (dcm2niix, dicom2nifti, nibabel) gives.
//!
//! Parsing and pixel decoding are the `dicom-object` / `dicom-pixeldata` crates (pure Rust,
//! no system library): explicit and implicit VR little endian, deflated explicit VR, RLE
//! lossless, JPEG baseline / extended / lossless, JPEG 2000 lossless and lossy.
//!
//! Geometry. Voxel `[i, j, k]` is column `i`, row `j` of the `k`-th slice sorted along the
//! slice normal `N = X × Y` (`X`, `Y` the row and column direction cosines of
//! ImageOrientationPatient). In DICOM's LPS patient coordinates
//! `p = P₀ + i·Δc·X + j·Δr·Y + k·Δs·N` (PixelSpacing is `[Δr, Δc]`, `Δs` the spacing of
//! the sorted ImagePositionPatient values); the affine is that map with x and y negated,
//! NIfTI's RAS. Values are the stored values through RescaleSlope / RescaleIntercept
//! (Hounsfield units for CT).
//!
//! Refused with an error naming the folder or file: a folder with no DICOM file, a file
//! that is not DICOM, several series, multi-frame or colour images, slices of different
//! size or orientation, two slices at one position, a gantry tilt (slices stacked off the
//! normal), and missing or unevenly spaced slices.

use std::path::{Path, PathBuf};

use dicom_dictionary_std::tags;
use dicom_object::mem::InMemDicomObject;
use dicom_object::{OpenFileOptions, Tag};
use dicom_pixeldata::PixelDecoder;

use crate::error::{DataError, Result};
use crate::volume::{Geometry, Volume};

/// How far (relative) slice gaps may differ from their mean before the series is refused as
/// missing or uneven slices.
const SPACING_TOLERANCE: f64 = 0.01;
/// The largest angle (radians) between the slice stacking direction and the slice normal:
/// more is a gantry tilt.
const TILT_TOLERANCE: f64 = 1e-3;

/// What the header of one slice says about its place in the volume.
#[derive(Debug, Clone)]
struct Slice {
    path: PathBuf,
    series: String,
    rows: usize,
    columns: usize,
    position: [f64; 3],
    orientation: [f64; 6],
    spacing: [f64; 2],
}

/// Facts about a series that was read.
#[derive(Debug, Clone, PartialEq)]
pub struct DicomSeriesInfo {
    /// SeriesInstanceUID.
    pub series_uid: String,
    /// Transfer syntax UID of the first slice.
    pub transfer_syntax: String,
    /// The slice files, in volume order (`k`).
    pub files: Vec<PathBuf>,
}

/// Reads a CT scan for inference: a DICOM series folder, or a NIfTI file. Returns the volume
/// with the geometry warnings a user should see (a NIfTI orientation guessed from `pixdim`,
/// a broken sform…; none for DICOM, whose geometry is checked or refused).
///
/// # Errors
/// As [`read_dicom_series`] for a folder, as [`crate::read_volume`] for a file.
pub fn read_scan(path: &Path) -> Result<(Volume<f32>, Vec<String>)> {
    if path.is_dir() {
        let (volume, _) = read_dicom_series(path)?;
        Ok((volume, Vec::new()))
    } else {
        let warnings = crate::read_header(path)?.warnings;
        Ok((crate::read_volume(path)?, warnings))
    }
}

/// Whether `dir` is a folder holding at least one DICOM file (the `DICM` marker after the
/// 128-byte preamble).
pub fn is_dicom_folder(dir: &Path) -> bool {
    dir.is_dir()
        && std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.path().is_file() && has_dicom_marker(&e.path()))
        })
}

/// The files of a scan: the file itself, or every regular file of a DICOM series folder
/// (sorted). Used to fingerprint scans for caches and resume checks.
pub fn scan_files(path: &Path) -> Vec<PathBuf> {
    if !path.is_dir() {
        return vec![path.to_path_buf()];
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn has_dicom_marker(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 132];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && &head[128..] == b"DICM"
}

/// Reads the CT series in folder `dir` (every regular, non-hidden file in it; a `DICOMDIR`
/// index is ignored) into a volume of rescaled values with its RAS affine.
///
/// # Errors
/// [`DataError::Invalid`] naming the folder or the file for everything the module
/// documentation lists as refused, [`DataError::Unsupported`] for pixel data the decoders
/// cannot read, [`DataError::Io`] when the folder cannot be listed.
pub fn read_dicom_series(dir: &Path) -> Result<(Volume<f32>, DicomSeriesInfo)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .and_then(|entries| entries.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| DataError::io(dir, e))?;
    files.retain(|p| {
        let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
        p.is_file()
            && !name
                .as_deref()
                .is_some_and(|n| n.starts_with('.') || n.eq_ignore_ascii_case("DICOMDIR"))
    });
    files.sort();
    if files.is_empty() {
        return Err(DataError::invalid(
            dir,
            "no file in this DICOM series folder",
        ));
    }
    let mut slices = files
        .iter()
        .map(|f| read_slice_header(f))
        .collect::<Result<Vec<_>>>()?;
    let first = slices[0].clone();
    let mut series: Vec<&str> = slices.iter().map(|s| s.series.as_str()).collect();
    series.sort();
    series.dedup();
    if series.len() > 1 {
        return Err(DataError::invalid(
            dir,
            format!(
                "{} series in one folder ({}); put each series in a folder of its own",
                series.len(),
                series.join(", ")
            ),
        ));
    }
    for s in &slices {
        if (s.rows, s.columns) != (first.rows, first.columns) {
            return Err(DataError::invalid(
                &s.path,
                format!(
                    "{}×{} pixels, but {} has {}×{}: not one volume",
                    s.rows,
                    s.columns,
                    first.path.display(),
                    first.rows,
                    first.columns
                ),
            ));
        }
        let same = s
            .orientation
            .iter()
            .zip(&first.orientation)
            .all(|(a, b)| (a - b).abs() < 1e-4)
            && s.spacing
                .iter()
                .zip(&first.spacing)
                .all(|(a, b)| (a - b).abs() < 1e-4);
        if !same {
            return Err(DataError::invalid(
                &s.path,
                format!(
                    "orientation {:?} / pixel spacing {:?} differ from {}: not one volume",
                    s.orientation,
                    s.spacing,
                    first.path.display()
                ),
            ));
        }
    }
    let x = [
        first.orientation[0],
        first.orientation[1],
        first.orientation[2],
    ];
    let y = [
        first.orientation[3],
        first.orientation[4],
        first.orientation[5],
    ];
    let n = cross(x, y);
    if (norm(n) - 1.0).abs() > 1e-3 || dot(x, y).abs() > 1e-3 {
        return Err(DataError::invalid(
            &first.path,
            format!(
                "ImageOrientationPatient {:?} is not two orthogonal unit vectors",
                first.orientation
            ),
        ));
    }
    slices.sort_by(|a, b| dot(a.position, n).total_cmp(&dot(b.position, n)));
    let step = slice_step(dir, &slices, n)?;
    let (columns, rows, depth) = (first.columns, first.rows, slices.len());
    let geometry = Geometry {
        shape: [columns, rows, depth],
        affine: ras_affine(
            x,
            y,
            step,
            [first.spacing[1], first.spacing[0]],
            slices[0].position,
        ),
    };
    let mut data = vec![0f32; geometry.len()];
    let mut transfer_syntax = String::new();
    for (k, s) in slices.iter().enumerate() {
        let (values, ts) = read_slice_pixels(&s.path, rows, columns)?;
        if k == 0 {
            transfer_syntax = ts;
        }
        for j in 0..rows {
            for i in 0..columns {
                data[geometry.index(i, j, k)] = values[j * columns + i];
            }
        }
    }
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(DataError::invalid(
            dir,
            format!("{bad} voxel(s) are not finite after rescaling"),
        ));
    }
    Ok((
        Volume { data, geometry },
        DicomSeriesInfo {
            series_uid: first.series,
            transfer_syntax,
            files: slices.into_iter().map(|s| s.path).collect(),
        },
    ))
}

/// The vector from one slice to the next, checked: at least one slice, no two at one
/// position, evenly spaced, stacked along the normal.
fn slice_step(dir: &Path, slices: &[Slice], n: [f64; 3]) -> Result<[f64; 3]> {
    if slices.len() == 1 {
        // A single slice: its thickness is unknown here; one millimetre along the normal.
        return Ok(n);
    }
    let gaps: Vec<f64> = slices
        .windows(2)
        .map(|w| dot(sub(w[1].position, w[0].position), n))
        .collect();
    for (w, gap) in slices.windows(2).zip(&gaps) {
        if *gap < 1e-4 {
            return Err(DataError::invalid(
                dir,
                format!(
                    "{} and {} are at the same position along the slice normal",
                    w[0].path.display(),
                    w[1].path.display()
                ),
            ));
        }
    }
    let last = &slices[slices.len() - 1];
    let total = sub(last.position, slices[0].position);
    let mean = dot(total, n) / (slices.len() - 1) as f64;
    for (w, gap) in slices.windows(2).zip(&gaps) {
        if (gap - mean).abs() > SPACING_TOLERANCE * mean {
            return Err(DataError::invalid(
                dir,
                format!(
                    "uneven slice spacing: {gap:.3} mm from {} to {}, {mean:.3} mm on average; \
                     a slice is missing or the series mixes spacings",
                    w[0].path.display(),
                    w[1].path.display()
                ),
            ));
        }
    }
    let off_normal = norm(cross(total, n)) / norm(total);
    if off_normal > TILT_TOLERANCE {
        return Err(DataError::invalid(
            dir,
            format!(
                "the slices are stacked {:.2}° off their normal (gantry tilt or sheared \
                 volume); resample the series to an orthogonal grid first",
                off_normal.asin().to_degrees()
            ),
        ));
    }
    let count = (slices.len() - 1) as f64;
    Ok([total[0] / count, total[1] / count, total[2] / count])
}

/// The RAS affine of voxel `[column, row, slice]`.
fn ras_affine(
    x: [f64; 3],
    y: [f64; 3],
    step: [f64; 3],
    column_row_spacing: [f64; 2],
    origin: [f64; 3],
) -> [[f64; 4]; 4] {
    let columns = [
        x.map(|v| v * column_row_spacing[0]),
        y.map(|v| v * column_row_spacing[1]),
        step,
        origin,
    ];
    let mut affine = [[0.0; 4]; 4];
    for (c, column) in columns.iter().enumerate() {
        for r in 0..3 {
            // LPS to RAS: x and y change sign.
            affine[r][c] = if r < 2 { -column[r] } else { column[r] };
        }
    }
    affine[3][3] = 1.0;
    affine
}

/// Reads the header of one slice (stopping before its pixel data).
fn read_slice_header(path: &Path) -> Result<Slice> {
    let object = OpenFileOptions::new()
        .read_until(tags::PIXEL_DATA)
        .open_file(path)
        .map_err(|e| DataError::invalid(path, format!("not a readable DICOM file: {e}")))?;
    let floats = |tag: Tag, name: &str, count: usize| -> Result<Vec<f64>> {
        let values = object
            .element(tag)
            .map_err(|_| DataError::invalid(path, format!("no {name}")))?
            .to_multi_float64()
            .map_err(|e| DataError::invalid(path, format!("{name}: {e}")))?;
        if values.len() != count || values.iter().any(|v| !v.is_finite()) {
            return Err(DataError::invalid(
                path,
                format!("{name} must be {count} finite numbers, found {values:?}"),
            ));
        }
        Ok(values)
    };
    let int = |tag: Tag, name: &str| -> Result<usize> {
        object
            .element(tag)
            .map_err(|_| DataError::invalid(path, format!("no {name}")))?
            .to_int::<u32>()
            .map(|v| v as usize)
            .map_err(|e| DataError::invalid(path, format!("{name}: {e}")))
    };
    let frames = match object.element_opt(tags::NUMBER_OF_FRAMES) {
        Ok(Some(e)) => e.to_int::<u32>().unwrap_or(1),
        _ => 1,
    };
    if frames != 1 {
        return Err(DataError::invalid(
            path,
            format!("a multi-frame image ({frames} frames); single-frame CT slices are read"),
        ));
    }
    let samples = match object.element_opt(tags::SAMPLES_PER_PIXEL) {
        Ok(Some(e)) => e.to_int::<u32>().unwrap_or(1),
        _ => 1,
    };
    if samples != 1 {
        return Err(DataError::invalid(
            path,
            format!("{samples} samples per pixel (colour); a CT slice has one"),
        ));
    }
    let series = object
        .element(tags::SERIES_INSTANCE_UID)
        .ok()
        .and_then(|e| e.to_str().ok())
        .map(|s| s.trim_end_matches(['\0', ' ']).to_string())
        .unwrap_or_default();
    let position = floats(tags::IMAGE_POSITION_PATIENT, "ImagePositionPatient", 3)?;
    let orientation = floats(
        tags::IMAGE_ORIENTATION_PATIENT,
        "ImageOrientationPatient",
        6,
    )?;
    let spacing = floats(tags::PIXEL_SPACING, "PixelSpacing", 2)?;
    if spacing.iter().any(|&s| s <= 0.0) {
        return Err(DataError::invalid(
            path,
            format!("PixelSpacing {spacing:?} must be positive"),
        ));
    }
    Ok(Slice {
        path: path.to_path_buf(),
        series,
        rows: int(tags::ROWS, "Rows")?,
        columns: int(tags::COLUMNS, "Columns")?,
        position: [position[0], position[1], position[2]],
        orientation: [
            orientation[0],
            orientation[1],
            orientation[2],
            orientation[3],
            orientation[4],
            orientation[5],
        ],
        spacing: [spacing[0], spacing[1]],
    })
}

/// Decodes one slice's pixels through its rescale (row-major, `rows × columns` values) and
/// returns them with the file's transfer syntax.
fn read_slice_pixels(path: &Path, rows: usize, columns: usize) -> Result<(Vec<f32>, String)> {
    let object: dicom_object::FileDicomObject<InMemDicomObject> = OpenFileOptions::new()
        .open_file(path)
        .map_err(|e| DataError::invalid(path, format!("not a readable DICOM file: {e}")))?;
    let ts = object
        .meta()
        .transfer_syntax()
        .trim_end_matches(['\0', ' '])
        .to_string();
    let pixels = object
        .decode_pixel_data()
        .map_err(|e| DataError::Unsupported {
            path: path.to_path_buf(),
            reason: format!("pixel data (transfer syntax {ts}) cannot be decoded: {e}"),
        })?;
    // The default conversion applies the modality LUT: RescaleSlope and RescaleIntercept.
    let values: Vec<f32> = pixels
        .to_vec()
        .map_err(|e| DataError::invalid(path, format!("pixel data: {e}")))?;
    if values.len() != rows * columns {
        return Err(DataError::invalid(
            path,
            format!(
                "{} pixel values decoded for {rows}×{columns} pixels",
                values.len()
            ),
        ));
    }
    Ok((values, ts))
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn norm(a: [f64; 3]) -> f64 {
    dot(a, a).sqrt()
}
