//! The scenarios, and the runner that starts each server, measures it and
//! stops it again.

mod cancel;
mod connections;
mod fairness;
mod flood;
pub mod hostile;
mod soak;
mod stream;
mod throughput;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use tokio::task::JoinHandle;

use crate::client::{Reply, RpcClient, WsUrl};
use crate::launch::{bin_dirs, ServerProcess, Target};
use crate::report::{Report, Status, TargetReport};
use crate::stats::LatencyHist;
use crate::{procfs, BenchArgs, BenchError, Scenario};

/// A validated run: what to measure, against which servers.
#[derive(Debug, Clone)]
pub struct Plan {
    pub scenario: Scenario,
    pub quick: bool,
    pub duration: Option<Duration>,
    pub connections: Option<usize>,
    pub inflight: Option<usize>,
    pub servers: Servers,
    pub server_logs: bool,
}

/// Which servers a run measures.
#[derive(Debug, Clone)]
pub enum Servers {
    /// `--url`: one server someone else started.
    External { url: WsUrl, pid: Option<u32> },
    /// Servers the bench starts, one after the other.
    Spawn {
        targets: Vec<Target>,
        dirs: Vec<PathBuf>,
    },
}

impl Plan {
    pub fn new(args: &BenchArgs) -> Result<Plan, BenchError> {
        let servers = match &args.url {
            Some(url) => Servers::External {
                url: WsUrl::parse(url)?,
                pid: args.server_pid,
            },
            None => {
                let mut targets = if args.targets.is_empty() {
                    default_targets(args.scenario).to_vec()
                } else {
                    args.targets.clone()
                };
                let mut seen = Vec::new();
                targets.retain(|t| {
                    let fresh = !seen.contains(t);
                    seen.push(*t);
                    fresh
                });
                Servers::Spawn {
                    targets,
                    dirs: bin_dirs(args.bin_dir.as_deref()),
                }
            }
        };
        if args.scenario == Scenario::Hostile && args.url.is_some() {
            return Err(BenchError::InvalidArgs(
                "hostile starts a fresh server for every attack: --url is not supported".into(),
            ));
        }
        if args.inflight == Some(0) || args.connections == Some(0) {
            return Err(BenchError::InvalidArgs(
                "--inflight and --connections must be at least 1".into(),
            ));
        }
        if args.inflight.is_some_and(|w| w > 1000) {
            // taskwire refuses beyond 1024 in flight per connection (-32001).
            return Err(BenchError::InvalidArgs(
                "--inflight is at most 1000 (the server's per-connection limit is 1024)".into(),
            ));
        }
        Ok(Plan {
            scenario: args.scenario,
            quick: args.quick,
            duration: args.duration,
            connections: args.connections,
            inflight: args.inflight,
            servers,
            server_logs: args.server_logs,
        })
    }
}

/// The servers each scenario compares by default.
fn default_targets(scenario: Scenario) -> &'static [Target] {
    use Target::*;
    match scenario {
        Scenario::Throughput | Scenario::Connections => &[Taskwire, RawEcho, Textbook],
        Scenario::Flood | Scenario::Fairness | Scenario::Cancel => &[Taskwire, Textbook, Naive],
        Scenario::Stream => &[Taskwire, TaskwireLas, Textbook],
        Scenario::Soak | Scenario::Tiny => &[Taskwire, Textbook],
        Scenario::Hostile => &[Taskwire],
    }
}

/// One server being measured.
#[derive(Debug)]
pub struct Subject {
    /// Report name.
    pub name: String,
    pub url: WsUrl,
    /// For /proc figures, when known.
    pub pid: Option<u32>,
    /// `None` for an external server (assumed to be taskwire).
    pub target: Option<Target>,
}

impl Subject {
    /// Whether it implements `runaway` (taskwire and, presumably, an external server).
    fn has_runaway(&self) -> bool {
        self.target.is_none_or(Target::has_runaway)
    }
}

