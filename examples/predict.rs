//! Segment a CT scan with any saved SegViz model (global, fine-tuned, baseline, central or
//! imported from MONAI):
//!
//! ```text
//! cargo run --release --example predict -- --model MODEL.segviz --input CT.nii.gz --output SEG.nii.gz
//! ```
//!
//! The scan gets the training preprocessing (stored in the model file by the experiment,
//! or given with `--pixdim`/`--a-min`/`--a-max`), sliding-window inference and head fusion;
//! the label map (0 background, 1 liver, 2 spleen, 3 pancreas, 4 kidney) is written back
//! in the scan's own geometry so it overlays the scan in 3D Slicer or ITK-SNAP.
//! Several `--model` files (e.g. each site's fine-tuned model) are fused organ by organ.

use std::path::PathBuf;
use std::process::ExitCode;

use burn::module::Module;
use clap::Parser;
use segviz::core::checkpoint::load_model;
use segviz::core::sliding_window::SlidingWindowConfig;
use segviz::data::{refuse_overwriting_inputs, write_labels, Organ, PreprocessConfig};
use segviz::fed::evaluate::{segment_file, Segmenter};

/// Segment a CT scan with saved SegViz model(s).
#[derive(Parser, Debug)]
#[command(name = "predict")]
struct Args {
    /// Model file(s) written by SegViz (`.segviz`); repeat to fuse per-site models.
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// CT scan (`.nii` or `.nii.gz`).
    #[arg(long)]
    input: PathBuf,
    /// Output label map (`.nii.gz`).
    #[arg(long)]
    output: PathBuf,
    /// Target spacing in mm, overriding the model file's (e.g. `1.5,1.5,2`).
    #[arg(long, value_delimiter = ',')]
    pixdim: Option<Vec<f64>>,
    /// Lower intensity window bound (HU), overriding the model file's.
    #[arg(long)]
    a_min: Option<f32>,
    /// Upper intensity window bound (HU), overriding the model file's.
    #[arg(long)]
    a_max: Option<f32>,
    /// Sliding-window size, overriding the model file's (e.g. `96,96,48`).
    #[arg(long, value_delimiter = ',')]
    roi: Option<Vec<usize>>,
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    match run(&Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> AnyResult<()> {
    // Before anything is read or written: the label map must not replace the scan or a model.
    let inputs: Vec<&std::path::Path> = std::iter::once(args.input.as_path())
        .chain(args.model.iter().map(PathBuf::as_path))
        .collect();
    refuse_overwriting_inputs(&args.output, &inputs)?;
    let device = segviz::default_device();
    let mut models = Vec::new();
    let mut metadata = serde_json::Value::Null;
    for path in &args.model {
        let (model, meta) = load_model(path, &device)?;
        if metadata.is_null() {
            metadata = meta;
        }
        models.push(model.valid());
    }
    let mut preprocess: PreprocessConfig = match metadata.get("preprocess") {
        Some(v) => serde_json::from_value(v.clone())?,
        None => PreprocessConfig::default(),
    };
    if let Some(p) = &args.pixdim {
        preprocess.pixdim =
            <[f64; 3]>::try_from(p.as_slice()).map_err(|_| "--pixdim takes three values")?;
    }
    if let Some(v) = args.a_min {
        preprocess.a_min = v;
    }
    if let Some(v) = args.a_max {
        preprocess.a_max = v;
    }
    let k = models[0].config().representation.size_divisor();
    preprocess.pad_multiple = preprocess.pad_multiple.max(k);
    let mut window: SlidingWindowConfig = match metadata.get("window") {
        Some(v) => serde_json::from_value(v.clone())?,
        None => SlidingWindowConfig::new([96, 96, 96]),
    };
    if let Some(r) = &args.roi {
        window.roi_size =
            <[usize; 3]>::try_from(r.as_slice()).map_err(|_| "--roi takes three values")?;
    }
    let segmenter = if models.len() == 1 {
        Segmenter::Single(Box::new(models.remove(0)))
    } else {
        let mut list = Vec::new();
        for m in models {
            for task in m.tasks().to_vec() {
                let organ = Organ::from_name(&task)
                    .ok_or_else(|| format!("model head {task:?} is not an organ"))?;
                list.push((organ, m.clone()));
            }
        }
        Segmenter::PerOrgan(list)
    };
    let (labels, warnings) = segment_file(&segmenter, &args.input, &preprocess, &window, &device)?;
    for w in &warnings {
        eprintln!("warning: {}: {w}", args.input.display());
    }
    write_labels(&args.output, &labels)?;
    let mut counts = [0usize; 5];
    for &v in &labels.data {
        if let Some(c) = counts.get_mut(v as usize) {
            *c += 1;
        }
    }
    println!(
        "wrote {} ({:?} voxels): liver {}, spleen {}, pancreas {}, kidney {} voxels",
        args.output.display(),
        labels.geometry.shape,
        counts[1],
        counts[2],
        counts[3],
        counts[4]
    );
    Ok(())
}
