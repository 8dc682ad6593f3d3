//! `soak`: a steady mixed workload for `--duration`, sampled per window, to
//! see memory or latency drift.
//!
//! Each connection, every 2 ms, sends an `echo`; every 100 ms a `spin` of 5 ms;
//! every 250 ms a `hash_chain` of 200 000 rounds; every 500 ms a `sleep` of
//! 20 ms. The load stays far below saturation on purpose: drift, not capacity,
//! is the question.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{ms_params, secs, Plan, Subject};
use crate::client::{Reply, RpcClient};
use crate::procfs::{cpu_ticks, rss_kib, tick};
use crate::report::{Report, TargetReport};
use crate::stats::{median, ratio, slope, LatencyHist};
use crate::BenchError;

const TICK: Duration = Duration::from_millis(2);
/// Per-connection bound on requests in flight (the server refuses beyond 1024).
const MAX_OUTSTANDING: usize = 512;

#[derive(Debug, Clone)]
pub struct Settings {
    pub duration: Duration,
    pub windows: u32,
    pub connections: usize,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        let (duration, windows, connections) = if plan.quick {
            (Duration::from_secs(3), 3, 2)
        } else {
            (Duration::from_secs(60), 12, 4)
        };
        let duration = plan.duration.unwrap_or(duration);
        // Windows of at least a second, at most 60 of them.
        let windows = windows.min(duration.as_secs() as u32).clamp(1, 60);
        let windows = if plan.duration.is_some() && duration >= Duration::from_secs(120) {
            ((duration.as_secs() / 10) as u32).clamp(12, 60)
        } else {
            windows
        };
        Settings {
            duration,
            windows,
            connections: plan.connections.unwrap_or(connections),
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("duration_s".into(), secs(self.duration));
        m.insert("windows".into(), self.windows.into());
        m.insert("connections".into(), self.connections.into());
        m.insert(
            "per_connection".into(),
            "echo/2ms, spin 5ms/100ms, hash_chain 200k/250ms, sleep 20ms/500ms".into(),
        );
        m
    }
}

#[derive(Debug, Default)]
struct Window {
    echo: LatencyHist,
    tasks: LatencyHist,
    answered: u64,
    errors: u64,
}

type Shared = Arc<Mutex<Window>>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, Window> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Drives one connection until `stop_at`.
async fn drive(client: RpcClient, shared: Shared, stop_at: Instant) -> Result<u64, BenchError> {
    let client = Arc::new(client);
    let echo = serde_json::json!({ "value": "soak" });
    let spin = ms_params(5);
    let hash = serde_json::json!({ "seed": 7, "rounds": 200_000 });
    let sleep = ms_params(20);
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut k: u64 = 0;
    let mut skipped = 0u64;
    let mut waiting = tokio::task::JoinSet::new();
    while Instant::now() < stop_at {
        tick.tick().await;
        k += 1;
        let mut sends: Vec<(&str, &serde_json::Value, bool)> = vec![("echo", &echo, true)];
        if k.is_multiple_of(50) {
            sends.push(("spin", &spin, false));
        }
        if k.is_multiple_of(125) {
            sends.push(("hash_chain", &hash, false));
        }
        if k.is_multiple_of(250) {
            sends.push(("sleep", &sleep, false));
        }
        for (method, params, is_echo) in sends {
            if client.in_flight() >= MAX_OUTSTANDING {
                skipped += 1;
                continue;
            }
            let call = client.start(method, params)?;
            let shared = Arc::clone(&shared);
            waiting.spawn(async move {
                if let Ok(Ok(reply)) =
                    tokio::time::timeout(Duration::from_secs(30), call.wait()).await
                {
                    record(&shared, &reply, is_echo);
                }
            });
        }
        // Reap finished waiters so the set does not grow for the whole run.
        while waiting.try_join_next().is_some() {}
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while waiting.join_next().await.is_some() {}
    })
    .await;
    waiting.abort_all();
    if let Ok(client) = Arc::try_unwrap(client) {
        client.close().await;
    }
    Ok(skipped)
}

