//! BatchNorm then PReLU (MONAI's "NDA" block, [`crate::blocks::NormAct`]) as one operation
//! on Burn's `flex` backend.
//!
//! Burn 0.22.1's `flex` backend computes batch normalisation from generic tensor operations:
//! in training, the batch statistics go through two layout copies (channels to the front)
//! and the output through four more passes; the backward pass takes about a dozen. On the
//! paper-size U-Net that was about a quarter of a training step. Here:
//! - training (`Autodiff<Flex>`, BatchNorm not frozen): one pass for each channel's mean and
//!   variance, one that writes `prelu(γ·x̂ + β)`; backward, one pass for the per-channel sums
//!   and one that writes the input gradient, with the gradients of `γ`, `β` and the PReLU
//!   slope from the same sums. The running statistics are updated exactly as Burn's
//!   `BatchNorm` updates them, from the batch's mean and biased variance;
//! - inference (`Flex`): one pass, `prelu(x·scale + shift)` with the running statistics
//!   folded into a per-channel scale and shift.
//!
//! Other backends, other dtypes, a PReLU with one slope per channel, and a frozen BatchNorm
//! on an autodiff device take Burn's path. `SEGVIZ_REFERENCE_CONV=1` sends every call there
//! too (see [`crate::fast_conv`]). Per-channel sums run over each `(item, channel)` volume
//! in a fixed order, in eight interleaved `f64` lanes, and the volumes are added in order:
//! the result does not depend on the number of threads.

use burn::nn::{BatchNorm, PRelu};
use burn::tensor::Tensor;

/// `act.forward(norm.forward(x))`, as one operation on `Flex` and `Autodiff<Flex>` (see the
/// module documentation). Running statistics are updated as `BatchNorm::forward` does.
///
/// # Shapes
/// - input and output: `[n, c, d, h, w]`
pub fn norm_act(norm: &BatchNorm, act: &PRelu, x: Tensor<5>) -> Tensor<5> {
    norm_act_biased(norm, act, x, None)
}

/// [`norm_act`] of `x + bias` (a per-channel `[c]` bias, as a convolution whose bias was
/// deferred leaves it: see [`crate::fast_conv::conv3d_deferred`]). On `Flex` the bias is
/// folded into the pass's per-channel shift.
pub fn norm_act_biased(
    norm: &BatchNorm,
    act: &PRelu,
    x: Tensor<5>,
    bias: Option<Tensor<1>>,
) -> Tensor<5> {
    #[cfg(feature = "flex")]
    if crate::fast_conv::enabled() {
        if let Some(y) = flex::norm_act(norm, act, x.clone(), bias.clone()) {
            return y;
        }
    }
    let x = crate::fast_conv::add_bias(x, bias);
    crate::fast_conv::prelu(act, norm.forward(x))
}

/// [`norm_act_biased`] plus `residual` (a residual unit's shortcut, of the output's shape).
/// On `Flex` (inference) the addition is part of the same pass.
pub fn norm_act_residual(
    norm: &BatchNorm,
    act: &PRelu,
    x: Tensor<5>,
    bias: Option<Tensor<1>>,
    residual: Tensor<5>,
) -> Tensor<5> {
    #[cfg(feature = "flex")]
    if crate::fast_conv::enabled() && !x.device().is_autodiff() && x.dims() == residual.dims() {
        if let Some(y) = flex::infer(norm, act, x.clone(), bias.clone(), Some(residual.clone())) {
            return y;
        }
    }
    norm_act_biased(norm, act, x, bias) + residual
}

#[cfg(feature = "flex")]
pub(crate) mod flex {
    //! The fused operation on `Flex` and `Autodiff<Flex>`.

    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{Autodiff, Flex, TensorMetadata};
    use burn::nn::{BatchNorm, PRelu};
    use burn::tensor::{DType, Tensor, TensorData};
    use rayon::prelude::*;

