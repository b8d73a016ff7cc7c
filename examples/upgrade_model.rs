//! Rewrite SegViz model files of the first format (magic `SEGVIZ\0\x01`) as safetensors, the
//! format every SegViz since writes and Python's `safetensors` reads:
//!
//! ```text
//! cargo run --release --example upgrade_model -- runs/models/fedbn_ft/*.segviz
//! ```
//!
//! Each file is replaced in place, atomically, by a file with the same configuration, tensors
//! and metadata (checked by reading it back). A file already in the current format is left
//! untouched; a file that cannot be read is reported and the others are still upgraded.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::core::checkpoint::{read_checkpoint, write_checkpoint};

/// Rewrite SegViz model files of the first format as safetensors.
#[derive(Parser, Debug)]
#[command(name = "upgrade_model")]
struct Args {
    /// Model files to upgrade in place.
    #[arg(required = true)]
    files: Vec<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut failed = 0;
    for file in &args.files {
        match upgrade(file) {
            Ok(true) => println!("{}: upgraded to safetensors", file.display()),
            Ok(false) => println!("{}: already safetensors, left as it is", file.display()),
            Err(e) => {
                eprintln!("error: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        eprintln!("{failed} of {} file(s) not upgraded", args.files.len());
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Upgrades one file; `Ok(false)` when it is already in the current format.
fn upgrade(file: &std::path::Path) -> Result<bool, Box<dyn std::error::Error>> {
    let head = std::fs::read(file)
        .map_err(|e| format!("{}: {e}", file.display()))?
        .get(..8)
        .map(<[u8]>::to_vec)
        .unwrap_or_default();
    let checkpoint = read_checkpoint(file)?;
    if head != b"SEGVIZ\0\x01" {
        return Ok(false);
    }
    write_checkpoint(file, &checkpoint)?;
    if read_checkpoint(file)? != checkpoint {
        return Err(format!(
            "{}: the rewritten file does not read back the same",
            file.display()
        )
        .into());
    }
    Ok(true)
}
