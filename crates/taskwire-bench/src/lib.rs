//! # taskwire-bench
//!
//! The load generator, the benchmark scenarios and the baseline servers of
//! taskwire. Every performance claim of taskwire comes from a command of this
//! crate: `taskwire bench SCENARIO` (wired by the CLI crate to [`run`]) or the
//! standalone `taskwire-bench SCENARIO` binary built from this crate.
//!
//! The crate speaks only the wire protocol (`PROTOCOL.md`): it does not depend on
//! the `taskwire` library, so it measures any server that follows the protocol,
//! including its own baselines:
//!
//! * `baseline-raw-echo`: a bare axum WebSocket echo, the round-trip ceiling;
//! * `baseline-textbook`: a spawned task per request, one mpsc to a writer task,
//!   `spawn_blocking` for CPU work, nothing more;
//! * `baseline-naive`: the handler awaits each task before reading the next message.
//!
//! Unless `--url` points at an already running server, the bench starts the
//! servers itself (found next to its own executable), measures each one in the same
//! run, reports the ratios and kills them again.
//!
//! ```no_run
//! # async fn demo() -> Result<(), taskwire_bench::BenchError> {
//! use clap::Parser;
//!
//! #[derive(Parser)]
//! struct Cli {
//!     #[command(flatten)]
//!     bench: taskwire_bench::BenchArgs,
//! }
//!
//! let cli = Cli::parse_from(["bench", "throughput", "--quick"]);
//! taskwire_bench::run(cli.bench).await?;
//! # Ok(())
//! # }
//! ```
#![deny(missing_docs)]

pub mod baseline;
mod client;
mod error;
mod launch;
mod procfs;
pub mod report;
mod scenario;
mod stats;

use std::path::PathBuf;
use std::time::Duration;

pub use error::BenchError;
pub use launch::Target;
pub use report::Report;

/// The scenarios of the benchmark suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// C connections × W pipelined `echo` requests for T seconds: requests/s and
    /// latency percentiles, against taskwire, the raw echo server and the textbook design.
    Throughput,
    /// One connection keeps 64 long `spin` tasks in flight; a second runs 10 ms
    /// `spin` tasks one at a time; a third sends `echo` every 10 ms.
    Flood,
    /// A queued flood of 200 `spin` 50 ms from one connection, a burst of 10 from
    /// another: the burst's completion time relative to the burst alone.
    Fairness,
    /// One connection sends 255 `spin` 100 ms at once, then a `spin` 10 ms: when
    /// the first, the median and the last results come, and the short one;
    /// against the same binary with least attained service throughout.
    Stream,
    /// Time from `$/cancelRequest` to the `-32800` reply, and from closing the
    /// connection to the server's CPU going idle.
    Cancel,
    /// N idle connections from several 127.0.0.x source addresses: server RSS per connection.
    Connections,
    /// A mixed workload for `--duration`: memory and latency drift per window.
    Soak,
    /// C connections × W pipelined tiny CPU tasks (`hash_chain`, 1000 rounds):
    /// the compute pool's throughput against `spawn_blocking`.
    Tiny,
    /// Hostile clients, one attack per fresh server: oversized batches, unread
    /// pongs, huge ids, error amplification, half-sent requests, shutdown under
    /// attack, one address taking every CPU slot, cross-site admin requests,
    /// log injection. Server RSS, descriptors and responsiveness for each.
    Hostile,
}

impl Scenario {
    /// The scenario's name as written on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::Throughput => "throughput",
            Scenario::Flood => "flood",
            Scenario::Fairness => "fairness",
            Scenario::Stream => "stream",
            Scenario::Cancel => "cancel",
            Scenario::Connections => "connections",
            Scenario::Soak => "soak",
            Scenario::Tiny => "tiny",
            Scenario::Hostile => "hostile",
        }
    }

    /// Every scenario, in the order reports and `BENCHMARKS.md` list them.
    pub const ALL: [Scenario; 9] = [
        Scenario::Throughput,
        Scenario::Flood,
        Scenario::Fairness,
        Scenario::Stream,
        Scenario::Cancel,
        Scenario::Connections,
        Scenario::Soak,
        Scenario::Tiny,
        Scenario::Hostile,
    ];
}

