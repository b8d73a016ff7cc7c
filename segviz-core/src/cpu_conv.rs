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
//! Both layouts are the tensors' own (`NCDHW` in, `NCDHW` out), so no layout copy is made
//! beyond padding the input once. At a stride along the last axis, each padded row is stored
//! grouped by column phase (`x mod stride`, see `ConvShape::column_slots`). A row of `X` is
//! then, output row by output row, one contiguous run of one padded row, at every stride: a
//! plain copy with no bounds to check, which is what makes this faster than Burn's `flex`
//! kernel (an element-by-element gather over a channels-last copy, see
//! `docs/performance.md`). The columns are processed in chunks of whole output rows, so the
//! unfolded matrix is never larger than about [`CHUNK_ELEMENTS`] values.
//!
//! Stride-1 convolutions with few input channels on large planes skip the unfolding: on the
//! padded grid every kernel offset is a plain shift of the padded input, so the samples of
//! one kernel plane `(a, b)` form a strided matrix over `kw` shifted copies of the input, and
//! `Y = Σ_(a,b) W_(a,b) · X_(a,b)` (see [`Grid`]). Their input gradient is the same kind of
//! convolution of the output gradient with the flipped, transposed weight.
//!
//! On CPUs with AVX-512, every stride-1 convolution on large planes (any channel count, a
//! kernel larger than 1×1×1) reads the padded input at those shifts directly instead
//! ([`direct`]): output channels times vectors of grid columns are summed in registers, one
//! vector load per input channel and kernel offset, so neither the shifted copies nor an
//! unfolded matrix is made; its weight gradient sweeps the grid the same way.
//!
//! The transposed convolution needs no kernel of its own: its forward pass is a
//! convolution's input gradient, its input gradient a convolution's forward pass and its
//! weight gradient a convolution's weight gradient with the roles of input and output
//! gradient swapped.
//!
//! Results depend only on the shapes, not on the number of threads: every sum runs in a
//! fixed order.

use std::cell::RefCell;
use std::sync::Mutex;

use gemm::Parallelism;
use rayon::prelude::*;

mod direct;

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

/// Buffers of the kernels' large temporaries (padded inputs, gradients on the padded grid,
/// input gradients before cropping), kept between calls: taking a fresh one every time
/// costs the kernel's page faults and zeroing again (about a fifth of an inference pass at
/// the paper's size on the machines we measured, where glibc gives freed memory back at
/// once). At most [`POOL_BUFFERS`] are kept, the largest first.
static POOL: Mutex<Vec<Vec<f32>>> = Mutex::new(Vec::new());

/// Buffers [`POOL`] keeps: more than one convolution holds at once (padded input and
/// gradient of a weight gradient, for each thread of a batch of windows).
const POOL_BUFFERS: usize = 6;

/// Frees the buffers the CPU kernels keep between calls (at most [`POOL_BUFFERS`], each
/// the size of a padded activation), e.g. when a long-running program is done with a model.
/// The next convolution allocates afresh.
pub fn release_buffers() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// A buffer taken from [`POOL`], given back when dropped.
pub(crate) struct Pooled(Vec<f32>);

impl Pooled {
    /// A kept buffer for `len` values: the smallest that holds them, else a fresh one (the
    /// largest kept is dropped then, so that the pool follows the sizes in use).
    fn take(len: usize) -> Vec<f32> {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let fits = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity());
        let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
        let buffer = pick.map(|i| pool.swap_remove(i)).unwrap_or_default();
        drop(pool);
        // Growing would copy the old values first: a fresh buffer instead.
        if buffer.capacity() >= len {
            buffer
        } else {
            Vec::with_capacity(len)
        }
    }

    /// `len` values, all zero.
    fn zeroed(len: usize) -> Pooled {
        let mut buffer = Pooled::take(len);
        buffer.clear();
        buffer.resize(len, 0.0);
        Pooled(buffer)
    }

    /// `len` values left from the buffer's earlier use (zero where it had none): for a
    /// caller that writes every value it reads.
    fn any(len: usize) -> Pooled {
        let mut buffer = Pooled::take(len);
        buffer.truncate(len);
        buffer.resize(len, 0.0);
        Pooled(buffer)
    }

    /// The buffer itself, no longer returned to the pool.
    fn into_vec(mut self) -> Vec<f32> {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for Pooled {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.0
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.0
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        if buffer.capacity() == 0 {
            return;
        }
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        pool.push(buffer);
        if pool.len() > POOL_BUFFERS {
            if let Some(smallest) = (0..pool.len()).min_by_key(|&i| pool[i].capacity()) {
                pool.swap_remove(smallest);
            }
        }
    }
}

/// A padded input: the input itself when it needs no padding, else a [`Pooled`] buffer.
enum Padded<'a> {
    Borrowed(&'a [f32]),
    Pooled(Pooled),
}

impl std::ops::Deref for Padded<'_> {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Padded::Borrowed(x) => x,
            Padded::Pooled(p) => p,
        }
    }
}

