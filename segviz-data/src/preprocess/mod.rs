//! CT preprocessing: the steps that turn a scanner volume into network input, one file per
//! idea, and [`preprocess_pair`] that chains them in the order the authors' MONAI pipeline
//! uses (orientation → spacing → intensity window → crop/resize → pad).

pub mod config;
pub mod crop;
pub mod intensity;
pub mod pad;
pub mod pipeline;
pub mod resample;

pub use config::PreprocessConfig;
pub use crop::{crop, foreground_box, BoundingBox};
pub use intensity::{window_intensity, window_intensity_owned};
pub use pad::{pad, pad_to_multiple, pad_to_multiple_owned};
pub use pipeline::{
    check_pair, preprocess_files, preprocess_image, preprocess_pair, AFFINE_TOLERANCE,
};
pub use resample::{
    resample_image_to_spacing, resample_labels_to_spacing, resample_nearest, resample_trilinear,
    resize_geometry, resize_image, resize_labels, spacing_geometry,
};
