//! The `tessera` command.
//!
//! - `tessera replay TRACE...`: replays allocation traces through tessera and through PyTorch's
//!   allocator rules on a simulated device and prints them side by side (`--json`, `--plot`,
//!   `--min-capacity`).
//! - `tessera info`: what the driver sees.
//!
//! Exit status: 0 when every trace replayed; 1 when a trace was missing, unreadable or malformed,
//! or a replay failed (the other traces still run); 2 for bad arguments.

mod plot;
mod progress;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use tessera::bytes::{format_bytes, parse_bytes};
use tessera::driver::cuda::CudaDriver;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::Driver;
use tessera::replay::engine::MAX_CAPACITY;
use tessera::replay::{self, trace, Policy, ReplayOptions};
use tessera::Config;

#[derive(Parser)]
#[command(
    name = "tessera",
    version,
    about = "A CUDA caching allocator with a page-remapping defragmentation core"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Replay allocation traces on a simulated device, every policy side by side.
    Replay(ReplayArgs),
    /// Show what the driver sees: devices, granularity, VMM support, memory.
    Info(InfoArgs),
}

#[derive(Args)]
struct ReplayArgs {
    /// Trace files: tessera CSV (`a,ID,SIZE,STREAM` / `f,ID`), gzip'd or not, or PyTorch memory
    /// snapshots (`torch.cuda.memory._dump_snapshot`).
    #[arg(required = true, value_name = "TRACE")]
    traces: Vec<PathBuf>,
    /// Memory of the simulated device (at most 8 TiB; default 80 GiB).
    #[arg(long, value_parser = parse_capacity)]
    capacity: Option<u64>,
    /// Allocation granularity of the simulated device: a power of two, at least 4 KiB.
    #[arg(long, default_value = "2MiB", value_parser = parse_granularity)]
    granularity: u64,
    /// Policies to compare, comma-separated: tessera, legacy, native, expandable.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tessera,legacy,native,expandable"
    )]
    policy: Vec<Policy>,
    /// Device whose events a PyTorch snapshot replays: an index, or `all` for one row per device.
    #[arg(long, default_value = "0", value_parser = parse_devices)]
    device: trace::Devices,
    /// Back the device with host memory and write and check a pattern in every allocation.
    #[arg(long)]
    verify: bool,
    /// Also find the smallest capacity (to 2 MiB) that replays with no OOM.
    #[arg(long)]
    min_capacity: bool,
    /// Break the bytes above live down by cause (rounding, size classes, small runs, large free
    /// space in used pages, other streams, free pages, ...) at the peak of live bytes, and with
    /// `--min-capacity` at the smallest capacity and at the OOM one step below it.
    #[arg(long)]
    explain: bool,
    /// Print one JSON object per line per (trace, policy) instead of the table.
    #[arg(long)]
    json: bool,
    /// Draw reserved and live bytes over each trace for every policy into this SVG file.
    #[arg(long, value_name = "FILE")]
    plot: Option<PathBuf>,
    /// Write each policy's replay of each trace into this directory as a PyTorch memory snapshot
    /// (`TRACE.POLICY.pickle`), which PyTorch's memory viewer opens.
    #[arg(long, value_name = "DIR")]
    export: Option<PathBuf>,
    /// Settings for the tessera and legacy policies, in `TESSERA_CONF` syntax (its backend is
    /// set by the policy).
    #[arg(long, value_name = "CONF", default_value = "")]
    conf: String,
}

#[derive(Args)]
struct InfoArgs {
    /// `cuda` (the real driver) or `sim` (a simulated device).
    #[arg(long, default_value = "cuda")]
    driver: String,
    /// The simulated device, as in `TESSERA_SIM` (`devices:2,capacity:8GiB,granularity:2MiB`).
    #[arg(long, default_value = "")]
    sim: String,
}

/// The simulated device's memory when `--capacity` is not given: an 80 GB GPU.
const DEFAULT_CAPACITY: u64 = 80 << 30;

fn parse_capacity(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        0 => Err("expected a size of at least 1 byte".into()),
        n if n > MAX_CAPACITY => Err(format!(
            "at most {} (the simulated device's address space)",
            format_bytes(MAX_CAPACITY)
        )),
        n => Ok(n),
    }
}

fn parse_devices(s: &str) -> Result<trace::Devices, String> {
    match s.trim() {
        "all" => Ok(trace::Devices::All),
        n => n
            .parse()
            .map(trace::Devices::One)
            .map_err(|_| format!("expected a device index or `all`, not {n:?}")),
    }
}

fn parse_granularity(s: &str) -> Result<u64, String> {
    match parse_bytes(s)? {
        n if n.is_power_of_two() && (4096..=1 << 30).contains(&n) => Ok(n),
        _ => Err("expected a power of two from 4 KiB to 1 GiB".into()),
    }
}

fn main() -> ExitCode {
    // `tessera replay ... | head` ends quietly, as command-line tools do, instead of panicking on
    // a closed stdout.
    // SAFETY: setting a signal's disposition to the default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Replay(args) => replay_command(args),
        Command::Info(args) => info_command(args),
    }
}

