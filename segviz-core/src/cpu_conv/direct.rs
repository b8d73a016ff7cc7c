//! Stride-1 convolutions computed directly on the padded grid with AVX-512, on CPUs that
//! have it.
//!
//! On the padded grid of [`Grid`] every kernel offset `(a, b, e)` reads the padded input at
//! a plain shift of the output column, `q + (a·ph + b)·pw + e`. So a block of 16·`NV`
//! consecutive columns and `CO` output channels is
//!
//! ```text
//! y[o, q..q+16·NV] = Σ_c Σ_(a,b,e) w[o, c, a, b, e] · xp[c, q + shift(a, b, e) ..]
//! ```
//!
//! one vector load of the padded input per `(c, offset)` and vector, and `CO·NV` fused
//! multiply-adds, each with one weight broadcast from memory. The accumulators stay in
//! registers for the whole sum and are stored once. Nothing is copied beyond the padding:
//! no unfolded matrix and none of the shifted views' `kw` copies. Below 16 input channels
//! the matrix products of the shifted views have too short an inner dimension (`c_in·kw`)
//! to run at the speed of their micro-kernels; this kernel does not depend on it.
//!
//! Every output value is summed in the same order (input channel, then kernel offset in
//! row-major order), whatever the number of threads or the block it falls in.

use rayon::prelude::*;

use super::{offsets, pad, ConvShape, Grid, SharedMut};

/// Whether this CPU runs the direct kernel (AVX-512 Foundation, detected once at run time
/// by the standard library).
pub(super) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `w` `[c_out, c_in, kd, kh, kw]` as `[c_in, kd·kh·kw, c_out]`: the weights one input
/// sample meets, for every output channel, side by side.
fn weight_by_input(s: &ConvShape, w: &[f32]) -> Vec<f32> {
    let taps = s.kernel.iter().product::<usize>();
    let mut out = vec![0f32; w.len()];
    for o in 0..s.c_out {
        for c in 0..s.c_in {
            for t in 0..taps {
                out[(c * taps + t) * s.c_out + o] = w[(o * s.c_in + c) * taps + t];
            }
        }
    }
    out
}

/// Stride-1 forward convolution (see [`super::forward`]) by the direct kernel.
///
/// # Panics
/// If the CPU lacks AVX-512 ([`available`] is false) or the stride is not 1; the dispatch
/// in [`super`] checks both.
pub(super) fn forward(s: &ConvShape, x: &[f32], w: &[f32]) -> Vec<f32> {
    assert!(available() && s.stride == [1; 3], "direct kernel: {s:?}");
    let p_out = s.output_positions();
    let len = s.batch * s.c_out * p_out;
    if s.is_empty() {
        return vec![0f32; len];
    }
    let mut y = Vec::with_capacity(len);
    let g = Grid::of(s);
    let xp = pad(s, x, s.batch * s.c_in);
    let channel = s.padded().iter().product::<usize>();
    let item = s.c_in * channel;
    let shifts: Vec<usize> = offsets(s.kernel)
        .map(|[a, b, e]| (a * g.ph + b) * g.pw + e)
        .collect();
    let wt = weight_by_input(s, w);
    let out = SharedMut(y.as_mut_ptr());
    g.tasks(s, s.c_out).into_par_iter().for_each(|(n, r0, r1)| {
        let (q0, width) = g.span(r0, r1);
        super::with_scratch(s.c_out * width, |yp| {
            let block = Block {
                c_in: s.c_in,
                c_out: s.c_out,
                channel,
                shifts: &shifts,
                weight: &wt,
            };
            // Every padded channel of item n reads up to column q0 + width − 1 + the last
            // shift, which is inside the channel (see `Grid`).
            let xn = &xp[n * item..(n + 1) * item];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `available()` was asserted; `xn` holds c_in padded channels of
            // `channel` values, and every column the block reads lies inside them; `yp`
            // holds c_out × width values.
            unsafe {
                avx512::grid_block(&block, xn.as_ptr().add(q0), width, yp.as_mut_ptr())
            };
            super::grid_rows_out(s, &g, yp, (n, r0, r1), width, out);
        });
    });
    // SAFETY: the tasks cover every grid row, and `grid_rows_out` copied each output row
    // of every channel of their batch item: all `len` values are written.
    unsafe { y.set_len(len) };
    y
}

