//! 3-D convolutions whose weight gradient on the CPU backend is a matrix product per kernel
//! offset.
//!
//! Burn's `flex` backend has fast forward kernels for `conv3d` and `conv_transpose3d`, but
//! no backward kernel of its own: the generic weight gradient is a `conv3d` whose kernel is
//! the whole output gradient. `flex` runs that shape through its im2col path with one tile
//! per input channel and a handful of elements per copy: slow when the input has few
//! channels, and for the U-Net's first layer it holds a 27-fold copy of the input (see
//! `docs/performance.md`).
//!
//! Here, for a model trained on `Autodiff<Flex>`, both convolutions are custom autodiff
//! operations (through Burn's `extension` feature, no fork):
//! - forward: `flex`'s own kernel;
//! - input gradient: Burn's reference (a transposed convolution for `conv3d`, a convolution
//!   for `conv_transpose3d`, both fast on `flex`);
//! - weight gradient: for each of the kernel's offsets `k`, the input (padded) sampled at
//!   `stride·p + k` for every output position `p` is one `[C_in, N·P]` matrix, and
//!   `dW[:, :, k] = G · Xₖᵀ` with the output gradient `G` as `[C_out, N·P]`: one GEMM per
//!   offset, 27 for a 3×3×3 kernel, with only one shifted copy of the input alive at a time;
//! - bias: added outside the operation, so autodiff sums its gradient.
//!
//! Any other backend (including `Autodiff<Flex>` with gradient checkpointing), grouped or
//! dilated convolutions, and padding modes other than explicit take Burn's own path
//! unchanged, and so do convolutions with more than [`FAST_WEIGHT_GRADIENT_MAX_CHANNELS`]
//! channels in the correlated tensor, where Burn's weight gradient measured faster.
//! [`conv3d`] and [`conv_transpose3d`] are what the U-Net's blocks call. Setting the
//! environment variable `SEGVIZ_REFERENCE_CONV=1` sends every convolution through Burn's
//! path (for before/after measurements).

use burn::nn::conv::{Conv3d, ConvTranspose3d};
#[cfg(feature = "flex")]
use burn::nn::PaddingConfig3d;
use burn::tensor::Tensor;

/// `conv.forward(x)`, with the fast weight gradient when `x` lives on `Autodiff<Flex>`.
///
/// # Shapes
/// - input: `[n, c_in, d, h, w]`; output: `[n, c_out, d', h', w']`
pub fn conv3d(conv: &Conv3d, x: Tensor<5>) -> Tensor<5> {
    #[cfg(feature = "flex")]
    if let PaddingConfig3d::Explicit(pd, ph, pw) = conv.padding {
        let [_, c_in, ..] = conv.weight.dims();
        if enabled()
            && c_in <= FAST_WEIGHT_GRADIENT_MAX_CHANNELS
            && conv.groups == 1
            && conv.dilation == [1, 1, 1]
        {
            let geometry = flex_ad::Geometry {
                stride: conv.stride,
                padding: [pd, ph, pw],
            };
            if let Some(y) = flex_ad::conv3d(x.clone(), conv.weight.val(), geometry) {
                return add_bias(y, conv.bias.as_ref().map(|b| b.val()));
            }
        }
    }
    conv.forward(x)
}

/// `conv.forward(x)`, with the fast weight gradient when `x` lives on `Autodiff<Flex>`.
///
/// # Shapes
/// - input: `[n, c_in, d, h, w]`; output: `[n, c_out, d', h', w']`
pub fn conv_transpose3d(conv: &ConvTranspose3d, x: Tensor<5>) -> Tensor<5> {
    #[cfg(feature = "flex")]
    if enabled()
        && conv.channels[1] <= FAST_WEIGHT_GRADIENT_MAX_CHANNELS
        && conv.groups == 1
        && conv.dilation == [1, 1, 1]
    {
        let geometry = flex_ad::Geometry {
            stride: conv.stride,
            padding: conv.padding,
        };
        if let Some(y) =
            flex_ad::conv_transpose3d(x.clone(), conv.weight.val(), geometry, conv.padding_out)
        {
            return add_bias(y, conv.bias.as_ref().map(|b| b.val()));
        }
    }
    conv.forward(x)
}

