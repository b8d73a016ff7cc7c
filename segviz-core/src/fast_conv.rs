//! The U-Net's 3-D convolutions, through SegViz's own CPU kernels on Burn's `flex` backend.
//!
//! Burn 0.22.1's `flex` backend has forward kernels for `conv3d` and `conv_transpose3d`
//! (an element-by-element im2col over a channels-last copy) and no backward kernel of its
//! own: the generic weight gradient is a `conv3d` whose kernel is the whole output
//! gradient. On the CPU both made a training step about three times slower than PyTorch's
//! (see `docs/performance.md`).
//!
//! Here both convolutions are custom operations (through Burn's `extension` feature, no
//! fork): on `Flex` (inference) a plain forward pass, on `Autodiff<Flex>` (training) an
//! autodiff operation with its own backward pass, all four computed by [`crate::cpu_conv`]
//! (unfold + GEMM, fold):
//! - convolution: forward, input gradient, weight gradient;
//! - transposed convolution: forward (a convolution's input gradient), input gradient (a
//!   convolution's forward pass), weight gradient (a convolution's weight gradient with the
//!   roles of input and output gradient swapped);
//! - bias: added outside the operation, so autodiff sums its gradient.
//!
//! Any other backend (including `Autodiff<Flex>` with gradient checkpointing), grouped or
//! dilated convolutions, tensors other than `f32`, and padding modes other than explicit
//! take Burn's own path unchanged. [`conv3d`] and [`conv_transpose3d`] are what the U-Net's
//! blocks call ([`conv3d_pair`] for a residual unit's two convolutions of one input, and the
//! `_deferred` variants where the next operation adds the bias itself on `Flex`), and
//! [`prelu`] for an activation outside [`crate::fast_norm`]'s fused BatchNorm + PReLU.
//! [`organ_probability`] is a two-class head's probability in one pass. Setting the
//! environment variable `SEGVIZ_REFERENCE_CONV=1` sends every convolution, PReLU,
//! BatchNorm + PReLU and head probability through Burn's path (for before/after
//! measurements).

use burn::nn::conv::{Conv3d, ConvTranspose3d};
#[cfg(feature = "flex")]
use burn::nn::PaddingConfig3d;
use burn::tensor::Tensor;

/// A convolution's output before its bias: `(x ⊛ w, Some(bias))` when the bias is left to
/// the caller, `(conv.forward(x), None)` when it has been added.
pub type Deferred = (Tensor<5>, Option<Tensor<1>>);

/// `conv.forward(x)`, through [`crate::cpu_conv`]'s kernels when `x` lives on `Flex` or
/// `Autodiff<Flex>`.
///
/// # Shapes
/// - input: `[n, c_in, d, h, w]`; output: `[n, c_out, d', h', w']`
pub fn conv3d(conv: &Conv3d, x: Tensor<5>) -> Tensor<5> {
    conv3d_with(conv, x, false).0
}

/// [`conv3d`], leaving the bias to the caller where `x` lives on plain `Flex` (inference):
/// [`crate::fast_norm::norm_act`] folds it into its own pass, which saves one pass over
/// the output.
pub fn conv3d_deferred(conv: &Conv3d, x: Tensor<5>) -> Deferred {
    let defer = defers_bias(&x);
    conv3d_with(conv, x, defer)
}

fn conv3d_with(conv: &Conv3d, x: Tensor<5>, defer: bool) -> Deferred {
    #[cfg(feature = "flex")]
    if let PaddingConfig3d::Explicit(pd, ph, pw) = conv.padding {
        if enabled() && conv.groups == 1 && conv.dilation == [1, 1, 1] {
            let geometry = flex_ad::Geometry {
                stride: conv.stride,
                padding: [pd, ph, pw],
            };
            if let Some(y) = flex_ad::conv3d(x.clone(), conv.weight.val(), geometry) {
                return finish(y, conv.bias.as_ref().map(|b| b.val()), defer);
            }
        }
    }
    let _ = defer;
    (conv.forward(x), None)
}

