//! Guarding the user's inputs: an output path that is one of the inputs (the same path,
//! a symbolic link to it, or a hard link) is refused before anything is written.

use std::path::Path;

use crate::error::{DataError, Result};

/// Refuses `output` if it already exists and is the same file as one of `inputs`.
///
/// Files are compared by identity (device and inode on Unix, the canonical path elsewhere),
/// so `./ct.nii.gz`, an absolute path, a symbolic link and a hard link to the same scan are
/// all recognised. An output that does not exist yet cannot be an input.
///
/// # Errors
/// [`DataError::OverwritesInput`] naming both paths as the user gave them.
pub fn refuse_overwriting_inputs(output: &Path, inputs: &[&Path]) -> Result<()> {
    let Some(out_id) = identity(output) else {
        return Ok(());
    };
    for input in inputs {
        if identity(input).is_some_and(|id| id == out_id) {
            return Err(DataError::OverwritesInput {
                output: output.to_path_buf(),
                input: input.to_path_buf(),
            });
        }
    }
    Ok(())
}

#[cfg(unix)]
fn identity(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

#[cfg(not(unix))]
fn identity(path: &Path) -> Option<std::path::PathBuf> {
    std::fs::canonicalize(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_file_by_any_name_is_refused_and_other_files_are_not() {
        let dir = std::env::temp_dir().join(format!("segviz-output-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let scan = dir.join("ct.nii.gz");
        let model = dir.join("m.segviz");
        std::fs::write(&scan, b"scan").unwrap();
        std::fs::write(&model, b"model").unwrap();
        let inputs = [scan.as_path(), model.as_path()];
        let link = dir.join("link.nii.gz");
        std::os::unix::fs::symlink(&scan, &link).unwrap();
        let hard = dir.join("hard.segviz");
        std::fs::hard_link(&model, &hard).unwrap();
        let dotted = dir.join(".").join("ct.nii.gz");
        for (output, input) in [
            (&scan, &scan),
            (&model, &model),
            (&link, &scan),
            (&hard, &model),
            (&dotted, &scan),
        ] {
            let e = refuse_overwriting_inputs(output, &inputs).unwrap_err();
            let text = e.to_string();
            assert!(
                text.contains(&output.display().to_string())
                    && text.contains(&input.display().to_string()),
                "{text}"
            );
        }
        refuse_overwriting_inputs(&dir.join("seg.nii.gz"), &inputs).unwrap();
        std::fs::write(dir.join("old.nii.gz"), b"old output").unwrap();
        refuse_overwriting_inputs(&dir.join("old.nii.gz"), &inputs).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