/// The custom weight gradient is taken when the tensor it correlates with the output
/// gradient (a convolution's input, a transposed convolution's output gradient) has at most
/// this many channels. Measured with `cargo bench --bench convolution` (docs/performance.md):
/// 23 % faster than Burn's for the first layer (1 channel), 8–30 % slower from 16 channels
/// on, where Burn's path has enough channels to keep its tiles busy.
pub const FAST_WEIGHT_GRADIENT_MAX_CHANNELS: usize = 4;

/// Whether the custom operations may be used: not when `SEGVIZ_REFERENCE_CONV` is set to
/// anything but `0` (read once).
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("SEGVIZ_REFERENCE_CONV").map_or(true, |v| v.is_empty() || v == "0")
    })
}

#[cfg_attr(not(feature = "flex"), allow(dead_code))]
fn add_bias(y: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
    match bias {
        Some(b) => {
            let c = b.dims()[0];
            y + b.reshape([1, c, 1, 1, 1])
        }
        None => y,
    }
}

#[cfg(feature = "flex")]
pub mod flex_ad {
    //! The custom autodiff operations on `Autodiff<Flex>`, whatever the channel count
    //! (benches call them directly; models go through [`super::conv3d`] and
    //! [`super::conv_transpose3d`]).

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::ops::{FloatTensorOps, ModuleOps};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Flex, TensorMetadata};
    use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
    use burn::tensor::{FloatDType, Shape, Slice, Tensor};

    type Ad = Autodiff<Flex, NoCheckpointing>;

    /// Stride and symmetric padding of a convolution.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Geometry {
        /// Stride per axis.
        pub stride: [usize; 3],
        /// Padding per axis, the same on both sides.
        pub padding: [usize; 3],
    }

    impl Geometry {
        fn conv_options(self) -> ConvOptions<3> {
            ConvOptions::new(self.stride, self.padding, [1, 1, 1], 1)
        }

        fn transpose_options(self, padding_out: [usize; 3]) -> ConvTransposeOptions<3> {
            ConvTransposeOptions::new(self.stride, self.padding, padding_out, [1, 1, 1], 1)
        }
    }

    /// Both tensors as `Autodiff<Flex>` primitives, or `None` when they live elsewhere.
    fn primitives(x: Tensor<5>, w: Tensor<5>) -> Option<(FloatTensor<Ad>, FloatTensor<Ad>)> {
        let x = x.try_into_primitive::<Ad>().ok()?;
        let w = w.try_into_primitive::<Ad>().ok()?;
        Some((x, w))
    }

    /// `conv3d(x, w)` without bias, or `None` when `x` is not on `Autodiff<Flex>`.
    pub fn conv3d(x: Tensor<5>, w: Tensor<5>, g: Geometry) -> Option<Tensor<5>> {
        let (x, w) = primitives(x, w)?;
        let out = match Conv3dBackward(g)
            .prepare::<NoCheckpointing>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
                let y = Flex::conv3d(xp.clone(), wp.clone(), None, g.conv_options());
                prep.finish((xp, wp), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::conv3d(
                x.into_primitive(),
                w.into_primitive(),
                None,
                g.conv_options(),
            )),
        };
        Some(Tensor::from_primitive::<Ad>(out))
    }

    /// `conv_transpose3d(x, w)` without bias, or `None` when `x` is not on
    /// `Autodiff<Flex>`.
    pub fn conv_transpose3d(
        x: Tensor<5>,
        w: Tensor<5>,
        g: Geometry,
        padding_out: [usize; 3],
    ) -> Option<Tensor<5>> {
        let (x, w) = primitives(x, w)?;
        let options = g.transpose_options(padding_out);
        let out = match ConvTranspose3dBackward(g, padding_out)
            .prepare::<NoCheckpointing>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
                let y = Flex::conv_transpose3d(xp.clone(), wp.clone(), None, options);
                prep.finish((xp, wp), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(Flex::conv_transpose3d(
                x.into_primitive(),
                w.into_primitive(),
                None,
                options,
            )),
        };
        Some(Tensor::from_primitive::<Ad>(out))
    }

    #[derive(Debug)]
    struct Conv3dBackward(Geometry);

    impl Backward<Flex, 2> for Conv3dBackward {
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, w) = ops.state;
            let g = self.0;
            if let Some(node) = node_x {
                let dx =
                    Flex::conv3d_x_backward(x.clone(), w.clone(), grad.clone(), g.conv_options());
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_w {
                let kernel = kernel_of(&w);
                grads.register::<Flex>(node.id, weight_gradient(x, grad, kernel, g));
            }
        }
    }

    #[derive(Debug)]
    struct ConvTranspose3dBackward(Geometry, [usize; 3]);

    impl Backward<Flex, 2> for ConvTranspose3dBackward {
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, w) = ops.state;
            let (g, padding_out) = (self.0, self.1);
            if let Some(node) = node_x {
                let dx = Flex::conv_transpose3d_x_backward(
                    w.clone(),
                    grad.clone(),
                    g.transpose_options(padding_out),
                );
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_w {
                // y[s·i + k − p] += x[i] · W[k]: the convolution weight gradient with the
                // roles of input and output gradient swapped, `[c_in, c_out, k]` as the
                // transposed convolution's weight is laid out.
                let kernel = kernel_of(&w);
                grads.register::<Flex>(node.id, weight_gradient(grad, x, kernel, g));
            }
        }
    }

    fn kernel_of(w: &FloatTensor<Flex>) -> [usize; 3] {
        let [_, _, kd, kh, kw] = w.shape().dims::<5>();
        [kd, kh, kw]
    }

    /// `dW[o, c, k] = Σ_{n, p} G[n, o, p] · X_pad[n, c, stride·p + k]`, shape
    /// `[c_out, c_in, kd, kh, kw]`, where `G` is `[n, c_out, d', h', w']` and `X` is
    /// `[n, c_in, d, h, w]` padded symmetrically by `g.padding` (zero outside, and cut to
    /// the samples the output positions reach).
    pub(crate) fn weight_gradient(
        x: FloatTensor<Flex>,
        grad: FloatTensor<Flex>,
        kernel: [usize; 3],
        g: Geometry,
    ) -> FloatTensor<Flex> {
        let [n, c_in, d, h, w] = x.shape().dims::<5>();
        let [_, c_out, od, oh, ow] = grad.shape().dims::<5>();
        let positions = n * od * oh * ow;
        let device = x.device();
        // The padded input, large enough for every offset's strided window.
        let extent = |i: usize| g.stride[i] * ([od, oh, ow][i].max(1) - 1) + kernel[i];
        let padded_shape = [
            n,
            c_in,
            extent(0).max(d + g.padding[0]),
            extent(1).max(h + g.padding[1]),
            extent(2).max(w + g.padding[2]),
        ];
        let mut padded = Flex::float_zeros(Shape::new(padded_shape), &device, FloatDType::F32);
        let inner = [
            Slice::new(0, Some(n as isize), 1),
            Slice::new(0, Some(c_in as isize), 1),
            span(g.padding[0], d),
            span(g.padding[1], h),
            span(g.padding[2], w),
        ];
        padded = Flex::float_slice_assign(padded, &inner, x);
        // G as [c_out, n·P].
        let grad = Flex::float_reshape(
            Flex::float_swap_dims(grad, 0, 1),
            Shape::new([c_out, positions]),
        );
        let mut columns = Vec::with_capacity(kernel.iter().product());
        for a in 0..kernel[0] {
            for b in 0..kernel[1] {
                for c in 0..kernel[2] {
                    let window = [
                        Slice::new(0, Some(n as isize), 1),
                        Slice::new(0, Some(c_in as isize), 1),
                        strided(a, od, g.stride[0]),
                        strided(b, oh, g.stride[1]),
                        strided(c, ow, g.stride[2]),
                    ];
                    let xk = Flex::float_slice(padded.clone(), &window);
                    // [c_in, n·P], then its transpose (a view) for G · Xₖᵀ = [c_out, c_in].
                    let xk = Flex::float_reshape(
                        Flex::float_swap_dims(xk, 0, 1),
                        Shape::new([c_in, positions]),
                    );
                    let dwk = Flex::float_matmul(grad.clone(), Flex::float_swap_dims(xk, 0, 1));
                    columns.push(Flex::float_reshape(dwk, Shape::new([c_out, c_in, 1])));
                }
            }
        }
        let stacked = Flex::float_cat(columns, 2);
        Flex::float_reshape(
            stacked,
            Shape::new([c_out, c_in, kernel[0], kernel[1], kernel[2]]),
        )
    }

    fn span(start: usize, len: usize) -> Slice {
        Slice::new(start as isize, Some((start + len) as isize), 1)
    }

    fn strided(offset: usize, count: usize, stride: usize) -> Slice {
        let end = offset + stride * (count.max(1) - 1) + 1;
        Slice::new(offset as isize, Some(end as isize), stride as isize)
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::nn::conv::{Conv3dConfig, ConvTranspose3dConfig};
    use burn::tensor::{Device, Distribution, TensorData};

    use super::*;

    /// (batch, c_in, c_out, input size, kernel, stride, padding)
    type ConvCase = (usize, usize, usize, [usize; 3], usize, usize, usize);
    /// (batch, c_in, c_out, input size, kernel, stride, padding, padding_out)
    type TransposedCase = (usize, usize, usize, [usize; 3], usize, usize, usize, usize);

    /// Output, input gradient, weight gradient and bias gradient of `forward` under a random
    /// linear loss, on `Autodiff<Flex>`.
    fn gradients(
        x: &Tensor<5>,
        weight: &Tensor<5>,
        bias: &Tensor<1>,
        forward: impl Fn(Tensor<5>, Tensor<5>, Tensor<1>) -> Tensor<5>,
    ) -> [Vec<f32>; 4] {
        let x = x.clone().require_grad();
        let w = weight.clone().require_grad();
        let b = bias.clone().require_grad();
        let y = forward(x.clone(), w.clone(), b.clone());
        // A fixed loss weighting, the same for both paths.
        let dims = y.dims();
        let weights: Vec<f32> = (0..dims.iter().product::<usize>())
            .map(|i| ((i as f32) * 0.618).sin())
            .collect();
        let r = Tensor::<5>::from_data(TensorData::new(weights, dims), &y.device());
        let grads = (y.clone() * r).sum().backward();
        let values = |t: Tensor<5>| t.into_data().try_to_vec::<f32>().unwrap();
        [
            values(y),
            values(x.grad(&grads).expect("input gradient")),
            values(w.grad(&grads).expect("weight gradient")),
            b.grad(&grads)
                .expect("bias gradient")
                .into_data()
                .try_to_vec()
                .unwrap(),
        ]
    }

    /// Output and the three gradients of the custom path against Burn's.
    fn assert_all_close(fast: &[Vec<f32>; 4], reference: &[Vec<f32>; 4], case: &str) {
        for (i, what) in ["output", "input grad", "weight grad", "bias grad"]
            .iter()
            .enumerate()
        {
            assert_close(&fast[i], &reference[i], &format!("{case}: {what}"));
        }
    }

    fn assert_close(fast: &[f32], reference: &[f32], what: &str) {
        assert_eq!(fast.len(), reference.len(), "{what}: length");
        let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
        let worst = fast
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{what}: relative error {worst:e}");
    }

    #[test]
    fn the_fast_convolution_gradients_equal_burns_over_odd_shapes_strides_and_padding() {
        let device = Device::flex().autodiff();
        // (batch, c_in, c_out, input size, kernel, stride, padding)
        let cases: [ConvCase; 6] = [
            (2, 1, 4, [9, 7, 5], 3, 1, 1),
            (1, 3, 5, [8, 6, 7], 3, 2, 1),
            (2, 4, 3, [5, 9, 6], 3, 2, 0),
            (1, 2, 2, [7, 7, 7], 1, 1, 0),
            (3, 5, 6, [6, 5, 4], 3, 1, 0),
            (1, 2, 3, [11, 6, 5], 5, 3, 2),
        ];
        for (n, ci, co, [d, h, w], k, s, p) in cases {
            let conv = Conv3dConfig::new([ci, co], [k; 3])
                .with_stride([s; 3])
                .with_padding(PaddingConfig3d::Explicit(p, p, p))
                .init(&device);
            let x = Tensor::<5>::random([n, ci, d, h, w], Distribution::Default, &device);
            let weight = conv.weight.val();
            let bias = conv.bias.as_ref().unwrap().val();
            let with = |fast: bool| {
                gradients(&x, &weight, &bias, |x, w, b| {
                    let mut c = conv.clone();
                    c.weight = burn::module::Param::from_tensor(w);
                    c.bias = Some(burn::module::Param::from_tensor(b));
                    if fast {
                        // The custom operation itself, whatever the channel gate decides.
                        let g = super::flex_ad::Geometry {
                            stride: [s; 3],
                            padding: [p; 3],
                        };
                        let y = super::flex_ad::conv3d(x, c.weight.val(), g).expect("flex");
                        add_bias(y, c.bias.as_ref().map(|b| b.val()))
                    } else {
                        c.forward(x)
                    }
                })
            };
            let case = format!("conv3d n{n} {ci}->{co} {d}x{h}x{w} k{k} s{s} p{p}");
            assert_all_close(&with(true), &with(false), &case);
        }
    }

    #[test]
    fn the_fast_transposed_convolution_gradients_equal_burns() {
        let device = Device::flex().autodiff();
        // (batch, c_in, c_out, input size, kernel, stride, padding, padding_out)
        let cases: [TransposedCase; 4] = [
            (2, 4, 2, [4, 3, 5], 3, 2, 1, 1),
            (1, 3, 5, [5, 4, 3], 3, 2, 1, 0),
            (2, 2, 3, [3, 3, 4], 2, 2, 0, 0),
            (1, 5, 4, [4, 5, 3], 3, 1, 1, 0),
        ];
        for (n, ci, co, [d, h, w], k, s, p, po) in cases {
            let conv = ConvTranspose3dConfig::new([ci, co], [k; 3])
                .with_stride([s; 3])
                .with_padding([p; 3])
                .with_padding_out([po; 3])
                .init(&device);
            let x = Tensor::<5>::random([n, ci, d, h, w], Distribution::Default, &device);
            let weight = conv.weight.val();
            let bias = conv.bias.as_ref().unwrap().val();
            let with = |fast: bool| {
                gradients(&x, &weight, &bias, |x, w, b| {
                    let mut c = conv.clone();
                    c.weight = burn::module::Param::from_tensor(w);
                    c.bias = Some(burn::module::Param::from_tensor(b));
                    if fast {
                        let g = super::flex_ad::Geometry {
                            stride: [s; 3],
                            padding: [p; 3],
                        };
                        let y = super::flex_ad::conv_transpose3d(x, c.weight.val(), g, [po; 3])
                            .expect("flex");
                        add_bias(y, c.bias.as_ref().map(|b| b.val()))
                    } else {
                        c.forward(x)
                    }
                })
            };
            let case =
                format!("conv_transpose3d n{n} {ci}->{co} {d}x{h}x{w} k{k} s{s} p{p} po{po}");
            assert_all_close(&with(true), &with(false), &case);
        }
    }

    #[test]
    fn other_backends_and_inference_take_burns_path() {
        // Without autodiff the operation is Burn's own, bit for bit.
        let device = Device::flex();
        let conv = Conv3dConfig::new([2, 3], [3; 3])
            .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
            .init(&device);
        let x = Tensor::<5>::random([1, 2, 5, 4, 3], Distribution::Default, &device);
        assert!(super::flex_ad::conv3d(
            x.clone(),
            conv.weight.val(),
            super::flex_ad::Geometry {
                stride: [1; 3],
                padding: [1; 3]
            }
        )
        .is_none());
        assert_eq!(
            conv3d(&conv, x.clone()).into_data(),
            conv.forward(x).into_data()
        );
        // On the training device the custom operation is the one taken (so the gradient
        // tests above compare it, not Burn's path with itself).
        let device = Device::flex().autodiff();
        let x = Tensor::<5>::random([1, 2, 5, 4, 3], Distribution::Default, &device);
        let w = Tensor::<5>::random([3, 2, 3, 3, 3], Distribution::Default, &device);
        let geometry = super::flex_ad::Geometry {
            stride: [1; 3],
            padding: [1; 3],
        };
        assert!(super::flex_ad::conv3d(x.clone(), w.clone(), geometry).is_some());
        assert!(super::flex_ad::conv_transpose3d(x, w.swap_dims(0, 1), geometry, [0; 3]).is_some());
    }
}
