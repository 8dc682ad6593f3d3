//! `flood`: can a short CPU task, and an `echo`, get through while another
//! connection floods the server with long CPU tasks?
//!
//! * A keeps `flood_inflight` `spin` tasks of `long_ms` in flight (a new one for
//!   each that finishes), and also sends an `echo` every 100 ms on the same
//!   connection: head-of-line blocking shows there.
//! * B runs `spin` of `short_ms` one at a time: its completion time.
//! * C sends `echo` every 10 ms: its round trip.
//!
//! B and C are first measured without A ("solo"), in the same run, so the
//! slowdown is a ratio of two figures measured minutes apart at most.

use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

use super::{ms_params, periodic, secs, sequential, CallStats, Plan, Subject};
use crate::client::RpcClient;
use crate::report::{Report, TargetReport};
use crate::stats::ratio;
use crate::BenchError;

const GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct Settings {
    pub long_ms: u64,
    pub flood_inflight: usize,
    pub short_ms: u64,
    pub echo_every: Duration,
    pub a_echo_every: Duration,
    pub solo: Duration,
    pub settle: Duration,
    pub duration: Duration,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        if plan.quick {
            Settings {
                long_ms: 500,
                flood_inflight: 8,
                short_ms: 10,
                echo_every: Duration::from_millis(10),
                a_echo_every: Duration::from_millis(100),
                solo: Duration::from_millis(500),
                settle: Duration::from_millis(100),
                duration: plan.duration.unwrap_or(Duration::from_secs(1)),
            }
        } else {
            Settings {
                long_ms: 2000,
                flood_inflight: 64,
                short_ms: 10,
                echo_every: Duration::from_millis(10),
                a_echo_every: Duration::from_millis(100),
                solo: Duration::from_secs(2),
                settle: Duration::from_millis(300),
                duration: plan.duration.unwrap_or(Duration::from_secs(10)),
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("A_spin_ms".into(), self.long_ms.into());
        m.insert("A_inflight".into(), self.flood_inflight.into());
        m.insert(
            "A_echo_every_ms".into(),
            (self.a_echo_every.as_millis() as u64).into(),
        );
        m.insert("B_spin_ms".into(), self.short_ms.into());
        m.insert(
            "C_echo_every_ms".into(),
            (self.echo_every.as_millis() as u64).into(),
        );
        m.insert("solo_s".into(), secs(self.solo));
        m.insert("flood_s".into(), secs(self.duration));
        m
    }
}

/// A's flood: keeps `inflight` long spins going until `stop_at`, never waits
/// for the ones still running then.
async fn flood(
    client: &RpcClient,
    s: &Settings,
    stop_at: Instant,
) -> Result<CallStats, BenchError> {
    let mut stats = CallStats::default();
    let params = ms_params(s.long_ms);
    let mut running = FuturesUnordered::new();
    for _ in 0..s.flood_inflight {
        running.push(client.start("spin", &params)?.wait());
        stats.sent += 1;
    }
    let stop = tokio::time::Instant::from_std(stop_at);
    while let Ok(Some(reply)) = tokio::time::timeout_at(stop, running.next()).await {
        stats.record(&reply?);
        running.push(client.start("spin", &params)?.wait());
        stats.sent += 1;
    }
    Ok(stats)
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let a = RpcClient::connect(&subject.url).await?;
    let b = RpcClient::connect(&subject.url).await?;
    let c = RpcClient::connect(&subject.url).await?;
    let echo = serde_json::json!({ "value": "ping" });
    let short = ms_params(s.short_ms);

    // Solo: B and C exactly as later, without A.
    let solo_end = Instant::now() + s.solo;
    let (b_solo, c_solo) = tokio::join!(
        sequential(&b, "spin", &short, solo_end, 100_000, GRACE),
        periodic(&c, "echo", &echo, s.echo_every, solo_end, GRACE),
    );
    let (b_solo, c_solo) = (b_solo?, c_solo?);

    // Flood: A starts, settles, then B and C measure for `duration`.
    let flood_end = Instant::now() + s.settle + s.duration;
    let measured = async {
        tokio::time::sleep(s.settle).await;
        tokio::join!(
            sequential(&b, "spin", &short, flood_end, 100_000, GRACE),
            periodic(&c, "echo", &echo, s.echo_every, flood_end, GRACE),
        )
    };
    let (a_flood, a_echo, (b_flood, c_flood)) = tokio::join!(
        flood(&a, s, flood_end),
        periodic(&a, "echo", &echo, s.a_echo_every, flood_end, GRACE),
        measured,
    );
    let (a_flood, a_echo, b_flood, c_flood) = (a_flood?, a_echo?, b_flood?, c_flood?);
    let unmatched = a.unknown_replies() + b.unknown_replies() + c.unknown_replies();
    a.close().await;
    b.close().await;
    c.close().await;

    let mut t = TargetReport::ok(&subject.name);
    let (bs, bf) = (b_solo.hist.summary(), b_flood.hist.summary());
    t.latency("B spin solo", bs.as_ref(), false);
    t.latency("B spin flood", bf.as_ref(), false);
    if let (Some(bs), Some(bf)) = (&bs, &bf) {
        if let Some(r) = ratio(bf.p50_ms, bs.p50_ms) {
            t.metric("B slowdown p50", r, "x");
        }
        if let Some(r) = ratio(bf.p99_ms, bs.p99_ms) {
            t.metric("B slowdown p99", r, "x");
        }
    }
    t.latency("C echo solo", c_solo.hist.summary().as_ref(), false);
    t.latency("C echo flood", c_flood.hist.summary().as_ref(), false);
    t.metric("C echo flood unanswered", c_flood.unanswered() as f64, "");
    t.latency("A echo flood", a_echo.hist.summary().as_ref(), false);
    t.metric("A echo flood unanswered", a_echo.unanswered() as f64, "");
    t.metric(
        "A spins completed",
        (a_flood.answered - a_flood.error_count()) as f64,
        "",
    );
    t.metric("A refused (-32001)", a_flood.errors_with(-32001) as f64, "");
    t.metric(
        "B+C error replies",
        (b_flood.error_count() + c_flood.error_count() + b_solo.error_count()) as f64,
        "",
    );
    t.metric("unmatched ids", unmatched as f64, "");
    Ok(t)
}

pub fn finish(report: &mut Report) {
    report.compare(
        "baseline-textbook",
        &[
            "B spin flood p50",
            "B spin flood p99",
            "B slowdown p50",
            "C echo flood p99",
            "A echo flood p99",
        ],
    );
    report.notes.push(
        "B: completion time of one short `spin` sent alone on its connection; C and A echo: \
         round trip of an `echo` (A's shares the flooding connection: head-of-line blocking). \
         'unanswered' = still without a reply 2 s after the phase ended."
            .into(),
    );
}
