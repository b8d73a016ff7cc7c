//! Evaluation of trained models on whole volumes: segmentation by sliding window and head
//! fusion, then Dice and HD95 per organ per volume, on the fused label map for every method.

use std::collections::BTreeMap;

use burn::tensor::Device;
use segviz_core::fusion::{fuse, ProbabilityKind};
use segviz_core::metrics::{dice, hausdorff95};
use segviz_core::sliding_window::{sliding_window_inference, SlidingWindowConfig};
use segviz_core::SegVizModel;
use segviz_data::{Organ, Volume};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::local::organ_of;
use segviz_data::SiteData;

/// The model(s) a method segments with.
#[derive(Debug, Clone)]
pub enum Segmenter {
    /// One model; its two-class heads are fused, or its multi-class head is arg-maxed.
    Single(Box<SegVizModel>),
    /// One model per organ (e.g. the baselines, or each site's own model under FedBN):
    /// each gives the probability of its organ, then the probabilities are fused.
    PerOrgan(Vec<(Organ, SegVizModel)>),
}

/// Organ probabilities of one volume, from which both per-organ masks and the fused label
/// map are read.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// The organs, in channel order (for class probabilities: classes 1..).
    pub organs: Vec<Organ>,
    /// Channel-major probabilities.
    pub probabilities: Vec<f32>,
    /// Channels in `probabilities`.
    pub channels: usize,
    /// Their meaning.
    pub kind: ProbabilityKind,
}

impl Prediction {
    /// Voxels predicted as `organ` by the organ's own output: probability ≥ 0.5 for a
    /// two-class head, the arg-max for a multi-class head. `None` if the organ is not
    /// predicted at all.
    pub fn organ_mask(&self, organ: Organ) -> Option<Vec<u8>> {
        let index = self.organs.iter().position(|o| *o == organ)?;
        let n = self.probabilities.len() / self.channels;
        Some(match self.kind {
            ProbabilityKind::TaskProbabilities => self.probabilities[index * n..(index + 1) * n]
                .iter()
                .map(|&p| u8::from(p >= 0.5))
                .collect(),
            ProbabilityKind::ClassProbabilities => {
                let labels = fuse(&self.probabilities, self.channels, self.kind);
                labels
                    .iter()
                    .map(|&c| u8::from(c as usize == index + 1))
                    .collect()
            }
        })
    }

    /// The fused label map in vocabulary labels (see [`segviz_core::fusion`]).
    pub fn labels(&self) -> Vec<u8> {
        let fused = fuse(&self.probabilities, self.channels, self.kind);
        to_vocabulary(&fused, &self.organs)
    }
}

impl Segmenter {
    /// The organs this segmenter can label.
    pub fn organs(&self) -> Result<Vec<Organ>> {
        match self {
            Segmenter::Single(m) => single_organs(m),
            Segmenter::PerOrgan(list) => Ok(list.iter().map(|(o, _)| *o).collect()),
        }
    }

    /// Organ probabilities of a preprocessed image, by sliding window.
    pub fn predict(
        &self,
        image: &Volume<f32>,
        window: &SlidingWindowConfig,
        device: &Device,
    ) -> Result<Prediction> {
        let shape = image.geometry.shape;
        match self {
            Segmenter::Single(model) => {
                let model = model.as_ref();
                let (probabilities, channels) =
                    sliding_window_inference(&image.data, shape, window, device, |x| {
                        model.probabilities(x)
                    })?;
                let multi_class = model.config().head_out_channels > 2;
                Ok(Prediction {
                    organs: single_organs(model)?,
                    probabilities,
                    channels,
                    kind: if multi_class {
                        ProbabilityKind::ClassProbabilities
                    } else {
                        ProbabilityKind::TaskProbabilities
                    },
                })
            }
            Segmenter::PerOrgan(list) => {
                let n = image.data.len();
                let mut all = Vec::with_capacity(list.len() * n);
                for (organ, model) in list {
                    let index = model.task_index(organ.name())?;
                    // Only this organ's head runs (a partial-label model holds every head).
                    let (probs, _) =
                        sliding_window_inference(&image.data, shape, window, device, |x| {
                            model.task_probability(x, index)
                        })?;
                    all.extend(probs);
                }
                Ok(Prediction {
                    organs: list.iter().map(|(o, _)| *o).collect(),
                    probabilities: all,
                    channels: list.len(),
                    kind: ProbabilityKind::TaskProbabilities,
                })
            }
        }
    }
}

/// The organs of a single model: its task heads, or every organ for a multi-class head.
fn single_organs(model: &SegVizModel) -> Result<Vec<Organ>> {
    if model.config().head_out_channels > 2 {
        let classes = model.config().head_out_channels - 1;
        return Ok(Organ::ALL.iter().copied().take(classes).collect());
    }
    model.tasks().iter().map(|t| organ_of(t)).collect()
}