/// For every input row `(z, y)` of one channel, where it starts in the volume and where its
/// padded row starts in the padded volume.
fn row_starts(s: &ConvShape) -> impl Iterator<Item = (usize, usize)> + '_ {
    let [_, ph, pw] = s.padded();
    let [d, h, w] = s.input;
    let [p0, p1, _] = s.padding;
    (0..d).flat_map(move |z| (0..h).map(move |y| ((z * h + y) * w, ((z + p0) * ph + y + p1) * pw)))
}

impl ConvShape {
    /// Where each column `x` of a padded row is stored in the padded layout of [`pad`]: `x`
    /// itself at stride 1 along the last axis; at stride `s`, the row's columns grouped by
    /// `x mod s` (all columns `≡ 0`, then all `≡ 1`, …), so that the samples one output row
    /// reads at one kernel offset, `e, e + s, e + 2s, …`, lie next to each other.
    fn column_slots(&self) -> Vec<usize> {
        let pw = self.padded()[2];
        let st = self.stride[2].max(1);
        let mut slots = vec![0; pw];
        let mut next = 0;
        for phase in 0..st.min(pw) {
            for x in (phase..pw).step_by(st) {
                slots[x] = next;
                next += 1;
            }
        }
        slots
    }

    /// Whether [`pad`] has anything to do: padding, or a stride along the last axis.
    fn needs_layout(&self) -> bool {
        self.padding != [0; 3] || self.stride[2] > 1
    }
}

/// `x` (`channels` volumes of the input's size, one after the other) with `padding` zeros
/// on both sides of every axis, each padded row laid out by [`ConvShape::column_slots`];
/// `x` itself when there is neither padding nor a stride along the last axis.
fn pad<'a>(s: &ConvShape, x: &'a [f32], channels: usize) -> Padded<'a> {
    let (inner, w) = (s.input_positions(), s.input[2]);
    if !s.needs_layout() {
        return Padded::Borrowed(&x[..channels * inner]);
    }
    let padded = s.padded().iter().product::<usize>();
    let slots = s.column_slots();
    let slots = &slots[s.padding[2]..s.padding[2] + w];
    let ([_, ph, pw], [p0, p1, p2], [d, h, _]) = (s.padded(), s.padding, s.input);
    // Every padded row is zeroed just before its values are written, while it is in the
    // cache: no separate pass zeroes the whole buffer.
    let mut out = Pooled::any(channels * padded);
    out.par_chunks_mut(padded)
        .zip(x.par_chunks(inner))
        .for_each(|(to, from)| {
            for (r, row) in to.chunks_exact_mut(pw).enumerate() {
                row.fill(0.0);
                let (z, y) = (r / ph, r % ph);
                if z < p0 || z >= p0 + d || y < p1 || y >= p1 + h {
                    continue;
                }
                let i = ((z - p0) * h + (y - p1)) * w;
                let from = &from[i..i + w];
                if s.stride[2] == 1 {
                    row[p2..p2 + w].copy_from_slice(from);
                } else {
                    for (v, &slot) in from.iter().zip(slots) {
                        row[slot] = *v;
                    }
                }
            }
        });
    Padded::Pooled(out)
}

/// The inverse of [`pad`]: the inside of `channels` padded volumes.
fn crop(s: &ConvShape, padded: Pooled, channels: usize) -> Vec<f32> {
    if !s.needs_layout() {
        return padded.into_vec();
    }
    let (inner, w) = (s.input_positions(), s.input[2]);
    let slots = s.column_slots();
    let slots = &slots[s.padding[2]..s.padding[2] + w];
    // Every row of every channel is written below, so the output is not zeroed first.
    let len = channels * inner;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    out.spare_capacity_mut()[..len]
        .par_chunks_mut(inner)
        .zip(padded.par_chunks(s.padded().iter().product::<usize>()))
        .for_each(|(to, from)| {
            for (i, o) in row_starts(s) {
                let to = &mut to[i..i + w];
                if s.stride[2] == 1 {
                    let o = o + s.padding[2];
                    for (v, &f) in to.iter_mut().zip(&from[o..o + w]) {
                        v.write(f);
                    }
                } else {
                    let from = &from[o..o + s.padded()[2]];
                    for (v, &slot) in to.iter_mut().zip(slots) {
                        v.write(from[slot]);
                    }
                }
            }
        });
    // SAFETY: `row_starts` gives every row of the input's size once, and each row's `w`
    // values were written, in every channel.
    unsafe { out.set_len(len) };
    out
}

/// For output rows `r0..r1` (`(z, y)` pairs), where each one's samples at kernel offset
/// `(0, 0, 0)` start in a padded channel; offset `(a, b, e)` adds [`offset_start`].
fn row_bases(s: &ConvShape, (r0, r1): (usize, usize)) -> Vec<usize> {
    let [_, ph, pw] = s.padded();
    (r0..r1)
        .map(|r| {
            let (z, y) = (r / s.output[1], r % s.output[1]);
            (z * s.stride[0] * ph + y * s.stride[1]) * pw
        })
        .collect()
}

