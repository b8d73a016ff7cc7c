//! How much of each organ a shortcut finds: the measures behind `make_phantoms --report`.
//!
//! For every site and target organ (using the full ground truth, whether or not the site
//! annotates that organ), pooled over the site's cases:
//! - **HU mean and SD** of the organ's voxels;
//! - **best single window**: over every HU interval `[lo, hi]` with both ends on a 2-HU
//!   grid spanning `[-1024, 3071]`, the Dice of `{voxels in the body with lo ≤ HU ≤ hi}`
//!   against the organ mask, pooled over all the site's voxels, maximised;
//! - **leave-one-out position prior**: each case's organ mask, reoriented to RAS and resized
//!   (nearest) to a [`PRIOR_GRID`] grid spanning its own field of view — what a network that
//!   sees whole resized volumes could memorise — is predicted by the mean mask of the site's
//!   other cases thresholded at `t`; the Dice per case is averaged over the cases, and the
//!   best `t` in `0.05, 0.10, …, 0.95` is reported.
//!
//! A phantom without shortcuts keeps both numbers low: a model has to learn shape and
//! context.

use serde::{Deserialize, Serialize};

use super::anatomy::btcv;
use super::{generate_case, map_sites, PhantomConfig, GENERATOR_VERSION};
use crate::error::Result;
use crate::labels::Organ;
use crate::preprocess::resample::resize_labels;

/// Grid (voxels per axis) the position prior is computed on.
pub const PRIOR_GRID: [usize; 3] = [64, 64, 64];

/// Lowest HU of the window search.
const HU_MIN: i32 = -1024;
/// Width of one window step, HU.
const HU_STEP: i32 = 2;
/// Number of window steps covering `[-1024, 3071]`.
const HU_BINS: usize = 2048;

/// The best single HU window for one organ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WindowScore {
    /// Lower end, HU.
    pub lo: f64,
    /// Upper end, HU.
    pub hi: f64,
    /// Dice of the window against the organ.
    pub dice: f64,
}

/// The best leave-one-out position prior for one organ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PriorScore {
    /// Threshold on the mean mask of the other cases.
    pub threshold: f64,
    /// Mean Dice over the cases.
    pub dice: f64,
}

/// One organ at one site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrganReport {
    /// Organ name.
    pub organ: String,
    /// Organ voxels over all cases.
    pub voxels: usize,
    /// Mean HU of the organ.
    pub hu_mean: f64,
    /// SD of the organ's HU.
    pub hu_sd: f64,
    /// Best single window (`None` if the organ never appears).
    pub window: Option<WindowScore>,
    /// Best position prior (`None` with fewer than two cases showing the organ).
    pub prior: Option<PriorScore>,
}

/// One site.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteReport {
    /// Site folder.
    pub site: String,
    /// Cases measured.
    pub cases: usize,
    /// Contrast phase of each case.
    pub phases: Vec<String>,
    /// The four target organs, in [`Organ::ALL`] order.
    pub organs: Vec<OrganReport>,
}

impl SiteReport {
    /// The entry of `organ`.
    pub fn organ(&self, organ: Organ) -> Option<&OrganReport> {
        self.organs.iter().find(|o| o.organ == organ.name())
    }
}

/// Every site of a phantom configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhantomReport {
    /// Generator version measured.
    pub generator_version: u32,
    /// Configuration hash measured.
    pub config_hash: String,
    /// The sites, in writing order.
    pub sites: Vec<SiteReport>,
}

impl PhantomReport {
    /// A plain-text table: one row per site and organ.
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:<9} {:>8} {:>7} {:>15} {:>7} {:>7}\n",
            "site", "organ", "HU mean", "HU SD", "best window", "Dice", "prior"
        );
        for site in &self.sites {
            for o in &site.organs {
                let (window, dice) = match o.window {
                    Some(w) => (
                        format!("[{:.0}, {:.0}]", w.lo, w.hi),
                        format!("{:.3}", w.dice),
                    ),
                    None => ("-".into(), "-".into()),
                };
                let prior = o.prior.map_or("-".into(), |p| format!("{:.3}", p.dice));
                out.push_str(&format!(
                    "{:<16} {:<9} {:>8.1} {:>7.1} {:>15} {:>7} {:>7}\n",
                    site.site, o.organ, o.hu_mean, o.hu_sd, window, dice, prior
                ));
            }
        }
        out
    }
}

