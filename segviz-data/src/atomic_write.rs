//! Writing files so that a reader never sees half of one: write a temporary file in the
//! same folder, then rename it over the target (a rename within one file system is atomic).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{DataError, Result};

/// The temporary path used while `path` is being written: same folder, a hidden name that
/// keeps the original name as its suffix (so `x.nii.gz` stays recognisably gzipped NIfTI),
/// unique per process and per write so that two threads writing the same file never share
/// a temporary.
pub(crate) fn temporary_path(path: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    path.with_file_name(format!(".tmp-{}-{n}-{name}", std::process::id()))
}

/// Writes `path` by calling `write` on a temporary path beside it, then renaming.
///
/// The parent folder is created if needed. If `write` fails the temporary file is removed
/// and the target is left untouched.
pub(crate) fn write_with<F>(path: &Path, write: F) -> Result<()>
where
    F: FnOnce(&Path) -> Result<()>,
{
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
    }
    let tmp = temporary_path(path);
    if let Err(e) = write(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        // The temporary name means nothing to the user: report the path they gave.
        return Err(match e {
            DataError::Io { path: p, source } if p == tmp => DataError::io(path, source),
            DataError::Invalid { path: p, reason } if p == tmp => DataError::invalid(path, reason),
            other => other,
        });
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        DataError::io(path, e)
    })
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| {
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(tmp)?;
            std::io::Write::write_all(&mut file, bytes)?;
            file.sync_all()
        };
        write().map_err(|e| DataError::io(tmp, e))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("segviz-atomic-{}", std::process::id()));
        let path = dir.join("sub").join("a.json");
        write_bytes(&path, b"first").unwrap();
        write_bytes(&path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let failed = write_with(&path, |_| Err(DataError::Config("boom".into())));
        assert!(failed.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_target_is_named_as_the_user_gave_it() {
        // Nobody, not even root, creates files in /proc.
        let path = Path::new("/proc/segviz-unwritable.nii.gz");
        let e = write_bytes(path, b"x").unwrap_err().to_string();
        assert!(e.starts_with("/proc/segviz-unwritable.nii.gz:"), "{e}");
        assert!(!e.contains(".tmp-"), "{e}");
    }
}