/// What kernel offset `(a, b, e)` adds to a [`row_bases`] entry, `slots` being
/// [`ConvShape::column_slots`]: the samples of one output row then lie at
/// `start..start + w'` in the padded layout, at every stride.
fn offset_start(s: &ConvShape, slots: &[usize], [a, b, e]: [usize; 3]) -> usize {
    let [_, ph, pw] = s.padded();
    (a * ph + b) * pw + slots[e]
}

/// Fills `col` (`rows() × (r1 − r0)·w'`, row-major) with the unfolded input of one batch
/// item, `x` being its channels laid out by [`pad`], for output rows `r0..r1`: one copy of
/// `w'` contiguous values per output row and kernel offset.
fn unfold(s: &ConvShape, x: &[f32], (r0, r1): (usize, usize), col: &mut [f32]) {
    let ow = s.output[2];
    let width = (r1 - r0) * ow;
    let channel = s.padded().iter().product::<usize>();
    let (bases, slots) = (row_bases(s, (r0, r1)), s.column_slots());
    let mut rows = col[..s.rows() * width].chunks_exact_mut(width);
    for c in 0..s.c_in {
        let xc = &x[c * channel..(c + 1) * channel];
        for (offset, dst) in offsets(s.kernel).zip(&mut rows) {
            let shift = offset_start(s, &slots, offset);
            for (out, base) in dst.chunks_exact_mut(ow).zip(&bases) {
                let start = base + shift;
                out.copy_from_slice(&xc[start..start + ow]);
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
/// them out) for the output rows whose [`row_bases`] are `bases` back onto that channel's
/// padded input gradient (laid out as [`pad`] lays out the input, `slots` being
/// [`ConvShape::column_slots`]): contiguous runs of `w'` values, a loop the compiler
/// vectorises.
fn fold_channel(s: &ConvShape, col: &[f32], (bases, slots): (&[usize], &[usize]), dx: &mut [f32]) {
    let ow = s.output[2];
    let width = bases.len() * ow;
    for (offset, src) in offsets(s.kernel).zip(col.chunks_exact(width)) {
        let shift = offset_start(s, slots, offset);
        for (run, base) in src.chunks_exact(ow).zip(bases) {
            let start = base + shift;
            for (d, v) in dx[start..start + ow].iter_mut().zip(run) {
                *d += *v;
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
    match s.forward_kernel() {
        Kernel::Direct => direct::forward(s, x, w),
        Kernel::Shifted => forward_shifted(s, x, w),
        Kernel::Unfolded => forward_unfolded(s, x, w),
    }
}

/// [`forward`] through the unfolded input.
fn forward_unfolded(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let (p_out, k) = (s.output_positions(), s.rows());
    let len = s.batch * s.c_out * p_out;
    if s.is_empty() {
        return vec![0f32; len];
    }
    let mut y = Vec::with_capacity(len);
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
    // SAFETY: the tasks cover every output row `(z, y)` of every batch item, and each wrote
    // all c_out × width values of its rows (a product that does not read its destination).
    unsafe { y.set_len(len) };
    y
}

/// Weight gradient: `x` `[n, c_in, d, h, w]`, `grad` (of the output)
/// `[n, c_out, d', h', w']`, result `[c_out, c_in, kd, kh, kw]`.
pub fn weight_gradient(s: &ConvShape, x: &[f32], grad: &[f32]) -> Vec<f32> {
    match s.forward_kernel() {
        Kernel::Direct => direct::weight_gradient(s, x, grad),
        Kernel::Shifted => weight_gradient_shifted(s, x, grad),
        Kernel::Unfolded => weight_gradient_unfolded(s, x, grad),
    }
}

/// [`weight_gradient`] through the unfolded input.
fn weight_gradient_unfolded(s: &ConvShape, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (p_out, k) = (s.output_positions(), s.rows());
    let size = s.c_out * k;
    if s.is_empty() {
        return vec![0f32; size];
    }
    let x = pad(s, x, s.batch * s.c_in);
    let ow = s.output[2];
    grouped_sum(&s.tasks(), size, |&(n, r0, r1), dw| {
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
    })
}

/// `Σ_task add(task, partial)` over `size` values: the tasks are split into at most
/// [`WEIGHT_GRADIENT_GROUPS`] groups by a rule that depends on the counts only, each group
/// sums into its own partial in parallel, and the partials are added in group order, so the
/// result does not depend on the number of threads.
fn grouped_sum<T: Sync>(tasks: &[T], size: usize, add: impl Fn(&T, &mut [f32]) + Sync) -> Vec<f32> {
    let memory_bound = (1usize << 22) / size.max(1);
    let groups = tasks
        .len()
        .min(WEIGHT_GRADIENT_GROUPS)
        .min(memory_bound)
        .max(1);
    let per_group = tasks.len().div_ceil(groups).max(1);
    let partials: Vec<Vec<f32>> = tasks
        .par_chunks(per_group)
        .map(|group| {
            let mut partial = vec![0f32; size];
            for task in group {
                add(task, &mut partial);
            }
            partial
        })
        .collect();
    let mut partials = partials.into_iter();
    let mut sum = partials.next().unwrap_or_else(|| vec![0f32; size]);
    for partial in partials {
        for (a, b) in sum.iter_mut().zip(&partial) {
            *a += *b;
        }
    }
    sum
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
///
/// At stride 1 with `padding < kernel` on every axis, the input gradient is itself a
/// stride-1 convolution of the output gradient (padded by `kernel − 1 − padding`) with the
/// flipped, transposed weight; it runs as one when [`forward`] would use shifted views for it.
pub fn input_gradient(s: &ConvShape, w: &[f32], grad: &[f32]) -> Vec<f32> {
    if let Some(adjoint) = s.adjoint() {
        match adjoint.forward_kernel() {
            Kernel::Direct => return direct::forward(&adjoint, grad, &flip_transpose(s, w)),
            Kernel::Shifted => return forward_shifted(&adjoint, grad, &flip_transpose(s, w)),
            Kernel::Unfolded => {}
        }
    }
    input_gradient_unfolded(s, w, grad)
}

/// [`input_gradient`] through the unfolded gradient, folded back.
fn input_gradient_unfolded(s: &ConvShape, w: &[f32], grad: &[f32]) -> Vec<f32> {
    let p_out = s.output_positions();
    let channel = s.padded().iter().product::<usize>();
    let mut dx = Pooled::zeroed(s.batch * s.c_in * channel);
    if s.is_empty() {
        return crop(s, dx, s.batch * s.c_in);
    }
    let ow = s.output[2];
    let chunks = s.chunks();
    let kernel: usize = s.kernel.iter().product();
    let k = s.rows();
    let block = channels_per_task(s);
    let slots = s.column_slots();
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
                let bases = row_bases(s, (r0, r1));
                for (dx_c, rows) in dx_block
                    .chunks_exact_mut(channel)
                    .zip(col[..rows * width].chunks_exact(kernel * width))
                {
                    fold_channel(s, rows, (&bases, &slots), dx_c);
                }
            }
        });
    });
    crop(s, dx, s.batch * s.c_in)
}

/// Largest ratio of padded-grid columns to output positions (`(h+2p)(w+2p) / h'w'`) at which
/// a stride-1 convolution runs on shifted views (see [`forward_shifted`]) rather than on the
/// unfolded input: the views compute every padded-grid column and drop the extra ones, so
/// small planes waste more than they save.
const SHIFTED_WASTE: f64 = 1.6;

/// Most input channels for which a stride-1 convolution runs on shifted views. With more,
/// the views measured slower than the unfolded input (criterion, `benches/convolution.rs`,
/// forward and backward at 64×64×16 with AVX-512 products: 16 channels 21 % faster on views,
/// 32 channels 21 % slower). The products read the views' rows in place, `c_in·kw` rows a
/// whole padded channel apart (`gemm` does not pack them for so few output channels). Why
/// that loses with more rows is open: transparent huge pages, which would remove TLB misses,
/// changed nothing (64 channels at 16×16×4: 7.4 ms on views either way, 5.9 unfolded).
const SHIFTED_MAX_INPUT_CHANNELS: usize = 16;

/// Which kernel computes a forward pass (see [`ConvShape::forward_kernel`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// [`direct::forward`].
    Direct,
    /// [`forward_shifted`].
    Shifted,
    /// [`forward_unfolded`].
    Unfolded,
}

/// Target size (in values) of one task's block of the output (or of its gradient) on the
/// padded grid in the shifted-view kernels.
const SHIFTED_CHUNK_ELEMENTS: usize = 1 << 17;

impl ConvShape {
    /// Whether this convolution runs on shifted views of its input: stride 1, few input
    /// channels and planes large enough that the padded grid wastes little (see
    /// [`SHIFTED_WASTE`], [`SHIFTED_MAX_INPUT_CHANNELS`]).
    fn shifted_views_pay(&self) -> bool {
        self.on_large_planes() && self.c_in <= SHIFTED_MAX_INPUT_CHANNELS
    }

    /// Whether this is a stride-1 convolution whose padded grid wastes at most
    /// [`SHIFTED_WASTE`] of its columns.
    fn on_large_planes(&self) -> bool {
        if self.stride != [1; 3] || self.is_empty() {
            return false;
        }
        let [_, ph, pw] = self.padded();
        let [_, oh, ow] = self.output;
        (ph * pw) as f64 <= SHIFTED_WASTE * (oh * ow) as f64
    }

    /// The kernel that computes this convolution's forward pass and weight gradient (and,
    /// through [`ConvShape::adjoint`], its input gradient): the direct one for every
    /// stride-1 convolution on large planes where the CPU has AVX-512, unless its kernel is
    /// 1×1×1 (a plain matrix product); shifted views for those with few input channels
    /// elsewhere; the unfolded input for the rest. Measured on the paper-size U-Net, the
    /// direct kernel was faster at every such layer: forward 16→16 channels at 64×64×16
    /// 2.1×, 32→32 at 32×32×8 1.3×; weight gradient 1.4×, 1.2× and 2→2 at 128×128×32 2×.
    /// On smaller planes it lost (forward 64→64 at 16×16×4: 6.1 against 5.6 ms unfolded),
    /// and so did the 1×1×1 residual convolutions (weight gradient 2.2 against 1.1 ms).
    fn forward_kernel(&self) -> Kernel {
        if self.on_large_planes() && self.kernel != [1; 3] && direct::available() {
            Kernel::Direct
        } else if self.shifted_views_pay() {
            Kernel::Shifted
        } else {
            Kernel::Unfolded
        }
    }

    /// The stride-1 convolution whose forward pass is this one's input gradient: output
    /// gradient in, input gradient out, padded by `kernel − 1 − padding`; `None` at other
    /// strides or when `padding ≥ kernel` on an axis.
    fn adjoint(&self) -> Option<ConvShape> {
        if self.stride != [1; 3] {
            return None;
        }
        let mut padding = [0; 3];
        for (i, p) in padding.iter_mut().enumerate() {
            *p = (self.kernel[i].checked_sub(1)?).checked_sub(self.padding[i])?;
        }
        Some(ConvShape {
            batch: self.batch,
            c_in: self.c_out,
            c_out: self.c_in,
            input: self.output,
            output: self.input,
            kernel: self.kernel,
            stride: [1; 3],
            padding,
        })
    }
}

/// `w` `[c_out, c_in, kd, kh, kw]` flipped along every spatial axis and with its channel axes
/// swapped: the weight of [`ConvShape::adjoint`].
fn flip_transpose(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let [kd, kh, kw] = s.kernel;
    let kernel = kd * kh * kw;
    let mut out = vec![0f32; w.len()];
    for o in 0..s.c_out {
        for c in 0..s.c_in {
            let from = &w[(o * s.c_in + c) * kernel..][..kernel];
            let to = &mut out[(c * s.c_out + o) * kernel..][..kernel];
            for (t, f) in to.iter_mut().zip(from.iter().rev()) {
                *t = *f;
            }
        }
    }
    out
}

/// The padded grid of a stride-1 convolution. Column `q = (z·ph + y)·pw + x` stands for
/// output position `(z, y, x)` when `y < h'` and `x < w'` (other columns are computed and
/// dropped); the input sample at kernel offset `(a, b, e)` is then padded value
/// `q + (a·ph + b)·pw + e`, a plain shift, so for each offset the samples of all columns form
/// one contiguous run of the padded input.
///
/// The offsets `e` of the kernel's last axis become rows of [`shifted_copies`]; the planes
/// `(a, b)` they repeat over are one matrix product each. (Folding the last two axes into the
/// rows, 9 copies and 3 products, measured slower at every layer of the paper-size U-Net with
/// 16 or fewer input channels.)
struct Grid {
    /// Padded height and width.
    ph: usize,
    pw: usize,
    /// Rows `(z, y)` of the grid: `d'·ph`.
    rows: usize,
    /// Columns up to the last output position, inclusive.
    columns: usize,
    /// Length of one row of [`shifted_copies`]: the padded volume less `kw − 1`.
    row_len: usize,
}

impl Grid {
    fn of(s: &ConvShape) -> Grid {
        let [pd, ph, pw] = s.padded();
        let [od, oh, ow] = s.output;
        Grid {
            ph,
            pw,
            rows: od * ph,
            columns: ((od - 1) * ph + oh - 1) * pw + ow,
            row_len: pd * ph * pw - (s.kernel[2] - 1),
        }
    }

    /// Where kernel plane `ab = a·kh + b` starts reading, relative to column `q`.
    fn shift(&self, s: &ConvShape, ab: usize) -> usize {
        let (a, b) = (ab / s.kernel[1], ab % s.kernel[1]);
        (a * self.ph + b) * self.pw
    }

    /// `(batch item, first grid row, end grid row)` for every task: blocks of whole grid
    /// rows holding at most about [`SHIFTED_CHUNK_ELEMENTS`] values of a `channels`-row
    /// matrix (at least one row).
    fn tasks(&self, s: &ConvShape, channels: usize) -> Vec<(usize, usize, usize)> {
        let step = (SHIFTED_CHUNK_ELEMENTS / (channels * self.pw).max(1)).clamp(1, self.rows);
        self.tasks_of(s, step)
    }

    /// [`Grid::tasks`] with `step` grid rows a task (at least one, the last task fewer).
    fn tasks_of(&self, s: &ConvShape, step: usize) -> Vec<(usize, usize, usize)> {
        let step = step.clamp(1, self.rows);
        (0..s.batch)
            .flat_map(|n| {
                (0..self.rows)
                    .step_by(step)
                    .map(move |r| (n, r, (r + step).min(self.rows)))
            })
            .filter(|&(_, r0, _)| r0 * self.pw < self.columns)
            .collect()
    }

    /// Columns `q0..q0 + width` of the grid rows `r0..r1`.
    fn span(&self, r0: usize, r1: usize) -> (usize, usize) {
        let q0 = r0 * self.pw;
        (q0, (r1 * self.pw).min(self.columns) - q0)
    }
}

/// For every padded channel `x_c` of `xp`, one copy per offset `e < kw` shifted by `e`: row
/// `(c, e)` of a batch item holds `x_c[q + e]` for `q < row_len`. With the rows `(c, e)` at
/// one stride, the samples of plane `(a, b)` for columns `q0..` are one strided matrix
/// (`c_in·kw` rows) starting at column `q0 + shift(a, b)`. `xp` itself when `kw = 1`.
fn shifted_copies<'a>(s: &ConvShape, g: &Grid, xp: &'a [f32]) -> Padded<'a> {
    let kw = s.kernel[2];
    if kw == 1 {
        return Padded::Borrowed(xp);
    }
    let channel = s.padded().iter().product::<usize>();
    let mut out = Pooled::any(s.batch * s.c_in * kw * g.row_len);
    out.par_chunks_mut(kw * g.row_len)
        .zip(xp.par_chunks(channel))
        .for_each(|(rows, xc)| {
            for (e, row) in rows.chunks_exact_mut(g.row_len).enumerate() {
                row.copy_from_slice(&xc[e..e + g.row_len]);
            }
        });
    Padded::Pooled(out)
}

