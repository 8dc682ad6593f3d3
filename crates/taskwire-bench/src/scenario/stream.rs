//! `stream`: does a batch of equal long tasks from one connection stream its
//! results, and does a short task sent right after the batch still finish early?
//!
//! One connection sends `count` `spin` tasks of `long_ms` at once (255 × 100
//! ms: with the short task, the server's default limit of 256 CPU tasks per
//! connection), then one `spin` of `short_ms` (10 ms). The figures: when the batch's first result, its
//! median and its last arrive (from the first request), the median as a
//! fraction of the last, when the short task's result arrives and how many of
//! the batch finished before it. `taskwire-las` is the same binary with least
//! attained service throughout (every task advances in lockstep, so the first
//! result comes near the end); the textbook baseline runs every task at once
//! on `spawn_blocking` threads.

use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use super::{ms_params, CallStats, Plan, Subject};
use crate::client::RpcClient;
use crate::report::{Report, TargetReport};
use crate::stats::{ms, ratio};
use crate::BenchError;

#[derive(Debug, Clone)]
pub struct Settings {
    pub count: usize,
    pub long_ms: u64,
    pub short_ms: u64,
    /// Bound on the whole batch.
    pub timeout: Duration,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        if plan.quick {
            Settings {
                count: 32,
                long_ms: 20,
                short_ms: 5,
                timeout: Duration::from_secs(30),
            }
        } else {
            Settings {
                // With the short task, 256: the server's default limit of CPU
                // tasks per connection (one more would be refused, -32001).
                count: 255,
                long_ms: 100,
                short_ms: 10,
                timeout: Duration::from_secs(120),
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("spin_count".into(), self.count.into());
        m.insert("spin_ms".into(), self.long_ms.into());
        m.insert("short_spin_ms".into(), self.short_ms.into());
        m
    }
}

/// A call's reply with the call's place in the order sent.
async fn tagged<F: std::future::Future>(i: usize, call: F) -> (usize, F::Output) {
    (i, call.await)
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let c = RpcClient::connect(&subject.url).await?;
    let start = Instant::now();
    let params = ms_params(s.long_ms);
    let mut pending = FuturesUnordered::new();
    for i in 0..s.count {
        let call = c.start("spin", &params)?.wait();
        pending.push(tagged(i, call));
    }
    let short = c.start("spin", &ms_params(s.short_ms))?.wait();
    pending.push(tagged(s.count, short));

    let mut stats = CallStats {
        sent: s.count as u64 + 1,
        ..CallStats::default()
    };
    // (index, when) of every batch result in completion order.
    let mut batch: Vec<(usize, Duration)> = Vec::with_capacity(s.count);
    let mut short_at = None;
    let mut answered = 0;
    let deadline = tokio::time::Instant::from_std(start + s.timeout);
    while let Ok(Some((i, reply))) = tokio::time::timeout_at(deadline, pending.next()).await {
        let reply = reply?;
        stats.record(&reply);
        answered += 1;
        let at = reply.at.duration_since(start);
        if i == s.count {
            // A refusal (say, past the server's per-connection limit) is no
            // completion time: it shows in "error replies" only.
            if reply.error.is_none() {
                short_at = Some((at, batch.len()));
            }
        } else {
            batch.push((i, at));
        }
    }
    c.close().await;
    if answered < s.count + 1 {
        return Err(BenchError::Timeout(format!(
            "{answered} of {} replies within {:?}",
            s.count + 1,
            s.timeout
        )));
    }

    let mut t = TargetReport::ok(&subject.name);
    let at = |k: usize| ms(batch[k.min(batch.len() - 1)].1);
    let (first, median, last) = (at(0), at(batch.len() / 2), at(batch.len() - 1));
    t.metric("first result", first, "ms");
    t.metric("median result", median, "ms");
    t.metric("last result", last, "ms");
    if let Some(r) = ratio(median, last) {
        t.metric("median / last", r, "x");
    }
    if let Some((short, before)) = short_at {
        t.metric("short task result", ms(short), "ms");
        t.metric("batch results before the short one", before as f64, "");
    }
    // Submission order kept: of the first half submitted, how many are among
    // the first half finished.
    let half = batch.len() / 2;
    let early = batch[..half].iter().filter(|(i, _)| *i < half).count();
    t.metric(
        "first half submitted among first half done",
        early as f64 / half.max(1) as f64,
        "x",
    );
    t.metric("error replies", stats.error_count() as f64, "");
    Ok(t)
}

pub fn finish(report: &mut Report) {
    report.compare(
        "taskwire-las",
        &["first result", "median result", "short task result"],
    );
    report.notes.push(
        "One connection sends the batch at once, then the short task. taskwire-las = the same \
         binary with --las-threshold-ms far beyond any task (least attained service throughout, \
         the policy before the threshold); the total work, hence the last result, is the same \
         for every server."
            .into(),
    );
}
