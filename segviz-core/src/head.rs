//! Task heads: the task block of SegViz (paper §3.1).
//!
//! A head is MONAI's top up-block: a transposed 3×3×3 convolution (stride `strides[0]`) with
//! BatchNorm and PReLU that brings the representation back to input resolution, then a plain
//! 3×3×3 convolution with an identity residual. With the default 32 input channels and two
//! output classes it has 1,845 parameters. Each site trains the heads of the organs it
//! annotated; the server copies each head from the sites that own it.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::blocks::UpBlock;

/// Configuration of one [`TaskHead`].
#[derive(Config, Debug, PartialEq)]
pub struct TaskHeadConfig {
    /// Channels coming from the representation block (`2 · channels[0]`).
    pub in_channels: usize,
    /// Output classes: 2 (background / organ) for a SegViz task head; `n + 1` for the
    /// multi-class head of a pooled (central) model.
    #[config(default = 2)]
    pub out_channels: usize,
    /// Up-sampling factor (`strides[0]` of the representation block).
    #[config(default = 2)]
    pub stride: usize,
}

impl TaskHeadConfig {
    /// Builds the head with Burn's default initialisation.
    pub fn init(&self, device: &Device) -> TaskHead {
        TaskHead {
            block: UpBlock::new(
                self.in_channels,
                self.out_channels,
                self.stride,
                true,
                device,
            ),
        }
    }
}

/// One task head. See the module documentation.
#[derive(Module, Debug)]
pub struct TaskHead {
    /// The top up-block.
    pub block: UpBlock,
}

impl TaskHead {
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]` (representation features)
    /// - output: `[batch, out_channels, d·stride, h·stride, w·stride]` (logits)
    pub fn forward(&self, features: Tensor<5>) -> Tensor<5> {
        self.block.forward(features)
    }

    /// Number of output classes.
    pub fn out_channels(&self) -> usize {
        self.block.upsample.weight.dims()[1]
    }
}