/// Runs the plan's scenario against each server and assembles the report.
pub async fn run(plan: Plan) -> Result<Report, BenchError> {
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let settings = match plan.scenario {
        Scenario::Throughput | Scenario::Tiny => throughput::Settings::new(&plan).to_json(),
        Scenario::Flood => flood::Settings::new(&plan).to_json(),
        Scenario::Fairness => fairness::Settings::new(&plan).to_json(),
        Scenario::Stream => stream::Settings::new(&plan).to_json(),
        Scenario::Cancel => cancel::Settings::new(&plan).to_json(),
        Scenario::Connections => connections::Settings::new(&plan).to_json(),
        Scenario::Soak => soak::Settings::new(&plan).to_json(),
        Scenario::Hostile => hostile::Settings::new(&plan).to_json(),
    };
    let mut report = Report {
        scenario: plan.scenario.name().to_string(),
        command: command_line(),
        date_utc: procfs::iso_utc(started),
        unix_time: started,
        machine: procfs::machine(),
        settings,
        targets: Vec::new(),
        comparisons: Vec::new(),
        notes: Vec::new(),
    };
    match &plan.servers {
        Servers::External { url, pid } => {
            let subject = Subject {
                name: "external".into(),
                url: url.clone(),
                pid: *pid,
                target: None,
            };
            let t = measure_or_fail(&plan, &subject).await;
            report.targets.push(t);
        }
        Servers::Spawn { targets, dirs } => {
            for &target in targets {
                if needs_json_rpc(plan.scenario) && !target.speaks_json_rpc() {
                    report.targets.push(TargetReport::not_run(
                        target.name(),
                        Status::Skipped,
                        "runs no tasks: throughput and connections only".into(),
                    ));
                    continue;
                }
                if plan.scenario == Scenario::Hostile {
                    // Every attack starts (and stops) a server of its own.
                    let settings = hostile::Settings::new(&plan);
                    report.targets.push(
                        hostile::measure_target(&settings, target, dirs, plan.server_logs).await,
                    );
                    continue;
                }
                eprintln!("{}: starting {}", plan.scenario.name(), target.name());
                let server = match ServerProcess::start(target, dirs, plan.server_logs).await {
                    Ok(s) => s,
                    Err(e) => {
                        let status = if matches!(e, BenchError::BinaryNotFound(_)) {
                            Status::Skipped
                        } else {
                            Status::Failed
                        };
                        eprintln!("{}: {}: {e}", plan.scenario.name(), target.name());
                        report.targets.push(TargetReport::not_run(
                            target.name(),
                            status,
                            e.to_string(),
                        ));
                        continue;
                    }
                };
                let subject = Subject {
                    name: target.name().into(),
                    url: WsUrl::parse(&server.url())?,
                    pid: Some(server.pid),
                    target: Some(target),
                };
                let t = measure_or_fail(&plan, &subject).await;
                server.stop().await;
                report.targets.push(t);
            }
        }
    }
    match plan.scenario {
        Scenario::Throughput => throughput::finish(&mut report),
        Scenario::Tiny => throughput::finish_tiny(&mut report),
        Scenario::Flood => flood::finish(&mut report),
        Scenario::Fairness => fairness::finish(&mut report),
        Scenario::Stream => stream::finish(&mut report),
        Scenario::Cancel => cancel::finish(&mut report),
        Scenario::Connections => connections::finish(&plan, &mut report),
        Scenario::Soak => soak::finish(&mut report),
        Scenario::Hostile => hostile::finish(&mut report),
    }
    report.notes.push(format!(
        "the load generator runs on the same {} CPU(s) as the server it measures",
        report.machine.nproc
    ));
    if report.machine.load_avg_1m > report.machine.nproc as f64 {
        report.notes.push(format!(
            "the machine was busy with other work when this run started (load average {:.1} \
             on {} CPUs): expect noisy figures, especially latency tails",
            report.machine.load_avg_1m, report.machine.nproc
        ));
    }
    Ok(report)
}

fn needs_json_rpc(scenario: Scenario) -> bool {
    !matches!(scenario, Scenario::Throughput | Scenario::Connections)
}

async fn measure_or_fail(plan: &Plan, subject: &Subject) -> TargetReport {
    let result = match plan.scenario {
        Scenario::Throughput | Scenario::Tiny => {
            throughput::measure(&throughput::Settings::new(plan), subject).await
        }
        Scenario::Flood => flood::measure(&flood::Settings::new(plan), subject).await,
        Scenario::Fairness => fairness::measure(&fairness::Settings::new(plan), subject).await,
        Scenario::Stream => stream::measure(&stream::Settings::new(plan), subject).await,
        Scenario::Cancel => cancel::measure(&cancel::Settings::new(plan), subject).await,
        Scenario::Connections => {
            connections::measure(&connections::Settings::new(plan), subject).await
        }
        Scenario::Soak => soak::measure(&soak::Settings::new(plan), subject).await,
        // Never reached: `run` measures hostile itself, and `Plan::new` refuses --url.
        Scenario::Hostile => Err(BenchError::InvalidArgs(
            "hostile starts its own servers".into(),
        )),
    };
    result.unwrap_or_else(|e| {
        eprintln!("{}: {}: failed: {e}", plan.scenario.name(), subject.name);
        TargetReport::not_run(&subject.name, Status::Failed, e.to_string())
    })
}