/// Whether BTCV label `label` belongs to `organ`.
fn is_organ(organ: Organ, label: u8) -> bool {
    match organ {
        Organ::Liver => label == btcv::LIVER,
        Organ::Spleen => label == btcv::SPLEEN,
        Organ::Pancreas => label == btcv::PANCREAS,
        Organ::Kidney => label == btcv::RIGHT_KIDNEY || label == btcv::LEFT_KIDNEY,
    }
}

/// Generates every case of `config` (nothing is written) and measures it.
pub fn measure(config: &PhantomConfig) -> Result<PhantomReport> {
    config.validate()?;
    let sites = map_sites(|index, spec| {
        let n = if spec.organ.is_some() {
            config.cases_per_site
        } else {
            config.btcv_cases
        };
        let mut hist = OrganHistograms::default();
        let mut masks: [Vec<Vec<bool>>; 4] = Default::default();
        let mut phases = Vec::with_capacity(n);
        for case in 0..n {
            let c = generate_case(config, index, case)?;
            phases.push(c.acquisition.phase.name().to_owned());
            hist.add(&c.image.data, &c.labels.data, &c.body.data);
            let grid = resize_labels(&c.labels.to_ras(), PRIOR_GRID)?;
            for organ in Organ::ALL {
                masks[organ.index()].push(grid.data.iter().map(|&l| is_organ(organ, l)).collect());
            }
        }
        let organs = Organ::ALL
            .iter()
            .map(|&organ| {
                let h = &hist.organ[organ.index()];
                OrganReport {
                    organ: organ.name().to_owned(),
                    voxels: h.count,
                    hu_mean: h.mean(),
                    hu_sd: h.sd(),
                    window: best_window(&h.bins, &hist.body),
                    prior: position_prior(&masks[organ.index()]),
                }
            })
            .collect();
        Ok(SiteReport {
            site: spec.folder.to_owned(),
            cases: n,
            phases,
            organs,
        })
    })?;
    Ok(PhantomReport {
        generator_version: GENERATOR_VERSION,
        config_hash: config.hash(),
        sites,
    })
}

/// HU histograms of the body and of each organ, plus running moments.
#[derive(Debug, Clone)]
struct OrganHistograms {
    body: Vec<u64>,
    organ: [Moments; 4],
}

impl Default for OrganHistograms {
    fn default() -> Self {
        OrganHistograms {
            body: vec![0; HU_BINS],
            organ: std::array::from_fn(|_| Moments::default()),
        }
    }
}

#[derive(Debug, Clone)]
struct Moments {
    bins: Vec<u64>,
    count: usize,
    sum: f64,
    sum_sq: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Moments {
            bins: vec![0; HU_BINS],
            count: 0,
            sum: 0.0,
            sum_sq: 0.0,
        }
    }
}

impl Moments {
    fn mean(&self) -> f64 {
        self.sum / self.count.max(1) as f64
    }

    fn sd(&self) -> f64 {
        let n = self.count.max(1) as f64;
        (self.sum_sq / n - self.mean().powi(2)).max(0.0).sqrt()
    }
}

/// The window step holding `hu`.
fn bin(hu: f32) -> usize {
    let b = (hu.round() as i32 - HU_MIN).div_euclid(HU_STEP);
    b.clamp(0, HU_BINS as i32 - 1) as usize
}

impl OrganHistograms {
    fn add(&mut self, image: &[f32], labels: &[u8], body: &[u8]) {
        for ((&hu, &label), &inside) in image.iter().zip(labels).zip(body) {
            let organ = Organ::ALL.into_iter().find(|&o| is_organ(o, label));
            if inside == 0 && organ.is_none() {
                continue;
            }
            let b = bin(hu);
            self.body[b] += 1;
            if let Some(o) = organ {
                let m = &mut self.organ[o.index()];
                m.bins[b] += 1;
                m.count += 1;
                m.sum += f64::from(hu);
                m.sum_sq += f64::from(hu).powi(2);
            }
        }
    }
}

