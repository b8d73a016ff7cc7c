//! The building blocks of MONAI's residual U-Net, shared by the representation block and
//! the task heads.
//!
//! Each block mirrors one MONAI module so that every tensor has exactly one counterpart in
//! a MONAI `UNet` `state_dict` (see [`crate::monai`]):
//! - [`ConvUnit`] = MONAI `Convolution`: a convolution, then BatchNorm and PReLU (the "NDA"
//!   ordering, no dropout), or the convolution alone when it is the last layer of the network.
//! - [`ResidualUnit`] = MONAI `ResidualUnit`: `subunits` conv units, the first one strided,
//!   plus a residual path (a strided 3×3×3 conv, a 1×1×1 conv when only the channel count
//!   changes, or the identity).
//! - [`UpBlock`] = one decoder step: a transposed conv unit that doubles the resolution,
//!   then a residual unit of one conv.

use burn::module::Module;
use burn::nn::conv::{Conv3d, Conv3dConfig, ConvTranspose3d, ConvTranspose3dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, PRelu, PReluConfig, PaddingConfig3d};
use burn::tensor::{Device, Tensor};

/// BatchNorm then PReLU, MONAI's `ADN` block with ordering "NDA" and no dropout.
#[derive(Module, Debug)]
pub struct NormAct {
    /// Batch normalisation (MONAI key `adn.N`).
    pub norm: BatchNorm,
    /// Parametric ReLU with one slope (MONAI key `adn.A`).
    pub act: PRelu,
}

impl NormAct {
    fn new(channels: usize, device: &Device) -> Self {
        NormAct {
            norm: BatchNormConfig::new(channels).init(device),
            act: PReluConfig::new().with_alpha(0.25).init(device),
        }
    }

    /// # Shapes
    /// `[batch, channels, depth, height, width]` in and out.
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        crate::fast_norm::norm_act(&self.norm, &self.act, x)
    }

    /// [`NormAct::forward`] of `x + bias`, the bias left by a convolution (see
    /// [`crate::fast_conv::conv3d_deferred`]).
    pub fn forward_biased(&self, x: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
        crate::fast_norm::norm_act_biased(&self.norm, &self.act, x, bias)
    }
}

/// A 3×3×3 convolution followed (unless it is the network's last layer) by BatchNorm and
/// PReLU: MONAI's `Convolution`.
#[derive(Module, Debug)]
pub struct ConvUnit {
    /// The convolution (MONAI key `conv`).
    pub conv: Conv3d,
    /// Normalisation and activation; `None` for a conv-only unit.
    pub adn: Option<NormAct>,
}

impl ConvUnit {
    /// A conv unit `in_channels → out_channels` with the given stride; `conv_only` drops the
    /// normalisation and activation.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        conv_only: bool,
        device: &Device,
    ) -> Self {
        ConvUnit {
            conv: conv3d(in_channels, out_channels, 3, stride, device),
            adn: (!conv_only).then(|| NormAct::new(out_channels, device)),
        }
    }

    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, out_channels, d / stride, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.after_conv(crate::fast_conv::conv3d_deferred(&self.conv, x))
    }

    /// The normalisation and activation applied to the convolution's output `y`, plus the
    /// bias the convolution left (folded into the normalisation where it can be).
    fn after_conv(&self, (y, bias): crate::fast_conv::Deferred) -> Tensor<5> {
        match &self.adn {
            Some(adn) => adn.forward_biased(y, bias),
            None => crate::fast_conv::add_bias(y, bias),
        }
    }

    /// [`ConvUnit::after_conv`] plus a residual unit's `shortcut`, in the same pass where
    /// the normalisation runs as one.
    fn after_conv_plus(
        &self,
        (y, bias): crate::fast_conv::Deferred,
        shortcut: Tensor<5>,
    ) -> Tensor<5> {
        match &self.adn {
            Some(adn) => {
                crate::fast_norm::norm_act_residual(&adn.norm, &adn.act, y, bias, shortcut)
            }
            None => crate::fast_conv::add_bias(y, bias) + shortcut,
        }
    }
}

/// MONAI's `ResidualUnit`: `units[0]` carries the stride, the others keep the size, and the
/// residual path matches the output shape.
#[derive(Module, Debug)]
pub struct ResidualUnit {
    /// The conv units, applied in order (MONAI keys `conv.unit0`, `conv.unit1`, …).
    pub units: Vec<ConvUnit>,
    /// The residual projection; `None` is the identity (MONAI key `residual`).
    pub residual: Option<Conv3d>,
}