/// `w` `[c_out, c_in, kd, kh, kw]` as one `[c_out, c_in·kw]` matrix per kernel plane
/// `(a, b)`, planes in row-major order.
fn weight_by_plane(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; w.len()];
    for_each_plane_run(s, |from, to| {
        out[to..to + s.kernel[2]].copy_from_slice(&w[from..][..s.kernel[2]])
    });
    out
}

/// The inverse of [`weight_by_plane`].
fn weight_from_planes(s: &ConvShape, by_plane: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; by_plane.len()];
    for_each_plane_run(s, |from, to| {
        out[from..from + s.kernel[2]].copy_from_slice(&by_plane[to..][..s.kernel[2]])
    });
    out
}

/// `f(weight offset, plane-layout offset)` for every run of `kw` values `(o, c, a, b, ·)`:
/// where it starts in `[c_out, c_in, kd, kh, kw]` and in [`weight_by_plane`]'s layout.
fn for_each_plane_run(s: &ConvShape, mut f: impl FnMut(usize, usize)) {
    let [kd, kh, kw] = s.kernel;
    let kk = s.c_in * kw;
    for o in 0..s.c_out {
        for c in 0..s.c_in {
            for ab in 0..kd * kh {
                f(
                    ((o * s.c_in + c) * kd * kh + ab) * kw,
                    (ab * s.c_out + o) * kk + c * kw,
                );
            }
        }
    }
}