/// `(y, bias)` when the bias is deferred, `(y + bias, None)` otherwise.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
fn finish(y: Tensor<5>, bias: Option<Tensor<1>>, defer: bool) -> Deferred {
    if defer {
        (y, bias)
    } else {
        (add_bias(y, bias), None)
    }
}

/// Whether a convolution of `x` may leave its bias to the caller: on plain `Flex`, where the
/// custom kernels and [`crate::fast_norm`]'s inference pass run.
fn defers_bias(x: &Tensor<5>) -> bool {
    #[cfg(feature = "flex")]
    {
        enabled() && !x.device().is_autodiff() && is_flex(x)
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = x;
        false
    }
}

/// `(a.forward(x), b.forward(x))` for two convolutions of the same input with the same
/// geometry (kernel, stride, padding), as a residual unit's first convolution and its
/// strided residual path are. On `Flex` and `Autodiff<Flex>` they run as one convolution
/// with both weights stacked (`a`'s output channels first), then split: the input is
/// padded and unfolded once, not twice, and the weight gradients share one unfolding too.
/// Elsewhere, or when the geometries differ, two convolutions.
///
/// # Shapes
/// - input: `[n, c_in, d, h, w]`; outputs: `[n, c_a, d', h', w']` and `[n, c_b, d', h', w']`
pub fn conv3d_pair(a: &Conv3d, b: &Conv3d, x: Tensor<5>) -> (Tensor<5>, Tensor<5>) {
    let ((ya, bias), yb) = conv3d_pair_with(a, b, x, false);
    (add_bias(ya, bias), yb)
}

/// [`conv3d_pair`], leaving the first output's bias to the caller as [`conv3d_deferred`]
/// does; the second output has its bias.
pub fn conv3d_pair_deferred(a: &Conv3d, b: &Conv3d, x: Tensor<5>) -> (Deferred, Tensor<5>) {
    let defer = defers_bias(&x);
    conv3d_pair_with(a, b, x, defer)
}

fn conv3d_pair_with(a: &Conv3d, b: &Conv3d, x: Tensor<5>, defer: bool) -> (Deferred, Tensor<5>) {
    #[cfg(feature = "flex")]
    if let PaddingConfig3d::Explicit(pd, ph, pw) = a.padding {
        let same = a.padding == b.padding
            && a.stride == b.stride
            && a.kernel_size == b.kernel_size
            && a.dilation == b.dilation
            && a.groups == b.groups
            && a.bias.is_some() == b.bias.is_some()
            && a.weight.dims()[1..] == b.weight.dims()[1..];
        if same && enabled() && a.groups == 1 && a.dilation == [1, 1, 1] && is_flex(&x) {
            let geometry = flex_ad::Geometry {
                stride: a.stride,
                padding: [pd, ph, pw],
            };
            let weight = Tensor::cat(vec![a.weight.val(), b.weight.val()], 0);
            if let Some(y) = flex_ad::conv3d(x.clone(), weight, geometry) {
                let (ca, cb) = (a.weight.dims()[0], b.weight.dims()[0]);
                let first = y.clone().narrow(1, 0, ca);
                let second = add_bias(y.narrow(1, ca, cb), b.bias.as_ref().map(|v| v.val()));
                let first = finish(first, a.bias.as_ref().map(|v| v.val()), defer);
                return (first, second);
            }
        }
    }
    let _ = defer;
    ((conv3d(a, x.clone()), None), conv3d(b, x))
}

/// Whether `x` lives on `Flex` or `Autodiff<Flex>`, where [`flex_ad`]'s kernels run.
#[cfg(feature = "flex")]
fn is_flex(x: &Tensor<5>) -> bool {
    x.device().inner() == burn::tensor::Device::flex()
}