/// Command-line arguments of `taskwire bench` (flatten them into a clap parser).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// The scenario to run.
    #[arg(value_enum)]
    pub scenario: Scenario,

    /// Measure an already running server at this `ws://127.0.0.x:PORT/ws` URL
    /// instead of starting servers (only loopback addresses are accepted). A
    /// taskwire server needs its demo tasks (`taskwire serve --demo`): the
    /// scenarios use `spin`, `runaway` and `crash`.
    #[arg(long)]
    pub url: Option<String>,

    /// With `--url`: the server's process id, for the CPU and memory figures
    /// read from /proc (`cancel`, `connections`, `soak`).
    #[arg(long, requires = "url")]
    pub server_pid: Option<u32>,

    /// The servers to start and measure (comma-separated); default: the
    /// scenario's own list. Ignored with `--url`.
    #[arg(long, value_enum, value_delimiter = ',')]
    pub targets: Vec<Target>,

    /// How long the timed part of the scenario runs per server (for `hostile`:
    /// how long each memory attack is held), e.g. `10s`,
    /// `500ms`, `2m` (a bare number is seconds). Default: per scenario.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,

    /// Connections: C for `throughput` and `soak`, N idle connections for
    /// `connections`, N half-sent requests for `hostile` (capped near the
    /// open-file limit). Default: per scenario.
    #[arg(long)]
    pub connections: Option<usize>,

    /// Pipelined requests in flight per connection (`throughput`). Default 16.
    #[arg(long)]
    pub inflight: Option<usize>,

    /// Write the JSON report to this path (its directory is created).
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,

    /// A short smoke run: small counts and sub-second phases.
    #[arg(long)]
    pub quick: bool,

    /// Where the server binaries are (default: next to this executable).
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Let the started servers' stderr through (default: discarded).
    #[arg(long)]
    pub server_logs: bool,
}

/// Parses `10`, `10s`, `250ms`, `2m` into a [`Duration`] (clap value parser).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, scale_ms) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60_000.0)
    } else {
        (text, 1000.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 10s, 500ms, 2m)"))?;
    if !value.is_finite() || value <= 0.0 || value * scale_ms > 86_400_000.0 {
        return Err(format!("duration out of range: {text:?}"));
    }
    Ok(Duration::from_secs_f64(value * scale_ms / 1000.0))
}

/// Runs one scenario as `args` describe, prints the human summary on stdout and,
/// with `--json`, writes the JSON report. Returns an error only when the run as a
/// whole could not happen (bad arguments, unwritable report); a server that fails
/// to start or to answer is recorded in the report as `failed` or `skipped`.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    let report = run_report(&args).await?;
    println!("{}", report.human_summary());
    if let Some(path) = &args.json {
        report.write_json(path)?;
        eprintln!("report written to {}", path.display());
    }
    Ok(())
}

/// Like [`run`] but returns the [`Report`] instead of printing it.
pub async fn run_report(args: &BenchArgs) -> Result<Report, BenchError> {
    let plan = scenario::Plan::new(args)?;
    scenario::run(plan).await
}

/// Regenerates the generated part of `docs/BENCHMARKS.md` (between its
/// `<!-- bench:begin -->` and `<!-- bench:end -->` markers, keeping everything
/// else) from the JSON reports found in `dir`.
pub fn write_markdown(dir: &std::path::Path, out: &std::path::Path) -> Result<(), BenchError> {
    report::write_markdown(dir, out)
}

/// The before/after table of `docs/BENCHMARKS.md`'s "Hostile clients"
/// section, from a `hostile` JSON report and, once the scenario has been rerun,
/// a second one (its column stays empty without it).
pub fn hostile_table(
    before: &std::path::Path,
    after: Option<&std::path::Path>,
) -> Result<String, BenchError> {
    let before = scenario::hostile::read_report(before)?;
    let after = after.map(scenario::hostile::read_report).transpose()?;
    Ok(scenario::hostile::before_after_table(
        &before,
        after.as_ref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("abc").is_err());
        assert!(parse_duration("100d").is_err());
    }

    #[test]
    fn args_parse() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            bench: BenchArgs,
        }
        let cli = Cli::try_parse_from([
            "bench",
            "throughput",
            "--targets",
            "raw-echo,textbook",
            "--duration",
            "3s",
            "--inflight",
            "8",
            "--quick",
        ]);
        let cli = match cli {
            Ok(cli) => cli,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cli.bench.scenario, Scenario::Throughput);
        assert_eq!(cli.bench.targets, vec![Target::RawEcho, Target::Textbook]);
        assert_eq!(cli.bench.duration, Some(Duration::from_secs(3)));
        assert_eq!(cli.bench.inflight, Some(8));
        assert!(cli.bench.quick);
    }
}
