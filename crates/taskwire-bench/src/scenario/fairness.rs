//! `fairness`: a newcomer's burst behind a queued flood.
//!
//! A queues `flood_count` `spin` tasks of `flood_ms` at once; shortly after, B
//! sends a burst of `burst_count` `spin` of `burst_ms`. The figure is the time
//! from B's first request to B's last reply, divided by the same burst's time
//! on an idle server (measured first, in the same run).

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::{ms_params, secs, CallStats, Plan, Subject};
use crate::client::{Reply, RpcClient};
use crate::report::{Report, TargetReport};
use crate::stats::{median, ms, ratio};
use crate::BenchError;

#[derive(Debug, Clone)]
pub struct Settings {
    pub flood_count: usize,
    pub flood_ms: u64,
    pub burst_count: usize,
    pub burst_ms: u64,
    pub solo_reps: usize,
    pub settle: Duration,
    /// Bound on one burst (and on waiting for the flood to drain).
    pub timeout: Duration,
    /// Whether to wait for A's flood to finish (its makespan).
    pub wait_flood: bool,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        if plan.quick {
            Settings {
                flood_count: 40,
                flood_ms: 20,
                burst_count: 5,
                burst_ms: 20,
                solo_reps: 1,
                settle: Duration::from_millis(50),
                timeout: Duration::from_secs(20),
                wait_flood: false,
            }
        } else {
            Settings {
                flood_count: 200,
                flood_ms: 50,
                burst_count: 10,
                burst_ms: 50,
                solo_reps: 3,
                settle: Duration::from_millis(100),
                timeout: Duration::from_secs(60),
                wait_flood: true,
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("A_spin_count".into(), self.flood_count.into());
        m.insert("A_spin_ms".into(), self.flood_ms.into());
        m.insert("B_burst_count".into(), self.burst_count.into());
        m.insert("B_spin_ms".into(), self.burst_ms.into());
        m.insert("solo_reps".into(), self.solo_reps.into());
        m.insert("B_after_A_s".into(), secs(self.settle));
        m
    }
}

/// Sends `count` spins at once, waits for every reply: (time to the last reply, stats).
async fn burst(
    client: &RpcClient,
    count: usize,
    spin_ms: u64,
    timeout: Duration,
) -> Result<(Duration, CallStats), BenchError> {
    let start = Instant::now();
    let params = ms_params(spin_ms);
    let mut calls = Vec::with_capacity(count);
    for _ in 0..count {
        calls.push(client.start("spin", &params)?.wait());
    }
    let replies: Vec<Reply> = tokio::time::timeout(timeout, join_all(calls))
        .await
        .map_err(|_| {
            BenchError::Timeout(format!("a burst of {count} spins took over {timeout:?}"))
        })?
        .into_iter()
        .collect::<Result<_, _>>()?;
    let mut stats = CallStats {
        sent: count as u64,
        ..CallStats::default()
    };
    let mut last = start;
    for r in &replies {
        stats.record(r);
        last = last.max(r.at);
    }
    Ok((last.duration_since(start), stats))
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let a = RpcClient::connect(&subject.url).await?;
    let b = RpcClient::connect(&subject.url).await?;

    let mut solo_ms = Vec::new();
    for _ in 0..s.solo_reps {
        let (took, _) = burst(&b, s.burst_count, s.burst_ms, s.timeout).await?;
        solo_ms.push(ms(took));
    }
    let solo = median(&solo_ms).unwrap_or(0.0);

    let flood_start = Instant::now();
    let params = ms_params(s.flood_ms);
    let mut flood = Vec::with_capacity(s.flood_count);
    for _ in 0..s.flood_count {
        flood.push(a.start("spin", &params)?.wait());
    }
    tokio::time::sleep(s.settle).await;
    // The burst under flood comes from a connection of its own: B's solo runs
    // just before charged B's connection with recent CPU use, which the
    // scheduler rightly counts against it; the scenario is about a newcomer.
    let b2 = RpcClient::connect(&subject.url).await?;
    let (under_flood, b_stats) = burst(&b2, s.burst_count, s.burst_ms, s.timeout).await?;
    b2.close().await;

    let mut t = TargetReport::ok(&subject.name);
    t.metric("burst solo", solo, "ms");
    t.metric("burst under flood", ms(under_flood), "ms");
    if let Some(r) = ratio(ms(under_flood), solo) {
        t.metric("burst slowdown", r, "x");
    }
    if let Some(sm) = b_stats.hist.summary() {
        t.metric("burst task p50 under flood", sm.p50_ms, "ms");
    }
    t.metric("burst error replies", b_stats.error_count() as f64, "");

    if s.wait_flood {
        let mut a_stats = CallStats {
            sent: s.flood_count as u64,
            ..CallStats::default()
        };
        let mut last = flood_start;
        if let Ok(replies) = tokio::time::timeout(s.timeout, join_all(flood)).await {
            for r in replies.into_iter().flatten() {
                a_stats.record(&r);
                last = last.max(r.at);
            }
            t.metric("flood makespan", ms(last.duration_since(flood_start)), "ms");
        }
        t.metric("flood answered", a_stats.answered as f64, "");
        t.metric(
            "flood refused (-32001)",
            a_stats.errors_with(-32001) as f64,
            "",
        );
    }
    a.close().await;
    b.close().await;
    Ok(t)
}

pub fn finish(report: &mut Report) {
    report.compare(
        "baseline-textbook",
        &["burst under flood", "burst slowdown", "flood makespan"],
    );
    report.notes.push(
        "burst slowdown = (B's burst completion behind A's queued flood) / (the same burst on an \
         idle server); flood makespan = time until A's last reply (total work is the same for \
         every server)."
            .into(),
    );
}
