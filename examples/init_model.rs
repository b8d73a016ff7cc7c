//! Write the initial global model of a federation, as the in-process experiment builds it
//! (same preset, same seed, same tensors), for the Flower server app to start from:
//!
//! ```text
//! cargo run --release --example init_model -- --preset quick --seed 0 --out initial.segviz
//! ```
//!
//! The file also records the preprocessing and sliding window of the preset, so the global
//! models the server app saves can be used by `predict` directly.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::core::checkpoint::save_model;
use segviz::core::SegVizConfig;
use segviz::data::Organ;
use segviz::fed::experiment::ExperimentConfig;

/// Write the initial global SegViz model.
#[derive(Parser, Debug)]
#[command(name = "init_model")]
struct Args {
    /// Settings preset (tiny, quick or paper): must be the nodes' preset.
    #[arg(long, default_value = "quick")]
    preset: String,
    /// Seed of the initial weights (the nodes' --seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Task heads, comma separated (organs: liver, spleen, pancreas, kidney).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "liver,spleen,pancreas,kidney"
    )]
    organs: Vec<String>,
    /// Output model file.
    #[arg(long)]
    out: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("init_model: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut config = ExperimentConfig::preset(&args.preset)?;
    config.seed = args.seed;
    // Heads in the experiment's order (Organ::ALL), whatever order they were given in.
    let mut organs = Vec::new();
    for name in &args.organs {
        let organ = Organ::from_name(name.trim())
            .ok_or_else(|| format!("unknown organ {name:?} (liver, spleen, pancreas, kidney)"))?;
        organs.push(organ);
    }
    let tasks: Vec<String> = Organ::ALL
        .into_iter()
        .filter(|o| organs.contains(o))
        .map(|o| o.name().to_string())
        .collect();
    if tasks.is_empty() {
        return Err("give at least one organ".into());
    }
    let model = SegVizConfig::new(config.representation.clone(), tasks.clone())
        .init(&segviz::default_device(), config.seed)?;
    save_model(
        &args.out,
        &model,
        serde_json::json!({
            "method": "flower",
            "round": 0,
            "preset": config.preset,
            "seed": config.seed,
            "preprocess": config.preprocess,
            "window": config.window,
        }),
    )?;
    println!(
        "wrote {} ({} trainable parameters, heads {})",
        args.out.display(),
        model.num_trainable_params(),
        tasks.join(", ")
    );
    Ok(())
}
