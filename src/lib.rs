//! # SegViz
//!
//! Federated multi-organ CT segmentation from partially annotated datasets, on Burn.
//! This root crate re-exports the three workspace crates and selects the compute backend
//! through cargo features (see the README).

pub use segviz_core as core;
pub use segviz_data as data;
pub use segviz_fed as fed;
