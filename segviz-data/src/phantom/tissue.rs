//! Tissue classes and their attenuation in each contrast phase.
//!
//! Values are textbook means for adults (NOTES.md §4 and standard CT references): what
//! matters for the phantom is their *ordering and overlap* in each phase, which decides
//! which neighbours a target organ can be confused with. Every subject then scales the
//! contrast uptake, shifts each organ, and adds texture (see [`super::anatomy`]).

use serde::{Deserialize, Serialize};

use crate::labels::Organ;

/// Contrast phase of an acquisition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ContrastPhase {
    /// No contrast agent.
    Native,
    /// Late arterial (~35 s): bright arteries, renal cortex far brighter than medulla,
    /// heterogeneous ("moiré") spleen, pancreas at its peak.
    LateArterial,
    /// Portal venous (~70 s): parenchyma and veins enhanced, kidneys homogeneous.
    PortalVenous,
    /// Delayed (~3–5 min): enhancement washing out, contrast excreted into the renal
    /// collecting systems and bladder.
    Delayed,
}

impl ContrastPhase {
    /// Every phase, in the order of [`Tissue::hu`]'s table.
    pub const ALL: [ContrastPhase; 4] = [
        ContrastPhase::Native,
        ContrastPhase::LateArterial,
        ContrastPhase::PortalVenous,
        ContrastPhase::Delayed,
    ];

    /// Position in [`ContrastPhase::ALL`].
    pub fn index(self) -> usize {
        match self {
            ContrastPhase::Native => 0,
            ContrastPhase::LateArterial => 1,
            ContrastPhase::PortalVenous => 2,
            ContrastPhase::Delayed => 3,
        }
    }

    /// Short name (`native`, `late_arterial`, `portal_venous`, `delayed`).
    pub fn name(self) -> &'static str {
        match self {
            ContrastPhase::Native => "native",
            ContrastPhase::LateArterial => "late_arterial",
            ContrastPhase::PortalVenous => "portal_venous",
            ContrastPhase::Delayed => "delayed",
        }
    }
}

/// The tissue classes the phantom renders, each with its own attenuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tissue {
    /// Outside the body.
    Air,
    /// Subcutaneous fat.
    SubcutaneousFat,
    /// Skeletal muscle (abdominal wall, paraspinal, psoas, diaphragm, gluteal).
    Muscle,
    /// Fat between the organs (mesentery, retroperitoneum, mediastinum).
    VisceralFat,
    /// Cortical bone.
    CorticalBone,
    /// Cancellous bone (vertebral bodies, pelvis, femoral heads); density varies per subject.
    CancellousBone,
    /// Intervertebral disc.
    Disc,
    /// Spinal canal (CSF and cord).
    SpinalCanal,
    /// Lung parenchyma.
    Lung,
    /// Heart muscle.
    Myocardium,
    /// Blood in the heart chambers.
    HeartBlood,
    /// Arterial blood (aorta, iliac arteries).
    Artery,
    /// Systemic venous blood (IVC, renal and hepatic veins).
    Vein,
    /// Portal, splenic and superior mesenteric venous blood.
    PortalVein,
    /// Liver parenchyma.
    Liver,
    /// A simple cyst (liver or kidney).
    Cyst,
    /// Bile in the gallbladder.
    Bile,
    /// Spleen.
    Spleen,
    /// Renal cortex.
    KidneyCortex,
    /// Renal medulla.
    KidneyMedulla,
    /// Renal sinus fat (not part of the kidney label).
    RenalSinus,
    /// Urine in the renal pelvis or bladder (excreted contrast in the delayed phase).
    Urine,
    /// Adrenal gland.
    Adrenal,
    /// Pancreas.
    Pancreas,
    /// Wall of the stomach, oesophagus or bowel.
    GutWall,
    /// Fluid content of stomach or bowel (water, or oral contrast: see [`OralContrast`]).
    GutFluid,
    /// Solid bowel content (chyme, stool).
    GutSolid,
    /// Gas in stomach or bowel.
    Gas,
    /// A tumour inside the given organ.
    Tumour(Organ),
    /// A metal implant.
    Metal,
}

/// What a subject drank before the scan: it decides the HU of [`Tissue::GutFluid`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OralContrast {
    /// Nothing: residual fluid.
    None,
    /// Water as a negative oral contrast.
    Water,
    /// Positive (iodinated or barium) oral contrast at this HU.
    Positive(f64),
}

