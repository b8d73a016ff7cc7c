//! The one error type of segviz-core.

use std::path::PathBuf;

/// Result alias for segviz-core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong in segviz-core on user input (configs, checkpoints,
/// imported weights, volumes handed to inference). A tensor of the wrong rank is a
/// programmer error and panics instead (documented on each function).
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A configuration value that cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// An input whose spatial size the network cannot process.
    #[error("input shape {shape:?} is not valid: {reason}")]
    Shape {
        /// The offending shape.
        shape: Vec<usize>,
        /// Why it is not valid.
        reason: String,
    },
    /// A task (head) name that the model does not have, or has twice.
    #[error("task head {name:?}: {reason}")]
    Task {
        /// The task name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// Model state that does not fit the model it is applied to.
    #[error("model state does not fit the model: {0}")]
    State(String),
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file whose content is not a valid checkpoint / weight file.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl CoreError {
    pub(crate) fn config(reason: impl Into<String>) -> Self {
        CoreError::Config(reason.into())
    }

    pub(crate) fn file(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        CoreError::File {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        CoreError::Io {
            path: path.into(),
            source,
        }
    }
}