fn record(shared: &Shared, reply: &Reply, is_echo: bool) {
    let mut w = lock(shared);
    w.answered += 1;
    if reply.error.is_some() {
        w.errors += 1;
    }
    if is_echo {
        w.echo.record(reply.latency);
    } else {
        w.tasks.record(reply.latency);
    }
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let shared: Shared = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..s.connections {
        clients.push(RpcClient::connect(&subject.url).await?);
    }
    let start = Instant::now();
    let stop_at = start + s.duration;
    let drivers: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(drive(c, Arc::clone(&shared), stop_at)))
        .collect();

    let window = s.duration / s.windows;
    let tick_ms = tick().as_secs_f64() * 1000.0;
    let mut series = Vec::new();
    let mut all_echo = LatencyHist::new();
    let (mut answered, mut errors) = (0u64, 0u64);
    let mut last_ticks = subject.pid.map(cpu_ticks).transpose()?;
    for i in 1..=s.windows {
        tokio::time::sleep_until((start + window * i).into()).await;
        let w = std::mem::take(&mut *lock(&shared));
        all_echo.merge(&w.echo);
        answered += w.answered;
        errors += w.errors;
        let rss = subject.pid.map(rss_kib).transpose()?;
        let ticks = subject.pid.map(cpu_ticks).transpose()?;
        let cpu_pct = match (ticks, last_ticks) {
            (Some(now), Some(before)) => {
                Some((now - before) as f64 * tick_ms / (window.as_secs_f64() * 1000.0) * 100.0)
            }
            _ => None,
        };
        last_ticks = ticks;
        let e = w.echo.summary();
        let t = w.tasks.summary();
        let sample = serde_json::json!({
            "t_s": (window * i).as_secs_f64(),
            "rss_kib": rss,
            "server_cpu_pct": cpu_pct,
            "replies": w.answered,
            "errors": w.errors,
            "echo_p50_ms": e.map(|e| e.p50_ms),
            "echo_p99_ms": e.map(|e| e.p99_ms),
            "tasks_p99_ms": t.map(|t| t.p99_ms),
        });
        eprintln!("  soak[{}]: {sample}", subject.name);
        series.push(sample);
    }
    let mut skipped = 0;
    for d in drivers {
        skipped += d
            .await
            .map_err(|e| BenchError::Protocol(format!("soak driver failed: {e}")))??;
    }
    // Replies that arrived after the last window.
    let tail = std::mem::take(&mut *lock(&shared));
    answered += tail.answered;
    errors += tail.errors;

    let mut t = TargetReport::ok(&subject.name);
    t.metric("replies", answered as f64, "");
    t.metric("error replies", errors as f64, "");
    t.metric("sends skipped (backlog)", skipped as f64, "");
    t.latency("echo", all_echo.summary().as_ref(), false);
    // The first window includes start-up and warm-up; drift is judged on the rest.
    let steady: Vec<&serde_json::Value> = series.iter().skip(1).collect();
    let xs: Vec<f64> = steady.iter().filter_map(|v| v["t_s"].as_f64()).collect();
    let rss: Vec<f64> = steady
        .iter()
        .filter_map(|v| v["rss_kib"].as_f64())
        .collect();
    if let (Some(first), Some(last)) = (rss.first(), rss.last()) {
        t.metric("RSS first steady window", *first, "KiB");
        t.metric("RSS last window", *last, "KiB");
        t.metric("RSS growth", last - first, "KiB");
        if let Some(sl) = slope(&xs, &rss) {
            t.metric("RSS slope", sl * 60.0, "KiB/min");
        }
    }
    let p99s: Vec<f64> = steady
        .iter()
        .filter_map(|v| v["echo_p99_ms"].as_f64())
        .collect();
    if p99s.len() >= 2 {
        let half = p99s.len() / 2;
        if let (Some(a), Some(b)) = (median(&p99s[..half]), median(&p99s[half..])) {
            t.metric("echo p99 first half (median of windows)", a, "ms");
            t.metric("echo p99 second half (median of windows)", b, "ms");
            if let Some(r) = ratio(b, a) {
                t.metric("echo p99 drift", r, "x");
            }
        }
    }
    t.series = serde_json::Value::Array(series);
    Ok(t)
}

pub fn finish(report: &mut Report) {
    report.compare("baseline-textbook", &["echo p99", "RSS growth"]);
    report.notes.push(
        "drift is judged after the first window: RSS growth and slope over the steady windows; \
         echo p99 drift = median window p99 of the second half / first half (1.0 = none). \
         Target: a 10-minute soak with no memory growth beyond noise and no latency drift."
            .into(),
    );
}
