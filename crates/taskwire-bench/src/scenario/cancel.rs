//! `cancel`: how fast does cancelled work stop?
//!
//! 1. `$/cancelRequest` of a running task (`runaway` on taskwire, a long `spin`
//!    on the baselines, which have no `runaway`): time to its reply (`-32800` if
//!    the cancel was honoured) and to the server's CPU going idle.
//! 2. Closing the connection of a running task: time to the server's CPU going
//!    idle (it should stop: the task's owner is gone).
//!
//! "CPU idle" is read from /proc/PID/stat (utime + stime, 10 ms ticks): the
//! instant of the last tick increase, once 200 ms pass without one.

use std::time::{Duration, Instant};

use super::{ms_params, Plan, Subject};
use crate::client::RpcClient;
use crate::procfs::{cpu_ticks, wait_cpu_idle};
use crate::report::{Report, TargetReport};
use crate::stats::LatencyHist;
use crate::BenchError;

const QUIET: Duration = Duration::from_millis(200);

#[derive(Debug, Clone)]
pub struct Settings {
    pub reps: usize,
    /// The baselines' stand-in for `runaway`.
    pub spin_ms: u64,
    /// How long the task runs before it is cancelled.
    pub warm: Duration,
    pub reply_timeout: Duration,
    pub idle_max: Duration,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        if plan.quick {
            Settings {
                reps: 2,
                spin_ms: 1000,
                warm: Duration::from_millis(100),
                reply_timeout: Duration::from_secs(3),
                idle_max: Duration::from_secs(5),
            }
        } else {
            Settings {
                reps: 5,
                spin_ms: 2000,
                warm: Duration::from_millis(200),
                reply_timeout: Duration::from_secs(5),
                idle_max: Duration::from_secs(10),
            }
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("reps".into(), self.reps.into());
        m.insert(
            "task".into(),
            "runaway (taskwire) / spin (baselines)".into(),
        );
        m.insert("baseline_spin_ms".into(), self.spin_ms.into());
        m.insert(
            "cancel_after_ms".into(),
            (self.warm.as_millis() as u64).into(),
        );
        m
    }
}

/// Waits until `pid` is idle before a repetition, so one rep's leftovers do not
/// count in the next.
async fn settle(pid: Option<u32>, max: Duration) -> Result<(), BenchError> {
    if let Some(pid) = pid {
        wait_cpu_idle(pid, Duration::from_millis(100), max).await?;
    }
    Ok(())
}

pub async fn measure(s: &Settings, subject: &Subject) -> Result<TargetReport, BenchError> {
    let (method, params) = if subject.has_runaway() {
        ("runaway", serde_json::json!({}))
    } else {
        ("spin", ms_params(s.spin_ms))
    };
    let pid = subject.pid;
    let mut cancel_reply = LatencyHist::new();
    let mut cancel_idle = LatencyHist::new();
    let mut close_idle = LatencyHist::new();
    let (mut honoured, mut answered_otherwise, mut unanswered, mut not_busy) =
        (0u64, 0u64, 0u64, 0u64);
    let mut still_busy = 0u64;

    let mut client = RpcClient::connect(&subject.url).await?;
    for _ in 0..s.reps {
        settle(pid, s.idle_max).await?;
        let ticks_before = pid.map(cpu_ticks).transpose()?;
        let call = client.start(method, &params)?;
        tokio::time::sleep(s.warm).await;
        if let (Some(pid), Some(before)) = (pid, ticks_before) {
            if cpu_ticks(pid)? <= before {
                not_busy += 1;
            }
        }
        let t0 = Instant::now();
        client.cancel(call.id)?;
        let reply_fut = tokio::time::timeout(s.reply_timeout, call.wait());
        let idle_fut = async {
            match pid {
                Some(pid) => wait_cpu_idle(pid, QUIET, s.idle_max).await,
                None => Ok(None),
            }
        };
        let (reply, idle) = tokio::join!(reply_fut, idle_fut);
        match reply {
            Ok(Ok(r)) => {
                cancel_reply.record(r.at.saturating_duration_since(t0));
                if r.error == Some(-32800) {
                    honoured += 1;
                } else {
                    answered_otherwise += 1;
                }
            }
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                unanswered += 1;
                // The task may still be burning: closing its connection is the
                // next lever; a fresh connection serves the next repetition.
                client.close().await;
                client = RpcClient::connect(&subject.url).await?;
            }
        }
        match idle? {
            Some(at) => cancel_idle.record(at.saturating_duration_since(t0)),
            None if pid.is_some() => still_busy += 1,
            None => {}
        }
    }
    client.close().await;

    for _ in 0..s.reps {
        settle(pid, s.idle_max).await?;
        let conn = RpcClient::connect(&subject.url).await?;
        let _call = conn.start(method, &params)?;
        tokio::time::sleep(s.warm).await;
        let t0 = Instant::now();
        conn.close().await;
        if let Some(pid) = pid {
            match wait_cpu_idle(pid, QUIET, s.idle_max).await? {
                Some(at) => close_idle.record(at.saturating_duration_since(t0)),
                None => still_busy += 1,
            }
        }
    }

    let mut t = TargetReport::ok(&subject.name);
    t.metric("repetitions", s.reps as f64, "");
    t.metric("cancel honoured (-32800)", honoured as f64, "");
    t.metric(
        "cancel ignored (task finished)",
        answered_otherwise as f64,
        "",
    );
    t.metric("cancel unanswered", unanswered as f64, "");
    t.latency("cancel→reply", cancel_reply.summary().as_ref(), false);
    if pid.is_some() {
        t.latency("cancel→CPU idle", cancel_idle.summary().as_ref(), false);
        t.latency("close→CPU idle", close_idle.summary().as_ref(), false);
        t.metric("still busy after bound", still_busy as f64, "");
        t.metric("task not seen running", not_busy as f64, "");
    }
    Ok(t)
}

pub fn finish(report: &mut Report) {
    report.compare(
        "baseline-textbook",
        &[
            "cancel→reply p50",
            "cancel→CPU idle p50",
            "close→CPU idle p50",
        ],
    );
    report.notes.push(
        "CPU idle = last increase of the server's utime+stime (/proc/PID/stat, 10 ms ticks) \
         followed by 200 ms without one; resolution one tick. The baselines implement no \
         cancellation: their figures are the remaining run time of the task."
            .into(),
    );
    if report.targets.iter().any(|t| t.target == "external") {
        report.notes.push(
            "with --url, CPU figures need --server-pid (and the server is assumed to have `runaway`)"
                .into(),
        );
    }
}
