//! 3-D convolution kernels for the CPU on contiguous `NCDHW` `f32` buffers: the forward
//! pass, the input gradient and the weight gradient, each a matrix product over an unfolded
//! ("im2col") copy of the input.
//!
//! For one batch item, the unfolded input of a convolution is the matrix `X` of
//! `K = C_in·kd·kh·kw` rows and `P = d'·h'·w'` columns whose row `(c, a, b, e)` holds, for
//! every output position `(z, y, x)`, the input sample `x[c, s·z + a − p, s·y + b − p,
//! s·x + e − p]` (zero outside the volume). Then, with the weight `W` as `[C_out, K]` and the
//! output (or its gradient) `G` as `[C_out, P]`:
//! - forward: `Y = W · X`;
//! - weight gradient: `dW = Σ_n G · Xᵀ`;
//! - input gradient: `dX = Wᵀ · G`, folded back onto the input ("col2im", the adjoint of the
//!   unfolding).
//!
//! Both layouts are the tensors' own (`NCDHW` in, `NCDHW` out), so no layout copy is made.
//! The input is padded once; a row of `X` is then, output row by output row, a run of one
//! padded input row: for stride 1 a plain copy with no bounds to check, which is what makes
//! this faster than Burn's `flex` kernel (an element-by-element gather over a channels-last
//! copy, see `docs/performance.md`). The columns are processed in chunks of whole output rows, so the
//! unfolded matrix is never larger than about [`CHUNK_ELEMENTS`] values.
//!
//! The transposed convolution needs no kernel of its own: its forward pass is a
//! convolution's input gradient, its input gradient a convolution's forward pass and its
//! weight gradient a convolution's weight gradient with the roles of input and output
//! gradient swapped.
//!
//! Results depend only on the shapes, not on the number of threads: every sum runs in a
//! fixed order.

use std::borrow::Cow;
use std::cell::RefCell;

use gemm::Parallelism;
use rayon::prelude::*;

/// Target size (in values) of one chunk of the unfolded input: 4 MiB of `f32`.
pub const CHUNK_ELEMENTS: usize = 1 << 20;

/// Largest number of partial weight gradients summed at the end (one per group of chunks,
/// computed in parallel).
const WEIGHT_GRADIENT_GROUPS: usize = 8;

/// Shapes of one convolution (no groups, no dilation, zero padding on both sides).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvShape {
    /// Batch size.
    pub batch: usize,
    /// Channels of the convolution's input.
    pub c_in: usize,
    /// Channels of the convolution's output.
    pub c_out: usize,
    /// Spatial size of the input.
    pub input: [usize; 3],
    /// Spatial size of the output.
    pub output: [usize; 3],
    /// Kernel size.
    pub kernel: [usize; 3],
    /// Stride per axis.
    pub stride: [usize; 3],
    /// Padding per axis, the same on both sides.
    pub padding: [usize; 3],
}

impl ConvShape {
    /// The output size a convolution of `input` gives:
    /// `(input + 2·padding − kernel) / stride + 1` per axis, or `None` when the kernel does
    /// not fit or a stride is zero.
    pub fn output_size(
        input: [usize; 3],
        kernel: [usize; 3],
        stride: [usize; 3],
        padding: [usize; 3],
    ) -> Option<[usize; 3]> {
        let mut out = [0; 3];
        for i in 0..3 {
            let span = (input[i] + 2 * padding[i]).checked_sub(kernel[i])?;
            out[i] = span.checked_div(stride[i])? + 1;
        }
        Some(out)
    }

    /// Rows of the unfolded input (and columns of the weight matrix).
    pub fn rows(&self) -> usize {
        self.c_in * self.kernel.iter().product::<usize>()
    }

    /// `[n, c_in, d, h, w]`.
    pub fn input_dims(&self) -> [usize; 5] {
        let [d, h, w] = self.input;
        [self.batch, self.c_in, d, h, w]
    }

    /// `[n, c_out, d', h', w']`.
    pub fn output_dims(&self) -> [usize; 5] {
        let [d, h, w] = self.output;
        [self.batch, self.c_out, d, h, w]
    }

