//! The representation block: the body of MONAI's residual 3-D U-Net, shared by every task
//! and aggregated across sites in every federated round (paper §3.1).
//!
//! It is the whole U-Net except the top up-block: the encoder (`down`), the bottom residual
//! unit, and every decoder step but the last (`up`). Its output is the top skip concatenation
//! `[down₀(x), up₁(…)]`: `2 · channels[0]` feature maps at the resolution after the first
//! stride (half the input with the defaults). The task heads start from there.

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};

use crate::blocks::{ResidualUnit, UpBlock};
use crate::error::{CoreError, Result};

/// Configuration of the [`RepresentationBlock`], in MONAI `UNet` vocabulary.
#[derive(Config, Debug, PartialEq)]
pub struct RepresentationConfig {
    /// Input channels (1 for CT).
    #[config(default = 1)]
    pub in_channels: usize,
    /// Feature channels per level, top to bottom (MONAI `channels`).
    #[config(default = "vec![16, 32, 64, 128, 256]")]
    pub channels: Vec<usize>,
    /// Down-sampling factor at the start of each level (MONAI `strides`), one fewer than
    /// `channels`.
    #[config(default = "vec![2, 2, 2, 2]")]
    pub strides: Vec<usize>,
    /// Convolutions per encoder residual unit (MONAI `num_res_units`, at least 1).
    #[config(default = 2)]
    pub num_res_units: usize,
}

impl RepresentationConfig {
    /// Checks the configuration; every other method assumes it is valid.
    pub fn validate(&self) -> Result<()> {
        if self.in_channels == 0 {
            return Err(CoreError::config("in_channels must be at least 1"));
        }
        if self.channels.len() < 2 {
            return Err(CoreError::config(format!(
                "channels needs at least two levels, got {:?}",
                self.channels
            )));
        }
        if self.strides.len() + 1 != self.channels.len() {
            return Err(CoreError::config(format!(
                "strides must have one entry fewer than channels: channels {:?}, strides {:?}",
                self.channels, self.strides
            )));
        }
        if self.channels.contains(&0) {
            return Err(CoreError::config("channels must all be at least 1"));
        }
        if self.strides.iter().any(|&s| s == 0 || s > 4) {
            return Err(CoreError::config(format!(
                "strides must be between 1 and 4, got {:?}",
                self.strides
            )));
        }
        if self.num_res_units == 0 {
            return Err(CoreError::config(
                "num_res_units must be at least 1 (MONAI's plain-convolution U-Net is not implemented)",
            ));
        }
        Ok(())
    }

    /// Number of channels the block outputs: `2 · channels[0]` (the top skip concatenation).
    pub fn out_channels(&self) -> usize {
        2 * self.channels[0]
    }

    /// The factor every spatial input size must be divisible by (product of the strides).
    pub fn size_divisor(&self) -> usize {
        self.strides.iter().product()
    }

    /// Checks that a spatial input size can go through the network and come back at the
    /// same size.
    pub fn check_input(&self, spatial: [usize; 3]) -> Result<()> {
        let k = self.size_divisor();
        if spatial.iter().any(|&s| s == 0 || s % k != 0) {
            return Err(CoreError::Shape {
                shape: spatial.to_vec(),
                reason: format!(
                    "every spatial size must be a positive multiple of {k} (the product of the strides {:?}); pad the volume first",
                    self.strides
                ),
            });
        }
        Ok(())
    }

    /// Number of values (parameters and BatchNorm statistics) the block holds, counted from
    /// the configuration without building it; `None` if the count overflows. Assumes a
    /// valid configuration.
    pub fn value_count(&self) -> Option<usize> {
        use crate::blocks::count;
        let levels = self.strides.len();
        let c = &self.channels;
        let mut total = 0usize;
        for l in 0..levels {
            let cin = if l == 0 { self.in_channels } else { c[l - 1] };
            total = total.checked_add(count::residual_unit(
                cin,
                c[l],
                self.strides[l],
                self.num_res_units,
                false,
            )?)?;
        }
        total = total.checked_add(count::residual_unit(
            c[levels - 1],
            c[levels],
            1,
            self.num_res_units,
            false,
        )?)?;
        for l in 1..levels {
            let cin = if l == levels - 1 {
                c[l].checked_add(c[l + 1])?
            } else {
                c[l].checked_mul(2)?
            };
            total = total.checked_add(count::up_block(cin, c[l - 1], false)?)?;
        }
        Some(total)
    }

    /// Builds the block with Burn's default initialisation (use
    /// [`crate::init::lecun_normal`] for the paper's).
    pub fn init(&self, device: &Device) -> Result<RepresentationBlock> {
        self.validate()?;
        let levels = self.strides.len();
        let c = &self.channels;
        let down = (0..levels)
            .map(|l| {
                let cin = if l == 0 { self.in_channels } else { c[l - 1] };
                ResidualUnit::new(
                    cin,
                    c[l],
                    self.strides[l],
                    self.num_res_units,
                    false,
                    device,
                )
            })
            .collect();
        let bottom = ResidualUnit::new(
            c[levels - 1],
            c[levels],
            1,
            self.num_res_units,
            false,
            device,
        );
        // up[l - 1] is the decoder step of level l (1 ≤ l < levels); level 0's is a task head.
        let up = (1..levels)
            .map(|l| {
                let cin = if l == levels - 1 {
                    c[l] + c[l + 1]
                } else {
                    2 * c[l]
                };
                UpBlock::new(cin, c[l - 1], self.strides[l], false, device)
            })
            .collect();
        Ok(RepresentationBlock { down, bottom, up })
    }
}

/// The shared U-Net body. See the module documentation.
#[derive(Module, Debug)]
pub struct RepresentationBlock {
    /// Encoder residual units, level 0 (top) first.
    pub down: Vec<ResidualUnit>,
    /// The bottom residual unit (stride 1).
    pub bottom: ResidualUnit,
    /// Decoder steps of levels 1.., `up[l - 1]` for level `l`.
    pub up: Vec<UpBlock>,
}

impl RepresentationBlock {
    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`, each spatial size a multiple of the product
    ///   of the strides
    /// - output: `[batch, 2·channels[0], d/s₀, h/s₀, w/s₀]`
    ///
    /// # Panics
    /// On sizes that do not divide (check with [`RepresentationConfig::check_input`]).
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.level(0, x)
    }

    /// `[down_l(x), inner(down_l(x))]` where inner is the next level, recursively.
    fn level(&self, l: usize, x: Tensor<5>) -> Tensor<5> {
        let d = self.down[l].forward(x);
        let inner = if l + 1 == self.down.len() {
            self.bottom.forward(d.clone())
        } else {
            self.up[l].forward(self.level(l + 1, d.clone()))
        };
        Tensor::cat(vec![d, inner], 1)
    }
}
