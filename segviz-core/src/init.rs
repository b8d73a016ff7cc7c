//! LeCun-normal initialisation (paper §3.1), seeded and independent of the backend.
//!
//! Every convolution weight is drawn from `N(0, 1 / fan_in)` with PyTorch's fan-in
//! convention (`weight.shape[1] · kernel volume`, which for a transposed convolution is the
//! output channel count); biases start at zero; BatchNorm starts at identity and PReLU at
//! 0.25. The generator of each tensor is seeded from the model seed and the tensor's path,
//! so a tensor gets the same values whatever other heads the model has, on every backend.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::error::{CoreError, Result};
use crate::model::SegVizModel;
use crate::state::{ModelState, StateTensor};

/// Re-initialises every convolution of `model` (LeCun normal) and zeroes its biases.
pub fn lecun_normal(model: SegVizModel, seed: u64) -> Result<SegVizModel> {
    let layout = model.layout();
    let mut state = ModelState::default();
    for (path, t) in layout.tensors {
        let n: usize = t.shape.iter().product();
        let data = if t.batch_norm {
            continue;
        } else if t.shape.len() == 5 {
            let fan_in = t.shape[1] * t.shape[2] * t.shape[3] * t.shape[4];
            let std = (1.0 / fan_in as f64).sqrt();
            let normal =
                Normal::new(0.0, std).map_err(|e| CoreError::State(format!("{path}: {e}")))?;
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ stable_hash(&path));
            (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
        } else if path.ends_with(".bias") {
            vec![0.0; n]
        } else {
            // PReLU slopes keep their 0.25.
            continue;
        };
        state.tensors.insert(path, StateTensor { data, ..t });
    }
    model.load_state(&state)
}

/// FNV-1a: a hash that never changes between runs, platforms or Rust versions.
pub(crate) fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}
