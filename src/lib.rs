//! # SegViz
//!
//! Federated multi-organ CT segmentation from partially annotated datasets, on Burn.
//!
//! This root crate re-exports the three workspace crates — [`core`] (model, losses,
//! metrics, inference), [`data`] (NIfTI, preprocessing, datasets, phantoms) and [`fed`]
//! (strategies, clients, server, experiments), plus [`flower`] (a site as a native Flower
//! node) — and chooses the compute backend through
//! cargo features:
//!
//! | feature | device | builds offline |
//! |---|---|---|
//! | `flex` (default) | pure-Rust CPU | yes |
//! | `ndarray` | reference CPU (slow 3-D convolutions) | yes |
//! | `wgpu` | WebGPU through wgpu (Vulkan, Metal, DX12) | yes |
//! | `vulkan` | WebGPU pinned to Vulkan | yes |
//! | `cuda` | NVIDIA CUDA | **no**: cubecl-llvm downloads LLVM at build time |
//!
//! [`default_device`] picks the most capable enabled one.

pub mod figures;
pub mod predict;

pub use segviz_core as core;
pub use segviz_data as data;
pub use segviz_fed as fed;
pub use segviz_flower as flower;

use burn::tensor::Device;

/// The device of the most capable backend compiled in: CUDA, then Vulkan, then WebGPU,
/// then flex, then ndarray.
#[cfg(feature = "cuda")]
pub fn default_device() -> Device {
    Device::cuda(0)
}

/// The device of the most capable backend compiled in: CUDA, then Vulkan, then WebGPU,
/// then flex, then ndarray.
#[cfg(all(feature = "vulkan", not(feature = "cuda")))]
pub fn default_device() -> Device {
    Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)
}

/// The device of the most capable backend compiled in: CUDA, then Vulkan, then WebGPU,
/// then flex, then ndarray.
#[cfg(all(feature = "wgpu", not(any(feature = "cuda", feature = "vulkan"))))]
pub fn default_device() -> Device {
    Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)
}

/// The device of the most capable backend compiled in: CUDA, then Vulkan, then WebGPU,
/// then flex, then ndarray.
#[cfg(all(
    feature = "flex",
    not(any(feature = "cuda", feature = "vulkan", feature = "wgpu"))
))]
pub fn default_device() -> Device {
    Device::flex()
}

/// The device of the most capable backend compiled in: CUDA, then Vulkan, then WebGPU,
/// then flex, then ndarray.
#[cfg(all(
    feature = "ndarray",
    not(any(
        feature = "cuda",
        feature = "vulkan",
        feature = "wgpu",
        feature = "flex"
    ))
))]
#[allow(deprecated)]
pub fn default_device() -> Device {
    Device::ndarray()
}

#[cfg(not(any(
    feature = "cuda",
    feature = "vulkan",
    feature = "wgpu",
    feature = "flex",
    feature = "ndarray"
)))]
compile_error!("enable one backend feature: flex (default), ndarray, wgpu, vulkan or cuda");

/// The name of the backend [`default_device`] uses.
pub fn backend_name() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "vulkan") {
        "vulkan"
    } else if cfg!(feature = "wgpu") {
        "wgpu"
    } else if cfg!(feature = "flex") {
        "flex (CPU)"
    } else {
        "ndarray (CPU)"
    }
}
