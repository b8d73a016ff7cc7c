//! Multi-organ fusion: one documented rule that turns the heads' outputs into one label map.
//!
//! Labels are `0` for background and `1..=n` for the tasks in the model's fixed task order
//! (with the default tasks: 1 liver, 2 spleen, 3 pancreas, 4 kidney).
//!
//! **Rule for two-class task heads.** Each head gives the probability `pₜ` that a voxel is
//! its organ. A voxel gets the label of the most probable organ, `1 + argmaxₜ pₜ`, if that
//! probability is at least 0.5; otherwise it is background. Ties go to the task that comes
//! first. This keeps each head's own decision (organ iff `pₜ ≥ 0.5`, the argmax of a
//! two-class softmax) and settles overlaps by confidence.
//!
//! **Rule for a multi-class head** (a pooled model): the argmax over its classes, ties to
//! the lower class.

/// What the channels of a probability volume mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbabilityKind {
    /// One organ probability per task (two-class heads).
    TaskProbabilities,
    /// A softmax over `background, task₁, …, taskₙ` (one multi-class head).
    ClassProbabilities,
}

/// Fuses per-channel probabilities of one volume into a label map.
///
/// `probabilities` is channel-major: `channels` blocks of `voxels` values.
///
/// # Panics
/// If `probabilities.len() != channels * voxels` or there are more than 255 tasks
/// (programmer errors).
pub fn fuse(probabilities: &[f32], channels: usize, kind: ProbabilityKind) -> Vec<u8> {
    assert!(channels > 0 && channels < 256, "1..=255 channels expected");
    assert_eq!(
        probabilities.len() % channels,
        0,
        "channel-major probabilities expected"
    );
    let voxels = probabilities.len() / channels;
    (0..voxels)
        .map(|v| {
            let (best, p) = (0..channels)
                .map(|c| (c, probabilities[c * voxels + v]))
                .fold((0, f32::NEG_INFINITY), |acc, cur| {
                    if cur.1 > acc.1 {
                        cur
                    } else {
                        acc
                    }
                });
            match kind {
                ProbabilityKind::TaskProbabilities if p >= 0.5 => best as u8 + 1,
                ProbabilityKind::TaskProbabilities => 0,
                ProbabilityKind::ClassProbabilities => best as u8,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_rule_picks_confident_organ_and_background() {
        // Three voxels, two tasks: liver-ish, nothing, spleen beats liver.
        let p = [0.9, 0.2, 0.6, /* task 2 */ 0.1, 0.4, 0.7];
        assert_eq!(
            fuse(&p, 2, ProbabilityKind::TaskProbabilities),
            vec![1, 0, 2]
        );
    }

    #[test]
    fn ties_go_to_the_first_task() {
        let p = [0.8, 0.8];
        assert_eq!(fuse(&p, 2, ProbabilityKind::TaskProbabilities), vec![1]);
        let p = [0.3, 0.3, 0.3];
        assert_eq!(fuse(&p, 3, ProbabilityKind::ClassProbabilities), vec![0]);
    }

    #[test]
    fn class_rule_is_argmax() {
        let p = [0.2, 0.5, /* c1 */ 0.7, 0.1, /* c2 */ 0.1, 0.4];
        assert_eq!(fuse(&p, 3, ProbabilityKind::ClassProbabilities), vec![1, 0]);
    }
}
