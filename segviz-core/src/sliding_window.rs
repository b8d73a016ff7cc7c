//! Sliding-window inference over whole volumes of any size (MONAI
//! `sliding_window_inference`): the volume is covered by overlapping windows, the windows
//! are run through the network in batches, and their outputs are blended back with constant
//! or Gaussian weights.
//!
//! Memory stays bounded: only `sw_batch_size` windows are on the device at a time; the
//! blended output and its weights live on the host (`channels + 1` floats per voxel).

use burn::config::Config;
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// How overlapping window outputs are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlendMode {
    /// Every voxel of a window weighs the same.
    Constant,
    /// Weights fall off from the window centre (σ = `sigma_scale` · window size), so window
    /// borders, which see less context, count less.
    Gaussian,
}

/// Sliding-window settings.
#[derive(Config, Debug, PartialEq)]
pub struct SlidingWindowConfig {
    /// Window size `[d, h, w]` (MONAI `roi_size`; must suit the network's stride product).
    pub roi_size: [usize; 3],
    /// Windows run through the network at once (MONAI `sw_batch_size`).
    #[config(default = 4)]
    pub sw_batch_size: usize,
    /// Fraction of a window shared with its neighbour, in `[0, 1)`.
    #[config(default = 0.25)]
    pub overlap: f64,
    /// Blending of overlapping outputs.
    #[config(default = "BlendMode::Gaussian")]
    pub mode: BlendMode,
    /// Gaussian σ as a fraction of the window size (MONAI `sigma_scale`).
    #[config(default = 0.125)]
    pub sigma_scale: f64,
}

impl SlidingWindowConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.roi_size.contains(&0) || self.sw_batch_size == 0 {
            return Err(CoreError::config(
                "roi_size entries and sw_batch_size must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&self.overlap) {
            return Err(CoreError::config(format!(
                "overlap must be in [0, 1), got {}",
                self.overlap
            )));
        }
        if self.sigma_scale <= 0.0 {
            return Err(CoreError::config("sigma_scale must be positive"));
        }
        Ok(())
    }
}

/// Start offsets of the windows along one axis: evenly stepped, the last one flush with the
/// end; a single window at 0 when the axis is not longer than the window.
fn starts(size: usize, roi: usize, overlap: f64) -> Vec<usize> {
    if size <= roi {
        return vec![0];
    }
    let step = ((roi as f64) * (1.0 - overlap)).floor().max(1.0) as usize;
    let mut s: Vec<usize> = (0..)
        .map(|i| i * step)
        .take_while(|&x| x + roi < size)
        .collect();
    s.push(size - roi);
    s
}

/// The smallest blending weight (MONAI `compute_importance_map`): Gaussian weights are
/// clamped to `max(min weight, 1e-3)`, an absolute floor, so every voxel of a window counts.
pub const MIN_IMPORTANCE: f32 = 1e-3;

/// Blending weights of one window, C order over `roi` (MONAI `compute_importance_map`).
///
/// The Gaussian is not normalised (its peak is below 1 for an even window) and is computed
/// in single precision, as MONAI does.
fn importance(cfg: &SlidingWindowConfig, roi: [usize; 3]) -> Vec<f32> {
    let n: usize = roi.iter().product();
    match cfg.mode {
        BlendMode::Constant => vec![1.0; n],
        BlendMode::Gaussian => {
            let axis = |len: usize| -> Vec<f32> {
                let sigma = (cfg.sigma_scale * len as f64) as f32;
                let start = -(len as f32 - 1.0) / 2.0;
                (0..len)
                    .map(|i| {
                        let x = start + i as f32;
                        (x * x / (-2.0 * sigma * sigma)).exp()
                    })
                    .collect()
            };
            let (a, b, c) = (axis(roi[0]), axis(roi[1]), axis(roi[2]));
            let mut w = Vec::with_capacity(n);
            for x in &a {
                for y in &b {
                    for z in &c {
                        w.push(x * y * z);
                    }
                }
            }
            let min = w.iter().copied().fold(f32::INFINITY, f32::min);
            let floor = min.max(MIN_IMPORTANCE);
            w.iter_mut().for_each(|v| *v = v.max(floor));
            w
        }
    }
}

