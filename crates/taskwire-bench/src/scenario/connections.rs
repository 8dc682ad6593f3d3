//! `connections`: N idle connections, each proven live by one `echo`; the
//! server's RSS per connection.
//!
//! Connections come from 127.0.0.1 .. 127.0.0.K (bound before connect) so that
//! one source address's ~28 000 ephemeral ports never run out. The machine's
//! open-file limit (20 000, not raisable) caps N: the bench holds one socket per
//! connection and the server another, each in its own process, so N stops at
//! 18 000 (or the limit minus a margin, if lower).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::{secs, Plan, Progress, Subject};
use crate::client::{connect, parse_incoming, Buffers, Incoming};
use crate::procfs::{open_file_limit, rss_kib};
use crate::report::{Report, TargetReport};
use crate::BenchError;

/// The most connections a run opens, whatever was asked (open-file limit 20 000).
pub const CAP: usize = 18_000;
/// File descriptors kept free for everything else.
const FD_MARGIN: u64 = 200;
/// How long opening all connections may take.
const OPEN_BOUND: Duration = Duration::from_secs(180);

#[derive(Debug, Clone)]
pub struct Settings {
    pub requested: usize,
    pub count: usize,
    pub source_addrs: u8,
    pub concurrency: usize,
    pub settle: Duration,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        let requested = plan
            .connections
            .unwrap_or(if plan.quick { 200 } else { 10_000 });
        let fd_cap = open_file_limit().saturating_sub(FD_MARGIN) as usize;
        Settings {
            requested,
            count: requested.min(CAP).min(fd_cap),
            source_addrs: 8,
            concurrency: 64,
            settle: if plan.quick {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(1)
            },
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("connections".into(), self.count.into());
        m.insert("requested".into(), self.requested.into());
        m.insert(
            "source_addresses".into(),
            format!("127.0.0.1..=127.0.0.{}", self.source_addrs).into(),
        );
        m.insert("concurrent_handshakes".into(), self.concurrency.into());
        m.insert("settle_s".into(), secs(self.settle));
        m
    }
}

/// Opens one connection from `source`, proves it with an `echo`, and parks it
/// in a task that keeps reading (so pings are answered) until aborted.
async fn open_one(
    url: &crate::client::WsUrl,
    source: Ipv4Addr,
) -> Result<JoinHandle<()>, BenchError> {
    let mut ws = connect(url, Some(source), Buffers::Small).await?;
    ws.send(Message::text(
        r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"value":1}}"#,
    ))
    .await?;
    let proven = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(t) = msg? {
                if let Incoming::Reply { id: 1, .. } = parse_incoming(t.as_str())? {
                    return Ok(());
                }
            }
        }
        Err(BenchError::ConnectionClosed)
    })
    .await;
    match proven {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(BenchError::Timeout("echo on a fresh connection".into())),
    }
    Ok(tokio::spawn(async move {
        while let Some(Ok(_)) = ws.next().await {}
    }))
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = subject.pid.map(rss_kib).transpose()?;
    let opened = Arc::new(AtomicU64::new(0));
    let _progress = Progress::start(
        format!("connections[{}]", subject.name),
        // Roughly how long a large run takes; only decides whether to print.
        Duration::from_millis(s.count as u64 / 2),
        Arc::clone(&opened),
        "connections",
    );
    let start = Instant::now();
    let url = subject.url.clone();
    let k = s.source_addrs.max(1);
    let results: Vec<Result<JoinHandle<()>, BenchError>> = {
        let opened = Arc::clone(&opened);
        let work = futures_util::stream::iter(0..s.count)
            .map(|i| {
                let url = url.clone();
                let opened = Arc::clone(&opened);
                async move {
                    let source = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(k)) as u8);
                    let r = open_one(&url, source).await;
                    if r.is_ok() {
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }
            })
            .buffer_unordered(s.concurrency)
            .collect::<Vec<_>>();
        match tokio::time::timeout(OPEN_BOUND, work).await {
            Ok(v) => v,
            Err(_) => {
                return Err(BenchError::Timeout(format!(
                    "opening {} connections took over {OPEN_BOUND:?}",
                    s.count
                )))
            }
        }
    };
    let open_time = start.elapsed();
    let mut holders = Vec::with_capacity(results.len());
    let mut first_error = None;
    let mut failed = 0u64;
    for r in results {
        match r {
            Ok(h) => holders.push(h),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    tokio::time::sleep(s.settle).await;
    let rss_after = subject.pid.map(rss_kib).transpose()?;
    let live = holders.iter().filter(|h| !h.is_finished()).count();
    for h in &holders {
        h.abort();
    }

    let mut t = TargetReport::ok(&subject.name);
    t.metric("connections opened", holders.len() as f64, "");
    t.metric("still open at measurement", live as f64, "");
    t.metric("failed", failed as f64, "");
    t.metric("open time", open_time.as_secs_f64(), "s");
    t.metric(
        "connections/s",
        holders.len() as f64 / open_time.as_secs_f64().max(1e-9),
        "conn/s",
    );
    if let (Some(before), Some(after)) = (rss_before, rss_after) {
        t.metric("server RSS before", before as f64, "KiB");
        t.metric("server RSS after", after as f64, "KiB");
        if !holders.is_empty() {
            t.metric(
                "RSS per connection",
                after.saturating_sub(before) as f64 / holders.len() as f64,
                "KiB",
            );
        }
    }
    if let Some(e) = first_error {
        t.reason = Some(format!("first failure: {e}"));
    }
    Ok(t)
}

pub fn finish(plan: &Plan, report: &mut Report) {
    let s = Settings::new(plan);
    report.compare("baseline-raw-echo", &["RSS per connection"]);
    report.compare_excluding(
        "baseline-textbook",
        &["RSS per connection"],
        &["baseline-raw-echo"],
    );
    report.notes.push(format!(
        "open-file limit {}: runs are capped at {} connections (asked for {}, ran {}); \
         figures beyond that are extrapolations. Target: ≤ 7 KiB per idle connection \
         at 10 000.",
        open_file_limit(),
        CAP,
        s.requested,
        s.count
    ));
}