/// Fused labels `1..=n` (index into `organs` + 1) to vocabulary labels.
fn to_vocabulary(fused: &[u8], organs: &[Organ]) -> Vec<u8> {
    fused
        .iter()
        .map(|&v| match v {
            0 => 0,
            i => organs.get(i as usize - 1).map_or(0, |o| o.label()),
        })
        .collect()
}

/// Scores of one volume.
///
/// Every method is scored the same way: on the fused label map, the one `predict` writes
/// and a user sees, so two heads that claim the same voxels cost Dice. Each head's own mask
/// (probability ≥ 0.5, overlaps allowed) is kept as a secondary score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeScore {
    /// Site name.
    pub site: String,
    /// Case id.
    pub case: String,
    /// Organ name → Dice of the fused label map.
    pub dice: BTreeMap<String, f64>,
    /// Organ name → Dice of the organ's own output (head mask or arg-max), before fusion.
    #[serde(default)]
    pub head_dice: BTreeMap<String, f64>,
    /// Organ name → HD95 in mm of the fused label map; when exactly one of prediction and
    /// truth is empty, the penalty [`hd95_penalty`] (the volume's diagonal); `None` when
    /// both are empty.
    pub hd95: BTreeMap<String, Option<f64>>,
    /// Organs whose HD95 is the empty-mask penalty.
    #[serde(default)]
    pub hd95_penalised: Vec<String>,
}

