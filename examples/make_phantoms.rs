//! Write synthetic abdominal CT phantoms in the layouts of SegViz's five datasets:
//!
//! ```text
//! cargo run --release --example make_phantoms -- --out phantoms --cases 6 --size small
//! ```
//!
//! Creates `Task03_Liver/`, `Task09_Spleen/`, `Task07_Pancreas/` (MSD), `kits19/` and
//! `btcv/` inside `--out`. Running it again with the same options reuses the output.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::data::phantom::{write_sites, PhantomConfig, PhantomSize};

/// Generate phantom CT sites (MSD liver/spleen/pancreas, KiTS19, BTCV).
#[derive(Parser, Debug)]
#[command(name = "make_phantoms")]
struct Args {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Training cases per site (liver, spleen, pancreas, kidney).
    #[arg(long, default_value_t = 6)]
    cases: usize,
    /// Cases of the BTCV-style external test site.
    #[arg(long, default_value_t = 4)]
    btcv_cases: usize,
    /// Volume size: tiny (32×32×16), small (96×96×48) or medium (160×160×80).
    #[arg(long, default_value = "small")]
    size: PhantomSize,
    /// Seed of everything random.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = PhantomConfig {
        out: args.out.clone(),
        cases_per_site: args.cases,
        btcv_cases: args.btcv_cases,
        size: args.size,
        seed: args.seed,
    };
    match write_sites(&config) {
        Ok(manifest) => {
            let verb = if manifest.reused { "reused" } else { "wrote" };
            for site in &manifest.sites {
                println!(
                    "{verb} {} ({} cases, annotated {})",
                    args.out.join(&site.name).display(),
                    site.cases.len(),
                    site.annotated
                );
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