impl ResidualUnit {
    /// A residual unit of `subunits` convs. `last_conv_only` makes the last conv plain (the
    /// network's final layer).
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        subunits: usize,
        last_conv_only: bool,
        device: &Device,
    ) -> Self {
        let subunits = subunits.max(1);
        let units = (0..subunits)
            .map(|i| {
                let (cin, s) = if i == 0 {
                    (in_channels, stride)
                } else {
                    (out_channels, 1)
                };
                ConvUnit::new(
                    cin,
                    out_channels,
                    s,
                    last_conv_only && i + 1 == subunits,
                    device,
                )
            })
            .collect();
        // MONAI: a strided residual uses the full kernel, a pure channel change a 1×1×1 conv.
        let residual = if stride != 1 {
            Some(conv3d(in_channels, out_channels, 3, stride, device))
        } else if in_channels != out_channels {
            Some(conv3d(in_channels, out_channels, 1, 1, device))
        } else {
            None
        };
        ResidualUnit { units, residual }
    }

    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, out_channels, d / stride, h / stride, w / stride]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let Some((first, rest)) = self.units.split_first() else {
            return match &self.residual {
                Some(conv) => crate::fast_conv::conv3d(conv, x),
                None => x,
            };
        };
        // The first conv and a residual conv read the same input: run them as a pair (one
        // unfolding of the input on the CPU, see `fast_conv::conv3d_pair`). Each conv's
        // bias goes to the normalisation after it, and the shortcut to the last one.
        let (mut pending, shortcut) = match &self.residual {
            Some(conv) => crate::fast_conv::conv3d_pair_deferred(&first.conv, conv, x),
            None => (crate::fast_conv::conv3d_deferred(&first.conv, x.clone()), x),
        };
        let mut unit = first;
        for next in rest {
            let y = unit.after_conv(pending);
            pending = crate::fast_conv::conv3d_deferred(&next.conv, y);
            unit = next;
        }
        unit.after_conv_plus(pending, shortcut)
    }
}

/// One decoder step: transposed convolution (×2 resolution) with BatchNorm and PReLU, then a
/// residual unit of one conv (plain when this is the network's top block).
#[derive(Module, Debug)]
pub struct UpBlock {
    /// Transposed 3×3×3 convolution, stride 2, padding 1, output padding 1 (MONAI `0.conv`).
    pub upsample: ConvTranspose3d,
    /// Its normalisation and activation (MONAI `0.adn`).
    pub upsample_adn: NormAct,
    /// The residual unit of one conv (MONAI `1`).
    pub refine: ResidualUnit,
}

impl UpBlock {
    /// An up block `in_channels → out_channels` that multiplies the resolution by `stride`.
    /// `is_top` makes the final conv plain, as in MONAI's top up-block.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        stride: usize,
        is_top: bool,
        device: &Device,
    ) -> Self {
        let out_pad = stride.saturating_sub(1);
        UpBlock {
            upsample: ConvTranspose3dConfig::new([in_channels, out_channels], [3, 3, 3])
                .with_stride([stride; 3])
                .with_padding([1; 3])
                .with_padding_out([out_pad; 3])
                .init(device),
            upsample_adn: NormAct::new(out_channels, device),
            refine: ResidualUnit::new(out_channels, out_channels, 1, 1, is_top, device),
        }
    }

    /// # Shapes
    /// - input: `[batch, in_channels, d, h, w]`
    /// - output: `[batch, out_channels, d·stride, h·stride, w·stride]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let (y, bias) = crate::fast_conv::conv_transpose3d_deferred(&self.upsample, x);
        self.refine
            .forward(self.upsample_adn.forward_biased(y, bias))
    }
}

/// Values held by a module, counted from its arguments without building it: weights,
/// biases, BatchNorm statistics and PReLU slopes, as in [`crate::ModelState`]. `None` when
/// the count overflows. Each function mirrors the constructor of the same block; a test
/// compares them with built models.
pub(crate) mod count {
    /// A convolution (or transposed convolution) with a bias.
    pub fn conv(cin: usize, cout: usize, kernel: usize) -> Option<usize> {
        cin.checked_mul(cout)?
            .checked_mul(kernel.checked_pow(3)?)?
            .checked_add(cout)
    }

    /// BatchNorm (γ, β, running mean and variance) and a one-slope PReLU.
    pub fn norm_act(channels: usize) -> Option<usize> {
        channels.checked_mul(4)?.checked_add(1)
    }

    /// [`super::ConvUnit::new`].
    pub fn conv_unit(cin: usize, cout: usize, conv_only: bool) -> Option<usize> {
        let adn = if conv_only { 0 } else { norm_act(cout)? };
        conv(cin, cout, 3)?.checked_add(adn)
    }

    /// [`super::ResidualUnit::new`].
    pub fn residual_unit(
        cin: usize,
        cout: usize,
        stride: usize,
        subunits: usize,
        last_conv_only: bool,
    ) -> Option<usize> {
        let subunits = subunits.max(1);
        let mut total = 0usize;
        for i in 0..subunits {
            let unit_in = if i == 0 { cin } else { cout };
            total = total.checked_add(conv_unit(
                unit_in,
                cout,
                last_conv_only && i + 1 == subunits,
            )?)?;
        }
        let residual = if stride != 1 {
            conv(cin, cout, 3)?
        } else if cin != cout {
            conv(cin, cout, 1)?
        } else {
            0
        };
        total.checked_add(residual)
    }

    /// [`super::UpBlock::new`].
    pub fn up_block(cin: usize, cout: usize, is_top: bool) -> Option<usize> {
        conv(cin, cout, 3)?
            .checked_add(norm_act(cout)?)?
            .checked_add(residual_unit(cout, cout, 1, 1, is_top)?)
    }
}

/// A cubic convolution with MONAI's "same" padding (`(k - 1) / 2`) and a bias.
fn conv3d(cin: usize, cout: usize, kernel: usize, stride: usize, device: &Device) -> Conv3d {
    let pad = (kernel - 1) / 2;
    Conv3dConfig::new([cin, cout], [kernel; 3])
        .with_stride([stride; 3])
        .with_padding(PaddingConfig3d::Explicit(pad, pad, pad))
        .init(device)
}