/// Stride-1 [`forward`] on shifted views: per task (a batch item and a block of grid rows),
/// `Y = Σ_(a,b) W_(a,b) · X_(a,b)` over the padded grid, `W_(a,b)` being `c_out × c_in·kw`
/// and `X_(a,b)` the strided view of [`shifted_copies`] for plane `(a, b)`; then the grid's
/// output columns are copied out. Nothing is unfolded beyond the `kw` shifted copies.
fn forward_shifted(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    let p_out = s.output_positions();
    let len = s.batch * s.c_out * p_out;
    if s.is_empty() {
        return vec![0f32; len];
    }
    let mut y = Vec::with_capacity(len);
    let g = Grid::of(s);
    let xp = pad(s, x, s.batch * s.c_in);
    let x3 = shifted_copies(s, &g, &xp);
    let kk = s.c_in * s.kernel[2];
    let item = kk * g.row_len;
    let planes = weight_by_plane(s, w);
    let out = SharedMut(y.as_mut_ptr());
    g.tasks(s, s.c_out).into_par_iter().for_each(|(n, r0, r1)| {
        let (q0, width) = g.span(r0, r1);
        with_scratch(s.c_out * width, |yp| {
            for (ab, wk) in planes.chunks_exact(s.c_out * kk).enumerate() {
                let view = &x3[n * item + q0 + g.shift(s, ab)..];
                // SAFETY: `yp` is c_out×width; `wk` is c_out×kk; `view` reaches kk rows
                // of row_len values, of which it reads `width` from each row's start,
                // and `q0 + shift + width ≤ row_len` (see `Grid`).
                unsafe {
                    matmul(
                        (s.c_out, width, kk),
                        yp.as_mut_ptr(),
                        (width as isize, 1),
                        ab > 0,
                        wk.as_ptr(),
                        (kk as isize, 1),
                        view.as_ptr(),
                        (g.row_len as isize, 1),
                        Parallelism::None,
                    )
                };
            }
            grid_rows_out(s, &g, yp, (n, r0, r1), width, out);
        });
    });
    // SAFETY: the tasks cover every grid row, and `grid_rows_out` copied each output row
    // of every channel of their batch item: all `len` values are written.
    unsafe { y.set_len(len) };
    y
}

