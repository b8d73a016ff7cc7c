//! The SegViz model: sizes, shapes, heads, parameter paths.

mod common;

use burn::tensor::Tensor;
use common::*;
use segviz_core::monai::monai_key;
use segviz_core::{CoreError, SegVizConfig, TensorRole};

#[test]
fn paper_model_has_monai_parameter_count() {
    let model = SegVizConfig::paper(&["liver"]).init(&device(), 0).unwrap();
    assert_eq!(model.num_trainable_params(), 4_808_917);
    let layout = model.layout();
    let body: usize = layout
        .representation()
        .tensors
        .values()
        .filter(|t| t.trainable)
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(body, 4_807_072);
    assert_eq!(layout.head("liver").num_trainable_after_shapes(), 1_845);
    // 17 BatchNorm layers, found by structure: gamma, beta, running mean and variance each.
    let bn = layout.tensors.values().filter(|t| t.batch_norm).count();
    assert_eq!(bn, 17 * 4);
    let running = layout.tensors.values().filter(|t| !t.trainable).count();
    assert_eq!(running, 17 * 2);
}

/// Counting by shapes (layouts carry no values).
trait CountByShape {
    fn num_trainable_after_shapes(&self) -> usize;
}
impl CountByShape for segviz_core::ModelState {
    fn num_trainable_after_shapes(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.trainable)
            .map(|t| t.shape.iter().product::<usize>())
            .sum()
    }
}

#[test]
fn every_head_adds_the_same_small_block() {
    let one = tiny_config(&["liver"]).init(&device(), 0).unwrap();
    let four = tiny_config(&["liver", "spleen", "pancreas", "kidney"])
        .init(&device(), 0)
        .unwrap();
    let head = one.layout().head("liver").num_trainable_after_shapes();
    assert_eq!(
        four.num_trainable_params(),
        one.num_trainable_params() + 3 * head
    );
}

#[test]
fn odd_but_valid_sizes_keep_their_shape() {
    let dev = device();
    let model = tiny_config(&["liver", "spleen"]).init(&dev, 1).unwrap();
    for shape in [[4, 8, 12], [12, 4, 20], [8, 8, 8]] {
        model
            .check_input([1, 1, shape[0], shape[1], shape[2]])
            .unwrap();
        let out = model.forward(input(shape, &dev));
        assert_eq!(out.len(), 2);
        for logits in out {
            assert_eq!(logits.dims(), [1, 2, shape[0], shape[1], shape[2]]);
        }
        let p = model.probabilities(input(shape, &dev));
        assert_eq!(p.dims(), [1, 2, shape[0], shape[1], shape[2]]);
    }
}

#[test]
fn sizes_not_divisible_by_the_strides_are_refused_clearly() {
    let model = tiny_config(&["liver"]).init(&device(), 1).unwrap();
    let err = model.check_input([1, 1, 8, 10, 8]).unwrap_err();
    match err {
        CoreError::Shape { shape, reason } => {
            assert_eq!(shape, vec![8, 10, 8]);
            assert!(reason.contains("multiple of 4"), "{reason}");
        }
        other => panic!("unexpected error {other}"),
    }
    assert!(model.check_input([1, 2, 8, 8, 8]).is_err());
    let paper = SegVizConfig::paper(&["liver"]);
    assert!(paper.representation.check_input([96, 96, 40]).is_err());
    assert!(paper.representation.check_input([96, 96, 48]).is_ok());
}

#[test]
fn bad_configurations_are_errors() {
    let mut c = tiny_config(&["liver", "liver"]);
    assert!(matches!(c.validate(), Err(CoreError::Task { .. })));
    c.tasks = vec!["li.ver".into()];
    assert!(c.validate().is_err());
    c.tasks = vec!["liver".into()];
    c.representation.strides = vec![2];
    assert!(matches!(c.validate(), Err(CoreError::Config(_))));
    c.representation.strides = vec![2, 2];
    c.representation.num_res_units = 0;
    assert!(c.validate().is_err());
}

