//! # segviz-data
//!
//! Everything SegViz needs to turn CT folders into training patches, without knowing
//! anything about models or federation:
//! NIfTI reading/writing with geometry, reorientation to RAS, CT preprocessing,
//! partial-label datasets in the MSD / KiTS19 / BTCV layouts, and synthetic abdominal
//! CT phantoms written in those same layouts.
//!
//! Volumes are [`Volume`]s: voxel values in C order over `[i, j, k]` (the NIfTI index axes,
//! `k` fastest), plus the voxel-to-world affine. After [`Volume::to_ras`] the axes are `i → R`, `j → A`, `k → S`, so a volume becomes a
//! `[1, 1, i, j, k]` tensor by a plain reshape — the same spatial order MONAI uses.

pub mod affine;
pub mod augment;
pub mod batches;
pub mod cache;
pub mod dicom;
pub mod error;
pub mod inspect;
pub mod nifti_io;
pub mod orientation;
pub mod output;
pub mod patches;
pub mod preprocess;
pub mod volume;

pub(crate) mod atomic_write;
pub mod datasets;
pub mod labels;
pub mod phantom;
pub mod site;
pub mod split;

pub use error::{DataError, Result};
pub use volume::{Geometry, Volume};

pub use augment::{AugmentConfig, Augmenter};
pub use cache::{CacheOutcome, PreprocessCache};
pub use dicom::{read_dicom_series, read_scan};
pub use inspect::inspect_file;
pub use nifti_io::{read_header, read_labels, read_volume, write_labels, write_volume, VoxelType};
pub use orientation::{from_ras, orientation_code};
pub use output::refuse_overwriting_inputs;
pub use patches::{Patch, PatchSampler, PatchSamplerConfig};
pub use preprocess::{preprocess_files, preprocess_image, preprocess_pair, PreprocessConfig};

pub use batches::{BatchStream, EpochPlan, HostBatch};
pub use datasets::{CaseRef, Layout, Sample, SiteDataset};
pub use labels::{LabelMap, Organ, OrganSet};
pub use phantom::{write_sites, PhantomConfig, PhantomManifest, PhantomSize};
pub use site::SiteData;
pub use split::Split;
