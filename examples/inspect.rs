//! Summarise NIfTI files, one JSON line per file:
//!
//! ```text
//! cargo run --release --example inspect -- imagesTr/spleen_2.nii.gz labelsTr/spleen_2.nii.gz
//! ```
//!
//! Each line has the path, shape, spacing, orientation code, affine, datatype, min/max/mean
//! and, for integer files, the distinct values. A file that cannot be read gives a line
//! `{"path": ..., "error": ...}`; the others are still inspected, and the exit code is 1.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::data::inspect::inspect_file;

/// Print a JSON summary of each NIfTI file.
#[derive(Parser, Debug)]
#[command(name = "inspect")]
struct Args {
    /// NIfTI-1 files (`.nii` or `.nii.gz`).
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut failed = false;
    for file in &args.files {
        match inspect_file(file) {
            Ok(summary) => println!("{summary}"),
            Err(error) => {
                failed = true;
                let line = serde_json::json!({
                    "path": file.display().to_string(),
                    "error": error.to_string(),
                });
                println!("{line}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