/// Copies the output positions among grid rows `r0..r1` of `yp` (`c_out` rows of `width`
/// grid columns from the first column of row `r0`) into batch item `n` of the output `out`
/// (`[n, c_out, d', h', w']`).
fn grid_rows_out(
    s: &ConvShape,
    g: &Grid,
    yp: &[f32],
    (n, r0, r1): (usize, usize, usize),
    width: usize,
    out: SharedMut,
) {
    let p_out = s.output_positions();
    let [_, oh, ow] = s.output;
    for r in r0..r1 {
        let (z, row) = (r / g.ph, r % g.ph);
        if row >= oh {
            continue;
        }
        let from = (r - r0) * g.pw;
        for o in 0..s.c_out {
            let to = (n * s.c_out + o) * p_out + (z * oh + row) * ow;
            let src = &yp[o * width + from..][..ow];
            // SAFETY: output row (z, row) of channel o of item n belongs to the task of
            // grid rows r0..r1 alone and lies inside the output.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), out.at(to), ow) };
        }
    }
}

/// `grad` `[n, c_out, d', h', w']` on the padded grid of `g`: `n·c_out` rows of `columns`
/// values, zero in the columns that are not output positions.
fn gradient_on_grid(s: &ConvShape, g: &Grid, grad: &[f32]) -> Pooled {
    let [_, oh, ow] = s.output;
    let mut out = Pooled::any(s.batch * s.c_out * g.columns);
    out.par_chunks_mut(g.columns)
        .zip(grad.par_chunks(s.output_positions()))
        .for_each(|(to, from)| {
            // Grid rows in order, each zeroed and, when it is an output row, filled.
            for (r, row) in to.chunks_mut(g.pw).enumerate() {
                row.fill(0.0);
                let (z, y) = (r / g.ph, r % g.ph);
                if y < oh {
                    row[..ow].copy_from_slice(&from[(z * oh + y) * ow..][..ow]);
                }
            }
        });
    out
}

