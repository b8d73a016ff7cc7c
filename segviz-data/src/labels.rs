//! The task vocabulary: the four organs SegViz segments, which of them a sample is
//! annotated for, and how each dataset's own label values map onto them.
//!
//! Every site labels a different subset of the organs (MSD liver only the liver, KiTS19 only
//! the kidneys, …). After [`LabelMap::apply`] all label volumes use one vocabulary:
//! `0` background, then `liver = 1`, `spleen = 2`, `pancreas = 3`, `kidney = 4`
//! ([`Organ::ALL`] order, label value = index + 1). Tumours are merged into their organ, as
//! in the paper. An organ that a sample is *not* annotated for is **unknown** there, not
//! background: its voxels carry `0` in the label volume, and [`OrganSet`] records that the
//! `0` means "not looked at" for that organ.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::volume::Volume;

/// One of the four organs of the SegViz task vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Organ {
    /// Liver (MSD Task03), vocabulary label 1.
    Liver,
    /// Spleen (MSD Task09), vocabulary label 2.
    Spleen,
    /// Pancreas (MSD Task07), vocabulary label 3.
    Pancreas,
    /// Both kidneys (KiTS19), vocabulary label 4.
    Kidney,
}

impl Organ {
    /// All organs in the fixed fusion order; an organ's vocabulary label is its index + 1.
    pub const ALL: [Organ; 4] = [Organ::Liver, Organ::Spleen, Organ::Pancreas, Organ::Kidney];

    /// Number of organs in the vocabulary.
    pub const COUNT: usize = 4;

    /// Lower-case name: `"liver"`, `"spleen"`, `"pancreas"`, `"kidney"`.
    pub fn name(self) -> &'static str {
        match self {
            Organ::Liver => "liver",
            Organ::Spleen => "spleen",
            Organ::Pancreas => "pancreas",
            Organ::Kidney => "kidney",
        }
    }

    /// Position in [`Organ::ALL`].
    pub fn index(self) -> usize {
        match self {
            Organ::Liver => 0,
            Organ::Spleen => 1,
            Organ::Pancreas => 2,
            Organ::Kidney => 3,
        }
    }

    /// Vocabulary label value (`index + 1`).
    pub fn label(self) -> u8 {
        self.index() as u8 + 1
    }

    /// The organ with vocabulary label `value` (1..=4); `None` for background or anything else.
    pub fn from_label(value: u8) -> Option<Organ> {
        match value {
            1..=4 => Some(Organ::ALL[value as usize - 1]),
            _ => None,
        }
    }

    /// The organ named `name`, case-insensitively; `"kidneys"` is accepted for
    /// [`Organ::Kidney`]. `None` for any other name.
    pub fn from_name(name: &str) -> Option<Organ> {
        let name = name.trim().to_ascii_lowercase();
        match name.as_str() {
            "liver" => Some(Organ::Liver),
            "spleen" => Some(Organ::Spleen),
            "pancreas" => Some(Organ::Pancreas),
            "kidney" | "kidneys" => Some(Organ::Kidney),
            _ => None,
        }
    }
}

impl fmt::Display for Organ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A set of organs, e.g. the organs a sample is annotated for.
///
/// Serialised as a list of organ names in [`Organ::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct OrganSet(u8);

impl OrganSet {
    /// No organ.
    pub const EMPTY: OrganSet = OrganSet(0);
    /// All four organs.
    pub const ALL: OrganSet = OrganSet(0b1111);

    /// The set holding exactly `organ`.
    pub fn single(organ: Organ) -> Self {
        OrganSet(1 << organ.index())
    }

    /// This set with `organ` added.
    #[must_use]
    pub fn with(self, organ: Organ) -> Self {
        OrganSet(self.0 | 1 << organ.index())
    }

    /// Adds `organ`.
    pub fn insert(&mut self, organ: Organ) {
        self.0 |= 1 << organ.index();
    }

    /// Whether `organ` is in the set.
    pub fn contains(self, organ: Organ) -> bool {
        self.0 & (1 << organ.index()) != 0
    }

    /// Whether every organ of `other` is in this set.
    pub fn is_superset(self, other: OrganSet) -> bool {
        self.0 & other.0 == other.0
    }

    /// Number of organs in the set.
    pub fn len(self) -> usize {
        self.0.count_ones() as usize
    }

    /// Whether the set holds no organ.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The organs of the set, in [`Organ::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Organ> {
        Organ::ALL.into_iter().filter(move |o| self.contains(*o))
    }

    /// One flag per organ, in [`Organ::ALL`] order.
    pub fn to_flags(self) -> [bool; 4] {
        Organ::ALL.map(|o| self.contains(o))
    }

    /// The set from one flag per organ, in [`Organ::ALL`] order.
    pub fn from_flags(flags: [bool; 4]) -> Self {
        Organ::ALL
            .into_iter()
            .zip(flags)
            .filter(|(_, f)| *f)
            .fold(OrganSet::EMPTY, |s, (o, _)| s.with(o))
    }
}

