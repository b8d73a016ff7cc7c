//! Seeded train/validation splits of a site's cases (the paper's 80:20).
//!
//! A split depends only on the set of case ids, the fraction and the seed — not on the
//! order the ids were listed in — so every run of an experiment sees the same cases. It is
//! saved as JSON beside the results, atomically, and reloaded from there; a saved split
//! that names cases the dataset does not have is refused, since it was made for other data.

use std::collections::BTreeSet;
use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::atomic_write;
use crate::error::{DataError, Result};

/// The paper's validation fraction (80:20).
pub const PAPER_VALIDATION_FRACTION: f64 = 0.2;

/// A train/validation split of case ids.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Split {
    /// Seed the split was drawn with.
    pub seed: u64,
    /// Fraction of cases asked for validation.
    pub validation_fraction: f64,
    /// Training case ids, sorted.
    pub train: Vec<String>,
    /// Validation case ids, sorted.
    pub validation: Vec<String>,
}

impl Split {
    /// Splits `ids` with `validation_fraction` of them (rounded) for validation.
    ///
    /// With two or more cases and a non-zero fraction at least one case is validation and at
    /// least one is training; a single case is always training.
    ///
    /// # Errors
    /// [`DataError::Config`] for a fraction outside `[0, 1)` or a repeated id.
    pub fn new<S: AsRef<str>>(ids: &[S], validation_fraction: f64, seed: u64) -> Result<Split> {
        if !(0.0..1.0).contains(&validation_fraction) {
            return Err(DataError::Config(format!(
                "validation fraction must be in [0, 1), got {validation_fraction}"
            )));
        }
        let mut sorted: Vec<String> = ids.iter().map(|s| s.as_ref().to_owned()).collect();
        sorted.sort();
        if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
            return Err(DataError::Config(format!(
                "case id {} appears twice; a split needs unique ids",
                w[0]
            )));
        }
        let n = sorted.len();
        let mut n_validation = (n as f64 * validation_fraction).round() as usize;
        if n >= 2 && validation_fraction > 0.0 {
            n_validation = n_validation.clamp(1, n - 1);
        } else if n < 2 {
            n_validation = 0;
        }
        // Fisher–Yates on the sorted ids: the result depends on the id set and the seed only.
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in (1..n).rev() {
            let j = rng.random_range(0..=i);
            sorted.swap(i, j);
        }
        let mut validation = sorted.split_off(n - n_validation);
        let mut train = sorted;
        train.sort();
        validation.sort();
        Ok(Split {
            seed,
            validation_fraction,
            train,
            validation,
        })
    }

    /// The paper's 80:20 split.
    pub fn paper<S: AsRef<str>>(ids: &[S], seed: u64) -> Result<Split> {
        Split::new(ids, PAPER_VALIDATION_FRACTION, seed)
    }

    /// Writes the split as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| DataError::invalid(path, format!("cannot serialise split: {e}")))?;
        atomic_write::write_bytes(path, &json)
    }

    /// Reads a saved split and checks it against the dataset's case ids `known`.
    ///
    /// # Errors
    /// [`DataError::Invalid`] (naming the file) for malformed JSON, a case listed twice or in
    /// both parts, or a case id not in `known`.
    pub fn load<S: AsRef<str>>(path: &Path, known: &[S]) -> Result<Split> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let split: Split = serde_json::from_str(&text)
            .map_err(|e| DataError::invalid(path, format!("not a saved split: {e}")))?;
        let known: BTreeSet<&str> = known.iter().map(AsRef::as_ref).collect();
        let mut seen = BTreeSet::new();
        let mut unknown = Vec::new();
        for id in split.train.iter().chain(&split.validation) {
            if !seen.insert(id.as_str()) {
                return Err(DataError::invalid(
                    path,
                    format!("case {id} is listed twice"),
                ));
            }
            if !known.contains(id.as_str()) {
                unknown.push(id.as_str());
            }
        }
        if !unknown.is_empty() {
            return Err(DataError::invalid(
                path,
                format!(
                    "split names case(s) the dataset does not have: {}",
                    unknown.join(", ")
                ),
            ));
        }
        Ok(split)
    }

    /// Loads the split at `path` if it exists, otherwise makes one and saves it there.
    pub fn load_or_create<S: AsRef<str>>(
        path: &Path,
        ids: &[S],
        validation_fraction: f64,
        seed: u64,
    ) -> Result<Split> {
        if path.exists() {
            let split = Split::load(path, ids)?;
            if split.seed != seed || split.validation_fraction != validation_fraction {
                return Err(DataError::invalid(
                    path,
                    format!(
                        "saved split was made with seed {} and validation fraction {}, \
                         this run asks for seed {seed} and fraction {validation_fraction}; \
                         use another output folder (or delete the split to make a new one)",
                        split.seed, split.validation_fraction
                    ),
                ));
            }
            return Ok(split);
        }
        let split = Split::new(ids, validation_fraction, seed)?;
        split.save(path)?;
        Ok(split)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    #[test]
    fn a_saved_split_of_another_seed_or_fraction_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("split.json");
        let all = ids(10);
        let saved = Split::load_or_create(&path, &all, 0.2, 1).unwrap();
        assert_eq!(Split::load_or_create(&path, &all, 0.2, 1).unwrap(), saved);
        for (fraction, seed) in [(0.2, 2), (0.3, 1)] {
            let e = Split::load_or_create(&path, &all, fraction, seed)
                .unwrap_err()
                .to_string();
            assert!(e.contains("split.json") && e.contains("seed 1"), "{e}");
        }
    }

    #[test]
    fn eighty_twenty_and_disjoint() {
        let all = ids(10);
        let s = Split::paper(&all, 7).unwrap();
        assert_eq!((s.train.len(), s.validation.len()), (8, 2));
        let mut joined: Vec<_> = s.train.iter().chain(&s.validation).cloned().collect();
        joined.sort();
        assert_eq!(joined, all);
    }

    #[test]
    fn same_seed_same_split_whatever_the_order() {
        let all = ids(20);
        let mut reversed = all.clone();
        reversed.reverse();
        let a = Split::paper(&all, 42).unwrap();
        assert_eq!(a, Split::paper(&all, 42).unwrap());
        assert_eq!(a, Split::paper(&reversed, 42).unwrap());
        let b = Split::paper(&all, 43).unwrap();
        assert_ne!(a.validation, b.validation);
    }

    #[test]
    fn small_sets() {
        let two = Split::paper(&ids(2), 0).unwrap();
        assert_eq!((two.train.len(), two.validation.len()), (1, 1));
        let one = Split::paper(&ids(1), 0).unwrap();
        assert_eq!((one.train.len(), one.validation.len()), (1, 0));
        let none = Split::new(&ids(5), 0.0, 0).unwrap();
        assert_eq!(none.validation.len(), 0);
        assert!(Split::new(&ids(5), 1.0, 0).is_err());
        assert!(Split::paper(&["a", "a"], 0).is_err());
    }

    #[test]
    fn save_and_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results/split.json");
        let all = ids(6);
        let s = Split::load_or_create(&path, &all, 0.2, 3).unwrap();
        assert_eq!(Split::load(&path, &all).unwrap(), s);
        // A second call with the same settings loads the saved split (another seed is
        // refused: see `a_saved_split_of_another_seed_or_fraction_is_refused`).
        assert_eq!(Split::load_or_create(&path, &all, 0.2, 3).unwrap(), s);
        let err = Split::load(&path, &all[..3]).unwrap_err().to_string();
        assert!(
            err.contains("split.json") && err.contains("does not have"),
            "{err}"
        );
        std::fs::write(&path, "{").unwrap();
        let err = Split::load(&path, &all).unwrap_err().to_string();
        assert!(err.contains("split.json"), "{err}");
    }
}