/// `conv.forward(x)`, through [`crate::cpu_conv`]'s kernels when `x` lives on `Flex` or
/// `Autodiff<Flex>`.
///
/// # Shapes
/// - input: `[n, c_in, d, h, w]`; output: `[n, c_out, d', h', w']`
pub fn conv_transpose3d(conv: &ConvTranspose3d, x: Tensor<5>) -> Tensor<5> {
    conv_transpose3d_with(conv, x, false).0
}

/// [`conv_transpose3d`], leaving the bias to the caller as [`conv3d_deferred`] does.
pub fn conv_transpose3d_deferred(conv: &ConvTranspose3d, x: Tensor<5>) -> Deferred {
    let defer = defers_bias(&x);
    conv_transpose3d_with(conv, x, defer)
}

fn conv_transpose3d_with(conv: &ConvTranspose3d, x: Tensor<5>, defer: bool) -> Deferred {
    #[cfg(feature = "flex")]
    if enabled() && conv.groups == 1 && conv.dilation == [1, 1, 1] {
        let geometry = flex_ad::Geometry {
            stride: conv.stride,
            padding: conv.padding,
        };
        if let Some(y) =
            flex_ad::conv_transpose3d(x.clone(), conv.weight.val(), geometry, conv.padding_out)
        {
            return finish(y, conv.bias.as_ref().map(|b| b.val()), defer);
        }
    }
    let _ = defer;
    (conv.forward(x), None)
}

/// `act.forward(x)` (PReLU with one slope). On `Autodiff<Flex>` it is one custom operation
/// with its own backward pass: Burn composes PReLU there from a comparison, a product and a
/// masked select, each a pass over the tensor forward and more backward. Elsewhere (including
/// `Flex`, whose own PReLU is already one pass) Burn's path.
///
/// # Shapes
/// - input and output: `[n, c, d, h, w]`
pub fn prelu(act: &burn::nn::PRelu, x: Tensor<5>) -> Tensor<5> {
    #[cfg(feature = "flex")]
    if enabled() {
        if let Some(y) = flex_ad::prelu(x.clone(), act.alpha.val()) {
            return y;
        }
    }
    act.forward(x)
}

/// `σ(l₁ − l₀)` of two-class logits `[n, 2, d, h, w]` as `[n, 1, d, h, w]`, in one pass on
/// plain `Flex` (Burn takes two slices, a difference and a sigmoid, four passes over a
/// full-resolution volume); `None` elsewhere, for other dtypes or channel counts.
pub fn organ_probability(logits: &Tensor<5>) -> Option<Tensor<5>> {
    #[cfg(feature = "flex")]
    {
        let [n, c, d, h, w] = logits.dims();
        if !enabled() || c != 2 || logits.device().is_autodiff() || !is_flex(logits) {
            return None;
        }
        let p = logits
            .clone()
            .try_into_primitive::<burn::backend::Flex>()
            .ok()?;
        let p = flex_ad::contiguous(&p)?;
        let values = p.as_slice::<f32>()?;
        let volume = d * h * w;
        let mut out = vec![0f32; n * volume];
        if volume > 0 {
            use rayon::prelude::*;
            out.par_chunks_mut(volume)
                .zip(values.par_chunks(2 * volume))
                .for_each(|(o, l)| {
                    let (background, organ) = l.split_at(volume);
                    for ((o, &b), &f) in o.iter_mut().zip(background).zip(organ) {
                        *o = 1.0 / (1.0 + (b - f).exp());
                    }
                });
        }
        let t = burn::backend::tensor::FloatTensor::<burn::backend::Flex>::from_data(
            burn::tensor::TensorData::new(out, [n, 1, d, h, w]),
        );
        Some(Tensor::from_primitive::<burn::backend::Flex>(t))
    }
    #[cfg(not(feature = "flex"))]
    {
        let _ = logits;
        None
    }
}

/// Whether the custom operations may be used: not when `SEGVIZ_REFERENCE_CONV` is set to
/// anything but `0` (read once; it covers [`prelu`] too).
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
pub(crate) fn enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        std::env::var("SEGVIZ_REFERENCE_CONV").map_or(true, |v| v.is_empty() || v == "0")
    })
}