impl FromIterator<Organ> for OrganSet {
    fn from_iter<I: IntoIterator<Item = Organ>>(iter: I) -> Self {
        iter.into_iter().fold(OrganSet::EMPTY, OrganSet::with)
    }
}

impl fmt::Display for OrganSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Organ::name).collect();
        write!(f, "[{}]", names.join(", "))
    }
}

impl Serialize for OrganSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

impl<'de> Deserialize<'de> for OrganSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let organs = Vec::<Organ>::deserialize(d)?;
        Ok(organs.into_iter().collect())
    }
}

/// How one dataset's label values map onto the vocabulary.
///
/// Only *declared* source values may appear in a label file: a value the map does not
/// declare means the file is not what the loader thinks it is, and [`LabelMap::apply`]
/// refuses it rather than silently calling it background. Source value `0` is always
/// declared as background.
///
/// The map also carries the organs the dataset is annotated for: normally exactly the organs
/// some value maps to, but a dataset may declare an organ annotated even when no value maps
/// to it (the organ is then absent from every case, which is still information).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelMap {
    /// Source value → vocabulary value (0 = background). Holds every declared value.
    targets: BTreeMap<u8, u8>,
    /// Organs annotated in this dataset.
    annotated: OrganSet,
}

impl Default for LabelMap {
    fn default() -> Self {
        Self::new()
    }
}

impl LabelMap {
    /// A map that declares only `0 → background` and no annotated organ.
    pub fn new() -> Self {
        LabelMap {
            targets: BTreeMap::from([(0, 0)]),
            annotated: OrganSet::EMPTY,
        }
    }

    /// Declares that source value `value` is `organ` (and so that `organ` is annotated).
    #[must_use]
    pub fn organ(mut self, value: u8, organ: Organ) -> Self {
        self.targets.insert(value, organ.label());
        self.annotated.insert(organ);
        self
    }

    /// Declares that source value `value` exists but is background for SegViz (a structure
    /// outside the vocabulary, such as BTCV's aorta).
    #[must_use]
    pub fn background(mut self, value: u8) -> Self {
        self.targets.insert(value, 0);
        self
    }

    /// Adds `organs` to the annotated set without mapping any value to them.
    #[must_use]
    pub fn with_annotated(mut self, organs: OrganSet) -> Self {
        self.annotated = OrganSet(self.annotated.0 | organs.0);
        self
    }

    /// MSD Task03 (liver): 1 liver, 2 tumour (merged into the liver).
    pub fn msd_liver() -> Self {
        Self::new().organ(1, Organ::Liver).organ(2, Organ::Liver)
    }

    /// MSD Task09 (spleen): 1 spleen.
    pub fn msd_spleen() -> Self {
        Self::new().organ(1, Organ::Spleen)
    }

    /// MSD Task07 (pancreas): 1 pancreas, 2 tumour (merged into the pancreas).
    pub fn msd_pancreas() -> Self {
        Self::new()
            .organ(1, Organ::Pancreas)
            .organ(2, Organ::Pancreas)
    }

    /// KiTS19: 1 kidney, 2 tumour (merged into the kidney).
    pub fn kits19() -> Self {
        Self::new().organ(1, Organ::Kidney).organ(2, Organ::Kidney)
    }

    /// BTCV abdomen (13 structures, all annotated): 1 spleen, 2 right kidney and 3 left
    /// kidney (merged), 6 liver, 11 pancreas; the other nine structures are background.
    pub fn btcv() -> Self {
        let mut map = Self::new()
            .organ(1, Organ::Spleen)
            .organ(2, Organ::Kidney)
            .organ(3, Organ::Kidney)
            .organ(6, Organ::Liver)
            .organ(11, Organ::Pancreas);
        for v in [4, 5, 7, 8, 9, 10, 12, 13] {
            map = map.background(v);
        }
        map
    }

    /// The organs this dataset is annotated for.
    pub fn annotated(&self) -> OrganSet {
        self.annotated
    }

    /// The declared source values, ascending.
    pub fn declared(&self) -> Vec<u8> {
        self.targets.keys().copied().collect()
    }

    /// The vocabulary value of source value `value`, or `None` if it is not declared.
    pub fn target(&self, value: u8) -> Option<u8> {
        self.targets.get(&value).copied()
    }