    /// `[c_out, c_in, kd, kh, kw]`.
    pub fn weight_dims(&self) -> [usize; 5] {
        let [d, h, w] = self.kernel;
        [self.c_out, self.c_in, d, h, w]
    }

    /// Spatial size of the input padded on both sides.
    fn padded(&self) -> [usize; 3] {
        let mut padded = self.input;
        for (size, p) in padded.iter_mut().zip(self.padding) {
            *size += 2 * p;
        }
        padded
    }

    fn input_positions(&self) -> usize {
        self.input.iter().product()
    }

    fn output_positions(&self) -> usize {
        self.output.iter().product()
    }

    /// Whether every size is non-zero (the kernels need at least one value everywhere).
    fn is_empty(&self) -> bool {
        self.batch == 0
            || self.c_in == 0
            || self.c_out == 0
            || self.output.contains(&0)
            || self.input.contains(&0)
            || self.kernel.contains(&0)
    }

    /// Chunks of whole output rows (`(z, y)` pairs), each unfolding to at most about
    /// [`CHUNK_ELEMENTS`] values (at least one row).
    fn chunks(&self) -> Vec<(usize, usize)> {
        let rows = self.output[0] * self.output[1];
        let per_row = self.rows() * self.output[2];
        let step = (CHUNK_ELEMENTS / per_row.max(1)).clamp(1, rows.max(1));
        (0..rows)
            .step_by(step)
            .map(|r| (r, (r + step).min(rows)))
            .collect()
    }

    /// `(batch item, first row, end row)` for every chunk of every batch item.
    fn tasks(&self) -> Vec<(usize, usize, usize)> {
        let chunks = self.chunks();
        (0..self.batch)
            .flat_map(|n| chunks.iter().map(move |&(r0, r1)| (n, r0, r1)))
            .collect()
    }
}

/// A pointer that may be shared between threads writing disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: only used for writes to disjoint elements (distinct output columns per task).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer `offset` values further on.
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

thread_local! {
    /// Each thread's buffer for one chunk of the unfolded input, kept between calls so that
    /// it is neither zeroed nor faulted in again for every chunk.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `f` on `len` values of this thread's scratch buffer (their contents are left over from
/// earlier calls: `f` must write every value before reading it). A fresh buffer when the
/// thread's own is in use further up its stack (a rayon worker may run another chunk's task
/// while it waits).
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut buffer) => {
            if buffer.len() < len {
                buffer.resize(len, 0.0);
            }
            f(&mut buffer[..len])
        }
        Err(_) => f(&mut vec![0.0; len]),
    })
}

/// For every input row `(z, y)` of one channel, where it starts in the volume and where in
/// the padded volume.
fn row_starts(s: &ConvShape) -> impl Iterator<Item = (usize, usize)> + '_ {
    let [_, ph, pw] = s.padded();
    let [d, h, w] = s.input;
    let [p0, p1, p2] = s.padding;
    (0..d).flat_map(move |z| {
        (0..h).map(move |y| ((z * h + y) * w, ((z + p0) * ph + y + p1) * pw + p2))
    })
}

/// `x` (`channels` volumes of the input's size, one after the other) with `padding` zeros
/// on both sides of every axis; `x` itself when there is no padding.
fn pad<'a>(s: &ConvShape, x: &'a [f32], channels: usize) -> Cow<'a, [f32]> {
    let (inner, w) = (s.input_positions(), s.input[2]);
    if s.padding == [0; 3] {
        return Cow::Borrowed(&x[..channels * inner]);
    }
    let padded = s.padded().iter().product::<usize>();
    let mut out = vec![0f32; channels * padded];
    out.par_chunks_mut(padded)
        .zip(x.par_chunks(inner))
        .for_each(|(to, from)| {
            for (i, o) in row_starts(s) {
                to[o..o + w].copy_from_slice(&from[i..i + w]);
            }
        });
    Cow::Owned(out)
}