/// The command line, shell-quoted where needed.
fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A progress line on stderr every few seconds for long phases; stops when dropped.
pub struct Progress {
    ticker: Option<JoinHandle<()>>,
}

impl Progress {
    /// Reports `counter` (what it counts is `unit`) for a phase of `length`.
    pub fn start(
        label: String,
        length: Duration,
        counter: Arc<AtomicU64>,
        unit: &'static str,
    ) -> Self {
        if length < Duration::from_secs(5) {
            return Progress { ticker: None };
        }
        let ticker = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            tick.tick().await;
            loop {
                tick.tick().await;
                let elapsed = start.elapsed();
                eprintln!(
                    "  {label}: {:.0}/{:.0} s, {} {unit}",
                    elapsed.as_secs_f64(),
                    length.as_secs_f64(),
                    counter.load(Ordering::Relaxed)
                );
                if elapsed > length + Duration::from_secs(30) {
                    break;
                }
            }
        });
        Progress {
            ticker: Some(ticker),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(t) = &self.ticker {
            t.abort();
        }
    }
}

/// What a stream of requests produced.
#[derive(Debug, Default)]
pub struct CallStats {
    /// Latencies of the replies (results and errors alike).
    pub hist: LatencyHist,
    pub sent: u64,
    pub answered: u64,
    /// Error replies by code: (code, count).
    pub errors: Vec<(i64, u64)>,
}

impl CallStats {
    fn record(&mut self, reply: &Reply) {
        self.answered += 1;
        self.hist.record(reply.latency);
        if let Some(code) = reply.error {
            match self.errors.iter_mut().find(|(c, _)| *c == code) {
                Some((_, n)) => *n += 1,
                None => self.errors.push((code, 1)),
            }
        }
    }

    /// Error replies with this code.
    pub fn errors_with(&self, code: i64) -> u64 {
        self.errors
            .iter()
            .find(|(c, _)| *c == code)
            .map_or(0, |(_, n)| *n)
    }

    /// Every error reply.
    pub fn error_count(&self) -> u64 {
        self.errors.iter().map(|(_, n)| n).sum()
    }

    /// Requests without a reply (still running when the phase ended).
    pub fn unanswered(&self) -> u64 {
        self.sent.saturating_sub(self.answered)
    }
}

/// Calls `method` one at a time (each after the previous reply) until `stop_at`
/// or `max_count` calls; a call still running at `stop_at + grace` is abandoned.
pub async fn sequential(
    client: &RpcClient,
    method: &str,
    params: &serde_json::Value,
    stop_at: Instant,
    max_count: u64,
    grace: Duration,
) -> Result<CallStats, BenchError> {
    let mut stats = CallStats::default();
    while Instant::now() < stop_at && stats.sent < max_count {
        let call = client.start(method, params)?;
        stats.sent += 1;
        match tokio::time::timeout_at((stop_at + grace).into(), call.wait()).await {
            Ok(reply) => stats.record(&reply?),
            Err(_) => break,
        }
    }
    Ok(stats)
}

/// Sends `method` every `every` (not waiting for replies) until `stop_at`, then
/// waits up to `grace` for the replies still outstanding.
pub async fn periodic(
    client: &RpcClient,
    method: &str,
    params: &serde_json::Value,
    every: Duration,
    stop_at: Instant,
    grace: Duration,
) -> Result<CallStats, BenchError> {
    let mut stats = CallStats::default();
    let mut outstanding = FuturesUnordered::new();
    let mut tick = tokio::time::interval(every);
    // A late tick is skipped rather than bunched: the point is a steady rate.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let stop = tokio::time::Instant::from_std(stop_at);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if Instant::now() >= stop_at { break; }
                // Never more than the server's per-connection limit in flight.
                if outstanding.len() < 900 {
                    outstanding.push(client.start(method, params)?.wait());
                    stats.sent += 1;
                }
            }
            Some(reply) = outstanding.next(), if !outstanding.is_empty() => {
                stats.record(&reply?);
            }
            _ = tokio::time::sleep_until(stop) => break,
        }
    }
    let drain_until = tokio::time::Instant::from_std(stop_at + grace);
    while !outstanding.is_empty() {
        match tokio::time::timeout_at(drain_until, outstanding.next()).await {
            Ok(Some(reply)) => stats.record(&reply?),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(stats)
}

/// Shorthand for JSON params.
fn ms_params(ms: u64) -> serde_json::Value {
    serde_json::json!({ "ms": ms })
}

/// Duration as seconds, for settings.
fn secs(d: Duration) -> serde_json::Value {
    serde_json::json!(d.as_secs_f64())
}