    /// Maps a label volume in the dataset's own values to vocabulary values.
    ///
    /// `file` names the label file in the error when a value is not declared; the error
    /// lists every offending value.
    pub fn apply(&self, labels: &Volume<u8>, file: &Path) -> Result<Volume<u8>> {
        // A 256-entry table keeps the per-voxel work to one load.
        let mut table = [None::<u8>; 256];
        for (&src, &dst) in &self.targets {
            table[src as usize] = Some(dst);
        }
        let mut seen = [false; 256];
        for &v in &labels.data {
            seen[v as usize] = true;
        }
        let undeclared: Vec<u8> = (0..=255u8)
            .filter(|&v| seen[v as usize] && table[v as usize].is_none())
            .collect();
        if !undeclared.is_empty() {
            return Err(DataError::UndeclaredLabels {
                path: file.to_path_buf(),
                values: undeclared,
                declared: self.declared(),
            });
        }
        let data = labels
            .data
            .iter()
            .map(|&v| table[v as usize].unwrap_or(0))
            .collect();
        Ok(Volume {
            data,
            geometry: labels.geometry.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Geometry;

    fn vol(values: &[u8]) -> Volume<u8> {
        Volume {
            data: values.to_vec(),
            geometry: Geometry::from_spacing([1, 1, values.len()], [1.0; 3]),
        }
    }

    #[test]
    fn organ_order_names_and_labels() {
        let names: Vec<_> = Organ::ALL.iter().map(|o| o.name()).collect();
        assert_eq!(names, ["liver", "spleen", "pancreas", "kidney"]);
        for (i, o) in Organ::ALL.iter().enumerate() {
            assert_eq!(o.label() as usize, i + 1);
            assert_eq!(Organ::from_label(o.label()), Some(*o));
            assert_eq!(Organ::from_name(&o.name().to_uppercase()), Some(*o));
        }
        assert_eq!(Organ::from_name("kidneys"), Some(Organ::Kidney));
        assert_eq!(Organ::from_name("aorta"), None);
        assert_eq!(Organ::from_label(0), None);
        assert_eq!(Organ::from_label(5), None);
    }

    #[test]
    fn organ_set_round_trips() {
        let s = OrganSet::single(Organ::Spleen).with(Organ::Kidney);
        assert_eq!(s.len(), 2);
        assert_eq!(s.to_flags(), [false, true, false, true]);
        assert_eq!(OrganSet::from_flags(s.to_flags()), s);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(json, r#"["spleen","kidney"]"#);
        assert_eq!(serde_json::from_str::<OrganSet>(&json).unwrap(), s);
        assert!(OrganSet::ALL.is_superset(s));
        assert!(!s.is_superset(OrganSet::ALL));
    }

    #[test]
    fn msd_tumours_merge_into_their_organ() {
        let out = LabelMap::msd_liver()
            .apply(&vol(&[0, 1, 2]), Path::new("l.nii"))
            .unwrap();
        assert_eq!(out.data, [0, 1, 1]);
        let out = LabelMap::msd_pancreas()
            .apply(&vol(&[2, 1, 0]), Path::new("p.nii"))
            .unwrap();
        assert_eq!(out.data, [3, 3, 0]);
        let out = LabelMap::msd_spleen()
            .apply(&vol(&[1, 0]), Path::new("s.nii"))
            .unwrap();
        assert_eq!(out.data, [2, 0]);
        assert_eq!(
            LabelMap::msd_liver().annotated(),
            OrganSet::single(Organ::Liver)
        );
    }

    #[test]
    fn kits_tumour_merges_into_kidney() {
        let out = LabelMap::kits19()
            .apply(&vol(&[0, 1, 2]), Path::new("seg.nii.gz"))
            .unwrap();
        assert_eq!(out.data, [0, 4, 4]);
        assert_eq!(
            LabelMap::kits19().annotated(),
            OrganSet::single(Organ::Kidney)
        );
    }

    #[test]
    fn btcv_merges_kidneys_and_drops_other_structures() {
        let src: Vec<u8> = (0..=13).collect();
        let out = LabelMap::btcv()
            .apply(&vol(&src), Path::new("label0001.nii.gz"))
            .unwrap();
        //            0  1  2  3  4  5  6  7  8  9 10 11 12 13
        assert_eq!(out.data, [0, 2, 4, 4, 0, 0, 1, 0, 0, 0, 0, 3, 0, 0]);
        assert_eq!(LabelMap::btcv().annotated(), OrganSet::ALL);
    }

    #[test]
    fn undeclared_value_names_file_and_values() {
        let err = LabelMap::msd_spleen()
            .apply(&vol(&[0, 1, 7, 3, 7]), Path::new("spleen_3.nii.gz"))
            .unwrap_err();
        match &err {
            DataError::UndeclaredLabels { path, values, .. } => {
                assert_eq!(path, Path::new("spleen_3.nii.gz"));
                assert_eq!(values, &[3, 7]);
            }
            other => panic!("unexpected error {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("spleen_3.nii.gz") && msg.contains("3, 7"),
            "{msg}"
        );
    }

    #[test]
    fn annotated_without_values() {
        let map = LabelMap::new()
            .organ(1, Organ::Liver)
            .with_annotated(OrganSet::single(Organ::Spleen));
        assert_eq!(
            map.annotated(),
            OrganSet::single(Organ::Liver).with(Organ::Spleen)
        );
        assert_eq!(map.declared(), [0, 1]);
    }
}