    use crate::fast_conv::flex_ad::contiguous;

    type Ad = Autodiff<Flex, NoCheckpointing>;

    /// Interleaved accumulators of the per-channel sums.
    const LANES: usize = 8;

    /// Values below which a pass is not split further between threads.
    const TASK_VALUES: usize = 1 << 15;

    /// The fewest `(item, channel)` volumes of `volume` values one task takes.
    fn min_volumes(volume: usize) -> usize {
        (TASK_VALUES / volume.max(1)).max(1)
    }

    /// The fused operation, or `None` where Burn's path must run (see the module
    /// documentation of [`crate::fast_norm`]).
    pub(crate) fn norm_act(
        norm: &BatchNorm,
        act: &PRelu,
        x: Tensor<5>,
        bias: Option<Tensor<1>>,
    ) -> Option<Tensor<5>> {
        if x.device().is_autodiff() {
            if norm.training.is_enabled() {
                train(norm, act, crate::fast_conv::add_bias(x, bias))
            } else {
                None
            }
        } else {
            infer(norm, act, x, bias, None)
        }
    }

    /// The values of a 1-D `f32` tensor of `len` values on `Flex`.
    fn flex_values(t: Tensor<1>, len: usize) -> Option<Vec<f32>> {
        let p = t.try_into_primitive::<Flex>().ok()?;
        let p = contiguous(&p)?;
        let v = p.as_slice::<f32>()?;
        (v.len() == len).then(|| v.to_vec())
    }

    /// Inference on `Flex`: `prelu(x·scale + shift)` with `scale = γ / √(var + ε)` and
    /// `shift = β + (bias − mean)·scale` from the running statistics and the deferred
    /// convolution bias.
    pub(crate) fn infer(
        norm: &BatchNorm,
        act: &PRelu,
        x: Tensor<5>,
        bias: Option<Tensor<1>>,
        residual: Option<Tensor<5>>,
    ) -> Option<Tensor<5>> {
        let [_, c, ..] = x.dims();
        let residual = match residual {
            Some(r) => Some(contiguous(&r.try_into_primitive::<Flex>().ok()?)?),
            None => None,
        };
        let rs = match &residual {
            Some(r) => Some(r.as_slice::<f32>()?),
            None => None,
        };
        let bias = match bias {
            Some(b) => flex_values(b, c)?,
            None => vec![0f32; c],
        };
        let gamma = flex_values(norm.gamma.val(), c)?;
        let beta = flex_values(norm.beta.val(), c)?;
        let mean = flex_values(norm.running_mean.value(), c)?;
        let var = flex_values(norm.running_var.value(), c)?;
        let slope = flex_values(act.alpha.val(), 1)?[0];
        let xp = x.try_into_primitive::<Flex>().ok()?;
        if xp.dtype() != DType::F32 {
            return None;
        }
        let dims = xp.shape().dims::<5>();
        let eps = norm.epsilon as f32;
        let (scale, shift): (Vec<f32>, Vec<f32>) = (0..c)
            .map(|i| {
                let scale = gamma[i] / (var[i] + eps).sqrt();
                (scale, beta[i] + (bias[i] - mean[i]) * scale)
            })
            .unzip();
        let volume = (dims[2] * dims[3] * dims[4]).max(1);
        if rs.is_some_and(|r| r.len() != dims.iter().product::<usize>()) {
            return None;
        }
        let apply = |slice: usize, y: &mut [f32], x: Option<&[f32]>| {
            let (a, b) = (scale[slice % c], shift[slice % c]);
            let r = rs.map(|r| &r[slice * volume..][..y.len()]);
            match (x, r) {
                (Some(x), None) => affine_prelu(y, x, a, b, slope),
                (None, None) => affine_prelu_in_place(y, a, b, slope),
                (Some(x), Some(r)) => affine_prelu_add(y, x, r, a, b, slope),
                (None, Some(r)) => affine_prelu_add_in_place(y, r, a, b, slope),
            }
        };
        // In place when this is the only reference to a contiguous tensor (a convolution's
        // fresh output, as in the U-Net), as Burn's own element-wise operations work.
        let mut xp = xp;
        let whole = xp.layout().contiguous_offsets() == Some((0, xp.shape().num_elements()));
        if whole {
            if let Some(values) = xp.try_storage_mut::<f32>() {
                values
                    .par_chunks_mut(volume)
                    .with_min_len(min_volumes(volume))
                    .enumerate()
                    .for_each(|(slice, y)| apply(slice, y, None));
                return Some(Tensor::from_primitive::<Flex>(xp));
            }
        }
        let xp = contiguous(&xp)?;
        let xs = xp.as_slice::<f32>()?;
        let mut y = vec![0f32; xs.len()];
        y.par_chunks_mut(volume)
            .zip(xs.par_chunks(volume))
            .with_min_len(min_volumes(volume))
            .enumerate()
            .for_each(|(slice, (y, x))| apply(slice, y, Some(x)));
        let y = FloatTensor::<Flex>::from_data(TensorData::new(y, dims));
        Some(Tensor::from_primitive::<Flex>(y))
    }

