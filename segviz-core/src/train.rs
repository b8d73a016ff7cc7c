//! Training utilities: the paper's optimiser (Adam, lr 1e-4), cosine annealing, one
//! optimisation step, and freezing for fine-tuning (see
//! [`crate::SegVizModel::freeze_representation`]).

use burn::config::Config;
use burn::module::Module;
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::Tensor;

/// Optimiser settings (paper §3.1: Adam, learning rate 1e-4).
#[derive(Config, Debug, PartialEq)]
pub struct OptimizerConfig {
    /// Initial learning rate.
    #[config(default = 1e-4)]
    pub learning_rate: f64,
    /// Adam's epsilon; 1e-8 as in PyTorch (Burn's own default is 1e-5).
    #[config(default = 1e-8)]
    pub epsilon: f32,
    /// Final learning rate of the cosine schedule.
    #[config(default = 0.0)]
    pub min_learning_rate: f64,
}

impl OptimizerConfig {
    /// A fresh Adam optimiser.
    pub fn adam(&self) -> ModuleOptimizer {
        AdamConfig::new().with_epsilon(self.epsilon).init()
    }
}

/// PyTorch's `CosineAnnealingLR` without restarts:
/// `lr(t) = min + (base − min) · (1 + cos(π t / T)) / 2`, held at `min` after `T` steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CosineAnnealing {
    /// Learning rate at step 0.
    pub base: f64,
    /// Learning rate at step `total_steps`.
    pub min: f64,
    /// Steps of one half cosine period (`T_max`).
    pub total_steps: usize,
}

impl CosineAnnealing {
    /// The schedule for an optimiser configuration over `total_steps` steps.
    pub fn new(config: &OptimizerConfig, total_steps: usize) -> Self {
        CosineAnnealing {
            base: config.learning_rate,
            min: config.min_learning_rate,
            total_steps: total_steps.max(1),
        }
    }

    /// Learning rate at `step`.
    pub fn at(&self, step: usize) -> f64 {
        let t = step.min(self.total_steps) as f64 / self.total_steps as f64;
        self.min + (self.base - self.min) * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// One optimisation step: back-propagates `loss` and lets the optimiser update every
/// parameter of `model` that requires gradients (frozen ones are left alone).
pub fn optimizer_step<M: Module>(
    model: M,
    optimizer: &mut ModuleOptimizer,
    loss: Tensor<1>,
    learning_rate: f64,
) -> M {
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    optimizer.step(learning_rate, model, grads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_schedule_matches_pytorch_formula() {
        let s = CosineAnnealing {
            base: 1e-4,
            min: 0.0,
            total_steps: 10,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(5) - 5e-5).abs() < 1e-12);
        assert!(s.at(10).abs() < 1e-12);
        assert!(s.at(20).abs() < 1e-12);
        assert!(s.at(3) > s.at(4));
    }
}
