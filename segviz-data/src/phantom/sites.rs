//! The five phantom sites: folder, layout, annotated organ and scanner style.
//!
//! Each style follows what the dataset papers report (sources in `docs/phantoms.md`);
//! ranges the papers do not give are our choice and are marked so there. The external
//! (BTCV-layout) site deliberately has a style of its own: a mix of phases, thick slices,
//! a soft kernel at low dose and a calibration offset no training site has.

use super::render::{AxisLayout, ScanRange, SiteStyle};
use super::tissue::ContrastPhase;
use crate::labels::Organ;

/// The kind of folder a site is written as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SiteKind {
    /// MSD task: dataset.json `name`, file prefix, and the label names.
    Msd {
        task: &'static str,
        prefix: &'static str,
        labels: &'static [(&'static str, &'static str)],
    },
    Kits,
    Btcv,
}

/// One site: where it goes, how it looks, what it annotates.
#[derive(Debug, Clone)]
pub(crate) struct SiteSpec {
    pub folder: &'static str,
    pub kind: SiteKind,
    pub organ: Option<Organ>,
    pub style: SiteStyle,
}

/// The style of the site written to `folder` (`Task03_Liver`, `Task09_Spleen`,
/// `Task07_Pancreas`, `kits19`, `btcv`), if there is one.
pub fn site_style(folder: &str) -> Option<SiteStyle> {
    site_specs()
        .into_iter()
        .find(|s| s.folder == folder)
        .map(|s| s.style)
}

