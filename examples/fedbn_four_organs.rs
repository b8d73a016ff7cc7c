//! The main SegViz experiment: four sites that each annotated one organ (liver, spleen,
//! pancreas, kidneys) train one multi-organ model without sharing images, compared with
//! per-organ baselines and with pooling the data (paper §4, Tables 1–2, Fig. 3).
//!
//! ```text
//! cargo run --release --example fedbn_four_organs                  # phantoms, quick preset
//! cargo run --release --example fedbn_four_organs -- --data DIR    # real MSD/KiTS19/BTCV
//! cargo run --release --features vulkan --example fedbn_four_organs -- --preset paper
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use segviz::data::phantom::{write_sites, PhantomConfig, PhantomSize};
use segviz::data::{write_labels, Organ};
use segviz::fed::evaluate::to_original_grid;
use segviz::fed::experiment::{
    combine_seeds, format_table, Experiment, ExperimentConfig, ExperimentData, ExperimentEvent,
    ExperimentResults, Method, RunMode, Table, TrainedMethod,
};
use segviz::fed::Weighting;
use segviz::figures::{comparison_figure, dice_per_round_figure, save_png, DiceSeries};

/// Federated multi-organ segmentation from partially annotated sites (SegViz).
#[derive(Parser, Debug)]
#[command(name = "fedbn_four_organs")]
struct Args {
    /// Folder holding one sub-folder per site (MSD Task folders, a KiTS19 folder, a generic
    /// folder) and optionally a BTCV-layout test site. Without it, phantom sites are
    /// generated in OUT/phantoms (once; reused afterwards).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Settings preset: quick (minutes on a CPU), paper (the paper's full settings, for a
    /// GPU) or tiny (seconds; smoke tests).
    #[arg(long, default_value = "quick")]
    preset: String,
    /// Methods, comma separated: baseline, central, central_marginal, fedavg, fedavg_ft,
    /// fedbn, fedbn_ft, fedprox, fedprox_ft, and the partial-label ("+ PL") methods
    /// fedavg_pl, fedavg_pl_ft, fedbn_pl, fedbn_pl_ft, fedbn_pl_no_distillation,
    /// fedbn_pl_no_exclusion. Default: the preset's (quick: baseline, fedbn_ft,
    /// fedbn_pl_ft).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Federated rounds (preset's value if absent).
    #[arg(long)]
    rounds: Option<usize>,
    /// Local epochs per round.
    #[arg(long)]
    local_epochs: Option<usize>,
    /// Fine-tuning epochs after federation.
    #[arg(long)]
    fine_tune_epochs: Option<usize>,
    /// Learning rate of fine-tuning (default: the federation's final rate × 10). With
    /// --resume, a finished federation is fine-tuned again without training its rounds.
    #[arg(long)]
    fine_tune_learning_rate: Option<f64>,
    /// Fine-tune each site's whole model (representation block included), not its heads
    /// only as the paper does.
    #[arg(long)]
    fine_tune_representation: bool,
    /// Seed of phantoms, splits, initialisation and sampling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Runs the whole comparison once per seed (each in OUT/seed-N, with its own phantoms,
    /// splits, initial weights and sampling) and prints the tables over all seeds, with
    /// 95 % confidence intervals and Holm-corrected paired tests over (seed, volume) pairs.
    #[arg(long, value_delimiter = ',', conflicts_with = "seed")]
    seeds: Option<Vec<u64>>,
    /// "+ PL" methods: the share of each head's average taken from the sites that own its
    /// organ, in [0, 1] (default 1: each head from its owners; the other sites' terms then
    /// shape only the shared representation), or "plain" for one mean over every site.
    #[arg(long)]
    head_owner_weight: Option<String>,
    /// "+ PL" methods: weight of the exclusion term (default 0.15).
    #[arg(long)]
    exclusion_weight: Option<f64>,
    /// "+ PL" methods: weight of the distillation term (default 1).
    #[arg(long)]
    distillation_weight: Option<f64>,
    /// "+ PL" methods: distil only where the teacher's organ probability exceeds this, in
    /// [0, 1) (default 0.5; 0: on every voxel a site did not annotate).
    #[arg(long)]
    distillation_threshold: Option<f64>,
    /// Federated methods: the server learning rate η on the representation block,
    /// `w ← g + η · (mean − g)` (1: the plain average of the paper; quick preset: 2).
    #[arg(long)]
    server_learning_rate: Option<f64>,
    /// Weight clients uniformly instead of by their number of examples.
    #[arg(long)]
    uniform_weights: bool,
    /// Clients trained at the same time.
    #[arg(long)]
    parallel_clients: Option<usize>,
    /// Channels of the representation block's levels, comma separated, one more than its
    /// strides (quick preset: 8,16,32,64; paper: 16,32,64,128,256). For every method.
    #[arg(long, value_delimiter = ',')]
    channels: Option<Vec<usize>>,
    /// Train every method without data augmentation (an ablation; every preset augments).
    #[arg(long)]
    no_augmentation: bool,
    /// Output folder (results, models, predictions, figures, checkpoints).
    #[arg(long, default_value = "runs/fedbn_four_organs")]
    out: PathBuf,
    /// Continue interrupted federations from their last committed round (the settings must
    /// be those of the interrupted run).
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Delete the checkpoints, splits and results of an earlier run in --out and start
    /// afresh (without it, an --out folder holding an earlier run is refused).
    #[arg(long)]
    overwrite: bool,
    /// Phantom training cases per site (without --data).
    #[arg(long, default_value_t = 11)]
    phantom_cases: usize,
    /// Phantom test cases (without --data).
    #[arg(long, default_value_t = 12)]
    phantom_test_cases: usize,
    /// Phantom size: tiny, small or medium (without --data).
    #[arg(long, default_value = "small")]
    phantom_size: PhantomSize,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type AnyResult<T> = Result<T, Box<dyn std::error::Error>>;

fn run(args: &Args) -> AnyResult<()> {
    let started = Instant::now();
    let seeds = args.seeds.clone().unwrap_or_else(|| vec![args.seed]);
    if seeds.is_empty() {
        return Err("--seeds needs at least one seed".into());
    }
    let several = seeds.len() > 1;
    let mut runs = Vec::new();
    for &seed in &seeds {
        let out = if several {
            println!("\n=== seed {seed} ===");
            args.out.join(format!("seed-{seed}"))
        } else {
            args.out.clone()
        };
        runs.push(run_seed(args, seed, &out)?);
    }
    if several {
        let summary = combine_seeds(runs)?;
        let json = serde_json::to_vec_pretty(&summary)?;
        segviz::core::checkpoint::write_atomically(&args.out.join("summary.json"), &json)?;
        let seeds_text = summary
            .seeds
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let tables = tables_markdown(
            &summary.table_validation,
            &summary.table_test,
            &summary.organs,
            &format!("over seeds {seeds_text}, every (seed, volume) pair"),
        );
        segviz::core::checkpoint::write_atomically(&args.out.join("tables.md"), tables.as_bytes())?;
        println!("\n{tables}");
        println!(
            "every seed's results in {}/seed-N; the pooled tables in {}/summary.json and tables.md",
            args.out.display(),
            args.out.display()
        );
    }
    println!("{:.1} min in all", started.elapsed().as_secs_f64() / 60.0);
    Ok(())
}

/// The whole comparison for one seed, written to `out`.
fn run_seed(args: &Args, seed: u64, out: &Path) -> AnyResult<ExperimentResults> {
    let started = Instant::now();
    let mut config = build_config(args)?;
    config.seed = seed;
    let data = match &args.data {
        Some(dir) => ExperimentData::discover(dir)?,
        None => {
            let dir = out.join("phantoms");
            let manifest = write_sites(&PhantomConfig {
                out: dir.clone(),
                cases_per_site: args.phantom_cases,
                btcv_cases: args.phantom_test_cases,
                size: args.phantom_size,
                seed,
            })?;
            println!(
                "{} phantom sites in {}",
                if manifest.reused {
                    "reusing"
                } else {
                    "generated"
                },
                dir.display()
            );
            ExperimentData::discover(&dir)?
        }
    };
    let device = segviz::default_device();
    println!(
        "backend {} | preset {} | {} rounds × {} local epochs | methods {}",
        segviz::backend_name(),
        config.preset,
        config.rounds,
        config.local_epochs,
        config
            .methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(",")
    );
    for folder in &data.ignored {
        println!(
            "  not a dataset, not used: {} (no dataset.json, case_*, img/, images/ or labels.json)",
            folder.display()
        );
    }
    let mode = if args.resume {
        RunMode::Resume
    } else if args.overwrite {
        RunMode::Overwrite
    } else {
        RunMode::Fresh
    };
    let check = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise}")?
            .progress_chars("=> "),
    );
    check.set_prefix("checking data");
    let experiment = Experiment::with_progress(config, &data, out, mode, |p| {
        check.set_length(p.total as u64);
        check.set_position(p.checked as u64);
    });
    check.finish_and_clear();
    let experiment = experiment?;
    println!("data checked: every case of every site reads, matches its label map and is finite");
    for w in experiment.data_warnings() {
        eprintln!("warning: {w}");
    }
    for site in experiment.sites() {
        println!(
            "  site {:<16} {:>3} train / {:>2} val cases, annotates {}",
            site.name(),
            site.split.train.len(),
            site.split.validation.len(),
            site.annotated()
        );
    }
    if let Some(t) = experiment.test_site() {
        println!(
            "  test {:<16} {:>3} cases",
            t.name(),
            t.split.validation.len()
        );
    }

    let bars = MultiProgress::new();
    let style = ProgressStyle::with_template(
        "{prefix:>18} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}",
    )?
    .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let (results, trained) = experiment.run(&device, |event| match event {
        ExperimentEvent::MethodStarted { method, total } => {
            let b = bars.add(ProgressBar::new(total));
            b.set_style(style.clone());
            b.set_prefix(method.name());
            bar = Some(b);
        }
        ExperimentEvent::Advanced { units } => {
            if let Some(b) = &bar {
                b.inc(units);
            }
        }
        ExperimentEvent::Line(line) => {
            // A hidden bar (output not a terminal) swallows println: print plainly then.
            if bars.is_hidden() {
                println!("{line}");
            } else {
                let _ = bars.println(line);
            }
        }
        ExperimentEvent::MethodFinished { method, seconds } => {
            if let Some(b) = bar.take() {
                b.finish_with_message(format!("done in {seconds:.0} s"));
            }
            if bars.is_hidden() {
                println!("{} done in {seconds:.0} s", method.name());
            }
        }
    })?;

    experiment.write_results(&results)?;
    let tables = tables_markdown(
        &results.table_validation,
        &results.table_test,
        &results.organs,
        &format!("seed {seed}"),
    );
    segviz::core::checkpoint::write_atomically(&out.join("tables.md"), tables.as_bytes())?;
    println!("\n{tables}");
    write_outputs(&experiment, &results, &trained, out)?;
    println!(
        "results, models, predictions and figures in {} ({:.1} min)",
        out.display(),
        started.elapsed().as_secs_f64() / 60.0
    );
    Ok(results)
}

