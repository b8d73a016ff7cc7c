//! Write synthetic abdominal CT phantoms in the layouts of SegViz's five datasets:
//!
//! ```text
//! cargo run --release --example make_phantoms -- --out phantoms --cases 6 --size small
//! ```
//!
//! Creates `Task03_Liver/`, `Task09_Spleen/`, `Task07_Pancreas/` (MSD), `kits19/` and
//! `btcv/` inside `--out`. Running it again with the same options reuses the output.
//! `--report` also measures, per site and organ, the HU mean and SD, the best single HU
//! window's Dice and the leave-one-out position prior's Dice (see `phantom::report` and
//! docs/phantoms.md), prints them and saves them as `phantom_report.json` in `--out`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::data::phantom::{measure, write_sites, PhantomConfig, PhantomSize};

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
    /// Also measure the intensity and position shortcuts and save phantom_report.json.
    #[arg(long)]
    report: bool,
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
        }
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    }
    if !args.report {
        return ExitCode::SUCCESS;
    }
    match measure(&config) {
        Ok(report) => {
            print!("{}", report.table());
            let path = args.out.join("phantom_report.json");
            let written = serde_json::to_vec_pretty(&report)
                .map_err(|e| e.to_string())
                .and_then(|text| std::fs::write(&path, text).map_err(|e| e.to_string()));
            match written {
                Ok(()) => {
                    println!("saved {}", path.display());
                    ExitCode::SUCCESS
                }
                Err(error) => {
                    eprintln!("error: cannot save {}: {error}", path.display());
                    ExitCode::FAILURE
                }
            }
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