/// Stride-1 [`weight_gradient`] on shifted views: `dW_(a,b) = Σ G · X_(a,b)ᵀ` over the padded
/// grid, the output gradient being zero in the grid's extra columns. Groups of tasks sum
/// into their own partial gradients, added in a fixed order.
fn weight_gradient_shifted(s: &ConvShape, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let size = s.c_out * s.rows();
    if s.is_empty() {
        return vec![0f32; size];
    }
    let g = Grid::of(s);
    let xp = pad(s, x, s.batch * s.c_in);
    let x3 = shifted_copies(s, &g, &xp);
    let gp = gradient_on_grid(s, &g, grad);
    let kk = s.c_in * s.kernel[2];
    let item = kk * g.row_len;
    let dw = grouped_sum(&g.tasks(s, s.c_out.max(kk)), size, |&(n, r0, r1), dw| {
        let (q0, width) = g.span(r0, r1);
        let gn = &gp[n * s.c_out * g.columns + q0..];
        for (ab, dwk) in dw.chunks_exact_mut(s.c_out * kk).enumerate() {
            let view = &x3[n * item + q0 + g.shift(s, ab)..];
            // dW_(a,b) (c_out×kk) += G (c_out×width) · X_(a,b)ᵀ (width×kk)
            // SAFETY: `dwk` is this group's own c_out×kk block; `gn` holds c_out rows
            // of `columns` values from column q0; `view` as in `forward_shifted`.
            unsafe {
                matmul(
                    (s.c_out, kk, width),
                    dwk.as_mut_ptr(),
                    (kk as isize, 1),
                    true,
                    gn.as_ptr(),
                    (g.columns as isize, 1),
                    view.as_ptr(),
                    (1, g.row_len as isize),
                    Parallelism::None,
                )
            };
        }
    });
    weight_from_planes(s, &dw)
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

    /// Stride-1 shapes for the shifted-view kernels, whatever their padded grid wastes:
    /// several kernel sizes and paddings (up to `kernel − 1`), odd planes, one or many tasks.
    fn stride_one_cases() -> Vec<ConvShape> {
        vec![
            shape(1, 3, [5, 6, 7], 3, 1, 1),
            shape(3, 2, [4, 9, 8], 3, 1, 0),
            shape(2, 3, [6, 5, 7], 5, 1, 2),
            shape(2, 2, [3, 4, 5], 2, 1, 1),
            shape(1, 2, [3, 4, 2], 3, 1, 2),
            shape(5, 4, [3, 7, 6], 1, 1, 0),
            // Many grid rows: several tasks per batch item.
            shape(4, 5, [6, 40, 37], 3, 1, 1),
        ]
    }

    /// `a` equals `b` value by value to a relative 1e-4.
    fn close_values(s: &ConvShape, a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{s:?}: {what}");
        for (u, v) in a.iter().zip(b) {
            assert!(
                (u - v).abs() <= 1e-4 * (1.0 + v.abs()),
                "{s:?} {what}: {u} vs {v}"
            );
        }
    }

    #[test]
    fn shifted_views_compute_the_same_convolution_and_gradients() {
        for s in stride_one_cases() {
            let x = values(s.batch * s.c_in * s.input_positions(), 0.4);
            let w = values(s.c_out * s.rows(), 1.1);
            let g = values(s.batch * s.c_out * s.output_positions(), 3.7);
            let close = |a: &[f32], b: &[f32], what: &str| close_values(&s, a, b, what);
            close(
                &forward_shifted(&s, &x, &w),
                &naive_forward(&s, &x, &w),
                "forward",
            );
            close(
                &weight_gradient_shifted(&s, &x, &g),
                &weight_gradient_unfolded(&s, &x, &g),
                "weight gradient",
            );
            let adjoint = s.adjoint().expect("stride 1, padding < kernel");
            close(
                &forward_shifted(&adjoint, &g, &flip_transpose(&s, &w)),
                &input_gradient_unfolded(&s, &w, &g),
                "input gradient",
            );
        }
    }

    #[test]
    fn the_direct_kernel_computes_the_same_convolution_and_gradients() {
        if !direct::available() {
            eprintln!(
                "this CPU lacks AVX-512: the direct kernel is not used here, nothing to test"
            );
            return;
        }
        let mut cases = stride_one_cases();
        // Output channel counts that use every group (8, 4, 2, 1) and column blocks that end
        // in every way (rows of 21 and 33 padded columns, partial masks).
        cases.extend([
            shape(3, 19, [4, 9, 19], 3, 1, 1),
            shape(17, 7, [3, 6, 31], 3, 1, 1),
            shape(2, 13, [5, 5, 5], 3, 1, 1),
            shape(16, 16, [6, 20, 20], 3, 1, 1),
        ]);
        for s in cases {
            let x = values(s.batch * s.c_in * s.input_positions(), 0.4);
            let w = values(s.c_out * s.rows(), 1.1);
            let g = values(s.batch * s.c_out * s.output_positions(), 3.7);
            let close = |a: &[f32], b: &[f32], what: &str| close_values(&s, a, b, what);
            close(
                &direct::forward(&s, &x, &w),
                &naive_forward(&s, &x, &w),
                "forward",
            );
            let adjoint = s.adjoint().expect("stride 1, padding < kernel");
            close(
                &direct::forward(&adjoint, &g, &flip_transpose(&s, &w)),
                &input_gradient_unfolded(&s, &w, &g),
                "input gradient",
            );
            close(
                &direct::weight_gradient(&s, &x, &g),
                &weight_gradient_unfolded(&s, &x, &g),
                "weight gradient",
            );
        }
    }

    #[test]
    fn only_stride_one_convolutions_on_large_planes_take_shifted_views() {
        assert!(shape(16, 16, [16, 64, 64], 3, 1, 1).shifted_views_pay());
        assert!(!shape(16, 16, [16, 64, 64], 3, 2, 1).shifted_views_pay());
        assert!(!shape(32, 32, [16, 64, 64], 3, 1, 1).shifted_views_pay());
        // A 4×4 plane padded to 6×6 computes 2.25 times the columns it keeps.
        assert!(!shape(16, 16, [4, 4, 4], 3, 1, 1).shifted_views_pay());
        assert!(shape(1, 1, [3, 3, 3], 3, 1, 3).adjoint().is_none());
        assert!(shape(1, 1, [6, 6, 6], 3, 2, 1).adjoint().is_none());
    }

    /// Pooled buffers come back zeroed whatever they held, the pool keeps at most
    /// `POOL_BUFFERS` of them, and `release_buffers` empties it. (The pool is shared by the
    /// tests running at the same time, so only what no other test can undo is checked.)
    #[test]
    fn pooled_buffers_are_zeroed_bounded_and_released() {
        {
            let mut a = Pooled::zeroed(1000);
            a.fill(7.0);
        }
        for _ in 0..3 {
            let b = Pooled::zeroed(900);
            assert!(b.iter().all(|&v| v == 0.0));
            assert_eq!(b.len(), 900);
        }
        let many: Vec<Pooled> = (0..POOL_BUFFERS + 4)
            .map(|i| Pooled::zeroed(10 + i))
            .collect();
        drop(many);
        assert!(POOL.lock().unwrap().len() <= POOL_BUFFERS);
        let v = Pooled::zeroed(64).into_vec();
        assert_eq!(v, vec![0.0; 64]);
        release_buffers();
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
