//! What trains the model: gradients, overfitting a tiny volume, freezing, losses.

mod common;

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use segviz_core::fusion::{fuse, ProbabilityKind};
use segviz_core::loss::{cross_entropy, DiceLoss, MarginalLoss};
use segviz_core::metrics::dice;
use segviz_core::train::{optimizer_step, OptimizerConfig};

/// Records the path of every float parameter without a gradient.
struct GradientAudit<'a> {
    grads: &'a GradientsParams,
    path: Vec<String>,
    missing: Vec<String>,
    seen: usize,
}

impl ModuleVisitor for GradientAudit<'_> {
    fn enter_module(&mut self, name: &str, _: &str) {
        self.path.push(name.to_string());
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.path.join(".");
        if path.contains("running_") {
            return; // BatchNorm statistics are buffers, not parameters.
        }
        self.seen += 1;
        let ok = self
            .grads
            .get::<D>(param.id)
            .map(|g| g.abs().sum().into_scalar::<f32>() as f64 > 0.0)
            .unwrap_or(false);
        if !ok {
            self.missing.push(path);
        }
    }
}

#[test]
fn gradients_reach_every_trainable_tensor() {
    let dev = device().autodiff();
    let model = tiny_config(&["liver", "spleen"]).init(&dev, 2).unwrap();
    let (x, y, _) = ball(8, 2.5, &dev);
    let x = Tensor::cat(vec![x.clone(), x.flip([2])], 0);
    let y = Tensor::cat(vec![y.clone(), y.flip([1])], 0);
    let logits = model.forward(x);
    let loss = logits
        .into_iter()
        .map(|l| DiceLoss::new().dice_ce(l, &y))
        .reduce(|a, b| a + b)
        .unwrap();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let mut audit = GradientAudit {
        grads: &grads,
        path: vec![],
        missing: vec![],
        seen: 0,
    };
    model.visit(&mut audit);
    assert!(audit.seen > 50);
    assert!(audit.missing.is_empty(), "no gradient: {:?}", audit.missing);
}

#[test]
fn tiny_model_overfits_one_volume() {
    let dev = device().autodiff();
    let mut model = tiny_config(&["organ"]).init(&dev, 11).unwrap();
    let mut optim = OptimizerConfig::new().adam();
    let (x, y, truth) = ball(16, 4.5, &dev);
    let loss_fn = DiceLoss::new();
    let mut first = None;
    let mut last = 0.0;
    for _ in 0..60 {
        let logits = model.forward(x.clone()).remove(0);
        let loss = loss_fn.dice_ce(logits, &y);
        last = loss.clone().into_scalar::<f32>() as f64;
        first.get_or_insert(last);
        model = optimizer_step(model, &mut optim, loss, 1e-2);
    }
    assert!(last < first.unwrap() * 0.5, "loss {first:?} -> {last}");
    // Evaluate without autodiff: BatchNorm then uses its running statistics.
    let eval = model.valid();
    let p = values(eval.probabilities(x.without_autodiff()));
    let pred = fuse(&p, 1, ProbabilityKind::TaskProbabilities);
    let d = dice(&pred, &truth, 1);
    assert!(d > 0.9, "Dice {d}");
}

#[test]
fn frozen_representation_does_not_change() {
    let dev = device().autodiff();
    let model = tiny_config(&["liver"]).init(&dev, 4).unwrap();
    let before = model.state();
    let mut model = model.freeze_representation();
    let mut optim = OptimizerConfig::new().adam();
    let (x, y, _) = ball(8, 2.5, &dev);
    for _ in 0..3 {
        let loss = DiceLoss::new().dice_ce(model.forward(x.clone()).remove(0), &y);
        model = optimizer_step(model, &mut optim, loss, 1e-2);
    }
    let after = model.state();
    // Weights and BatchNorm running statistics of the body are untouched…
    assert_eq!(before.representation(), after.representation());
    // …while the head learned (weights and its BatchNorm statistics).
    assert_ne!(before.head("liver"), after.head("liver"));
    // Unfreezing trains the body again.
    let mut model = model.unfreeze_representation();
    let loss = DiceLoss::new().dice_ce(model.forward(x).remove(0), &y);
    model = optimizer_step(model, &mut optim, loss, 1e-2);
    assert_ne!(before.representation(), model.state().representation());
}

fn logits_and_target() -> (Tensor<5>, Tensor<4, Int>) {
    let dev = device();
    // Two samples, three classes, 2×2×2 voxels.
    let n = 2 * 3 * 8;
    let logits: Vec<f32> = (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.3).collect();
    let target: Vec<i64> = (0..16).map(|i| (i * 5 % 3) as i64).collect();
    (
        Tensor::from_data(TensorData::new(logits, [2, 3, 2, 2, 2]), &dev),
        Tensor::from_data(TensorData::new(target, [2, 2, 2, 2]), &dev),
    )
}

