//! Segment a CT scan with any saved SegViz model (global, fine-tuned, baseline, central or
//! imported from MONAI):
//!
//! ```text
//! cargo run --release --example predict -- --model MODEL.segviz -i CT.nii.gz -o SEG.nii.gz
//! cargo run --release --example predict -- --model MODEL.segviz -i SCANS/ -o LABELS/
//! ```
//!
//! The input may be a NIfTI file or a DICOM series folder (the label map is then written as
//! NIfTI in the series' geometry). With a folder of scans as input, every `.nii` / `.nii.gz`
//! file and every DICOM series folder in it is segmented into the output folder (same name,
//! `.nii.gz`), with a progress bar. Nothing is skipped silently: every other
//! entry of the folder is listed with the reason it was not segmented, a scan that fails is
//! reported and the others still run, and the exit status is non-zero if any failed.
//!
//! The scan gets the training preprocessing (stored in the model file by the experiment,
//! or given with `--pixdim`/`--a-min`/`--a-max`), sliding-window inference and head fusion;
//! the label map (0 background, 1 liver, 2 spleen, 3 pancreas, 4 kidney) is written back
//! in the scan's own geometry so it overlays the scan in 3D Slicer or ITK-SNAP.
//! Several `--model` files (e.g. each site's fine-tuned model) are fused organ by organ.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use burn::module::Module;
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use segviz::core::checkpoint::load_model;
use segviz::core::sliding_window::SlidingWindowConfig;
use segviz::data::{refuse_overwriting_inputs, Organ, PreprocessConfig};
use segviz::fed::evaluate::Segmenter;
use segviz::predict::{plan_folder, segment_to_file};

/// Segment a CT scan with saved SegViz model(s).
#[derive(Parser, Debug)]
#[command(name = "predict")]
struct Args {
    /// Model file(s) written by SegViz (`.segviz`); repeat to fuse per-site models.
    #[arg(long, required = true)]
    model: Vec<PathBuf>,
    /// CT scan (`.nii`, `.nii.gz` or a DICOM series folder), or a folder of scans.
    #[arg(short, long)]
    input: PathBuf,
    /// Output label map (`.nii.gz`), or a folder when the input is one.
    #[arg(short, long)]
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
    let folder = args.input.is_dir() && !segviz::data::dicom::is_dicom_folder(&args.input);
    let (cases, skipped) = if folder {
        if args.output.exists() && !args.output.is_dir() {
            return Err(format!(
                "{}: the input is a folder, so the output must be a folder too",
                args.output.display()
            )
            .into());
        }
        let plan = plan_folder(&args.input, &args.output)?;
        (plan.cases, plan.skipped)
    } else {
        (vec![(args.input.clone(), args.output.clone())], Vec::new())
    };
    for s in &skipped {
        eprintln!("skipped: {s}");
    }
    if folder && cases.is_empty() {
        return Err(format!("{}: no NIfTI scan in this folder", args.input.display()).into());
    }
    // Before anything is read or written: no label map may replace a scan or a model.
    for (input, output) in &cases {
        let inputs: Vec<&Path> = std::iter::once(input.as_path())
            .chain(args.model.iter().map(PathBuf::as_path))
            .collect();
        refuse_overwriting_inputs(output, &inputs)?;
    }
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
    if !folder {
        let (input, output) = &cases[0];
        let summary = segment_to_file(&segmenter, input, output, &preprocess, &window, &device)?;
        println!("{summary}");
        return Ok(());
    }
    let bar = ProgressBar::new(cases.len() as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} scans, {elapsed} elapsed, ~{eta} left: {msg}",
        )
        .map_err(|e| e.to_string())?,
    );
    let mut failed = Vec::new();
    for (input, output) in &cases {
        bar.set_message(input.display().to_string());
        match segment_to_file(&segmenter, input, output, &preprocess, &window, &device) {
            // suspend, not println: a hidden bar (output not a terminal) swallows println.
            Ok(summary) => bar.suspend(|| println!("{summary}")),
            Err(e) => {
                bar.suspend(|| eprintln!("error: {}: {e}", input.display()));
                failed.push(input.display().to_string());
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    println!(
        "{} of {} scan(s) segmented into {}; {} other entries skipped (listed above)",
        cases.len() - failed.len(),
        cases.len(),
        args.output.display(),
        skipped.len()
    );
    if !failed.is_empty() {
        return Err(format!("{} scan(s) failed: {}", failed.len(), failed.join(", ")).into());
    }
    Ok(())
}
