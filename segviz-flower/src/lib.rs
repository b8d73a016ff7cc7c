//! # segviz-flower
//!
//! A SegViz site as a native [Flower](https://flower.ai) 1.42 node, in Rust.
//!
//! - [`protocol`]: the Fleet API (signed protobuf-over-HTTP calls, content-addressed
//!   objects, records), generated from the pinned flwr release; the only code a Flower
//!   upgrade touches.
//! - [`node`]: the node's life cycle (register, activate, heartbeats, pull, reply,
//!   reconnect with backoff, leave), independent of SegViz.
//! - [`app`]: the SegViz handler: a site's local training and evaluation, reusing
//!   `segviz_fed::SiteClient`, and the record layout of `docs/flower.md`.
//!
//! The server side (the SegViz aggregation in a Flower `ServerApp`) is the Python app in
//! `flower/` at the repository root.

#![warn(missing_docs)]

pub mod app;
pub mod error;
pub mod node;
pub mod protocol;

pub use app::{ReplyLayout, SegVizApp, SiteSettings};
pub use error::{FlowerError, Result};
pub use node::{FlowerNode, InstructionHandler, NodeEvent, NodeOptions};
pub use protocol::auth::NodeIdentity;
pub use protocol::fleet::{FleetClient, Transport};
