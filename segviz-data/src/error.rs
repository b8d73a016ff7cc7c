//! The one error type of segviz-data.

use std::path::PathBuf;

/// Result alias for segviz-data.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

/// Everything that can go wrong while reading, checking or preparing data.
///
/// Every variant that concerns a file names it, so a user can find the bad case.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file that exists but whose content is not what it must be.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
    /// A file in a format or layout that is valid but that segviz-data does not read
    /// (NIfTI-2, 4-D series, complex or RGB voxels, ...).
    #[error("{path}: unsupported: {reason}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is not supported, in words.
        reason: String,
    },
    /// An image with NaN or infinite voxels, which would poison every later step.
    #[error("{path}: {nan} NaN and {infinite} infinite voxel(s) out of {total}")]
    NonFinite {
        /// The file.
        path: PathBuf,
        /// How many voxels are NaN.
        nan: usize,
        /// How many voxels are +/- infinity.
        infinite: usize,
        /// How many voxels the volume has.
        total: usize,
    },
    /// An image and its label map that do not share one voxel grid.
    #[error("image {image} and label {label} do not match: {problems}")]
    PairMismatch {
        /// The image file.
        image: PathBuf,
        /// The label file.
        label: PathBuf,
        /// Every problem found (shape and/or affine), in words.
        problems: String,
    },
    /// A volume whose shape is not the one an operation needs (e.g. a prediction that does
    /// not have the shape of the geometry it is put back into).
    #[error("{context}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// What was being done.
        context: String,
        /// The shape that was needed.
        expected: [usize; 3],
        /// The shape that was given.
        found: [usize; 3],
    },
    /// A label file holding values its dataset does not declare.
    #[error(
        "{path}: label value(s) {} not declared by the dataset (declared: {})",
        join_values(values),
        join_values(declared)
    )]
    UndeclaredLabels {
        /// The label file.
        path: PathBuf,
        /// Every undeclared value found, ascending.
        values: Vec<u8>,
        /// The values the dataset declares, ascending.
        declared: Vec<u8>,
    },
    /// A dataset folder whose layout cannot be recognised or is inconsistent.
    #[error("{path}: {reason}")]
    Layout {
        /// The dataset folder.
        path: PathBuf,
        /// What was looked for or what is inconsistent, in words.
        reason: String,
    },
    /// An output path that is one of the inputs: writing it would destroy the input.
    #[error(
        "{output}: refusing to write the output over the input {input}; choose another output path"
    )]
    OverwritesInput {
        /// The output path, as given.
        output: PathBuf,
        /// The input it is (or links to), as given.
        input: PathBuf,
    },
    /// A configuration value that cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
}

impl DataError {
    /// Shorthand for [`DataError::Invalid`].
    pub fn invalid(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        DataError::Invalid {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`DataError::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.into(),
            source,
        }
    }
}

/// `"1, 2, 3"` for error messages.
fn join_values(values: &[u8]) -> String {
    values
        .iter()
        .map(u8::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
