//! `throughput`: C connections × W pipelined `echo` requests for T seconds.
//!
//! Each connection is driven by one task that keeps exactly W requests in
//! flight: every reply is matched by id, timed, and immediately replaced by a
//! new request. Only replies that arrive inside the measured window (after a
//! warm-up) count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use super::{secs, Plan, Progress, Subject};
use crate::client::{connect, parse_incoming, Buffers, Incoming, Pending, Ws};
use crate::report::{Report, TargetReport};
use crate::stats::LatencyHist;
use crate::BenchError;

/// How long a connection may keep draining replies after the window.
const DRAIN: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Settings {
    pub duration: Duration,
    pub warmup: Duration,
    pub connections: usize,
    pub inflight: usize,
    /// `tiny`: a stream of tiny CPU tasks (`hash_chain`, 1000 rounds) instead of `echo`.
    pub tiny: bool,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        let (duration, warmup, connections, inflight) = if plan.quick {
            (Duration::from_secs(1), Duration::from_millis(200), 2, 8)
        } else {
            (Duration::from_secs(10), Duration::from_secs(1), 8, 16)
        };
        Settings {
            duration: plan.duration.unwrap_or(duration),
            warmup,
            connections: plan.connections.unwrap_or(connections),
            inflight: plan.inflight.unwrap_or(inflight),
            tiny: plan.scenario == crate::Scenario::Tiny,
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("duration_s".into(), secs(self.duration));
        m.insert("warmup_s".into(), secs(self.warmup));
        m.insert("connections".into(), self.connections.into());
        m.insert("inflight_per_connection".into(), self.inflight.into());
        let method = if self.tiny {
            "hash_chain (1000 rounds)"
        } else {
            "echo"
        };
        m.insert("method".into(), method.into());
        m
    }
}

#[derive(Debug, Default)]
struct ConnStats {
    hist: LatencyHist,
    /// Replies inside the measured window.
    measured: u64,
    errors: u64,
    unmatched: u64,
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let mut conns = Vec::with_capacity(s.connections);
    for _ in 0..s.connections {
        conns.push(connect(&subject.url, None, Buffers::Default).await?);
    }
    let start = Instant::now();
    let record_from = start + s.warmup;
    let end = record_from + s.duration;
    let counter = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(
        format!("throughput[{}]", subject.name),
        s.warmup + s.duration,
        Arc::clone(&counter),
        "replies",
    );
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            let counter = Arc::clone(&counter);
            tokio::spawn(drive(ws, s.inflight, s.tiny, record_from, end, counter))
        })
        .collect();
    let mut total = ConnStats::default();
    for t in tasks {
        let c = t
            .await
            .map_err(|e| BenchError::Protocol(format!("connection task failed: {e}")))??;
        total.hist.merge(&c.hist);
        total.measured += c.measured;
        total.errors += c.errors;
        total.unmatched += c.unmatched;
    }
    let mut t = TargetReport::ok(&subject.name);
    t.metric(
        "req/s",
        total.measured as f64 / s.duration.as_secs_f64(),
        "req/s",
    );
    let summary = total.hist.summary();
    if let Some(sm) = &summary {
        t.metric("p50", sm.p50_ms, "ms");
        t.metric("p99", sm.p99_ms, "ms");
        t.metric("p99.9", sm.p999_ms, "ms");
        t.metric("max", sm.max_ms, "ms");
    }
    t.metric("replies", total.measured as f64, "");
    t.metric("error replies", total.errors as f64, "");
    t.metric("unmatched ids", total.unmatched as f64, "");
    Ok(t)
}

fn request(id: u64, tiny: bool) -> Message {
    if tiny {
        return Message::text(format!(
            r#"{{"jsonrpc":"2.0","id":{id},"method":"hash_chain","params":{{"seed":{id},"rounds":1000}}}}"#
        ));
    }
    Message::text(format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"echo","params":{{"value":"taskwire-bench"}}}}"#
    ))
}

/// Keeps `inflight` echos in flight on one connection until `end`, then drains.
async fn drive(
    ws: Ws,
    inflight: usize,
    tiny: bool,
    record_from: Instant,
    end: Instant,
    counter: Arc<AtomicU64>,
) -> Result<ConnStats, BenchError> {
    let (mut sink, mut stream) = ws.split();
    let mut pending: Pending<()> = Pending::default();
    let mut stats = ConnStats::default();
    let mut next_id = 1u64;
    let now = Instant::now();
    for _ in 0..inflight {
        pending.insert(next_id, now, ());
        sink.feed(request(next_id, tiny)).await?;
        next_id += 1;
    }
    sink.flush().await?;
    let deadline = tokio::time::Instant::from_std(end + DRAIN);
    loop {
        let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) => break, // still waiting after the drain period: give up on those
            Ok(None) => return Err(BenchError::ConnectionClosed),
            Ok(Some(msg)) => msg?,
        };
        let now = Instant::now();
        let text = match &msg {
            Message::Text(t) => t.as_str(),
            Message::Close(_) => return Err(BenchError::ConnectionClosed),
            _ => continue,
        };
        match parse_incoming(text)? {
            Incoming::Reply { id, error } => match pending.complete(id, now) {
                Some((latency, ())) => {
                    if now >= record_from && now <= end {
                        stats.hist.record(latency);
                        stats.measured += 1;
                        counter.fetch_add(1, Ordering::Relaxed);
                        if error.is_some() {
                            stats.errors += 1;
                        }
                    }
                    if now < end {
                        pending.insert(next_id, now, ());
                        sink.send(request(next_id, tiny)).await?;
                        next_id += 1;
                    } else if pending.is_empty() {
                        break;
                    }
                }
                None => stats.unmatched += 1,
            },
            Incoming::Other => {}
        }
    }
    // Best effort: the server may already be gone.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.send(Message::Close(None))).await;
    Ok(stats)
}

/// `tiny`: the compute pool against `spawn_blocking` on tiny CPU tasks.
pub fn finish_tiny(report: &mut Report) {
    report.compare("baseline-textbook", &["req/s", "p50", "p99"]);
    report.notes.push(
        "target: taskwire ≥ 0.90 × baseline-textbook req/s on tiny CPU tasks \
         (hash_chain, 1000 rounds): the compute pool against spawn_blocking"
            .into(),
    );
}

pub fn finish(report: &mut Report) {
    report.compare("baseline-raw-echo", &["req/s", "p50", "p99"]);
    report.compare_excluding(
        "baseline-textbook",
        &["req/s", "p99"],
        &["baseline-raw-echo"],
    );
    report
        .notes
        .push("target: taskwire ≥ 0.90 × baseline-raw-echo req/s at equal or better p99".into());
}