/// The HD95 given when exactly one of prediction and truth is empty: the diagonal of the
/// volume in mm, the largest distance two of its voxels can have.
pub fn hd95_penalty(shape: [usize; 3], spacing: [f64; 3]) -> f64 {
    shape
        .iter()
        .zip(spacing)
        .map(|(&n, s)| (n as f64 * s).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Scores one organ of one volume: fused-map Dice and HD95 (with the empty-mask penalty),
/// and the Dice of the organ's own output.
fn score_organ(
    score: &mut VolumeScore,
    organ: Organ,
    fused: &[u8],
    head_mask: &[u8],
    label: &Volume<u8>,
    spacing: [f64; 3],
) {
    let shape = label.geometry.shape;
    let truth: Vec<u8> = label
        .data
        .iter()
        .map(|&v| u8::from(v == organ.label()))
        .collect();
    let mask: Vec<u8> = fused
        .iter()
        .map(|&v| u8::from(v == organ.label()))
        .collect();
    let name = organ.name().to_string();
    score.dice.insert(name.clone(), dice(&mask, &truth, 1));
    score
        .head_dice
        .insert(name.clone(), dice(head_mask, &truth, 1));
    let predicted = mask.contains(&1);
    let present = truth.contains(&1);
    let hd = match (predicted, present) {
        (true, true) => hausdorff95(&mask, &truth, 1, shape, spacing),
        (false, false) => None,
        _ => {
            score.hd95_penalised.push(name.clone());
            Some(hd95_penalty(shape, spacing))
        }
    };
    score.hd95.insert(name, hd);
}

/// Segments one case of `site` and scores `organs` (those the site annotates and the
/// segmenter predicts) on the fused label map, with each organ's own output as a secondary
/// score (see [`VolumeScore`]). Returns the score with the preprocessed image, its labels
/// and the prediction.
pub fn score_case(
    segmenter: &Segmenter,
    site: &SiteData,
    id: &str,
    organs: &[Organ],
    window: &SlidingWindowConfig,
    device: &Device,
) -> Result<(VolumeScore, Volume<f32>, Volume<u8>, Prediction)> {
    let annotated = site.annotated();
    let (image, label) = site.volume(id)?;
    let prediction = segmenter.predict(&image, window, device)?;
    let fused = prediction.labels();
    let mut score = VolumeScore {
        site: site.name().to_string(),
        case: id.to_string(),
        dice: BTreeMap::new(),
        head_dice: BTreeMap::new(),
        hd95: BTreeMap::new(),
        hd95_penalised: Vec::new(),
    };
    for organ in organs.iter().filter(|o| annotated.contains(**o)) {
        let Some(head_mask) = prediction.organ_mask(*organ) else {
            continue;
        };
        let spacing = image.geometry.spacing();
        score_organ(&mut score, *organ, &fused, &head_mask, &label, spacing);
    }
    Ok((score, image, label, prediction))
}

/// Segments every case of `cases` at `site` and scores them with [`score_case`], one after
/// the other. `on_case` is called after each volume with the preprocessed image, its labels
/// and the prediction.
pub fn evaluate_site(
    segmenter: &Segmenter,
    site: &SiteData,
    cases: &[String],
    organs: &[Organ],
    window: &SlidingWindowConfig,
    device: &Device,
    mut on_case: impl FnMut(&str, &Volume<f32>, &Volume<u8>, &Prediction),
) -> Result<Vec<VolumeScore>> {
    let mut scores = Vec::new();
    for id in cases {
        let (score, image, label, prediction) =
            score_case(segmenter, site, id, organs, window, device)?;
        on_case(id, &image, &label, &prediction);
        scores.push(score);
    }
    Ok(scores)
}

/// Mean Dice per organ over scores.
pub fn mean_dice(scores: &[VolumeScore]) -> BTreeMap<String, f64> {
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    for s in scores {
        for (organ, d) in &s.dice {
            let e = sums.entry(organ.clone()).or_insert((0.0, 0));
            e.0 += d;
            e.1 += 1;
        }
    }
    sums.into_iter()
        .map(|(k, (s, n))| (k, s / n as f64))
        .collect()
}

/// Segments a CT scan end to end (a NIfTI file or a DICOM series folder): reads it, applies the training preprocessing, runs the
/// sliding window and head fusion, and returns the label map resampled (nearest) back onto
/// the scan's own grid, so it overlays the scan in a viewer — with the file's geometry
/// warnings (an orientation guessed from `pixdim`, a negative `pixdim`, a broken sform…),
/// which a caller should show: the label map is only as right as the geometry.
pub fn segment_file(
    segmenter: &Segmenter,
    image_path: &std::path::Path,
    preprocess: &segviz_data::PreprocessConfig,
    window: &SlidingWindowConfig,
    device: &Device,
) -> Result<(Volume<u8>, Vec<String>)> {
    let (original, warnings) = segviz_data::read_scan(image_path)?;
    let image = segviz_data::preprocess_image(&original, preprocess)?;
    let labels = segmenter.predict(&image, window, device)?.labels();
    Ok((
        to_original_grid(labels, &image, &original.geometry)?,
        warnings,
    ))
}

/// Moves a label map computed on a preprocessed image back onto the original grid.
pub fn to_original_grid(
    labels: Vec<u8>,
    preprocessed: &Volume<f32>,
    original: &segviz_data::Geometry,
) -> Result<Volume<u8>> {
    let volume = Volume {
        data: labels,
        geometry: preprocessed.geometry.clone(),
    };
    Ok(segviz_data::preprocess::resample_nearest(
        &volume, original, 0,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use segviz_data::Geometry;

    fn identity_geometry(shape: [usize; 3]) -> Geometry {
        let mut affine = [[0.0; 4]; 4];
        for (i, row) in affine.iter_mut().enumerate() {
            row[i] = 1.0;
        }
        Geometry { shape, affine }
    }

    /// Two heads that both claim the liver: each head's own mask is perfect, but the fused
    /// map gives the overlap to the more confident head, so the fused liver Dice drops.
    #[test]
    fn an_overlap_of_two_heads_lowers_the_fused_score_only() {
        let shape = [4, 4, 4];
        let n = 64;
        let liver: Vec<u8> = (0..n).map(|i| u8::from(i < 32)).collect();
        let label = Volume {
            data: liver.iter().map(|&v| v * Organ::Liver.label()).collect(),
            geometry: identity_geometry(shape),
        };
        // Liver head: 0.8 on the liver; spleen head: 0.9 on half the liver.
        let mut probabilities = vec![0.0f32; 2 * n];
        for i in 0..n {
            probabilities[i] = if liver[i] == 1 { 0.8 } else { 0.1 };
            probabilities[n + i] = if i < 16 { 0.9 } else { 0.1 };
        }
        let prediction = Prediction {
            organs: vec![Organ::Liver, Organ::Spleen],
            probabilities,
            channels: 2,
            kind: ProbabilityKind::TaskProbabilities,
        };
        let mut score = VolumeScore {
            site: "s".into(),
            case: "c".into(),
            dice: BTreeMap::new(),
            head_dice: BTreeMap::new(),
            hd95: BTreeMap::new(),
            hd95_penalised: Vec::new(),
        };
        let fused = prediction.labels();
        let head = prediction.organ_mask(Organ::Liver).unwrap();
        score_organ(&mut score, Organ::Liver, &fused, &head, &label, [1.0; 3]);
        assert_eq!(score.head_dice["liver"], 1.0);
        // Fused: 16 of the 32 liver voxels stay liver: Dice 2·16 / (16 + 32).
        assert!(
            (score.dice["liver"] - 32.0 / 48.0).abs() < 1e-12,
            "{score:?}"
        );
        assert!(score.hd95_penalised.is_empty());

        // An organ predicted nowhere gets the stated HD95 penalty and is counted.
        let empty = vec![0u8; n];
        score_organ(
            &mut score,
            Organ::Liver,
            &empty,
            &empty,
            &label,
            [1.0, 2.0, 2.0],
        );
        assert_eq!(score.dice["liver"], 0.0);
        assert_eq!(score.hd95["liver"], Some((16.0f64 + 64.0 + 64.0).sqrt()));
        assert_eq!(score.hd95_penalised, vec!["liver"]);
    }
}