/// `y` plus a per-channel `bias` (`[c]` on `[n, c, d, h, w]`), or `y` itself.
pub(crate) fn add_bias(y: Tensor<5>, bias: Option<Tensor<1>>) -> Tensor<5> {
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
    //! The convolutions on `Flex` (inference) and `Autodiff<Flex>` (training) through the
    //! kernels of [`crate::cpu_conv`], whatever the channel count (benches call them
    //! directly; models go through [`super::conv3d`] and [`super::conv_transpose3d`]).

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Flex, TensorMetadata};
    use burn::tensor::{DType, Tensor, TensorData};

    use rayon::prelude::*;

    use crate::cpu_conv::{self, ConvShape};

    type Ad = Autodiff<Flex, NoCheckpointing>;

    /// Stride and symmetric padding of a convolution.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub struct Geometry {
        /// Stride per axis.
        pub stride: [usize; 3],
        /// Padding per axis, the same on both sides.
        pub padding: [usize; 3],
    }

    /// `conv3d(x, w)` without bias, or `None` when `x` is on neither `Flex` nor
    /// `Autodiff<Flex>`, is not `f32`, or the shapes do not make a convolution (Burn's own
    /// path then reports it).
    pub fn conv3d(x: Tensor<5>, w: Tensor<5>, g: Geometry) -> Option<Tensor<5>> {
        if let (Ok(xp), Ok(wp)) = (
            x.clone().try_into_primitive::<Ad>(),
            w.clone().try_into_primitive::<Ad>(),
        ) {
            let s = conv_shape(xp.primitive(), wp.primitive(), g)?;
            return Some(track(xp, wp, Conv3dBackward(s), |x, w| {
                values(x, w, |x, w| (cpu_conv::forward(&s, x, w), s.output_dims()))
            }));
        }
        let (x, w) = flex_pair(x, w)?;
        let s = conv_shape(&x, &w, g)?;
        let y = values(&x, &w, |x, w| {
            (cpu_conv::forward(&s, x, w), s.output_dims())
        })?;
        Some(Tensor::from_primitive::<Flex>(y))
    }

    /// `conv_transpose3d(x, w)` without bias, or `None` under the same conditions as
    /// [`conv3d`].
    pub fn conv_transpose3d(
        x: Tensor<5>,
        w: Tensor<5>,
        g: Geometry,
        padding_out: [usize; 3],
    ) -> Option<Tensor<5>> {
        if let (Ok(xp), Ok(wp)) = (
            x.clone().try_into_primitive::<Ad>(),
            w.clone().try_into_primitive::<Ad>(),
        ) {
            let s = transposed_shape(xp.primitive(), wp.primitive(), g, padding_out)?;
            return Some(track(xp, wp, ConvTranspose3dBackward(s), |x, w| {
                values(x, w, |x, w| {
                    (cpu_conv::input_gradient(&s, w, x), s.input_dims())
                })
            }));
        }
        let (x, w) = flex_pair(x, w)?;
        let s = transposed_shape(&x, &w, g, padding_out)?;
        let y = values(&x, &w, |x, w| {
            (cpu_conv::input_gradient(&s, w, x), s.input_dims())
        })?;
        Some(Tensor::from_primitive::<Flex>(y))
    }

    /// PReLU with one slope `alpha` (`[1]`) on `Autodiff<Flex>`: `x` where `x ≥ 0`, `α·x`
    /// elsewhere, as Burn defines it, with a fused backward pass. `None` on other backends,
    /// for other dtypes, or when `alpha` has more than one value.
    pub fn prelu(x: Tensor<5>, alpha: Tensor<1>) -> Option<Tensor<5>> {
        let (xp, ap) = (
            x.try_into_primitive::<Ad>().ok()?,
            alpha.try_into_primitive::<Ad>().ok()?,
        );
        if xp.primitive().dtype() != DType::F32
            || ap.primitive().dtype() != DType::F32
            || ap.primitive().shape().num_elements() != 1
        {
            return None;
        }
        let dims = xp.primitive().shape().dims::<5>();
        Some(track(xp, ap, PreluBackward, move |x, a| {
            values(x, a, |x, a| {
                let slope = a[0];
                let mut y = vec![0f32; x.len()];
                y.par_chunks_mut(ELEMENTWISE_BLOCK)
                    .zip(x.par_chunks(ELEMENTWISE_BLOCK))
                    .for_each(|(y, x)| {
                        for (y, &v) in y.iter_mut().zip(x) {
                            *y = if v >= 0.0 { v } else { slope * v };
                        }
                    });
                (y, dims)
            })
        }))
    }

    /// Values per task of the element-wise passes.
    const ELEMENTWISE_BLOCK: usize = 1 << 15;

    /// PReLU's backward pass: `dx = g` where `x ≥ 0` and `α·g` elsewhere; `dα = Σ g·x` over
    /// `x < 0`, summed per block and the blocks in order (the same result on any number of
    /// threads).
    #[derive(Debug)]
    struct PreluBackward;

    impl Backward<Flex, 2> for PreluBackward {
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_a] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, a) = ops.state;
            let dims = x.shape().dims::<5>();
            let (x, a, grad) = (
                contiguous(&x).expect("f32 PReLU input"),
                contiguous(&a).expect("f32 PReLU slope"),
                contiguous(&grad).expect("f32 PReLU gradient"),
            );
            let (xs, gs) = (
                x.as_slice::<f32>().expect("contiguous"),
                grad.as_slice::<f32>().expect("contiguous"),
            );
            let slope = a.as_slice::<f32>().expect("contiguous")[0];
            // One pass computes both; `dx` is kept only when `x` is tracked.
            let mut dx = vec![0f32; xs.len()];
            let sums: Vec<f32> = dx
                .par_chunks_mut(ELEMENTWISE_BLOCK)
                .zip(xs.par_chunks(ELEMENTWISE_BLOCK))
                .zip(gs.par_chunks(ELEMENTWISE_BLOCK))
                .map(|((dx, x), g)| {
                    let mut sum = 0f32;
                    for ((d, &v), &g) in dx.iter_mut().zip(x).zip(g) {
                        if v >= 0.0 {
                            *d = g;
                        } else {
                            *d = slope * g;
                            sum += g * v;
                        }
                    }
                    sum
                })
                .collect();
            if let Some(node) = node_x {
                let dx = FloatTensor::<Flex>::from_data(TensorData::new(dx, dims));
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_a {
                let da: f32 = sums.iter().sum();
                let da = FloatTensor::<Flex>::from_data(TensorData::new(vec![da], [1]));
                grads.register::<Flex>(node.id, da);
            }
        }
    }

    fn flex_pair(x: Tensor<5>, w: Tensor<5>) -> Option<(FloatTensor<Flex>, FloatTensor<Flex>)> {
        Some((
            x.try_into_primitive::<Flex>().ok()?,
            w.try_into_primitive::<Flex>().ok()?,
        ))
    }

    /// Runs `forward` on the primitives and records `backward` for autodiff, keeping `x`
    /// and `w` as its state.
    fn track<
        O: Backward<Flex, 2, State = (FloatTensor<Flex>, FloatTensor<Flex>)> + std::fmt::Debug,
    >(
        x: FloatTensor<Ad>,
        w: FloatTensor<Ad>,
        backward: O,
        forward: impl Fn(&FloatTensor<Flex>, &FloatTensor<Flex>) -> Option<FloatTensor<Flex>>,
    ) -> Tensor<5> {
        let (xp, wp) = (x.primitive().clone(), w.primitive().clone());
        // The shapes and dtype were checked by the caller, so `forward` gives a value.
        let y = forward(&xp, &wp).expect("f32 operands of checked shapes");
        let out = match backward
            .prepare::<NoCheckpointing>([x.node(), w.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xp, wp), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        Tensor::from_primitive::<Ad>(out)
    }

    /// The shapes of `conv3d(x, w)`, when both are 5-D `f32` and the kernel fits.
    fn conv_shape(x: &FloatTensor<Flex>, w: &FloatTensor<Flex>, g: Geometry) -> Option<ConvShape> {
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return None;
        }
        let [n, c_in, d, h, wd] = x.shape().dims::<5>();
        let [c_out, wc, kd, kh, kw] = w.shape().dims::<5>();
        if wc != c_in {
            return None;
        }
        let (input, kernel) = ([d, h, wd], [kd, kh, kw]);
        Some(ConvShape {
            batch: n,
            c_in,
            c_out,
            input,
            output: ConvShape::output_size(input, kernel, g.stride, g.padding)?,
            kernel,
            stride: g.stride,
            padding: g.padding,
        })
    }

    /// The shapes of the convolution whose input gradient is `conv_transpose3d(x, w)`: its
    /// input is the transposed convolution's output, its output the transposed
    /// convolution's input, and `w` (`[c_in, c_out, k]` as a transposed convolution's weight
    /// is laid out) its weight as it stands.
    fn transposed_shape(
        x: &FloatTensor<Flex>,
        w: &FloatTensor<Flex>,
        g: Geometry,
        padding_out: [usize; 3],
    ) -> Option<ConvShape> {
        if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
            return None;
        }
        let [n, c_in, d, h, wd] = x.shape().dims::<5>();
        let [wc, c_out, kd, kh, kw] = w.shape().dims::<5>();
        let kernel = [kd, kh, kw];
        let output = [d, h, wd];
        if wc != c_in
            || padding_out
                .iter()
                .zip(g.stride)
                .any(|(&po, s)| po >= s.max(1))
        {
            return None;
        }
        let mut input = [0; 3];
        for i in 0..3 {
            input[i] = ((output[i].checked_sub(1)? * g.stride[i]) + kernel[i] + padding_out[i])
                .checked_sub(2 * g.padding[i])?;
        }
        let s = ConvShape {
            batch: n,
            c_in: c_out,
            c_out: c_in,
            input,
            output,
            kernel,
            stride: g.stride,
            padding: g.padding,
        };
        (ConvShape::output_size(input, kernel, g.stride, g.padding)? == output).then_some(s)
    }

    /// `f` on the values of `x` and `w` in row-major order, its result as a tensor.
    fn values(
        x: &FloatTensor<Flex>,
        w: &FloatTensor<Flex>,
        f: impl FnOnce(&[f32], &[f32]) -> (Vec<f32>, [usize; 5]),
    ) -> Option<FloatTensor<Flex>> {
        let (x, w) = (contiguous(x)?, contiguous(w)?);
        let (values, dims) = f(x.as_slice::<f32>()?, w.as_slice::<f32>()?);
        Some(FloatTensor::<Flex>::from_data(TensorData::new(
            values, dims,
        )))
    }

    /// The tensor itself when its values are contiguous from the start of its storage, a
    /// contiguous copy otherwise; `None` when it is not `f32`.
    pub(crate) fn contiguous(t: &FloatTensor<Flex>) -> Option<FloatTensor<Flex>> {
        if t.dtype() != DType::F32 {
            return None;
        }
        Some(if t.as_slice::<f32>().is_some() {
            t.clone()
        } else {
            t.to_contiguous()
        })
    }

    #[derive(Debug)]
    struct Conv3dBackward(ConvShape);

    impl Backward<Flex, 2> for Conv3dBackward {
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, w) = ops.state;
            let s = self.0;
            if let Some(node) = node_x {
                let dx = values(&grad, &w, |g, w| {
                    (cpu_conv::input_gradient(&s, w, g), s.input_dims())
                })
                .expect("f32 gradient of an f32 convolution");
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_w {
                let dw = values(&x, &grad, |x, g| {
                    (cpu_conv::weight_gradient(&s, x, g), s.weight_dims())
                })
                .expect("f32 gradient of an f32 convolution");
                grads.register::<Flex>(node.id, dw);
            }
        }
    }

    /// A transposed convolution is the input gradient of the convolution `self.0`.
    #[derive(Debug)]
    struct ConvTranspose3dBackward(ConvShape);

    impl Backward<Flex, 2> for ConvTranspose3dBackward {
        type State = (FloatTensor<Flex>, FloatTensor<Flex>);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_w] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, w) = ops.state;
            let s = self.0;
            if let Some(node) = node_x {
                // The adjoint of the convolution's input gradient is the convolution.
                let dx = values(&grad, &w, |g, w| {
                    (cpu_conv::forward(&s, g, w), s.output_dims())
                })
                .expect("f32 gradient of an f32 convolution");
                grads.register::<Flex>(node.id, dx);
            }
            if let Some(node) = node_w {
                // y[s·i + k − p] += x[i] · W[k]: the convolution's weight gradient with its
                // input the output gradient and its output gradient `x`.
                let dw = values(&grad, &x, |g, x| {
                    (cpu_conv::weight_gradient(&s, g, x), s.weight_dims())
                })
                .expect("f32 gradient of an f32 convolution");
                grads.register::<Flex>(node.id, dw);
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
pub(crate) mod tests {
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

    /// `fast` equals `reference` to 1e-4 of the reference's largest magnitude.
    pub(crate) fn assert_close(fast: &[f32], reference: &[f32], what: &str) {
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
    fn inference_on_flex_takes_the_kernels_and_equals_burns_forward() {
        let device = Device::flex();
        let geometry = super::flex_ad::Geometry {
            stride: [2; 3],
            padding: [1; 3],
        };
        let conv = Conv3dConfig::new([3, 4], [3; 3])
            .with_stride([2; 3])
            .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
            .init(&device);
        let x = Tensor::<5>::random([2, 3, 7, 6, 5], Distribution::Default, &device);
        // The kernels are the ones taken (so this compares them, not Burn's path with
        // itself) ...
        assert!(super::flex_ad::conv3d(x.clone(), conv.weight.val(), geometry).is_some());
        let values = |t: Tensor<5>| t.into_data().try_to_vec::<f32>().unwrap();
        // ... and agree with Burn's.
        assert_close(
            &values(conv3d(&conv, x.clone())),
            &values(conv.forward(x)),
            "inference conv3d",
        );
        let up = ConvTranspose3dConfig::new([3, 2], [3; 3])
            .with_stride([2; 3])
            .with_padding([1; 3])
            .with_padding_out([1; 3])
            .init(&device);
        let x = Tensor::<5>::random([1, 3, 4, 3, 5], Distribution::Default, &device);
        assert!(
            super::flex_ad::conv_transpose3d(x.clone(), up.weight.val(), geometry, [1; 3])
                .is_some()
        );
        assert_close(
            &values(conv_transpose3d(&up, x.clone())),
            &values(up.forward(x)),
            "inference conv_transpose3d",
        );
        // Shapes that make no convolution are left to Burn's path (which reports them).
        let tiny = Tensor::<5>::random([1, 3, 1, 1, 1], Distribution::Default, &device);
        let no_padding = super::flex_ad::Geometry {
            stride: [1; 3],
            padding: [0; 3],
        };
        assert!(super::flex_ad::conv3d(tiny, conv.weight.val(), no_padding).is_none());
    }

    #[test]
    fn a_convolution_pair_equals_its_two_convolutions_with_gradients() {
        let device = Device::flex().autodiff();
        let x = Tensor::<5>::random([2, 3, 6, 7, 9], Distribution::Normal(0.0, 1.0), &device);
        let pair = |stride: usize, c_b: usize| {
            let a = Conv3dConfig::new([3, 4], [3, 3, 3])
                .with_stride([stride; 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .init(&device);
            let b = Conv3dConfig::new([3, c_b], [3, 3, 3])
                .with_stride([stride; 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .init(&device);
            (a, b)
        };
        for (stride, c_b) in [(2, 5), (1, 4)] {
            let (a, b) = pair(stride, c_b);
            let run = |fast: bool| {
                let x = x.clone().require_grad();
                let (ya, yb) = if fast {
                    conv3d_pair(&a, &b, x.clone())
                } else {
                    (a.forward(x.clone()), b.forward(x.clone()))
                };
                let ra = ya.clone().sin();
                let loss = (ya.clone() * ra.detach()).sum() + (yb.clone() * 0.7).cos().sum();
                let grads = loss.backward();
                let v = |t: Tensor<5>| t.into_data().try_to_vec::<f32>().unwrap();
                let v1 = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().unwrap();
                let wa = a.weight.val().grad(&grads).expect("first weight gradient");
                let wb = b.weight.val().grad(&grads).expect("second weight gradient");
                let ba = a
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .expect("first bias");
                let bb = b
                    .bias
                    .as_ref()
                    .unwrap()
                    .val()
                    .grad(&grads)
                    .expect("second bias");
                [
                    v(ya),
                    v(yb),
                    v(x.grad(&grads).expect("input gradient")),
                    v(wa),
                    v(wb),
                    v1(ba),
                    v1(bb),
                ]
            };
            let (fast, reference) = (run(true), run(false));
            let names = [
                "first output",
                "second output",
                "input grad",
                "first weight grad",
            ];
            let names =
                names
                    .iter()
                    .chain(&["second weight grad", "first bias grad", "second bias grad"]);
            for (i, what) in names.enumerate() {
                assert_close(&fast[i], &reference[i], &format!("stride {stride}: {what}"));
            }
        }
    }

    #[test]
    fn the_fused_prelu_and_its_gradients_equal_burns() {
        let device = Device::flex().autodiff();
        let x = Tensor::<5>::random([2, 3, 5, 6, 7], Distribution::Normal(0.0, 1.0), &device);
        // Exact zeros too, where the two definitions' branches meet.
        let x = x.clone().mask_fill(x.abs().lower_elem(0.05), 0.0);
        let alpha = Tensor::<1>::from_data(TensorData::new(vec![0.3f32], [1]), &device);
        let run = |fast: bool| {
            let x = x.clone().require_grad();
            let a = alpha.clone().require_grad();
            let y = if fast {
                flex_ad::prelu(x.clone(), a.clone()).expect("Autodiff<Flex>, f32, one slope")
            } else {
                burn::tensor::activation::prelu(x.clone(), a.clone())
            };
            let dims = y.dims();
            let weights: Vec<f32> = (0..dims.iter().product::<usize>())
                .map(|i| ((i as f32) * 0.377).cos())
                .collect();
            let r = Tensor::<5>::from_data(TensorData::new(weights, dims), &device);
            let grads = (y.clone() * r).sum().backward();
            let values = |t: Tensor<5>| t.into_data().try_to_vec::<f32>().unwrap();
            [
                values(y),
                values(x.grad(&grads).expect("input gradient")),
                a.grad(&grads)
                    .expect("slope gradient")
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
            ]
        };
        let (fast, reference) = (run(true), run(false));
        for (i, what) in ["output", "input grad", "slope grad"].iter().enumerate() {
            assert_close(&fast[i], &reference[i], &format!("PReLU {what}"));
        }
        // Not on plain Flex (its own PReLU is already one pass), nor with one slope per channel.
        let plain = Tensor::<5>::zeros([1, 2, 2, 2, 2], &Device::flex());
        let one = Tensor::<1>::ones([1], &Device::flex());
        assert!(flex_ad::prelu(plain, one).is_none());
        let per_channel = Tensor::<1>::ones([3], &device);
        assert!(flex_ad::prelu(x, per_channel).is_none());
    }
}