/// Columns per task of [`weight_gradient`]: each task sweeps its columns once per group of
/// output channels, input channel and group of kernel offsets, so they should stay in the
/// second-level cache.
const WEIGHT_GRADIENT_COLUMNS: usize = 2048;

/// Stride-1 weight gradient (see [`super::weight_gradient`]) by the direct kernel:
/// `dW[o, c, t] = Σ_n Σ_q g[n, o, q] · xp[n, c, q + shift(t)]` over the padded grid, the
/// output gradient spread onto the grid with zeros in its extra columns. Each task (a
/// batch item and a block of grid rows) sums into its group's partial gradient; the groups
/// are added in order.
///
/// # Panics
/// As [`forward`].
pub(super) fn weight_gradient(s: &ConvShape, x: &[f32], grad: &[f32]) -> Vec<f32> {
    assert!(available() && s.stride == [1; 3], "direct kernel: {s:?}");
    let size = s.c_out * s.rows();
    if s.is_empty() {
        return vec![0f32; size];
    }
    let g = Grid::of(s);
    let xp = pad(s, x, s.batch * s.c_in);
    let gp = super::gradient_on_grid(s, &g, grad);
    let channel = s.padded().iter().product::<usize>();
    let item = s.c_in * channel;
    let shifts: Vec<usize> = offsets(s.kernel)
        .map(|[a, b, e]| (a * g.ph + b) * g.pw + e)
        .collect();
    let block = Block {
        c_in: s.c_in,
        c_out: s.c_out,
        channel,
        shifts: &shifts,
        weight: &[],
    };
    let rows_per_task = (WEIGHT_GRADIENT_COLUMNS / g.pw).max(1);
    let tasks = g.tasks_of(s, rows_per_task);
    super::grouped_sum(&tasks, size, |&(n, r0, r1), dw| {
        let (q0, width) = g.span(r0, r1);
        let xn = &xp[n * item..(n + 1) * item];
        let gn = &gp[n * s.c_out * g.columns..(n + 1) * s.c_out * g.columns];
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `available()` was asserted; `xn` holds c_in padded channels and every
        // column read lies inside them (see `Grid`); `gn` holds c_out rows of `columns`
        // values and the task reads columns q0..q0 + width ≤ columns of each; `dw` is the
        // group's own c_out × c_in × taps partial gradient.
        unsafe {
            avx512::weight_block(
                &block,
                xn.as_ptr().add(q0),
                gn.as_ptr().add(q0),
                g.columns,
                width,
                dw,
            )
        };
    })
}

