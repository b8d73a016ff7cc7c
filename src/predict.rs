//! Segmenting scans (NIfTI files, DICOM series folders) to NIfTI label maps, one or a whole
//! folder, as the `predict` example does.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use segviz_core::sliding_window::SlidingWindowConfig;
use segviz_data::{write_labels, PreprocessConfig};
use segviz_fed::evaluate::{segment_file, Segmenter};

/// The scans of an input folder and what was not taken, with why.
#[derive(Debug, Clone, PartialEq)]
pub struct FolderPlan {
    /// (scan, label map to write), sorted by scan path.
    pub cases: Vec<(PathBuf, PathBuf)>,
    /// Every other entry of the folder with the reason it is not segmented.
    pub skipped: Vec<String>,
}

/// Lists the scans of `input`, each with its label map in `output`: NIfTI files (`.nii`,
/// `.nii.gz`) under the same name (a `.nii` scan gets a `.nii.gz` label map) and DICOM series
/// folders as `<folder>.nii.gz`. Hidden entries, folders without DICOM files and other files
/// are listed in [`FolderPlan::skipped`], never dropped silently.
///
/// # Errors
/// A message naming the folder when it cannot be listed.
pub fn plan_folder(input: &Path, output: &Path) -> Result<FolderPlan, String> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(input)
        .and_then(|dir| dir.map(|e| e.map(|e| e.path())).collect())
        .map_err(|e| format!("{}: cannot list the folder: {e}", input.display()))?;
    entries.sort();
    let mut plan = FolderPlan {
        cases: Vec::new(),
        skipped: Vec::new(),
    };
    for path in entries {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let reason = if name.starts_with('.') {
            "a hidden entry"
        } else if path.is_dir() {
            if segviz_data::dicom::is_dicom_folder(&path) {
                plan.cases
                    .push((path, output.join(format!("{name}.nii.gz"))));
                continue;
            }
            "a folder without DICOM files"
        } else if name.ends_with(".nii.gz") || name.ends_with(".nii") {
            let stem = name.strip_suffix(".gz").unwrap_or(&name);
            plan.cases.push((path, output.join(format!("{stem}.gz"))));
            continue;
        } else {
            "not a NIfTI file (.nii or .nii.gz)"
        };
        plan.skipped.push(format!("{}: {reason}", path.display()));
    }
    Ok(plan)
}

/// Segments the scan `input` (a NIfTI file or a DICOM series folder) and writes its label map (0 background, 1 liver, 2 spleen,
/// 3 pancreas, 4 kidney) to `output` in the scan's geometry, atomically. Returns the line a
/// user reads: the file, its shape and the voxels of each organ; the scan's geometry
/// warnings are printed to stderr.
///
/// # Errors
/// Any error reading the scan, segmenting it or writing the label map; each names its file.
pub fn segment_to_file(
    segmenter: &Segmenter,
    input: &Path,
    output: &Path,
    preprocess: &PreprocessConfig,
    window: &SlidingWindowConfig,
    device: &Device,
) -> Result<String, Box<dyn std::error::Error>> {
    let (labels, warnings) = segment_file(segmenter, input, preprocess, window, device)?;
    for w in &warnings {
        eprintln!("warning: {}: {w}", input.display());
    }
    write_labels(output, &labels)?;
    let mut counts = [0usize; 5];
    for &v in &labels.data {
        if let Some(c) = counts.get_mut(v as usize) {
            *c += 1;
        }
    }
    Ok(format!(
        "wrote {} ({:?} voxels): liver {}, spleen {}, pancreas {}, kidney {} voxels",
        output.display(),
        labels.geometry.shape,
        counts[1],
        counts[2],
        counts[3],
        counts[4]
    ))
}
