//! # segviz-core
//!
//! The SegViz model and what trains and evaluates it, independent of file formats and of
//! federation:
//! - [`model`]: [`SegVizModel`] = a [`RepresentationBlock`] (MONAI's residual 3-D U-Net
//!   body) + named [`TaskHead`]s, built from a [`SegVizConfig`];
//! - [`state`]: every tensor by stable path, classified as representation / BatchNorm /
//!   head — the single source of truth for federation and checkpoints;
//! - [`monai`]: the one-to-one map to MONAI `UNet` `state_dict` keys and `.pt` import;
//! - [`loss`], [`metrics`], [`fusion`], [`sliding_window`], [`train`], [`checkpoint`].
//!
//! The crate enables no Burn backend: the application chooses one (the `segviz` root crate
//! does it with cargo features) and passes a [`burn::tensor::Device`].

pub mod blocks;
pub mod checkpoint;
#[cfg(feature = "flex")]
pub mod cpu_conv;
pub mod error;
pub mod fast_conv;
pub mod fast_norm;
pub mod fusion;
pub mod head;
pub mod init;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod monai;
pub mod representation;
pub mod sliding_window;
pub mod state;
pub mod torch_save;
pub mod train;

pub use error::{CoreError, Result};
pub use head::{TaskHead, TaskHeadConfig};
pub use model::{SegVizConfig, SegVizModel};
pub use representation::{RepresentationBlock, RepresentationConfig};
pub use state::{ModelState, StateTensor, TensorRole};
