//! Convert a MONAI `UNet` checkpoint (a PyTorch `state_dict` saved with `torch.save`) into a
//! single-head SegViz model file:
//!
//! ```text
//! cargo run --release --example import_monai -- IN.pt --out MODEL.segviz --task liver
//! ```
//!
//! The U-Net must be MONAI's residual one with BatchNorm (`norm="batch"`); give its
//! `--channels`, `--strides` and `--num-res-units` if they are not the defaults
//! (16,32,64,128,256 / 2,2,2,2 / 2) and `--out-channels` for its classes. The file may be a
//! bare `state_dict` or wrap it as `{"state_dict": …}` (Lightning, MONAI bundles) or
//! `{"model": …}` (MONAI's `CheckpointSaver`). Every tensor of the file must be used: a
//! checkpoint with keys this configuration has no place for is refused, naming them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use segviz::core::checkpoint::save_model;
use segviz::core::monai::load_monai_checkpoint;
use segviz::core::{RepresentationConfig, SegVizConfig};

/// Convert a MONAI UNet checkpoint into a SegViz model.
#[derive(Parser, Debug)]
#[command(name = "import_monai")]
struct Args {
    /// MONAI UNet state_dict (`.pt`).
    input: PathBuf,
    /// SegViz model file to write.
    #[arg(long)]
    out: PathBuf,
    /// Name of the task head (e.g. liver).
    #[arg(long, default_value = "liver")]
    task: String,
    /// MONAI `channels`.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128,256")]
    channels: Vec<usize>,
    /// MONAI `strides`.
    #[arg(long, value_delimiter = ',', default_value = "2,2,2,2")]
    strides: Vec<usize>,
    /// MONAI `num_res_units`.
    #[arg(long, default_value_t = 2)]
    num_res_units: usize,
    /// MONAI `in_channels`.
    #[arg(long, default_value_t = 1)]
    in_channels: usize,
    /// MONAI `out_channels`.
    #[arg(long, default_value_t = 2)]
    out_channels: usize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = segviz::data::refuse_overwriting_inputs(&args.out, &[&args.input]) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    let config = SegVizConfig::new(
        RepresentationConfig::new()
            .with_in_channels(args.in_channels)
            .with_channels(args.channels.clone())
            .with_strides(args.strides.clone())
            .with_num_res_units(args.num_res_units),
        vec![args.task.clone()],
    )
    .with_head_out_channels(args.out_channels);
    let device = segviz::default_device();
    let result = load_monai_checkpoint(&args.input, &config, &args.task, &device).and_then(|m| {
        save_model(
            &args.out,
            &m,
            serde_json::json!({"imported_from": args.input.display().to_string()}),
        )
        .map(|_| m.num_trainable_params())
    });
    match result {
        Ok(n) => {
            println!(
                "wrote {} ({n} trainable parameters, head {:?})",
                args.out.display(),
                args.task
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
