//! The one error type of segviz-fed.

use std::path::PathBuf;

/// Result alias for segviz-fed.
pub type Result<T, E = FedError> = std::result::Result<T, E>;

/// What can go wrong in a federation or an experiment.
#[derive(Debug, thiserror::Error)]
pub enum FedError {
    /// From the model side.
    #[error(transparent)]
    Core(#[from] segviz_core::CoreError),
    /// From the data side.
    #[error(transparent)]
    Data(#[from] segviz_data::DataError),
    /// A client failed this round (it is left out of the aggregation).
    #[error("client {client}: {reason}")]
    Client {
        /// The client's name.
        client: String,
        /// What happened.
        reason: String,
    },
    /// Data that cannot be used: every bad site folder or case, with what is wrong.
    #[error("the data cannot be used ({} problem(s)):\n  {}", problems.len(), problems.join("\n  "))]
    BadData {
        /// One line per problem, naming the site, the case or file, and what is wrong.
        problems: Vec<String>,
    },
    /// A configuration that cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Aggregation could not run (for example, no client replied).
    #[error("round {round}: {reason}")]
    Round {
        /// The round (1-based).
        round: usize,
        /// Why.
        reason: String,
    },
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl FedError {
    /// Shorthand for an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FedError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a client failure.
    pub fn client(client: impl Into<String>, reason: impl Into<String>) -> Self {
        FedError::Client {
            client: client.into(),
            reason: reason.into(),
        }
    }
}