#[test]
fn initialisation_is_seeded_and_path_local() {
    let dev = device();
    let a = tiny_config(&["liver"]).init(&dev, 3).unwrap().state();
    let b = tiny_config(&["liver"]).init(&dev, 3).unwrap().state();
    let c = tiny_config(&["liver"]).init(&dev, 4).unwrap().state();
    assert_eq!(a, b);
    assert_ne!(a, c);
    // Another head does not change the liver head or the body.
    let d = tiny_config(&["spleen", "liver"])
        .init(&dev, 3)
        .unwrap()
        .state();
    assert_eq!(a.head("liver"), d.head("liver"));
    assert_eq!(a.representation(), d.representation());
    // LeCun normal: conv weights have std ≈ 1/sqrt(fan_in).
    let w = &a.tensors["representation.down.1.units.1.conv.weight"];
    let fan_in = (w.shape[1] * 27) as f64;
    let var = w.data.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / w.data.len() as f64;
    assert!(
        (var * fan_in - 1.0).abs() < 0.25,
        "variance × fan_in = {}",
        var * fan_in
    );
}

#[test]
fn heads_are_added_and_removed_without_touching_the_representation() {
    let dev = device();
    let model = tiny_config(&["liver"]).init(&dev, 5).unwrap();
    let before = model.state();
    let model = model.add_task("kidney", 5).unwrap();
    assert_eq!(model.tasks(), ["liver", "kidney"]);
    let after = model.state();
    assert_eq!(before.representation(), after.representation());
    assert_eq!(before.head("liver"), after.head("liver"));
    // The new head is the one a model built with it from the start would have.
    let fresh = tiny_config(&["kidney"]).init(&dev, 5).unwrap().state();
    assert_eq!(fresh.head("kidney"), after.head("kidney"));
    assert!(model.clone().add_task("liver", 0).is_err());
    let model = model.remove_task("liver").unwrap();
    assert_eq!(model.tasks(), ["kidney"]);
    assert_eq!(before.representation(), model.state().representation());
    assert!(model.remove_task("liver").is_err());
}

#[test]
fn every_path_is_classified_and_maps_to_one_monai_key() {
    let model = tiny_config(&["liver", "spleen"])
        .init(&device(), 0)
        .unwrap();
    let layout = model.layout();
    let mut keys = std::collections::HashSet::new();
    for (path, t) in &layout.tensors {
        match &t.role {
            TensorRole::Head(task) => assert!(path.starts_with(&format!("heads.{task}."))),
            TensorRole::Representation => assert!(path.starts_with("representation.")),
        }
        let key = monai_key(path, 2).unwrap_or_else(|| panic!("no key for {path}"));
        if matches!(t.role, TensorRole::Representation) {
            assert!(keys.insert(key.clone()), "{key} used twice");
        }
        assert!(t.batch_norm == key.contains(".adn.N."), "{path} -> {key}");
    }
}

#[test]
fn head_probabilities_are_the_softmax_organ_channel() {
    use burn::tensor::activation::softmax;
    let dev = device();
    let model = tiny_config(&["liver", "spleen"]).init(&dev, 3).unwrap();
    // Batch 2, so that each head's channel slices are strided views.
    let x = Tensor::cat(
        vec![
            input([8, 8, 8], &dev),
            input([8, 8, 8], &dev).mul_scalar(-2.0),
        ],
        0,
    );
    let logits = model.forward(x.clone());
    let p = model.probabilities(x.clone());
    assert_eq!(p.dims(), [2, 2, 8, 8, 8]);
    for (k, l) in logits.into_iter().enumerate() {
        let want = softmax(l, 1).slice([0..2, 1..2, 0..8, 0..8, 0..8]);
        let got = p.clone().slice([0..2, k..k + 1, 0..8, 0..8, 0..8]);
        let err: f32 = (got.clone() - want.clone()).abs().max().into_scalar();
        assert!(err <= 1e-6, "head {k}: max |σ(l₁ − l₀) − softmax₁| = {err}");
        let single = model.task_probability(x.clone(), k);
        let err: f32 = (single - want).abs().max().into_scalar();
        assert!(err <= 1e-6, "task_probability({k}): {err}");
    }
}
