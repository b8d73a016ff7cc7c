//! The one error type of segviz-flower.

use std::path::PathBuf;

/// Result alias for segviz-flower.
pub type Result<T, E = FlowerError> = std::result::Result<T, E>;

/// What can go wrong between a node and a Flower SuperLink.
#[derive(Debug, thiserror::Error)]
pub enum FlowerError {
    /// The SuperLink could not be reached (refused, reset, timed out, TLS failure).
    #[error("cannot reach the SuperLink at {address} ({rpc}): {reason}")]
    Unreachable {
        /// `host:port`.
        address: String,
        /// The Fleet call.
        rpc: String,
        /// What the transport said.
        reason: String,
    },
    /// The SuperLink refused the node's identity (HTTP 401): unknown key, bad signature or
    /// a stale timestamp.
    #[error("the SuperLink refused this node's credentials on {rpc}: {message}")]
    Unauthorized {
        /// The Fleet call.
        rpc: String,
        /// The SuperLink's explanation.
        message: String,
    },
    /// The SuperLink answered with an HTTP error.
    #[error("the SuperLink answered {status} to {rpc}: {message}")]
    Rejected {
        /// The Fleet call.
        rpc: String,
        /// HTTP status.
        status: u16,
        /// The SuperLink's explanation (its JSON error body).
        message: String,
    },
    /// A message or object that does not follow the Flower protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// An object whose content does not hash to its id.
    #[error("object {id}: content does not match its id (tampered or corrupted)")]
    Tampered {
        /// The object's claimed id.
        id: String,
    },
    /// An instruction that lacks tensors of the node's model: the node refuses to train or
    /// evaluate on whatever it has left from before.
    #[error(
        "the {message_type} instruction lacks {} of the {expected} tensors this node's model \
         needs (first: {}); refusing to {message_type} on leftover local state",
        missing.len(),
        missing.iter().take(3).cloned().collect::<Vec<_>>().join(", ")
    )]
    MissingTensors {
        /// `train` or `evaluate`.
        message_type: String,
        /// Tensors the node needed.
        expected: usize,
        /// Paths of those the instruction lacked.
        missing: Vec<String>,
    },
    /// A configuration that cannot be used.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// From the federation side (training, evaluation, data).
    #[error(transparent)]
    Fed(#[from] segviz_fed::FedError),
    /// From the model side.
    #[error(transparent)]
    Core(#[from] segviz_core::CoreError),
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

impl FlowerError {
    /// Shorthand for an I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        FlowerError::Io {
            path: path.into(),
            source,
        }
    }

    /// Shorthand for a protocol error.
    pub fn protocol(reason: impl Into<String>) -> Self {
        FlowerError::Protocol(reason.into())
    }

    /// Whether reconnecting (re-registering) may help: the SuperLink was unreachable, is
    /// restarting behind a proxy, or no longer knows this node (for example after it
    /// restarted with a fresh state).
    pub fn is_connection_lost(&self) -> bool {
        match self {
            FlowerError::Unreachable { .. } | FlowerError::Unauthorized { .. } => true,
            FlowerError::Rejected { status, .. } => matches!(status, 404 | 502 | 503 | 504),
            _ => false,
        }
    }

    /// Whether a failed connection attempt is worth retrying: anything the SuperLink said
    /// or failed to say, but not a local configuration, file or protocol problem.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            FlowerError::Unreachable { .. }
                | FlowerError::Unauthorized { .. }
                | FlowerError::Rejected { .. }
        )
    }
}
