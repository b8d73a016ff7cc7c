//! The whole recipe for one (image, label) pair.

use std::path::Path;

use super::config::PreprocessConfig;
use super::crop::{crop, foreground_box};
use super::intensity::window_intensity_owned;
use super::pad::pad_to_multiple_owned;
use super::resample::{
    resample_image_to_spacing, resample_labels_to_spacing, resize_image, resize_labels,
};
use crate::error::{DataError, Result};
use crate::nifti_io::read_labels;
use crate::volume::{Geometry, Volume};

/// Largest element-wise affine difference (mm) still treated as "the same grid".
pub const AFFINE_TOLERANCE: f64 = 1e-3;

/// Checks that an image and its label map share one voxel grid: same shape, and affines
/// equal within [`AFFINE_TOLERANCE`].
///
/// # Errors
/// [`DataError::PairMismatch`] naming both files and every problem found.
pub fn check_pair(
    image_path: &Path,
    image: &Geometry,
    label_path: &Path,
    label: &Geometry,
) -> Result<()> {
    let mut problems = Vec::new();
    if image.shape != label.shape {
        problems.push(format!(
            "shape mismatch: image {:?}, label {:?}",
            image.shape, label.shape
        ));
    }
    // Entries are compared relative to their size: NIfTI stores the affine in single
    // precision, so an origin of a few hundred mm carries rounding of ~1e-5 of it.
    let difference = image
        .affine
        .iter()
        .flatten()
        .zip(label.affine.iter().flatten())
        .map(|(a, b)| (a - b).abs() / (1.0 + a.abs().max(b.abs()) * 1e-3))
        .fold(0.0f64, |worst, d| {
            if d.is_nan() {
                f64::INFINITY
            } else {
                worst.max(d)
            }
        });
    if difference > AFFINE_TOLERANCE {
        problems.push(format!(
            "affine mismatch: largest difference {difference:.4} (tolerance {AFFINE_TOLERANCE})"
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(DataError::PairMismatch {
            image: image_path.to_path_buf(),
            label: label_path.to_path_buf(),
            problems: problems.join("; "),
        })
    }
}

/// Prepares an image (HU) and its label map: to RAS → resample to `pixdim` (trilinear /
/// nearest) → window to `[0, 1]` → optional foreground crop → optional resize → pad to a
/// multiple of `pad_multiple` (image with 0, label with background).
///
/// The label is given the image's affine after the pair check, so the outputs share one
/// geometry exactly.
///
/// # Errors
/// [`DataError::Config`] for an invalid config, [`DataError::PairMismatch`] if the inputs
/// do not share a grid (use [`preprocess_files`] to have the files named).
pub fn preprocess_pair(
    image: &Volume<f32>,
    label: &Volume<u8>,
    config: &PreprocessConfig,
) -> Result<(Volume<f32>, Volume<u8>)> {
    check_pair(
        Path::new("<image>"),
        &image.geometry,
        Path::new("<label>"),
        &label.geometry,
    )?;
    preprocess_checked(image, label, config)
}

/// Reads an image and label file, checks they match (naming both files if not) and
/// preprocesses them with [`preprocess_pair`].
///
/// # Errors
/// Reading errors of either file, [`DataError::PairMismatch`], [`DataError::Config`].
pub fn preprocess_files(
    image_path: &Path,
    label_path: &Path,
    config: &PreprocessConfig,
) -> Result<(Volume<f32>, Volume<u8>)> {
    config.validate()?;
    let (image, _) = crate::dicom::read_scan(image_path)?;
    let label = read_labels(label_path)?;
    check_pair(image_path, &image.geometry, label_path, &label.geometry)?;
    // Both go through the same grid, as in `preprocess_checked`; the volumes read here are
    // ours to change, so nothing is copied.
    let label = Volume {
        data: label.data,
        geometry: image.geometry.clone(),
    };
    with_label(prepare(image.into_ras(), Some(label.into_ras()), config)?)
}

/// Prepares an image (HU) alone, as [`preprocess_pair`] prepares the image of a pair: what
/// segmenting a scan needs, without carrying an empty label map through every step.
///
/// # Errors
/// [`DataError::Config`] for an invalid config; resampling errors.
pub fn preprocess_image(image: &Volume<f32>, config: &PreprocessConfig) -> Result<Volume<f32>> {
    config.validate()?;
    Ok(prepare(image.to_ras(), None, config)?.0)
}

fn preprocess_checked(
    image: &Volume<f32>,
    label: &Volume<u8>,
    config: &PreprocessConfig,
) -> Result<(Volume<f32>, Volume<u8>)> {
    config.validate()?;
    // Both go through the same grid: the label inherits the image's affine (they agree
    // within tolerance), so rounding differences cannot shift one against the other.
    let label = Volume {
        data: label.data.clone(),
        geometry: image.geometry.clone(),
    };
    with_label(prepare(image.to_ras(), Some(label.into_ras()), config)?)
}

/// The pair [`prepare`] gave, which must hold the label map it was given.
fn with_label(prepared: (Volume<f32>, Option<Volume<u8>>)) -> Result<(Volume<f32>, Volume<u8>)> {
    match prepared {
        (image, Some(label)) => Ok((image, label)),
        (_, None) => Err(DataError::Config(
            "preprocessing lost the label map (a bug; please report it)".into(),
        )),
    }
}

/// The recipe of [`preprocess_pair`] on an image and, when given, its label map (already on
/// the image's grid), both reoriented to RAS.
fn prepare(
    image: Volume<f32>,
    label: Option<Volume<u8>>,
    config: &PreprocessConfig,
) -> Result<(Volume<f32>, Option<Volume<u8>>)> {
    let image = resample_image_to_spacing(&image, config.pixdim)?;
    let label = label
        .map(|l| resample_labels_to_spacing(&l, config.pixdim))
        .transpose()?;
    let mut image = window_intensity_owned(image, config.a_min, config.a_max, config.clip)?;
    let mut label = label;
    if config.crop_foreground {
        let threshold = config.foreground_threshold;
        if let Some(bounds) = foreground_box(&image, |v| v > threshold, config.crop_margin) {
            image = crop(&image, &bounds)?;
            label = label.map(|l| crop(&l, &bounds)).transpose()?;
        }
    }
    if let Some(shape) = config.resize {
        image = resize_image(&image, shape)?;
        label = label.map(|l| resize_labels(&l, shape)).transpose()?;
    }
    let image = pad_to_multiple_owned(image, config.pad_multiple, 0.0);
    let label = label.map(|l| pad_to_multiple_owned(l, config.pad_multiple, 0));
    Ok((image, label))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti_io::{write_labels, write_volume, VoxelType};

    /// A small LPS, slice-first CT-like pair: a bright block (label 1) in air.
    fn pair() -> (Volume<f32>, Volume<u8>) {
        let geometry = Geometry {
            shape: [10, 20, 18], // axis 0 = S (slices), 1 = L, 2 = P
            affine: [
                [0.0, -0.8, 0.0, 10.0],
                [0.0, 0.0, -0.8, 20.0],
                [2.5, 0.0, 0.0, -30.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
        };
        let mut image = Volume::filled(geometry.clone(), -1000.0f32);
        let mut label = Volume::filled(geometry, 0u8);
        for i in 3..7 {
            for j in 5..15 {
                for k in 4..12 {
                    let n = image.geometry.index(i, j, k);
                    image.data[n] = 100.0;
                    label.data[n] = 1;
                }
            }
        }
        (image, label)
    }

    /// World centroid of the voxels where `mask` is true.
    fn centroid(g: &Geometry, mask: impl Iterator<Item = bool>) -> [f64; 3] {
        let mut sum = [0.0; 3];
        let mut count = 0.0;
        let [_, s1, s2] = g.shape;
        for (n, inside) in mask.enumerate() {
            if inside {
                let index = [n / (s1 * s2), (n / s2) % s1, n % s2].map(|x| x as f64);
                let w = crate::affine::apply(&g.affine, index);
                for d in 0..3 {
                    sum[d] += w[d];
                }
                count += 1.0;
            }
        }
        sum.map(|s| s / count)
    }

    #[test]
    fn the_image_alone_is_prepared_as_the_image_of_a_pair() {
        let (image, label) = pair();
        let cropping = PreprocessConfig {
            crop_foreground: true,
            foreground_threshold: 0.5,
            crop_margin: 1,
            ..PreprocessConfig::default()
        };
        let resizing = PreprocessConfig {
            resize: Some([8, 12, 10]),
            ..PreprocessConfig::default()
        };
        for config in [PreprocessConfig::default(), cropping, resizing] {
            let (from_pair, _) = preprocess_pair(&image, &label, &config).expect("pair");
            let alone = preprocess_image(&image, &config).expect("image");
            assert_eq!(alone.geometry, from_pair.geometry);
            assert_eq!(alone.data, from_pair.data);
        }
        let bad = PreprocessConfig {
            pixdim: [0.0, 1.0, 1.0],
            ..PreprocessConfig::default()
        };
        assert!(preprocess_image(&image, &bad).is_err());
    }

    #[test]
    fn preprocess_pair_gives_ras_windowed_padded_volumes_on_one_grid() {
        let (image, label) = pair();
        let config = PreprocessConfig::default();
        let (img, lbl) = preprocess_pair(&image, &label, &config).expect("preprocess");
        assert_eq!(img.geometry, lbl.geometry);
        assert_eq!(
            crate::orientation::orientation_code(&img.geometry.affine),
            "RAS"
        );
        assert!(img.shape().iter().all(|n| n % 16 == 0));
        assert!(img.data.iter().all(|v| (0.0..=1.0).contains(v)));
        // Image and label stay aligned in world space: the centroid of the label, of the
        // bright image voxels and of the original block coincide (within a voxel).
        // (Voxel-wise comparison is not meaningful at the boundary, where trilinear mixes
        // the organ with −1000 HU air before the window clips it to 0.)
        let original = centroid(&label.geometry, label.data.iter().map(|&l| l == 1));
        let of_label = centroid(&lbl.geometry, lbl.data.iter().map(|&l| l == 1));
        let of_image = centroid(&img.geometry, img.data.iter().map(|&v| v > 0.3));
        for d in 0..3 {
            assert!(
                (original[d] - of_label[d]).abs() < 1.0,
                "{original:?} vs {of_label:?}"
            );
            assert!(
                (original[d] - of_image[d]).abs() < 1.0,
                "{original:?} vs {of_image:?}"
            );
        }
        let volume_mm3 = |l: &Volume<u8>| {
            l.data.iter().filter(|&&x| x == 1).count() as f64
                * l.geometry.spacing().iter().product::<f64>()
        };
        let before = volume_mm3(&label);
        let after = volume_mm3(&lbl);
        assert!((after / before - 1.0).abs() < 0.15, "{before} vs {after}");

        let cropped = PreprocessConfig {
            crop_foreground: true,
            pad_multiple: 1,
            ..config
        };
        let (ci, cl) = preprocess_pair(&image, &label, &cropped).expect("crop");
        assert!(ci.data.len() < img.data.len());
        assert_eq!(ci.geometry, cl.geometry);
    }

    #[test]
    fn mismatched_files_are_named_with_every_problem() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (image, label) = pair();
        let image_path = dir.path().join("img0001.nii.gz");
        let label_path = dir.path().join("label0001.nii.gz");
        write_volume(&image_path, &image, VoxelType::Int16).expect("write image");

        // Shape mismatch.
        let small = Volume::filled(
            Geometry {
                shape: [10, 20, 17],
                ..label.geometry.clone()
            },
            0u8,
        );
        write_labels(&label_path, &small).expect("write label");
        let err =
            preprocess_files(&image_path, &label_path, &PreprocessConfig::default()).unwrap_err();
        let message = err.to_string();
        assert!(
            message.contains("img0001.nii.gz") && message.contains("label0001.nii.gz"),
            "{message}"
        );
        assert!(
            message.contains("shape mismatch") && !message.contains("affine"),
            "{message}"
        );

        // Affine mismatch (origin moved by 2 mm).
        let mut moved = label.clone();
        moved.geometry.affine[0][3] += 2.0;
        write_labels(&label_path, &moved).expect("write label");
        let message = preprocess_files(&image_path, &label_path, &PreprocessConfig::default())
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("img0001.nii.gz") && message.contains("label0001.nii.gz"),
            "{message}"
        );
        assert!(
            message.contains("affine mismatch") && !message.contains("shape"),
            "{message}"
        );

        // Both at once.
        let mut both = small;
        both.geometry.affine[1][3] -= 1.0;
        assert!(
            check_pair(&image_path, &image.geometry, &label_path, &both.geometry)
                .unwrap_err()
                .to_string()
                .contains(
                    "shape mismatch: image [10, 20, 18], label [10, 20, 17]; affine mismatch"
                )
        );

        // Matching files go through.
        write_labels(&label_path, &label).expect("write label");
        preprocess_files(&image_path, &label_path, &PreprocessConfig::spleen())
            .expect("matching pair");
    }
}
