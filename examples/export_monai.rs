//! Export a SegViz model as MONAI `UNet` checkpoints, one per organ head:
//!
//! ```text
//! cargo run --release --example export_monai -- runs/quick/seed-0/models/fedbn_ft/global.segviz --out monai/
//! ```
//!
//! For each head (or the `--tasks` given) it writes `OUT/<task>.pt`, a PyTorch `state_dict`
//! of the representation block with that head, and `OUT/<task>.json`, the keyword arguments
//! of `monai.networks.nets.UNet` that build the network it loads into (`strict=True`) plus
//! the training preprocessing when the model file records it. In Python:
//!
//! ```python
//! import json, torch
//! from monai.networks.nets import UNet
//! spec = json.load(open("monai/liver.json"))
//! net = UNet(**spec["unet"])
//! net.load_state_dict(torch.load("monai/liver.pt"), strict=True)
//! ```
//!
//! Channel 1 of the output is the organ's logit against background (channel 0): softmax,
//! then channel 1 ≥ 0.5, is SegViz's head mask.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::core::checkpoint::{load_model, write_atomically};
use segviz::core::monai::{export_monai, monai_unet_kwargs};

/// Export SegViz heads as MONAI UNet checkpoints.
#[derive(Parser, Debug)]
#[command(name = "export_monai")]
struct Args {
    /// SegViz model file.
    model: PathBuf,
    /// Output folder (created if needed).
    #[arg(long)]
    out: PathBuf,
    /// Heads to export, comma separated (default: every head of the model).
    #[arg(long, value_delimiter = ',')]
    tasks: Vec<String>,
}

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = segviz::default_device();
    let (model, metadata) = load_model(&args.model, &device)?;
    let tasks = if args.tasks.is_empty() {
        model.tasks().to_vec()
    } else {
        args.tasks.clone()
    };
    for task in &tasks {
        let pt = args.out.join(format!("{task}.pt"));
        segviz::data::refuse_overwriting_inputs(&pt, &[&args.model])?;
        export_monai(&model, task, &pt)?;
        let spec = serde_json::json!({
            "unet": monai_unet_kwargs(model.config()),
            "task": task,
            "exported_from": args.model.display().to_string(),
            "preprocess": metadata.get("preprocess"),
            "window": metadata.get("window"),
        });
        let json = args.out.join(format!("{task}.json"));
        write_atomically(&json, serde_json::to_string_pretty(&spec)?.as_bytes())?;
        println!("wrote {} and {}", pt.display(), json.display());
    }
    Ok(())
}