/// The best window from HU histograms of the organ and of the whole body (organ included),
/// both on the 2-HU grid of this module.
pub fn best_window(organ: &[u64], body: &[u64]) -> Option<WindowScore> {
    let total: u64 = organ.iter().sum();
    if total == 0 || organ.len() != body.len() {
        return None;
    }
    let cum = |h: &[u64]| {
        let mut c = vec![0u64; h.len() + 1];
        for (i, v) in h.iter().enumerate() {
            c[i + 1] = c[i] + v;
        }
        c
    };
    let (co, cb) = (cum(organ), cum(body));
    let mut best = WindowScore {
        lo: 0.0,
        hi: 0.0,
        dice: 0.0,
    };
    for lo in 0..organ.len() {
        if organ[lo] == 0 {
            // A window starting on an empty organ bin is beaten by the one starting next.
            continue;
        }
        for hi in lo..organ.len() {
            let tp = co[hi + 1] - co[lo];
            let predicted = cb[hi + 1] - cb[lo];
            let dice = 2.0 * tp as f64 / (predicted + total) as f64;
            if dice > best.dice {
                best = WindowScore {
                    lo: f64::from(HU_MIN + HU_STEP * lo as i32),
                    hi: f64::from(HU_MIN + HU_STEP * hi as i32 + HU_STEP - 1),
                    dice,
                };
            }
        }
    }
    Some(best)
}

/// The best leave-one-out position prior over `masks` (one per case, all on one grid).
/// Cases without the organ are left out of the mean; `None` with fewer than two cases.
pub fn position_prior(masks: &[Vec<bool>]) -> Option<PriorScore> {
    let masks: Vec<&Vec<bool>> = masks.iter().filter(|m| m.iter().any(|&v| v)).collect();
    let n = masks.len();
    if n < 2 || masks.iter().any(|m| m.len() != masks[0].len()) {
        return None;
    }
    let mut counts = vec![0u32; masks[0].len()];
    for m in &masks {
        for (c, &v) in counts.iter_mut().zip(m.iter()) {
            *c += u32::from(v);
        }
    }
    let mut best: Option<PriorScore> = None;
    for step in 1..=19 {
        let threshold = step as f64 * 0.05;
        let mut sum = 0.0;
        for m in &masks {
            let (mut tp, mut predicted, mut actual) = (0u64, 0u64, 0u64);
            for (&c, &v) in counts.iter().zip(m.iter()) {
                let others = c - u32::from(v);
                let p = f64::from(others) >= threshold * (n - 1) as f64 - 1e-9;
                predicted += u64::from(p);
                actual += u64::from(v);
                tp += u64::from(p && v);
            }
            sum += 2.0 * tp as f64 / (predicted + actual).max(1) as f64;
        }
        let dice = sum / n as f64;
        if best.is_none_or(|b| dice > b.dice) {
            best = Some(PriorScore { threshold, dice });
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_finds_a_separable_organ_and_not_a_hidden_one() {
        // Organ at 100 HU, other tissue at 0 and 300 HU: a perfect window exists.
        let mut organ = vec![0u64; HU_BINS];
        let mut body = vec![0u64; HU_BINS];
        organ[bin(100.0)] = 50;
        body[bin(100.0)] = 50;
        body[bin(0.0)] = 500;
        body[bin(300.0)] = 500;
        let w = best_window(&organ, &body).unwrap();
        assert!((w.dice - 1.0).abs() < 1e-12);
        assert!(w.lo <= 100.0 && w.hi >= 100.0 && w.hi < 300.0, "{w:?}");
        // Now as many non-organ voxels share its HU: Dice 2·50 / (100 + 50).
        body[bin(100.0)] += 50;
        let w = best_window(&organ, &body).unwrap();
        assert!((w.dice - 2.0 / 3.0).abs() < 1e-12, "{w:?}");
        assert!(best_window(&vec![0; HU_BINS], &body).is_none());
    }

    #[test]
    fn prior_is_perfect_for_a_fixed_organ_and_poor_for_a_wandering_one() {
        let grid = 20;
        let blob = |start: usize| -> Vec<bool> {
            (0..grid).map(|i| (start..start + 4).contains(&i)).collect()
        };
        let fixed = vec![blob(5); 4];
        let p = position_prior(&fixed).unwrap();
        assert!((p.dice - 1.0).abs() < 1e-12);
        let wandering = vec![blob(0), blob(5), blob(10), blob(15)];
        let p = position_prior(&wandering).unwrap();
        assert!(p.dice < 0.01, "{p:?}");
        assert!(position_prior(&[blob(3)]).is_none());
    }
}