fn build_config(args: &Args) -> AnyResult<ExperimentConfig> {
    let mut config = ExperimentConfig::preset(&args.preset)?;
    if let Some(names) = &args.methods {
        config.methods = names
            .iter()
            .map(|n| {
                Method::from_name(n.trim())
                    .ok_or_else(|| format!("unknown method {n:?}; see --help"))
            })
            .collect::<Result<_, _>>()?;
    }
    if let Some(r) = args.rounds {
        config.rounds = r;
    }
    if let Some(e) = args.local_epochs {
        config.local_epochs = e;
    }
    if let Some(e) = args.fine_tune_epochs {
        config.fine_tune_epochs = e;
    }
    if let Some(lr) = args.fine_tune_learning_rate {
        config.fine_tune_learning_rate = Some(lr);
    }
    if args.fine_tune_representation {
        config.fine_tune_representation = true;
    }
    if let Some(p) = args.parallel_clients {
        config.parallel_clients = p;
    }
    if let Some(channels) = &args.channels {
        let levels = config.representation.strides.len() + 1;
        if channels.len() != levels {
            return Err(format!(
                "--channels: the {} preset's representation block has {levels} levels, got {} channels",
                config.preset,
                channels.len()
            )
            .into());
        }
        config.representation = config
            .representation
            .clone()
            .with_channels(channels.clone());
    }
    if args.no_augmentation {
        config.training.augment = None;
    }
    if args.uniform_weights {
        config.weighting = Weighting::Uniform;
    }
    if let Some(rate) = args.server_learning_rate {
        config.server_learning_rate = rate;
    }
    let pl = &mut config.partial_labels;
    if let Some(a) = &args.head_owner_weight {
        pl.owner_weight = match a.as_str() {
            "plain" => None,
            a => Some(a.parse().map_err(|_| {
                format!("--head-owner-weight: expected a number in [0, 1] or \"plain\", got {a:?}")
            })?),
        };
    }
    if let Some(w) = args.exclusion_weight {
        pl.exclusion_weight = w;
    }
    if let Some(w) = args.distillation_weight {
        pl.distillation_weight = w;
    }
    if let Some(t) = args.distillation_threshold {
        pl.distillation_threshold = t;
    }
    config.validate()?;
    Ok(config)
}