/// What every block of one convolution shares.
struct Block<'a> {
    c_in: usize,
    c_out: usize,
    /// Values in one padded channel.
    channel: usize,
    /// The padded-input shift of every kernel offset, in row-major order.
    shifts: &'a [usize],
    /// [`weight_by_input`]'s layout.
    weight: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m512, _mm512_fmadd_ps, _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_set1_ps,
        _mm512_setzero_ps, _mm512_storeu_ps,
    };

    use super::Block;

    /// Lanes in one vector.
    const LANES: usize = 16;

    /// `y` (`c_out` rows of `width` values) = the convolution at grid columns
    /// `0..width` counted from `x`, which points at column `q0` of the first padded channel.
    ///
    /// # Safety
    /// The CPU must have AVX-512F. For every channel `c < c_in`, column `j < width` and
    /// shift, `x + c·channel + j + shift` must lie in one live buffer; `y` must hold
    /// `c_out·width` values no other thread touches.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn grid_block(b: &Block<'_>, x: *const f32, width: usize, y: *mut f32) {
        let mut o = 0;
        // Output channels in groups, wider column blocks for smaller groups, so that every
        // group keeps 16–24 accumulators in registers.
        // SAFETY: the caller's promise covers each group's channels.
        unsafe {
            while o < b.c_out {
                let left = b.c_out - o;
                if left >= 8 {
                    columns::<8, 3>(b, x, width, y, o);
                    o += 8;
                } else if left >= 4 {
                    columns::<4, 5>(b, x, width, y, o);
                    o += 4;
                } else if left >= 2 {
                    columns::<2, 8>(b, x, width, y, o);
                    o += 2;
                } else {
                    columns::<1, 8>(b, x, width, y, o);
                    o += 1;
                }
            }
        }
    }

    /// Adds to `dw` (`[c_out, c_in, taps]`) the weight gradient of grid columns
    /// `0..width` counted from `x` (column `q0` of the first padded input channel) and `g`
    /// (column `q0` of the first output-gradient row, rows `g_row` values apart).
    ///
    /// # Safety
    /// As [`grid_block`] for `x`; `g + o·g_row + j` must lie in a live buffer for every
    /// `o < c_out` and `j < width`; `dw` must hold `c_out·c_in·taps` values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weight_block(
        b: &Block<'_>,
        x: *const f32,
        g: *const f32,
        g_row: usize,
        width: usize,
        dw: &mut [f32],
    ) {
        let taps = b.shifts.len();
        let mut o = 0;
        // SAFETY: the caller's promise covers every group of channels and offsets.
        unsafe {
            while o < b.c_out {
                let left = b.c_out - o;
                let group = if left >= 8 {
                    8
                } else if left >= 4 {
                    4
                } else if left >= 2 {
                    2
                } else {
                    1
                };
                for c in 0..b.c_in {
                    let mut t = 0;
                    while t < taps {
                        let at = Sweep {
                            x: x.wrapping_add(c * b.channel),
                            g: g.wrapping_add(o * g_row),
                            g_row,
                            width,
                            first_tap: t,
                        };
                        let out = &mut dw[(o * b.c_in + c) * taps + t..];
                        let stride = b.c_in * taps;
                        t += match (group, taps - t) {
                            (8, 3..) => sweep::<8, 3>(b, &at, out, stride),
                            (8, 2) => sweep::<8, 2>(b, &at, out, stride),
                            (8, _) => sweep::<8, 1>(b, &at, out, stride),
                            (4, 3..) => sweep::<4, 3>(b, &at, out, stride),
                            (4, 2) => sweep::<4, 2>(b, &at, out, stride),
                            (4, _) => sweep::<4, 1>(b, &at, out, stride),
                            (2, 3..) => sweep::<2, 3>(b, &at, out, stride),
                            (2, 2) => sweep::<2, 2>(b, &at, out, stride),
                            (2, _) => sweep::<2, 1>(b, &at, out, stride),
                            (_, 3..) => sweep::<1, 3>(b, &at, out, stride),
                            (_, 2) => sweep::<1, 2>(b, &at, out, stride),
                            (_, _) => sweep::<1, 1>(b, &at, out, stride),
                        };
                    }
                }
                o += group;
            }
        }
    }

    /// Where one [`sweep`] reads.
    struct Sweep {
        /// Column `q0` of one padded input channel.
        x: *const f32,
        /// Column `q0` of the group's first output-gradient row.
        g: *const f32,
        g_row: usize,
        width: usize,
        first_tap: usize,
    }

    /// `out[i·stride + k] += Σ_j g[i, j] · x[j + shift(first_tap + k)]` for `OG` gradient
    /// rows and `TG` offsets, over columns `0..width` in 16 lanes, each lane summed in
    /// column order and the lanes added in order. Returns `TG`.
    #[target_feature(enable = "avx512f")]
    unsafe fn sweep<const OG: usize, const TG: usize>(
        b: &Block<'_>,
        at: &Sweep,
        out: &mut [f32],
        stride: usize,
    ) -> usize {
        let mut shifts = [0usize; TG];
        shifts.copy_from_slice(&b.shifts[at.first_tap..at.first_tap + TG]);
        let mut acc: [[__m512; TG]; OG] = [[_mm512_setzero_ps(); TG]; OG];
        let mut j = 0;
        while j < at.width {
            let left = at.width - j;
            let mask = if left >= LANES {
                u16::MAX
            } else {
                ((1u32 << left) - 1) as u16
            };
            let mut xv: [__m512; TG] = [_mm512_setzero_ps(); TG];
            for (value, &shift) in xv.iter_mut().zip(&shifts) {
                // SAFETY: columns below `width` at this shift lie in the padded channel
                // (the caller's promise); masked-off lanes are not read.
                *value = unsafe { _mm512_maskz_loadu_ps(mask, at.x.wrapping_add(j + shift)) };
            }
            for (i, row) in acc.iter_mut().enumerate() {
                // SAFETY: row i of the group, columns below `width`.
                let gv =
                    unsafe { _mm512_maskz_loadu_ps(mask, at.g.wrapping_add(i * at.g_row + j)) };
                for (a, &xval) in row.iter_mut().zip(&xv) {
                    *a = _mm512_fmadd_ps(gv, xval, *a);
                }
            }
            j += LANES;
        }
        for (i, row) in acc.iter().enumerate() {
            for (k, &a) in row.iter().enumerate() {
                let mut lanes = [0f32; LANES];
                // SAFETY: `lanes` holds 16 values.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), a) };
                out[i * stride + k] += lanes.iter().sum::<f32>();
            }
        }
        TG
    }

    /// Output channels `o..o + CO` of [`grid_block`], `NV` vectors of columns at a time;
    /// the last block's columns past `width` are masked off (neither read nor written).
    #[target_feature(enable = "avx512f")]
    unsafe fn columns<const CO: usize, const NV: usize>(
        b: &Block<'_>,
        x: *const f32,
        width: usize,
        y: *mut f32,
        o: usize,
    ) {
        let taps = b.shifts.len();
        let mut j = 0;
        while j < width {
            let mut masks = [0u16; NV];
            for (v, mask) in masks.iter_mut().enumerate() {
                let left = width.saturating_sub(j + v * LANES);
                *mask = if left >= LANES {
                    u16::MAX
                } else {
                    ((1u32 << left) - 1) as u16
                };
            }
            let mut acc: [[__m512; NV]; CO] = [[_mm512_setzero_ps(); NV]; CO];
            for c in 0..b.c_in {
                let xc = x.wrapping_add(c * b.channel + j);
                let wc = &b.weight[c * taps * b.c_out + o..];
                for (t, &shift) in b.shifts.iter().enumerate() {
                    let xs = xc.wrapping_add(shift);
                    let mut xv: [__m512; NV] = [_mm512_setzero_ps(); NV];
                    for (v, value) in xv.iter_mut().enumerate() {
                        // SAFETY: the lanes `masks[v]` keeps are columns below `width`,
                        // inside the buffer by the caller's promise; masked-off lanes are
                        // not read.
                        *value =
                            unsafe { _mm512_maskz_loadu_ps(masks[v], xs.wrapping_add(v * LANES)) };
                    }
                    let wt = &wc[t * b.c_out..][..CO];
                    for (row, &weight) in acc.iter_mut().zip(wt) {
                        let wb = _mm512_set1_ps(weight);
                        for (a, &xval) in row.iter_mut().zip(&xv) {
                            *a = _mm512_fmadd_ps(wb, xval, *a);
                        }
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (v, &a) in row.iter().enumerate() {
                    // SAFETY: row o + i of `y`, columns below `width` (masked).
                    unsafe {
                        _mm512_mask_storeu_ps(
                            y.wrapping_add((o + i) * width + j + v * LANES),
                            masks[v],
                            a,
                        )
                    };
                }
            }
            j += NV * LANES;
        }
    }
}