impl Tissue {
    /// Mean attenuation in HU in each phase of [`ContrastPhase::ALL`] (before the subject's
    /// uptake scaling, offsets and texture).
    pub fn hu_table(self) -> [f64; 4] {
        match self {
            Tissue::Air | Tissue::Gas => [-1000.0; 4],
            Tissue::Lung => [-840.0; 4],
            Tissue::SubcutaneousFat => [-105.0; 4],
            Tissue::VisceralFat => [-95.0; 4],
            Tissue::RenalSinus => [-70.0, -65.0, -65.0, -65.0],
            Tissue::Muscle => [48.0, 56.0, 60.0, 58.0],
            Tissue::CorticalBone => [850.0; 4],
            Tissue::CancellousBone => [200.0, 205.0, 210.0, 208.0],
            Tissue::Disc => [80.0, 85.0, 88.0, 88.0],
            Tissue::SpinalCanal => [15.0, 18.0, 20.0, 20.0],
            Tissue::Metal => [3000.0; 4],
            Tissue::Myocardium => [45.0, 130.0, 110.0, 85.0],
            Tissue::HeartBlood => [42.0, 260.0, 165.0, 105.0],
            Tissue::Artery => [42.0, 290.0, 165.0, 105.0],
            Tissue::Vein => [40.0, 95.0, 150.0, 105.0],
            Tissue::PortalVein => [40.0, 140.0, 170.0, 105.0],
            Tissue::Liver => [58.0, 72.0, 110.0, 88.0],
            Tissue::Cyst => [6.0, 7.0, 8.0, 8.0],
            Tissue::Bile => [12.0; 4],
            Tissue::Spleen => [48.0, 125.0, 120.0, 90.0],
            Tissue::KidneyCortex => [32.0, 185.0, 170.0, 135.0],
            Tissue::KidneyMedulla => [30.0, 75.0, 150.0, 150.0],
            Tissue::Urine => [10.0, 10.0, 12.0, 450.0],
            Tissue::Adrenal => [30.0, 70.0, 62.0, 50.0],
            Tissue::Pancreas => [42.0, 115.0, 98.0, 72.0],
            Tissue::GutWall => [40.0, 110.0, 95.0, 72.0],
            Tissue::GutFluid => [12.0; 4],
            Tissue::GutSolid => [35.0, 36.0, 38.0, 38.0],
            Tissue::Tumour(Organ::Liver) => [42.0, 60.0, 68.0, 62.0],
            Tissue::Tumour(Organ::Kidney) => [36.0, 130.0, 95.0, 70.0],
            Tissue::Tumour(Organ::Pancreas) => [38.0, 55.0, 60.0, 58.0],
            Tissue::Tumour(Organ::Spleen) => [40.0, 70.0, 75.0, 65.0],
        }
    }

    /// The target organ whose per-subject offset and texture apply to this tissue.
    pub fn organ(self) -> Option<Organ> {
        match self {
            Tissue::Liver => Some(Organ::Liver),
            Tissue::Spleen => Some(Organ::Spleen),
            Tissue::Pancreas => Some(Organ::Pancreas),
            Tissue::KidneyCortex | Tissue::KidneyMedulla => Some(Organ::Kidney),
            Tissue::Tumour(o) => Some(o),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hu(t: Tissue, phase: ContrastPhase) -> f64 {
        t.hu_table()[phase.index()]
    }

    #[test]
    fn phases_order_the_tissues_as_in_clinical_ct() {
        use ContrastPhase::*;
        // Late arterial: cortico-medullary differentiation, arteries brightest.
        assert!(
            hu(Tissue::KidneyCortex, LateArterial) > hu(Tissue::KidneyMedulla, LateArterial) + 80.0
        );
        assert!(hu(Tissue::Artery, LateArterial) > hu(Tissue::PortalVein, LateArterial));
        // Portal venous: the liver is enhanced, the kidney nearly homogeneous.
        assert!(hu(Tissue::Liver, PortalVenous) > hu(Tissue::Liver, Native) + 40.0);
        assert!(
            hu(Tissue::KidneyCortex, PortalVenous) - hu(Tissue::KidneyMedulla, PortalVenous) < 30.0
        );
        // Delayed: excreted contrast in the urine.
        assert!(hu(Tissue::Urine, Delayed) > 300.0);
        // Native: the organs are within a few HU of muscle.
        for t in [
            Tissue::Liver,
            Tissue::Spleen,
            Tissue::Pancreas,
            Tissue::KidneyCortex,
        ] {
            assert!(
                (hu(t, Native) - hu(Tissue::Muscle, Native)).abs() < 20.0,
                "{t:?}"
            );
        }
        for (i, p) in ContrastPhase::ALL.into_iter().enumerate() {
            assert_eq!(p.index(), i);
        }
    }
}