/// The inverse of [`pad`]: the inside of `channels` padded volumes.
fn crop(s: &ConvShape, padded: Vec<f32>, channels: usize) -> Vec<f32> {
    if s.padding == [0; 3] {
        return padded;
    }
    let (inner, w) = (s.input_positions(), s.input[2]);
    let mut out = vec![0f32; channels * inner];
    out.par_chunks_mut(inner)
        .zip(padded.par_chunks(s.padded().iter().product::<usize>()))
        .for_each(|(to, from)| {
            for (i, o) in row_starts(s) {
                to[i..i + w].copy_from_slice(&from[o..o + w]);
            }
        });
    out
}

/// Where in a padded channel the sample of output row `r` (a `(z, y)` pair), column 0,
/// kernel offset `(a, b, e)` lies.
fn source_start(s: &ConvShape, r: usize, [a, b, e]: [usize; 3]) -> usize {
    let [_, ph, pw] = s.padded();
    let (z, y) = (r / s.output[1], r % s.output[1]);
    ((z * s.stride[0] + a) * ph + y * s.stride[1] + b) * pw + e
}

/// Fills `col` (`rows() × (r1 − r0)·w'`, row-major) with the unfolded input of one batch
/// item, `x` being its channels padded by [`pad`], for output rows `r0..r1`.
fn unfold(s: &ConvShape, x: &[f32], (r0, r1): (usize, usize), col: &mut [f32]) {
    let ow = s.output[2];
    let width = (r1 - r0) * ow;
    let channel = s.padded().iter().product::<usize>();
    let stride = s.stride[2];
    let mut rows = col[..s.rows() * width].chunks_exact_mut(width);
    for c in 0..s.c_in {
        let xc = &x[c * channel..(c + 1) * channel];
        for (offset, dst) in offsets(s.kernel).zip(&mut rows) {
            for (out, r) in dst.chunks_exact_mut(ow).zip(r0..r1) {
                let start = source_start(s, r, offset);
                if stride == 1 {
                    out.copy_from_slice(&xc[start..start + ow]);
                } else {
                    // Sliced to exactly the samples read: one bounds check for the run,
                    // not an open-ended iterator.
                    let src = &xc[start..start + (ow - 1) * stride + 1];
                    for (i, o) in out.iter_mut().enumerate() {
                        *o = src[i * stride];
                    }
                }
            }
        }
    }
}

/// The kernel offsets `(a, b, e)` in row-major order (the order of the unfolded rows).
fn offsets([kd, kh, kw]: [usize; 3]) -> impl Iterator<Item = [usize; 3]> {
    (0..kd).flat_map(move |a| (0..kh).flat_map(move |b| (0..kw).map(move |e| [a, b, e])))
}

/// `f(col, width)` on the unfolded input (`rows() × width`) of batch item `n` for output
/// rows `r0..r1`, `x` being the whole batch padded by [`pad`].
fn with_unfolded<R>(
    s: &ConvShape,
    x: &[f32],
    (n, r0, r1): (usize, usize, usize),
    f: impl FnOnce(&[f32], usize) -> R,
) -> R {
    let width = (r1 - r0) * s.output[2];
    let item = s.c_in * s.padded().iter().product::<usize>();
    with_scratch(s.rows() * width, |col| {
        unfold(s, &x[n * item..(n + 1) * item], (r0, r1), col);
        f(col, width)
    })
}

/// Adds the `kd·kh·kw` rows of one channel of an unfolded gradient (as [`unfold`] lays
/// them out) for output rows `r0..r1` back onto that channel's padded input gradient.
fn fold_channel(s: &ConvShape, col: &[f32], (r0, r1): (usize, usize), dx: &mut [f32]) {
    let ow = s.output[2];
    let width = (r1 - r0) * ow;
    let stride = s.stride[2];
    for (offset, src) in offsets(s.kernel).zip(col.chunks_exact(width)) {
        for (run, r) in src.chunks_exact(ow).zip(r0..r1) {
            let start = source_start(s, r, offset);
            if stride == 1 {
                // Contiguous: a loop the compiler vectorises.
                for (d, v) in dx[start..start + ow].iter_mut().zip(run) {
                    *d += *v;
                }
            } else {
                for (d, v) in dx[start..start + (ow - 1) * stride + 1]
                    .iter_mut()
                    .step_by(stride)
                    .zip(run)
                {
                    *d += *v;
                }
            }
        }
    }
}