/// The five sites. Styles differ on purpose: this is the domain shift between hospitals.
pub(crate) fn site_specs() -> Vec<SiteSpec> {
    use ContrastPhase::*;
    use ScanRange::*;
    vec![
        // MSD Task03 (LiTS): contrast-enhanced CT from several hospitals and scanners, from
        // upper-abdomen scans to whole-trunk staging: the widest spread of any site.
        SiteSpec {
            folder: "Task03_Liver",
            kind: SiteKind::Msd {
                task: "Liver",
                prefix: "liver",
                labels: &[("0", "background"), ("1", "liver"), ("2", "cancer")],
            },
            organ: Some(Organ::Liver),
            style: SiteStyle {
                phases: vec![(PortalVenous, 1.0)],
                scan_ranges: vec![
                    (Abdomen, 0.4),
                    (AbdomenPelvis, 0.35),
                    (ChestAbdomenPelvis, 0.25),
                ],
                fov_mm: [320.0, 460.0],
                inplane_spacing_scale: [0.85, 1.1],
                slice_spacing_scale: [0.6, 1.2],
                noise_sigma: [10.0, 22.0],
                noise_kernel: [0, 3],
                intensity_offset: 0.0,
                offset_jitter: 8.0,
                table_offset_mm: 25.0,
                streak_hu: 300.0,
                layout: AxisLayout::LPS,
            },
        },
        // MSD Task09: portal-venous CT of one cancer centre (patients treated for liver
        // metastases): staging scans of abdomen and pelvis, often with the chest.
        SiteSpec {
            folder: "Task09_Spleen",
            kind: SiteKind::Msd {
                task: "Spleen",
                prefix: "spleen",
                labels: &[("0", "background"), ("1", "spleen")],
            },
            organ: Some(Organ::Spleen),
            style: SiteStyle {
                phases: vec![(PortalVenous, 1.0)],
                scan_ranges: vec![(AbdomenPelvis, 0.6), (ChestAbdomenPelvis, 0.4)],
                fov_mm: [360.0, 440.0],
                inplane_spacing_scale: [0.95, 1.05],
                slice_spacing_scale: [0.9, 1.1],
                noise_sigma: [13.0, 18.0],
                noise_kernel: [1, 2],
                intensity_offset: -6.0,
                offset_jitter: 4.0,
                table_offset_mm: 15.0,
                streak_hu: 150.0,
                layout: AxisLayout::RAS,
            },
        },
        // MSD Task07: portal-venous CT of the same cancer centre (patients with pancreatic
        // masses): thinner slices, so noisier; abdomen or abdomen and pelvis.
        SiteSpec {
            folder: "Task07_Pancreas",
            kind: SiteKind::Msd {
                task: "Pancreas",
                prefix: "pancreas",
                labels: &[("0", "background"), ("1", "pancreas"), ("2", "cancer")],
            },
            organ: Some(Organ::Pancreas),
            style: SiteStyle {
                phases: vec![(PortalVenous, 1.0)],
                scan_ranges: vec![(Abdomen, 0.4), (AbdomenPelvis, 0.6)],
                fov_mm: [320.0, 450.0],
                inplane_spacing_scale: [0.9, 1.0],
                slice_spacing_scale: [0.5, 0.8],
                noise_sigma: [16.0, 22.0],
                noise_kernel: [1, 2],
                intensity_offset: 10.0,
                offset_jitter: 4.0,
                table_offset_mm: 25.0,
                streak_hu: 150.0,
                layout: AxisLayout::LPS,
            },
        },
        // KiTS19: preoperative late-arterial CT of nephrectomy patients, many scanned at
        // referring hospitals: wide spread of scanners, slice thicknesses and ranges;
        // stored slice-first.
        SiteSpec {
            folder: "kits19",
            kind: SiteKind::Kits,
            organ: Some(Organ::Kidney),
            style: SiteStyle {
                phases: vec![(LateArterial, 1.0)],
                scan_ranges: vec![
                    (Abdomen, 0.5),
                    (AbdomenPelvis, 0.4),
                    (ChestAbdomenPelvis, 0.1),
                ],
                fov_mm: [320.0, 480.0],
                inplane_spacing_scale: [0.85, 1.15],
                slice_spacing_scale: [0.5, 1.2],
                noise_sigma: [10.0, 25.0],
                noise_kernel: [0, 3],
                intensity_offset: -6.0,
                offset_jitter: 10.0,
                table_offset_mm: 30.0,
                streak_hu: 350.0,
                layout: AxisLayout::SLICE_FIRST,
            },
        },
        // External test site in BTCV layout, with a style no training site has: a mix of
        // portal-venous, delayed and native scans, thick slices, a soft kernel at low dose,
        // a large field of view and a calibration offset.
        SiteSpec {
            folder: "btcv",
            kind: SiteKind::Btcv,
            organ: None,
            style: SiteStyle {
                phases: vec![(PortalVenous, 0.5), (Delayed, 0.3), (Native, 0.2)],
                scan_ranges: vec![(Abdomen, 0.5), (AbdomenPelvis, 0.5)],
                fov_mm: [420.0, 500.0],
                inplane_spacing_scale: [1.0, 1.1],
                slice_spacing_scale: [1.2, 1.5],
                noise_sigma: [18.0, 28.0],
                noise_kernel: [3, 4],
                intensity_offset: 15.0,
                offset_jitter: 6.0,
                table_offset_mm: 20.0,
                streak_hu: 500.0,
                layout: AxisLayout::LPS,
            },
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn styles_are_valid_and_phases_follow_the_datasets() {
        let phases = |folder| {
            site_style(folder)
                .expect(folder)
                .phases
                .iter()
                .filter(|p| p.1 > 0.0)
                .map(|p| p.0)
                .collect::<Vec<_>>()
        };
        for spec in site_specs() {
            spec.style.validate().expect(spec.folder);
        }
        for folder in ["Task03_Liver", "Task09_Spleen", "Task07_Pancreas"] {
            assert_eq!(phases(folder), [ContrastPhase::PortalVenous], "{folder}");
        }
        assert_eq!(phases("kits19"), [ContrastPhase::LateArterial]);
        // The external site mixes phases, including some no training site has.
        let external = phases("btcv");
        assert!(external.len() >= 2);
        assert!(external.contains(&ContrastPhase::Delayed));
        // ... and its scanners (kernel, slice spacing) lie outside every training range.
        let btcv = site_style("btcv").unwrap();
        for spec in site_specs().iter().filter(|s| s.organ.is_some()) {
            let s = &spec.style;
            assert!(btcv.noise_kernel[1] > s.noise_kernel[1], "{}", spec.folder);
            assert!(
                btcv.slice_spacing_scale[1] > s.slice_spacing_scale[1],
                "{}",
                spec.folder
            );
            assert_ne!(btcv.intensity_offset, s.intensity_offset, "{}", spec.folder);
        }
        assert!(site_style("nowhere").is_none());
    }
}