fn replay_command(args: ReplayArgs) -> ExitCode {
    let mut config = match Config::parse(&args.conf) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tessera: --conf: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.conf.contains("check_invariants") {
        config.check_invariants = false;
    }
    let mut policies: Vec<Policy> = Vec::new();
    for p in &args.policy {
        if !policies.contains(p) {
            policies.push(*p);
        }
    }
    let opts = ReplayOptions {
        capacity: args.capacity.unwrap_or(DEFAULT_CAPACITY),
        granularity: args.granularity,
        verify: args.verify,
        samples: if args.plot.is_some() { 1000 } else { 0 },
        config,
        stop_at_first_oom: false,
        record: args.export.is_some(),
        ..ReplayOptions::default()
    };
    let measures = replay::Measures {
        min_capacity: args.min_capacity,
        explain: args.explain,
    };
    if let Some(dir) = &args.export {
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("tessera: --export {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    }
    let mut failed = false;
    let mut rows = Vec::new();
    let mut plotted = Vec::new();
    // The export files written so far: traces of the same name must not overwrite each other.
    let mut exported = std::collections::HashSet::new();
    for path in &args.traces {
        let traces = match trace::load_devices(path, args.device) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("tessera: {e}");
                failed = true;
                continue;
            }
        };
        for trace in traces {
            report_problems(&trace);
            let mut bar = progress::Progress::new(&trace.name, trace.events.len(), policies.len());
            let report = replay::run(&trace, &policies, &opts, measures, &mut |p, n| {
                bar.update(p, n)
            });
            bar.finish();
            for e in &report.errors {
                eprintln!("tessera: {}: {e}", trace.name);
                failed = true;
            }
            if let Some(dir) = &args.export {
                for o in &report.outcomes {
                    let Some(snap) = replay::export::snapshot_of(&trace, o, opts.capacity) else {
                        continue;
                    };
                    let file =
                        replay::export::unique_export_path(dir, &trace, o.policy, &mut exported);
                    match std::fs::write(&file, snap.to_pickle()) {
                        Ok(()) => eprintln!("tessera: exported {}", file.display()),
                        Err(e) => {
                            eprintln!("tessera: --export {}: {e}", file.display());
                            failed = true;
                        }
                    }
                }
            }
            if args.json {
                for row in &report.rows {
                    println!("{}", row.to_json());
                }
            }
            rows.extend(report.rows.iter().cloned());
            if args.plot.is_some() && !report.outcomes.is_empty() {
                plotted.push((trace.name.clone(), report));
            }
        }
    }
    if !args.json && !rows.is_empty() {
        print!("{}", replay::report::render_table(&rows));
        let explained = replay::report::render_explain(&rows);
        if !explained.is_empty() {
            print!("\n{explained}");
        }
        let notes = replay::report::render_notes(&rows);
        if !notes.is_empty() {
            print!("\n{notes}");
        }
    }
    // The table goes before any later message on stderr.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    if let (Some(file), false) = (&args.plot, plotted.is_empty()) {
        match plot::draw(file, &plotted, args.capacity) {
            Ok(()) => eprintln!("tessera: plot written to {}", file.display()),
            Err(e) => {
                eprintln!("tessera: --plot {}: {e}", file.display());
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Unreplayable events (frees of unknown ids, ...): the first few on stderr, then a count.
fn report_problems(trace: &trace::Trace) {
    const SHOWN: usize = 5;
    for p in trace.problems.iter().take(SHOWN) {
        eprintln!(
            "tessera: {}:{}: {} (dropped)",
            trace.name, p.line, p.message
        );
    }
    if trace.problems.len() > SHOWN {
        eprintln!(
            "tessera: {}: {} events dropped in all",
            trace.name,
            trace.problems.len()
        );
    }
}

fn info_command(args: InfoArgs) -> ExitCode {
    let drv: Arc<dyn Driver> = match args.driver.as_str() {
        "sim" => match SimConfig::parse(&args.sim) {
            Ok(c) => Arc::new(SimDriver::new(c)),
            Err(e) => {
                eprintln!("tessera: --sim: {e}");
                return ExitCode::from(2);
            }
        },
        "cuda" => match CudaDriver::open() {
            Ok(d) => Arc::new(d),
            Err(e) => {
                println!("no GPU: {e}");
                println!("(`tessera replay` runs on a simulated device and needs none)");
                return ExitCode::SUCCESS;
            }
        },
        other => {
            eprintln!("tessera: --driver {other:?}: expected cuda or sim");
            return ExitCode::from(2);
        }
    };
    let n = match drv.device_count() {
        Ok(n) => n,
        Err(e) => {
            println!("no GPU: {e}");
            return ExitCode::SUCCESS;
        }
    };
    println!(
        "driver: {} ({n} device{})",
        drv.name(),
        if n == 1 { "" } else { "s" }
    );
    for dev in 0..n {
        let vmm = match drv.supports_vmm(dev) {
            Ok(true) => "yes".to_string(),
            Ok(false) => "no (legacy backend)".to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let gran = drv
            .granularity(dev)
            .map(format_bytes)
            .unwrap_or_else(|e| format!("unknown ({e})"));
        let mem = match drv.mem_info(dev) {
            Ok(m) => format!("{} free of {}", format_bytes(m.free), format_bytes(m.total)),
            Err(e) => format!("unknown ({e})"),
        };
        println!("device {dev}: memory {mem}, granularity {gran}, virtual memory API {vmm}");
    }
    ExitCode::SUCCESS
}