/// `dst (m×n) = [dst +] lhs (m×k) · rhs (k×n)`, strides in elements as (row, column).
///
/// # Safety
/// The three pointers must reach every element of their whole matrix at the given strides,
/// inside live buffers, and no other thread may access the `m×n` block of `dst` meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    parallelism: Parallelism,
) {
    // SAFETY: the caller's promise is `gemm`'s requirement.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.1,
            dst_strides.0,
            accumulate,
            lhs,
            lhs_strides.1,
            lhs_strides.0,
            rhs,
            rhs_strides.1,
            rhs_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// Forward convolution: `x` `[n, c_in, d, h, w]`, `w` `[c_out, c_in, kd, kh, kw]`, result
/// `[n, c_out, d', h', w']` (no bias).
pub fn forward(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (p_out, k) = (s.output_positions(), s.rows());
    let mut y = vec![0f32; s.batch * s.c_out * p_out];
    if s.is_empty() {
        return y;
    }
    let x = pad(s, x, s.batch * s.c_in);
    let out = SharedMut(y.as_mut_ptr());
    let ow = s.output[2];
    s.tasks().into_par_iter().for_each(|(n, r0, r1)| {
        with_unfolded(s, &x, (n, r0, r1), |col, width| {
            // Columns r0·w'..r1·w' of every output channel of item n: disjoint per task.
            let dst = out.at(n * s.c_out * p_out + r0 * ow);
            // SAFETY: `y` holds c_out rows of p_out values from `dst`'s item on, `w` is
            // c_out×k and `col` k×width; no other task writes these columns.
            unsafe {
                matmul(
                    (s.c_out, width, k),
                    dst,
                    (p_out as isize, 1),
                    false,
                    w.as_ptr(),
                    (k as isize, 1),
                    col.as_ptr(),
                    (width as isize, 1),
                    Parallelism::None,
                )
            };
        });
    });
    y
}

/// Weight gradient: `x` `[n, c_in, d, h, w]`, `grad` (of the output)
/// `[n, c_out, d', h', w']`, result `[c_out, c_in, kd, kh, kw]`.
pub fn weight_gradient(s: &ConvShape, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (p_out, k) = (s.output_positions(), s.rows());
    let size = s.c_out * k;
    if s.is_empty() {
        return vec![0f32; size];
    }
    let x = pad(s, x, s.batch * s.c_in);
    let tasks = s.tasks();
    // A fixed split of the tasks into groups (it depends on the shapes only), each summed
    // into its own partial gradient; the partials are added in group order.
    let memory_bound = (1usize << 22) / size.max(1);
    let groups = tasks
        .len()
        .min(WEIGHT_GRADIENT_GROUPS)
        .min(memory_bound)
        .max(1);
    let per_group = tasks.len().div_ceil(groups);
    let ow = s.output[2];
    let partials: Vec<Vec<f32>> = tasks
        .par_chunks(per_group)
        .map(|group| {
            let mut dw = vec![0f32; size];
            for &(n, r0, r1) in group {
                with_unfolded(s, &x, (n, r0, r1), |col, width| {
                    let g = &grad[n * s.c_out * p_out + r0 * ow..];
                    // dW (c_out×K) += G[:, chunk] (c_out×width) · colᵀ (width×K)
                    // SAFETY: `dw` is this group's own c_out×k buffer, `g` holds c_out rows
                    // of p_out values from the chunk's first column, `col` is k×width.
                    unsafe {
                        matmul(
                            (s.c_out, k, width),
                            dw.as_mut_ptr(),
                            (k as isize, 1),
                            true,
                            g.as_ptr(),
                            (p_out as isize, 1),
                            col.as_ptr(),
                            (1, width as isize),
                            Parallelism::None,
                        )
                    };
                });
            }
            dw
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut dw = partials.next().unwrap_or_else(|| vec![0f32; size]);
    for partial in partials {
        for (a, b) in dw.iter_mut().zip(&partial) {
            *a += *b;
        }
    }
    dw
}

/// Input channels folded by one task of [`input_gradient`]: about 128 rows of the unfolded
/// gradient for a 3×3×3 kernel. A function of the shapes only, so results do not depend on
/// the number of threads.
fn channels_per_task(s: &ConvShape) -> usize {
    let kernel: usize = s.kernel.iter().product();
    (128 / kernel.max(1)).clamp(1, s.c_in.max(1))
}

/// Input gradient: `w` `[c_out, c_in, kd, kh, kw]`, `grad` (of the output)
/// `[n, c_out, d', h', w']`, result `[n, c_in, d, h, w]`.
///
/// The unfolded gradient's rows of one input channel fold onto that channel alone, so each
/// task takes one batch item and a block of input channels: it computes those channels'
/// rows chunk by chunk and folds them, independent of every other task.
pub fn input_gradient(s: &ConvShape, w: &[f32], grad: &[f32]) -> Vec<f32> {
    let p_out = s.output_positions();
    let channel = s.padded().iter().product::<usize>();
    let mut dx = vec![0f32; s.batch * s.c_in * channel];
    if s.is_empty() {
        return crop(s, dx, s.batch * s.c_in);
    }
    let ow = s.output[2];
    let chunks = s.chunks();
    let kernel: usize = s.kernel.iter().product();
    let k = s.rows();
    let block = channels_per_task(s);
    let largest = chunks
        .iter()
        .map(|&(r0, r1)| (r1 - r0) * ow)
        .max()
        .unwrap_or(0);
    let tasks = dx
        .chunks_exact_mut(s.c_in * channel)
        .enumerate()
        .flat_map(|(n, item)| {
            item.chunks_mut(block * channel)
                .enumerate()
                .map(move |(b, dx_block)| (n, b * block, dx_block))
        })
        .collect::<Vec<_>>();
    tasks.into_par_iter().for_each(|(n, c0, dx_block)| {
        let channels = dx_block.len() / channel;
        let rows = channels * kernel;
        with_scratch(rows * largest, |col| {
            for &(r0, r1) in &chunks {
                let width = (r1 - r0) * ow;
                let g = &grad[n * s.c_out * p_out + r0 * ow..];
                // col (rows×width) = W[:, c0..]ᵀ (rows×c_out) · G[:, chunk] (c_out×width)
                // SAFETY: `col` is this thread's rows×width scratch, `w` from channel c0 on
                // reaches rows×c_out values at strides (1, k), `g` c_out rows of p_out.
                unsafe {
                    matmul(
                        (rows, width, s.c_out),
                        col.as_mut_ptr(),
                        (width as isize, 1),
                        false,
                        w[c0 * kernel..].as_ptr(),
                        (1, k as isize),
                        g.as_ptr(),
                        (p_out as isize, 1),
                        Parallelism::None,
                    )
                };
                for (dx_c, rows) in dx_block
                    .chunks_exact_mut(channel)
                    .zip(col[..rows * width].chunks_exact(kernel * width))
                {
                    fold_channel(s, rows, (r0, r1), dx_c);
                }
            }
        });
    });
    crop(s, dx, s.batch * s.c_in)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The convolution by its definition, one output value at a time.
    fn naive_forward(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
        let [d, h, wd] = s.input;
        let [od, oh, ow] = s.output;
        let [kd, kh, kw] = s.kernel;
        let mut y = vec![0f32; s.batch * s.c_out * od * oh * ow];
        for n in 0..s.batch {
            for o in 0..s.c_out {
                for z in 0..od {
                    for yy in 0..oh {
                        for xx in 0..ow {
                            let mut acc = 0f32;
                            for c in 0..s.c_in {
                                for a in 0..kd {
                                    for b in 0..kh {
                                        for e in 0..kw {
                                            let iz = (z * s.stride[0] + a) as isize
                                                - s.padding[0] as isize;
                                            let iy = (yy * s.stride[1] + b) as isize
                                                - s.padding[1] as isize;
                                            let ix = (xx * s.stride[2] + e) as isize
                                                - s.padding[2] as isize;
                                            if iz < 0
                                                || iy < 0
                                                || ix < 0
                                                || iz >= d as isize
                                                || iy >= h as isize
                                                || ix >= wd as isize
                                            {
                                                continue;
                                            }
                                            let xi = (((n * s.c_in + c) * d + iz as usize) * h
                                                + iy as usize)
                                                * wd
                                                + ix as usize;
                                            let wi =
                                                (((o * s.c_in + c) * kd + a) * kh + b) * kw + e;
                                            acc += x[xi] * w[wi];
                                        }
                                    }
                                }
                            }
                            y[(((n * s.c_out + o) * od + z) * oh + yy) * ow + xx] = acc;
                        }
                    }
                }
            }
        }
        y
    }

    fn values(len: usize, seed: f32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as f32 + seed) * 0.731).sin())
            .collect()
    }

    fn dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    fn shape(
        c_in: usize,
        c_out: usize,
        input: [usize; 3],
        k: usize,
        st: usize,
        p: usize,
    ) -> ConvShape {
        let kernel = [k; 3];
        let (stride, padding) = ([st; 3], [p; 3]);
        ConvShape {
            batch: 2,
            c_in,
            c_out,
            input,
            output: ConvShape::output_size(input, kernel, stride, padding).unwrap(),
            kernel,
            stride,
            padding,
        }
    }

    fn cases() -> Vec<ConvShape> {
        vec![
            shape(1, 3, [5, 6, 7], 3, 1, 1),
            shape(2, 2, [7, 5, 9], 3, 2, 1),
            shape(3, 2, [6, 7, 5], 3, 2, 0),
            shape(2, 3, [9, 4, 11], 5, 3, 2),
            shape(1, 1, [3, 3, 3], 1, 1, 0),
            shape(2, 1, [4, 5, 6], 2, 2, 0),
            // Padding larger than the input's border reach on the last axis.
            shape(1, 2, [3, 4, 2], 3, 1, 2),
            // Input channels in blocks of 4 and 2 for the input gradient's tasks.
            shape(6, 2, [4, 5, 3], 3, 1, 1),
        ]
    }

    #[test]
    fn the_forward_pass_equals_the_definition() {
        for s in cases() {
            let x = values(s.batch * s.c_in * s.input_positions(), 0.3);
            let w = values(s.c_out * s.rows(), 1.7);
            let fast = forward(&s, &x, &w);
            let slow = naive_forward(&s, &x, &w);
            for (a, b) in fast.iter().zip(&slow) {
                assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{s:?}: {a} vs {b}");
            }
        }
    }

    /// Both gradients are the adjoints of the forward pass: for any `g`,
    /// `⟨g, conv(x, w)⟩ = ⟨dX(g), x⟩ = ⟨dW(g), w⟩`.
    #[test]
    fn the_gradients_are_the_adjoints_of_the_forward_pass() {
        for s in cases() {
            let x = values(s.batch * s.c_in * s.input_positions(), 0.9);
            let w = values(s.c_out * s.rows(), 2.3);
            let g = values(s.batch * s.c_out * s.output_positions(), 5.1);
            let y = forward(&s, &x, &w);
            let reference = dot(&g, &y);
            let by_input = dot(&input_gradient(&s, &w, &g), &x);
            let by_weight = dot(&weight_gradient(&s, &x, &g), &w);
            let tolerance = 1e-4 * (1.0 + reference.abs());
            assert!(
                (by_input - reference).abs() <= tolerance,
                "{s:?}: dX {by_input} vs {reference}"
            );
            assert!(
                (by_weight - reference).abs() <= tolerance,
                "{s:?}: dW {by_weight} vs {reference}"
            );
        }
    }

    #[test]
    fn chunks_cover_every_output_row_once_and_stay_near_the_target_size() {
        let s = shape(16, 16, [16, 64, 64], 3, 1, 1);
        let chunks = s.chunks();
        assert!(chunks.len() > 1);
        assert_eq!(chunks[0].0, 0);
        assert_eq!(chunks.last().unwrap().1, 16 * 64);
        for pair in chunks.windows(2) {
            assert_eq!(pair[0].1, pair[1].0);
        }
        for &(r0, r1) in &chunks {
            assert!((r1 - r0) * s.output[2] * s.rows() <= CHUNK_ELEMENTS);
        }
    }
}