fn tables_markdown(validation: &Table, test: &Table, organs: &[String], scope: &str) -> String {
    let legend = "[95 % CI]; * p < 0.05 vs baseline, † vs FedBN + FT (paired t-tests, \
                  Holm-corrected over the table)";
    let mut s = format_table(
        &format!(
            "Table 1 — mean Dice (SD) of the fused label map on each site's validation split, \
             {scope} {legend}"
        ),
        validation,
        organs,
    );
    s.push('\n');
    s.push_str(&format_table(
        &format!("Table 2 — mean Dice (SD) of the fused label map on the external test site, {scope} {legend}"),
        test,
        organs,
    ));
    s
}

/// Predicted label maps of the test site (in each scan's own geometry), Fig. 3 and the
/// per-round Dice plot.
fn write_outputs(
    experiment: &Experiment,
    results: &ExperimentResults,
    trained: &[TrainedMethod],
    out: &Path,
) -> AnyResult<()> {
    let Some(test) = experiment.test_site() else {
        return Ok(());
    };
    for t in trained {
        for (case, labels) in &t.test_predictions {
            let (image, _) = test.volume(case)?;
            let index = test
                .dataset
                .position(case)
                .ok_or_else(|| format!("unknown test case {case}"))?;
            let original = segviz::data::read_volume(&test.dataset.cases[index].image)?;
            let on_grid = to_original_grid(labels.clone(), &image, &original.geometry)?;
            let path = out
                .join("predictions")
                .join(t.method.name())
                .join(format!("{case}.nii.gz"));
            write_labels(&path, &on_grid)?;
        }
    }
    // Fig. 3: the first test case, ground truth and the methods that ran.
    if let Some(case) = test.split.validation.first() {
        let (image, truth) = test.volume(case)?;
        let organs: Vec<Organ> = results
            .organs
            .iter()
            .filter_map(|o| Organ::from_name(o))
            .collect();
        let mut columns: Vec<(&str, &[u8])> = vec![("Ground truth", &truth.data)];
        let wanted = [
            (Method::Baseline, "Baseline"),
            (Method::Central, "Central"),
            (Method::FedbnFt, "FedBN + FT"),
            (Method::FedbnPlFt, "FedBN + PL + FT"),
            (Method::FedbnPl, "FedBN + PL"),
        ];
        for (method, title) in wanted {
            if let Some(t) = trained.iter().find(|t| t.method == method) {
                if let Some((_, labels)) = t.test_predictions.iter().find(|(c, _)| c == case) {
                    columns.push((title, labels));
                }
            }
        }
        let fig = comparison_figure(&image, &truth, &columns, &organs, 3)?;
        save_png(&fig, &out.join("figures").join("fig3_comparison.png"))?;
    }
    let series: Vec<DiceSeries> = results
        .methods
        .iter()
        // One curve per federation (a method and its fine-tuned variant share one).
        .filter(|r| {
            let plain_ran = results
                .methods
                .iter()
                .any(|o| !o.method.fine_tuned() && o.method.federation() == r.method.federation());
            !r.rounds.is_empty() && (!r.method.fine_tuned() || !plain_ran)
        })
        .map(|r| {
            let mut per: BTreeMap<Organ, Vec<f64>> = BTreeMap::new();
            for report in &r.rounds {
                for (k, v) in &report.metrics {
                    if let Some(o) = k.strip_prefix("dice/").and_then(Organ::from_name) {
                        per.entry(o).or_default().push(*v);
                    }
                }
            }
            // The rounds are the federation's: its label without the fine-tuning.
            let name = r.method.label().trim_end_matches(" + FT");
            (name.to_string(), per.into_iter().collect())
        })
        .collect();
    if !series.is_empty() {
        let fig = dice_per_round_figure(&series)?;
        save_png(&fig, &out.join("figures").join("dice_per_round.png"))?;
    }
    Ok(())
}
