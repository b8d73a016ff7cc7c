//! An on-disk cache of preprocessed (image, label) pairs, so resampling a few hundred CT
//! volumes happens once, not every epoch.
//!
//! # Key
//! SHA-256 of: a format tag, then for every source file its absolute path, size and
//! modification time, then the JSON of the [`PreprocessConfig`]. Editing a file or changing
//! any preprocessing field therefore gives a new key; a stale entry is never reused (it is
//! simply left behind; delete the folder to reclaim space).
//!
//! # Entry format (`<key>.svpp`, little-endian)
//! ```text
//! magic   8 bytes  b"SVPPv001"
//! image   volume block, f32 values
//! label   volume block, u8 values
//! block:  shape 3 × u64 | affine 16 × f64 (row-major) | values in C order
//! ```
//! Raw rather than compressed: windowed CT in `f32` barely compresses, and loading must be
//! fast. Entries are written atomically; an unreadable entry counts as a miss and is rewritten.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use sha2::{Digest, Sha256};

use crate::atomic_write::write_bytes;
use crate::error::{DataError, Result};
use crate::preprocess::{preprocess_files, PreprocessConfig};
use crate::volume::{Geometry, Volume};

/// First bytes of every cache entry (bump the version when the layout changes).
const MAGIC: &[u8; 8] = b"SVPPv001";
/// Mixed into every key, so a change of key recipe invalidates old entries.
const KEY_TAG: &[u8] = b"segviz-preprocess-cache/1\0";

/// Whether a lookup found a stored entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// The entry was on disk and was read.
    Hit,
    /// The entry was computed (and stored).
    Miss,
}

/// A folder of preprocessed pairs.
#[derive(Debug, Clone)]
pub struct PreprocessCache {
    dir: PathBuf,
}

impl PreprocessCache {
    /// A cache in `dir`, created if missing.
    ///
    /// # Errors
    /// [`DataError::Io`] if the folder cannot be created.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
        Ok(PreprocessCache { dir })
    }

    /// The cache folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The key (64 hex digits) of `sources` preprocessed with `config`.
    ///
    /// # Errors
    /// [`DataError::Io`] if a source file cannot be found or its metadata read.
    pub fn key(&self, sources: &[&Path], config: &PreprocessConfig) -> Result<String> {
        let mut hasher = Sha256::new();
        hasher.update(KEY_TAG);
        // A DICOM series is a folder: every file of it counts.
        let files: Vec<PathBuf> = sources
            .iter()
            .flat_map(|s| crate::dicom::scan_files(s))
            .collect();
        for source in &files {
            let absolute = std::fs::canonicalize(source).map_err(|e| DataError::io(source, e))?;
            let meta = std::fs::metadata(&absolute).map_err(|e| DataError::io(source, e))?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .unwrap_or_default();
            let name = absolute.to_string_lossy();
            hasher.update((name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            hasher.update(meta.len().to_le_bytes());
            hasher.update(modified.as_secs().to_le_bytes());
            hasher.update(modified.subsec_nanos().to_le_bytes());
        }
        let config_json = serde_json::to_string(config)
            .map_err(|e| DataError::Config(format!("cannot serialise the config: {e}")))?;
        hasher.update(config_json.as_bytes());
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }

    /// Where the entry of `key` lives.
    pub fn entry_path(&self, key: &str) -> PathBuf {
        self.dir.join(format!("{key}.svpp"))
    }

    /// The preprocessed pair for these files, from the cache when possible, else computed by
    /// [`preprocess_files`] and stored.
    ///
    /// # Errors
    /// Any error of [`preprocess_files`], or [`DataError::Io`] when storing fails.
    pub fn load_or_preprocess(
        &self,
        image_path: &Path,
        label_path: &Path,
        config: &PreprocessConfig,
    ) -> Result<(Volume<f32>, Volume<u8>, CacheOutcome)> {
        self.get_or_insert_with(&[image_path, label_path], config, || {
            preprocess_files(image_path, label_path, config)
        })
    }

    /// The entry for (`sources`, `config`), or `compute()`'s result, stored before it is
    /// returned.
    ///
    /// # Errors
    /// `compute`'s error, [`DataError::Io`] for unreadable sources or a failed write.
    pub fn get_or_insert_with(
        &self,
        sources: &[&Path],
        config: &PreprocessConfig,
        compute: impl FnOnce() -> Result<(Volume<f32>, Volume<u8>)>,
    ) -> Result<(Volume<f32>, Volume<u8>, CacheOutcome)> {
        let path = self.entry_path(&self.key(sources, config)?);
        if let Ok(bytes) = std::fs::read(&path) {
            if let Some((image, label)) = decode_entry(&bytes) {
                return Ok((image, label, CacheOutcome::Hit));
            }
        }
        let (image, label) = compute()?;
        write_bytes(&path, &encode_entry(&image, &label))?;
        Ok((image, label, CacheOutcome::Miss))
    }
}

fn encode_entry(image: &Volume<f32>, label: &Volume<u8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + 2 * 152 + image.data.len() * 4 + label.data.len());
    out.extend_from_slice(MAGIC);
    encode_geometry(&mut out, &image.geometry);
    for v in &image.data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    encode_geometry(&mut out, &label.geometry);
    out.extend_from_slice(&label.data);
    out
}