/// Runs `predict` over `volume` window by window and blends the outputs.
///
/// `volume` is one single-channel volume in C order over `shape`. A volume smaller than the
/// window along an axis is zero-padded as MONAI pads it (half of the missing voxels before,
/// rounded down, the rest after) and the output cropped back. The result is channel-major:
/// `channels` blocks of `shape`'s voxel count.
///
/// `predict` maps a batch `[n, 1, rd, rh, rw]` to `[n, channels, rd, rh, rw]` (for example
/// [`crate::SegVizModel::probabilities`]); it runs on `device`.
pub fn sliding_window_inference<F>(
    volume: &[f32],
    shape: [usize; 3],
    config: &SlidingWindowConfig,
    device: &Device,
    predict: F,
) -> Result<(Vec<f32>, usize)>
where
    F: Fn(Tensor<5>) -> Tensor<5>,
{
    config.validate()?;
    let n: usize = shape.iter().product();
    if volume.len() != n || n == 0 {
        return Err(CoreError::Shape {
            shape: shape.to_vec(),
            reason: format!("the volume holds {} values", volume.len()),
        });
    }
    let roi = config.roi_size;
    // The padded extent: at least one window along each axis. MONAI pads `diff / 2` voxels
    // before and `diff - diff / 2` after, so a short axis sits in the middle of the window.
    let padded = [
        shape[0].max(roi[0]),
        shape[1].max(roi[1]),
        shape[2].max(roi[2]),
    ];
    let before = [0, 1, 2].map(|a| (padded[a] - shape[a]) / 2);
    let axes = [
        starts(padded[0], roi[0], config.overlap),
        starts(padded[1], roi[1], config.overlap),
        starts(padded[2], roi[2], config.overlap),
    ];
    let mut positions: Vec<[usize; 3]> = Vec::new();
    for &x in &axes[0] {
        for &y in &axes[1] {
            for &z in &axes[2] {
                positions.push([x, y, z]);
            }
        }
    }
    let weights = importance(config, roi);
    let window_len: usize = roi.iter().product();
    let padded_len: usize = padded.iter().product();
    let mut out: Vec<f32> = Vec::new();
    let mut channels = 0;
    let mut norm = vec![0.0f32; padded_len];

    for batch in positions.chunks(config.sw_batch_size) {
        let mut input = vec![0.0f32; batch.len() * window_len];
        for (w, origin) in batch.iter().enumerate() {
            for_window(roi, |i, j, k, t| {
                // Padded coordinates back to the volume's; padding voxels stay zero.
                let inside =
                    |a: usize, p: usize| p.checked_sub(before[a]).filter(|&v| v < shape[a]);
                if let (Some(x), Some(y), Some(z)) = (
                    inside(0, origin[0] + i),
                    inside(1, origin[1] + j),
                    inside(2, origin[2] + k),
                ) {
                    input[w * window_len + t] = volume[(x * shape[1] + y) * shape[2] + z];
                }
            });
        }
        let x = Tensor::<5>::from_data(
            TensorData::new(input, [batch.len(), 1, roi[0], roi[1], roi[2]]),
            device,
        );
        let y = predict(x);
        let dims = y.dims();
        if dims[0] != batch.len() || dims[2..] != roi[..] {
            return Err(CoreError::Shape {
                shape: dims.to_vec(),
                reason: format!("the predictor must return [{}, C, {roi:?}]", batch.len()),
            });
        }
        if out.is_empty() {
            channels = dims[1];
            out = vec![0.0; channels * padded_len];
        }
        let values = y
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .map_err(|e| CoreError::State(format!("could not read window output: {e:?}")))?;
        for (w, origin) in batch.iter().enumerate() {
            for_window(roi, |i, j, k, t| {
                let p = ((origin[0] + i) * padded[1] + origin[1] + j) * padded[2] + origin[2] + k;
                let wt = weights[t];
                norm[p] += wt;
                for c in 0..channels {
                    out[c * padded_len + p] += wt * values[(w * channels + c) * window_len + t];
                }
            });
        }
    }

    // Normalise and crop the padding away.
    let mut result = vec![0.0f32; channels * n];
    for c in 0..channels {
        for i in 0..shape[0] {
            for j in 0..shape[1] {
                for k in 0..shape[2] {
                    let p =
                        ((i + before[0]) * padded[1] + j + before[1]) * padded[2] + k + before[2];
                    result[c * n + (i * shape[1] + j) * shape[2] + k] =
                        out[c * padded_len + p] / norm[p];
                }
            }
        }
    }
    Ok((result, channels))
}

/// Calls `f(i, j, k, linear index)` for every voxel of a window.
#[inline]
fn for_window(roi: [usize; 3], mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut t = 0;
    for i in 0..roi[0] {
        for j in 0..roi[1] {
            for k in 0..roi[2] {
                f(i, j, k, t);
                t += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_starts_cover_the_axis() {
        assert_eq!(starts(10, 16, 0.25), vec![0]);
        assert_eq!(starts(16, 16, 0.25), vec![0]);
        assert_eq!(starts(40, 16, 0.25), vec![0, 12, 24]);
        assert_eq!(starts(41, 16, 0.5), vec![0, 8, 16, 24, 25]);
    }
}
