//! Run a hospital's SegViz site as a Flower node:
//!
//! ```text
//! cargo run --release --example flower_node -- --superlink HOST:9092 --data /data/Task03_Liver --root-ca ca.pem
//! cargo run --release --example flower_node -- --superlink 127.0.0.1:9092 --insecure --data DIR   # loopback
//! ```
//!
//! The node registers with the SuperLink, heartbeats, and answers the server app's `train`
//! and `evaluate` instructions with the site's local SegViz model: only model state and
//! metrics leave the site. It reconnects with backoff when the SuperLink goes away.
//!
//! Ctrl-C, SIGTERM (`kill`, systemd, `docker stop`) and SIGHUP all stop it the same way: it
//! finishes the current instruction and replies, and deactivates (staying registered, so a
//! restart rejoins with the same key); a second signal quits at once (the round then waits
//! for the SuperLink to declare the node gone).
//! Give a container or service enough time for one local training round before it sends
//! SIGKILL (`docker stop --time`, systemd `TimeoutStopSec`).
//!
//! `--preset` and `--seed` must match the server's initial model (`init_model`). `--site-name`
//! is the site's identity in the federation (default: the data folder's name); the server
//! refuses a second node with a name already taken. `--uniform-reply` is for Flower's stock
//! strategies (see docs/flower.md).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use segviz::fed::experiment::ExperimentConfig;
use segviz::flower::{
    FleetClient, FlowerNode, NodeEvent, NodeIdentity, NodeOptions, ReplyLayout, SegVizApp,
    SiteSettings, Transport,
};

/// A SegViz site as a Flower node.
#[derive(Parser, Debug)]
#[command(name = "flower_node")]
struct Args {
    /// The SuperLink's Fleet API address, HOST:PORT.
    #[arg(long)]
    superlink: String,
    /// The site's dataset folder (MSD task, KiTS19, BTCV or generic layout).
    #[arg(long)]
    data: PathBuf,
    /// Root certificate (PEM) of the SuperLink's TLS certificate.
    #[arg(long, conflicts_with = "insecure")]
    root_ca: Option<PathBuf>,
    /// Plain HTTP, for a SuperLink started with --insecure (loopback tests only).
    #[arg(long)]
    insecure: bool,
    /// Settings preset (tiny, quick or paper): the server's initial model must use the same.
    #[arg(long, default_value = "quick")]
    preset: String,
    /// Seed of splits, augmentation and local training (the server's --seed).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the node keeps its splits, preprocessing cache, key and local states
    /// (default: runs/flower_node/<data folder name>).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// The node's private key (PKCS#8 PEM, P-256); created if missing
    /// (default: <work-dir>/node-key.pem).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Seconds between heartbeats promised to the SuperLink.
    #[arg(long, default_value_t = 30.0)]
    heartbeat_interval: f64,
    /// The site's name in the federation (default: the data folder's name). Must be unique
    /// among the federation's nodes: the server refuses a second node with the same name.
    #[arg(long)]
    site_name: Option<String>,
    /// Replies that Flower's stock strategies (FedAvg…) can aggregate: every head sent is
    /// sent back (other tasks' unchanged) and Dice is one `dice` metric (docs/flower.md).
    #[arg(long)]
    uniform_reply: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flower_node: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut experiment = ExperimentConfig::preset(&args.preset)?;
    experiment.seed = args.seed;
    let site_folder = args
        .data
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_else(|| "site".into());
    let work_dir = args
        .work_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/flower_node").join(&site_folder));
    let key_path = args
        .key
        .clone()
        .unwrap_or_else(|| work_dir.join("node-key.pem"));
    let transport = if args.insecure {
        Transport::Insecure
    } else {
        Transport::Tls {
            root_ca: args.root_ca.clone(),
        }
    };

    let device = segviz::default_device().autodiff();
    let app = SegVizApp::open(
        &args.data,
        &SiteSettings {
            experiment,
            work_dir: work_dir.clone(),
            site_name: args.site_name.clone(),
            reply: if args.uniform_reply {
                ReplyLayout::Uniform
            } else {
                ReplyLayout::PerSite
            },
        },
        &device,
    )?;
    for w in app.data_warnings() {
        eprintln!("warning: {w}");
    }
    let identity = NodeIdentity::load_or_create(&key_path)?;
    let client = FleetClient::new(&args.superlink, &transport, identity)?;
    println!(
        "site {} (heads: {}) | backend {} | preset {} | SuperLink {} ({})",
        app.site_name(),
        app.tasks().join(", "),
        segviz::backend_name(),
        args.preset,
        args.superlink,
        if args.insecure { "insecure" } else { "TLS" }
    );

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // With ctrlc's `termination` feature this handles SIGINT, SIGTERM and SIGHUP alike.
        ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                eprintln!("flower_node: second stop signal, quitting now");
                std::process::exit(130);
            }
            eprintln!("flower_node: stop signal: finishing the current instruction, then leaving (signal again to quit now)");
        })?;
    }
    let mut node = FlowerNode::new(
        client,
        app,
        NodeOptions {
            heartbeat_interval: args.heartbeat_interval,
            poll_interval: Duration::from_millis(500),
            ..NodeOptions::default()
        },
    );
    node.run(&stop, |event| match event {
        NodeEvent::Connected { node_id } => println!("connected as node {node_id}"),
        NodeEvent::Received {
            run_id,
            message_type,
            group,
        } => println!("run {run_id} round {group}: {message_type} instruction received"),
        NodeEvent::Replied {
            run_id,
            message_type,
            seconds,
            error,
        } => match error {
            None => println!("run {run_id}: {message_type} reply sent ({seconds:.1} s)"),
            Some(e) => println!("run {run_id}: {message_type} failed, error reply sent: {e}"),
        },
        NodeEvent::Skipped { reason } => println!("skipped: {reason}"),
        NodeEvent::Reconnecting { reason, wait } => {
            println!("connection lost ({reason}); retrying in {wait:?}")
        }
        NodeEvent::Left => {
            println!("deactivated (still registered: a restart rejoins with the same key)")
        }
    })?;
    Ok(())
}