fn encode_geometry(out: &mut Vec<u8>, g: &Geometry) {
    for s in g.shape {
        out.extend_from_slice(&(s as u64).to_le_bytes());
    }
    for row in g.affine {
        for v in row {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
}

/// Reads an entry; `None` for anything malformed (treated as a miss).
fn decode_entry(bytes: &[u8]) -> Option<(Volume<f32>, Volume<u8>)> {
    let mut reader = Reader { bytes, at: 0 };
    if reader.take(8)? != MAGIC {
        return None;
    }
    let geometry = reader.geometry()?;
    let raw = reader.take(geometry.len().checked_mul(4)?)?;
    let data = raw
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let image = Volume { data, geometry };
    let geometry = reader.geometry()?;
    let data = reader.take(geometry.len())?.to_vec();
    let label = Volume { data, geometry };
    (reader.at == bytes.len()).then_some((image, label))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let slice = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(slice)
    }

    fn u64(&mut self) -> Option<u64> {
        let b = self.take(8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?))
    }

    fn f64(&mut self) -> Option<f64> {
        self.u64().map(f64::from_bits)
    }

    fn geometry(&mut self) -> Option<Geometry> {
        let mut shape = [0usize; 3];
        for s in &mut shape {
            *s = usize::try_from(self.u64()?).ok()?;
        }
        shape
            .iter()
            .try_fold(1usize, |acc, &s| acc.checked_mul(s))?;
        let mut affine = [[0.0; 4]; 4];
        for row in &mut affine {
            for v in row.iter_mut() {
                *v = self.f64()?;
            }
        }
        Some(Geometry { shape, affine })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nifti_io::{write_labels, write_volume, VoxelType};

    fn write_pair(dir: &Path, side: usize) -> (PathBuf, PathBuf) {
        let geometry = Geometry::from_spacing([side, side, side], [1.0, 1.0, 1.5]);
        let mut image = Volume::filled(geometry.clone(), -1000.0f32);
        let mut label = Volume::filled(geometry, 0u8);
        for n in 0..image.data.len() / 3 {
            image.data[n] = 60.0;
            label.data[n] = 1;
        }
        let image_path = dir.join("img.nii.gz");
        let label_path = dir.join("seg.nii.gz");
        write_volume(&image_path, &image, VoxelType::Int16).expect("image");
        write_labels(&label_path, &label).expect("label");
        (image_path, label_path)
    }

    #[test]
    fn second_call_hits_and_a_changed_config_or_source_misses() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (image_path, label_path) = write_pair(dir.path(), 12);
        let cache = PreprocessCache::new(dir.path().join("cache")).expect("cache");
        let config = PreprocessConfig::spleen();

        let (i1, l1, first) = cache
            .load_or_preprocess(&image_path, &label_path, &config)
            .expect("first");
        assert_eq!(first, CacheOutcome::Miss);
        let (i2, l2, second) = cache
            .load_or_preprocess(&image_path, &label_path, &config)
            .expect("second");
        assert_eq!(second, CacheOutcome::Hit);
        assert_eq!((&i1, &l1), (&i2, &l2));

        let other = PreprocessConfig::liver();
        let (_, _, changed) = cache
            .load_or_preprocess(&image_path, &label_path, &other)
            .expect("other");
        assert_eq!(changed, CacheOutcome::Miss);
        let moved = PreprocessConfig {
            pixdim: [2.0, 2.0, 2.0],
            ..config.clone()
        };
        assert_ne!(
            cache.key(&[&image_path, &label_path], &moved).expect("key"),
            cache
                .key(&[&image_path, &label_path], &config)
                .expect("key")
        );

        // A rewritten source (different size) is a new key.
        write_pair(dir.path(), 14);
        let (i3, _, rewritten) = cache
            .load_or_preprocess(&image_path, &label_path, &config)
            .expect("rewritten");
        assert_eq!(rewritten, CacheOutcome::Miss);
        assert_ne!(i3, i2);
    }

    #[test]
    fn a_corrupt_entry_is_recomputed_and_a_missing_source_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (image_path, label_path) = write_pair(dir.path(), 8);
        let cache = PreprocessCache::new(dir.path().join("cache")).expect("cache");
        let config = PreprocessConfig::default();
        let (image, label, _) = cache
            .load_or_preprocess(&image_path, &label_path, &config)
            .expect("fill");
        let key = cache
            .key(&[&image_path, &label_path], &config)
            .expect("key");
        let entry = cache.entry_path(&key);
        let bytes = std::fs::read(&entry).expect("entry");
        assert_eq!(decode_entry(&bytes), Some((image.clone(), label.clone())));
        std::fs::write(&entry, &bytes[..bytes.len() - 1]).expect("truncate");
        let (again, _, outcome) = cache
            .load_or_preprocess(&image_path, &label_path, &config)
            .expect("again");
        assert_eq!(outcome, CacheOutcome::Miss);
        assert_eq!(again, image);

        let missing = dir.path().join("nope.nii.gz");
        let err = cache
            .load_or_preprocess(&missing, &label_path, &config)
            .unwrap_err();
        assert!(err.to_string().contains("nope.nii.gz"), "{err}");
    }
}