    /// `Σ f(v)` over `values` in [`LANES`] interleaved `f64` accumulators, added in order.
    fn lane_sum(values: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut acc = [0f64; LANES];
        let mut chunks = values.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += f(v);
            }
        }
        for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
            *a += f(v);
        }
        acc.iter().sum()
    }

    /// Per-channel sums of `per_slice` over every `(item, channel)` volume, items added in
    /// order.
    fn channel_sums<const K: usize>(slices: &[[f64; K]], channels: usize) -> Vec<[f64; K]> {
        let mut sums = vec![[0f64; K]; channels];
        for (i, s) in slices.iter().enumerate() {
            for (total, v) in sums[i % channels].iter_mut().zip(s) {
                *total += v;
            }
        }
        sums
    }

    /// Training on `Autodiff<Flex>` with the batch's statistics.
    fn train(norm: &BatchNorm, act: &PRelu, x: Tensor<5>) -> Option<Tensor<5>> {
        let device = x.device();
        let [_, c, ..] = x.dims();
        let (xa, ga, ba, aa) = (
            x.try_into_primitive::<Ad>().ok()?,
            norm.gamma.val().try_into_primitive::<Ad>().ok()?,
            norm.beta.val().try_into_primitive::<Ad>().ok()?,
            act.alpha.val().try_into_primitive::<Ad>().ok()?,
        );
        let (xi, gi, bi, ai) = (
            xa.primitive().clone(),
            ga.primitive().clone(),
            ba.primitive().clone(),
            aa.primitive().clone(),
        );
        if [&xi, &gi, &bi, &ai].iter().any(|t| t.dtype() != DType::F32)
            || gi.shape().num_elements() != c
            || bi.shape().num_elements() != c
            || ai.shape().num_elements() != 1
        {
            return None;
        }
        let dims = xi.shape().dims::<5>();
        let xi = contiguous(&xi)?;
        let gamma = contiguous(&gi)?.as_slice::<f32>()?.to_vec();
        let beta = contiguous(&bi)?.as_slice::<f32>()?.to_vec();
        let slope = contiguous(&ai)?.as_slice::<f32>()?[0];
        let xs = xi.as_slice::<f32>()?;
        let volume = (dims[2] * dims[3] * dims[4]).max(1);
        let count = (xs.len() / c.max(1)) as f64;
        if count == 0.0 {
            return None;
        }

        // Mean, then the biased variance about it (as Burn computes them).
        let sums: Vec<[f64; 1]> = xs
            .par_chunks(volume)
            .with_min_len(min_volumes(volume))
            .map(|x| [lane_sum(x, f64::from)])
            .collect();
        let mean: Vec<f64> = channel_sums(&sums, c).iter().map(|[s]| s / count).collect();
        let squares: Vec<[f64; 1]> = xs
            .par_chunks(volume)
            .with_min_len(min_volumes(volume))
            .enumerate()
            .map(|(i, x)| {
                let m = mean[i % c];
                [lane_sum(x, |v| {
                    let d = f64::from(v) - m;
                    d * d
                })]
            })
            .collect();
        let var: Vec<f64> = channel_sums(&squares, c)
            .iter()
            .map(|[s]| s / count)
            .collect();
        let stats = Stats {
            mean: mean.iter().map(|&m| m as f32).collect(),
            inv_std: var
                .iter()
                .map(|&v| (1.0 / (v + norm.epsilon).sqrt()) as f32)
                .collect(),
            gamma,
            beta,
            slope,
        };

        // Written in full below, so not zeroed first.
        let mut y: Vec<f32> = Vec::with_capacity(xs.len());
        y.spare_capacity_mut()[..xs.len()]
            .par_chunks_mut(volume)
            .zip(xs.par_chunks(volume))
            .with_min_len(min_volumes(volume))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let (a, b) = stats.affine(i % c);
                for (y, &v) in y.iter_mut().zip(x) {
                    y.write(prelu_value(v * a + b, slope));
                }
            });
        // SAFETY: the chunks of `volume` values cover all `xs.len()` values, and each chunk
        // wrote every value (it is as long as its input chunk).
        unsafe { y.set_len(xs.len()) };
        let y = FloatTensor::<Flex>::from_data(TensorData::new(y, dims));

        let out = match NormActBackward
            .prepare::<NoCheckpointing>([xa.node(), ga.node(), ba.node(), aa.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((xi, stats.clone()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };

        // The running statistics, as `BatchNorm::forward` updates them.
        let batch_mean = Tensor::<1>::from_data(TensorData::new(stats.mean.clone(), [c]), &device);
        let batch_var = Tensor::<1>::from_data(
            TensorData::new(var.iter().map(|&v| v as f32).collect::<Vec<_>>(), [c]),
            &device,
        );
        let running_mean = norm.running_mean.value_sync().to_device(&device);
        let running_var = norm.running_var.value_sync().to_device(&device);
        let running_mean = running_mean
            .mul_scalar(1.0 - norm.momentum)
            .add(batch_mean.mul_scalar(norm.momentum));
        let running_var = running_var
            .mul_scalar(1.0 - norm.momentum)
            .add(batch_var.mul_scalar(norm.momentum));
        norm.running_mean.update(running_mean.detach());
        norm.running_var.update(running_var.detach());

        Some(Tensor::from_primitive::<Ad>(out))
    }

    /// `if keep { a } else { b }` with both operands computed: a select the compiler
    /// vectorises, where a branch on the sign of each value would not be.
    #[inline(always)]
    fn select(keep: bool, a: f32, b: f32) -> f32 {
        if keep {
            a
        } else {
            b
        }
    }

    /// PReLU of `u`: `u` where `u ≥ 0`, `slope·u` elsewhere (Burn's definition).
    #[inline(always)]
    fn prelu_value(u: f32, slope: f32) -> f32 {
        select(u >= 0.0, u, slope * u)
    }

    /// `y = prelu(x·a + b)`.
    fn affine_prelu(y: &mut [f32], x: &[f32], a: f32, b: f32, slope: f32) {
        for (y, &v) in y.iter_mut().zip(x) {
            *y = prelu_value(v * a + b, slope);
        }
    }

    /// `y = prelu(x·a + b) + r`.
    fn affine_prelu_add(y: &mut [f32], x: &[f32], r: &[f32], a: f32, b: f32, slope: f32) {
        for ((y, &v), &q) in y.iter_mut().zip(x).zip(r) {
            *y = prelu_value(v * a + b, slope) + q;
        }
    }

    /// `y ← prelu(y·a + b) + r`.
    fn affine_prelu_add_in_place(y: &mut [f32], r: &[f32], a: f32, b: f32, slope: f32) {
        for (y, &q) in y.iter_mut().zip(r) {
            *y = prelu_value(*y * a + b, slope) + q;
        }
    }

    /// `y ← prelu(y·a + b)`.
    fn affine_prelu_in_place(y: &mut [f32], a: f32, b: f32, slope: f32) {
        for y in y.iter_mut() {
            *y = prelu_value(*y * a + b, slope);
        }
    }

    /// For one value `v` and its output gradient `dy`: `du`, `du·x̂` and the slope's term
    /// `dy·u` (zero where `u ≥ 0`), with `u = v·a + b` and `x̂ = (v − m)·s`.
    #[inline(always)]
    fn backward_terms(v: f32, dy: f32, a: f32, b: f32, m: f32, s: f32, slope: f32) -> [f32; 3] {
        let u = v * a + b;
        let positive = u >= 0.0;
        let du = select(positive, dy, slope * dy);
        [du, du * ((v - m) * s), select(positive, 0.0, dy * u)]
    }

    /// The per-channel values the backward pass needs.
    #[derive(Debug, Clone)]
    struct Stats {
        mean: Vec<f32>,
        inv_std: Vec<f32>,
        gamma: Vec<f32>,
        beta: Vec<f32>,
        slope: f32,
    }

    impl Stats {
        /// `(a, b)` with `γ·x̂ + β = x·a + b` for channel `c`.
        fn affine(&self, c: usize) -> (f32, f32) {
            let a = self.gamma[c] * self.inv_std[c];
            (a, self.beta[c] - self.mean[c] * a)
        }
    }

    /// The backward pass. With `u = γ·x̂ + β` and `du = dy` where `u ≥ 0`, `α·dy` elsewhere:
    /// `dβ = Σ du`, `dγ = Σ du·x̂`, `dα = Σ dy·u` over `u < 0`, and
    /// `dx = γ/σ · (du − mean(du) − x̂·mean(du·x̂))`, the means over each channel.
    #[derive(Debug)]
    struct NormActBackward;

    impl Backward<Flex, 4> for NormActBackward {
        type State = (FloatTensor<Flex>, Stats);

        fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _: &mut Checkpointer) {
            let [node_x, node_gamma, node_beta, node_alpha] = ops.parents;
            let grad = grads.consume::<Flex>(&ops.node);
            let (x, stats) = ops.state;
            let dims = x.shape().dims::<5>();
            let grad = contiguous(&grad).expect("f32 BatchNorm + PReLU gradient");
            let (xs, gs) = (
                x.as_slice::<f32>().expect("contiguous"),
                grad.as_slice::<f32>().expect("contiguous"),
            );
            let c = stats.gamma.len();
            let volume = (dims[2] * dims[3] * dims[4]).max(1);
            let count = (xs.len() / c) as f64;
            let slope = stats.slope;
            // Per volume: Σ du, Σ du·x̂, Σ dy·u over u < 0.
            let sums: Vec<[f64; 3]> = xs
                .par_chunks(volume)
                .zip(gs.par_chunks(volume))
                .with_min_len(min_volumes(volume))
                .enumerate()
                .map(|(i, (x, g))| {
                    let ch = i % c;
                    let (a, b) = stats.affine(ch);
                    let (m, s) = (stats.mean[ch], stats.inv_std[ch]);
                    let mut acc = [[0f64; LANES]; 3];
                    let mut xs = x.chunks_exact(LANES);
                    let mut gs = g.chunks_exact(LANES);
                    for (x, g) in (&mut xs).zip(&mut gs) {
                        let mut terms = [[0f32; LANES]; 3];
                        for l in 0..LANES {
                            let [du, dux, da] = backward_terms(x[l], g[l], a, b, m, s, slope);
                            terms[0][l] = du;
                            terms[1][l] = dux;
                            terms[2][l] = da;
                        }
                        for (acc, terms) in acc.iter_mut().zip(&terms) {
                            for (a, &t) in acc.iter_mut().zip(terms) {
                                *a += f64::from(t);
                            }
                        }
                    }
                    for (l, (&v, &dy)) in xs.remainder().iter().zip(gs.remainder()).enumerate() {
                        let terms = backward_terms(v, dy, a, b, m, s, slope);
                        for (acc, t) in acc.iter_mut().zip(terms) {
                            acc[l] += f64::from(t);
                        }
                    }
                    acc.map(|lanes| lanes.iter().sum())
                })
                .collect();
            let per_channel = channel_sums(&sums, c);
            if let Some(node) = node_x {
                // Written in full below, so not zeroed first.
                let mut dx: Vec<f32> = Vec::with_capacity(xs.len());
                dx.spare_capacity_mut()[..xs.len()]
                    .par_chunks_mut(volume)
                    .zip(xs.par_chunks(volume).zip(gs.par_chunks(volume)))
                    .with_min_len(min_volumes(volume))
                    .enumerate()
                    .for_each(|(i, (dx, (x, g)))| {
                        let ch = i % c;
                        let (a, b) = stats.affine(ch);
                        let (m, s) = (stats.mean[ch], stats.inv_std[ch]);
                        let mean_du = (per_channel[ch][0] / count) as f32;
                        let mean_dux = (per_channel[ch][1] / count) as f32;
                        let scale = stats.gamma[ch] * s;
                        for ((d, &v), &dy) in dx.iter_mut().zip(x).zip(g) {
                            let u = v * a + b;
                            let du = select(u >= 0.0, dy, slope * dy);
                            let xhat = (v - m) * s;
                            d.write(scale * (du - mean_du - xhat * mean_dux));
                        }
                    });
                // SAFETY: as for the forward pass's output: every value was written.
                unsafe { dx.set_len(xs.len()) };
                let dx = FloatTensor::<Flex>::from_data(TensorData::new(dx, dims));
                grads.register::<Flex>(node.id, dx);
            }
            let column = |k: usize| -> FloatTensor<Flex> {
                let v: Vec<f32> = per_channel.iter().map(|s| s[k] as f32).collect();
                FloatTensor::<Flex>::from_data(TensorData::new(v, [c]))
            };
            if let Some(node) = node_gamma {
                grads.register::<Flex>(node.id, column(1));
            }
            if let Some(node) = node_beta {
                grads.register::<Flex>(node.id, column(0));
            }
            if let Some(node) = node_alpha {
                let da: f64 = per_channel.iter().map(|s| s[2]).sum();
                let da = FloatTensor::<Flex>::from_data(TensorData::new(vec![da as f32], [1]));
                grads.register::<Flex>(node.id, da);
            }
        }
    }
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::module::Module;
    use burn::nn::{BatchNormConfig, PReluConfig};
    use burn::tensor::{Device, Distribution, Tensor, TensorData};

    use super::*;
    use crate::fast_conv::tests::assert_close;

    fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// A BatchNorm with non-trivial parameters and running statistics, and a PReLU.
    fn layers(c: usize, device: &Device) -> (BatchNorm, PRelu) {
        let mut norm = BatchNormConfig::new(c).init(device);
        let ramp = |a: f32, b: f32| {
            let v: Vec<f32> = (0..c).map(|i| a + b * i as f32).collect();
            Tensor::<1>::from_data(TensorData::new(v, [c]), device)
        };
        let param = |t: Tensor<1>| {
            if device.is_autodiff() {
                t.require_grad()
            } else {
                t
            }
        };
        norm.gamma = norm.gamma.map(|_| param(ramp(0.7, 0.2)));
        norm.beta = norm.beta.map(|_| param(ramp(-0.3, 0.15)));
        norm.running_mean = burn::module::RunningState::new(ramp(0.1, -0.05));
        norm.running_var = burn::module::RunningState::new(ramp(0.8, 0.3));
        (norm, PReluConfig::new().with_alpha(0.2).init(device))
    }

    #[test]
    fn training_gives_burns_output_gradients_and_running_statistics() {
        let device = Device::flex().autodiff();
        for dims in [[2, 3, 4, 5, 6], [1, 2, 3, 3, 9], [3, 5, 1, 2, 2]] {
            let x = Tensor::<5>::random(dims, Distribution::Normal(0.5, 2.0), &device);
            let run = |fast: bool| {
                let (norm, act) = layers(dims[1], &device);
                let x = x.clone().require_grad();
                let y = if fast {
                    flex::norm_act(&norm, &act, x.clone(), None).expect("Autodiff<Flex>, f32")
                } else {
                    crate::fast_conv::prelu(&act, norm.forward(x.clone()))
                };
                let n: usize = dims.iter().product();
                let r: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.618).sin()).collect();
                let r = Tensor::<5>::from_data(TensorData::new(r, dims), &device);
                let grads = (y.clone() * r).sum().backward();
                let grad1 = |t: Tensor<1>| values(t.grad(&grads).expect("gradient"));
                [
                    values(y),
                    values(x.grad(&grads).expect("input gradient")),
                    grad1(norm.gamma.val()),
                    grad1(norm.beta.val()),
                    grad1(act.alpha.val()),
                    values(norm.running_mean.value()),
                    values(norm.running_var.value()),
                ]
            };
            let (fast, reference) = (run(true), run(false));
            let names = [
                "output",
                "input gradient",
                "gamma gradient",
                "beta gradient",
                "slope gradient",
                "running mean",
                "running variance",
            ];
            for (i, what) in names.iter().enumerate() {
                assert_close(&fast[i], &reference[i], &format!("{dims:?} {what}"));
            }
        }
    }

    #[test]
    fn inference_gives_burns_output_and_frozen_layers_take_burns_path() {
        let device = Device::flex();
        let x = Tensor::<5>::random([2, 4, 3, 5, 7], Distribution::Normal(0.0, 3.0), &device);
        let (norm, act) = layers(4, &device);
        let fast = flex::norm_act(&norm, &act, x.clone(), None).expect("Flex, f32");
        let reference = crate::fast_conv::prelu(&act, norm.forward(x.clone()));
        assert_close(&values(fast), &values(reference), "inference output");
        // A deferred convolution bias, folded into the shift.
        let bias =
            Tensor::<1>::from_data(TensorData::new(vec![0.5f32, -1.0, 2.0, 0.0], [4]), &device);
        let fast = flex::norm_act(&norm, &act, x.clone(), Some(bias.clone())).expect("Flex");
        let reference = crate::fast_conv::prelu(
            &act,
            norm.forward(x.clone() + bias.clone().reshape([1, 4, 1, 1, 1])),
        );
        assert_close(
            &values(fast),
            &values(reference.clone()),
            "inference output with a bias",
        );
        // And a residual added in the same pass.
        let r = Tensor::<5>::random([2, 4, 3, 5, 7], Distribution::Normal(0.0, 1.0), &device);
        let fast = norm_act_residual(&norm, &act, x.clone(), Some(bias), r.clone());
        assert_close(
            &values(fast),
            &values(reference + r),
            "inference plus a residual",
        );

        // A BatchNorm frozen on an autodiff device normalises with its running statistics,
        // which Burn's path does; the fused operation steps aside.
        let ad = device.autodiff();
        let (norm, act) = layers(4, &ad);
        let norm = norm.no_grad();
        let mut frozen = norm.clone();
        frozen.training = frozen.training.with_value(false);
        let x = Tensor::<5>::zeros([1, 4, 2, 2, 2], &ad);
        assert!(flex::norm_act(&frozen, &act, x, None).is_none());
    }
}