/// The Dice loss written out voxel by voxel.
fn dice_by_hand(logits: &[f32], target: &[i64], b: usize, c: usize, n: usize, bg: bool) -> f64 {
    let mut total = 0.0;
    let mut count = 0.0;
    for s in 0..b {
        for k in 0..c {
            if k == 0 && !bg {
                continue;
            }
            let (mut i, mut p_sum, mut g_sum) = (0.0, 0.0, 0.0);
            for v in 0..n {
                let z: Vec<f64> = (0..c).map(|q| logits[(s * c + q) * n + v] as f64).collect();
                let m = z.iter().cloned().fold(f64::MIN, f64::max);
                let e: f64 = z.iter().map(|x| (x - m).exp()).sum();
                let p = (z[k] - m).exp() / e;
                let g = (target[s * n + v] == k as i64) as u8 as f64;
                i += p * g;
                p_sum += p;
                g_sum += g;
            }
            total += 1.0 - (2.0 * i + 1e-5) / (p_sum + g_sum + 1e-5);
            count += 1.0;
        }
    }
    total / count
}

#[test]
fn dice_loss_matches_the_formula() {
    let (logits, target) = logits_and_target();
    let l = values(logits.clone());
    let t: Vec<i64> = target
        .clone()
        .into_data()
        .convert::<i64>()
        .try_to_vec()
        .unwrap();
    for bg in [true, false] {
        let ours = DiceLoss::new()
            .with_include_background(bg)
            .forward(logits.clone(), &target)
            .into_scalar::<f32>() as f64;
        let expected = dice_by_hand(&l, &t, 2, 3, 8, bg);
        assert!((ours - expected).abs() < 1e-5, "{ours} vs {expected}");
    }
    let ce = cross_entropy(logits, &target).into_scalar::<f32>() as f64;
    assert!(ce > 0.0 && ce.is_finite());
}

#[test]
fn marginal_loss_equals_dice_ce_when_everything_is_annotated() {
    let (logits, target) = logits_and_target();
    let full = vec![vec![true, true]; 2];
    let marginal = MarginalLoss::new()
        .forward(logits.clone(), &target, &full)
        .into_scalar::<f32>() as f64;
    let plain = DiceLoss::new()
        .dice_ce(logits, &target)
        .into_scalar::<f32>() as f64;
    assert!((marginal - plain).abs() < 1e-4, "{marginal} vs {plain}");
}

#[test]
fn marginal_loss_does_not_punish_an_unannotated_organ() {
    let dev = device();
    // One sample annotated only for class 1; the network is confident about class 2 on a
    // voxel that the (partial) label calls background.
    let logits = Tensor::<5>::from_data(
        TensorData::new(
            vec![
                0.0, 0.0, // class 0
                0.0, 5.0, // class 1
                5.0, 0.0, // class 2
            ],
            [1, 3, 1, 1, 2],
        ),
        &dev,
    );
    let target = Tensor::<4, Int>::from_data(TensorData::new(vec![0i64, 1], [1, 1, 1, 2]), &dev);
    let partial = vec![vec![true, false]];
    let marginal = MarginalLoss::new()
        .forward(logits.clone(), &target, &partial)
        .into_scalar::<f32>() as f64;
    let naive = DiceLoss::new()
        .dice_ce(logits.clone(), &target)
        .into_scalar::<f32>() as f64;
    assert!(
        marginal < naive * 0.5,
        "marginal {marginal} vs naive {naive}"
    );
    // The exclusion term adds a penalty only when the unannotated organ sits on an
    // annotated one: here class 2 is predicted on the background voxel, so almost none.
    let with_exclusion = MarginalLoss::new()
        .with_exclusion_weight(1.0)
        .forward(logits, &target, &partial)
        .into_scalar::<f32>() as f64;
    assert!(with_exclusion >= marginal && with_exclusion < marginal + 0.05);
}

#[test]
fn copies_do_not_share_batchnorm_statistics() {
    let dev = device().autodiff();
    let model = tiny_config(&["liver", "spleen"]).init(&dev, 4).unwrap();
    let before = model.state();
    // Burn's clone() shares BatchNorm running statistics; deep copies and subsets must not.
    let mut copy = model.subset(&["liver".to_string()]).unwrap();
    let mut optim = OptimizerConfig::new().adam();
    let (x, y, _) = ball(8, 2.5, &dev);
    for _ in 0..2 {
        let loss = DiceLoss::new().dice_ce(copy.forward(x.clone()).remove(0), &y);
        copy = optimizer_step(copy, &mut optim, loss, 1e-2);
    }
    assert_eq!(
        model.state(),
        before,
        "training a subset changed the original"
    );
    let running = |s: &segviz_core::ModelState| {
        s.filter(|p, t| !t.trainable && p.starts_with("representation."))
    };
    assert_ne!(running(&copy.state()), running(&before));
    let twin = model.deep_copy().unwrap();
    assert_eq!(twin.state(), before);
}
