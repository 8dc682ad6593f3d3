//! Observe and kill: the live table of connections and tasks, the admin API,
//! Prometheus metrics and the dashboard's static files.
//!
//! The live registry costs nothing per task: tasks already live in their
//! connection's in-flight table (needed for cancellation), so the observer only
//! keeps the map of connections and walks their tables when asked.

mod admin;
mod metrics;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use serde_json::Value;

pub(crate) use admin::routes;

use crate::compute::JobState;
use crate::conn::ConnState;
use crate::task::Outcome;
use crate::task::{Stopped, TaskKind, TaskShared};

/// One task as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskInfo {
    /// Server-wide task id.
    pub id: u64,
    /// The connection that started it.
    pub conn: u64,
    /// The JSON-RPC id of its request (`null` for a notification).
    pub request_id: Value,
    /// Its method.
    pub method: String,
    /// `io` or `cpu`.
    pub kind: &'static str,
    /// `queued`, `running`, `yielded` or `waiting`; or `abandoned`: told to
    /// stop and already answered, but still on a worker thread because it
    /// reaches no checkpoint (listed until that thread is back).
    pub state: &'static str,
    /// Time since it was admitted, in ms.
    pub age_ms: u64,
    /// CPU time used so far (CPU tasks), in ms.
    pub cpu_ms: f64,
    /// The last progress value it reported.
    pub progress: Value,
    /// Whether it ran far past its slice without a checkpoint.
    pub not_yielding: bool,
    /// Whether it has been told to stop (and why).
    pub stopping: Option<String>,
    /// Memory it holds: bytes allocated minus freed while it ran (CPU tasks,
    /// with `taskwire::alloc::CountingAlloc` installed; else 0).
    pub memory_bytes: u64,
    /// Whether it is one of the largest tasks while the server is over its
    /// memory budget.
    pub memory_flagged: bool,
}

/// One connection as the admin API shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnInfo {
    /// Connection id.
    pub id: u64,
    /// The peer's address.
    pub peer: String,
    /// When it opened, in ms since the Unix epoch.
    pub opened_at_ms: u64,
    /// How long it has been open, in ms.
    pub age_ms: u64,
    /// Requests in flight.
    pub inflight: usize,
    /// Bytes received (message payloads).
    pub bytes_in: u64,
    /// Bytes sent (message payloads).
    pub bytes_out: u64,
    /// Messages received.
    pub messages_in: u64,
    /// Messages sent.
    pub messages_out: u64,
}

/// Filters and order for listing tasks.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct TaskQuery {
    /// Only this connection's tasks.
    pub conn: Option<u64>,
    /// Only tasks in this state.
    pub state: Option<String>,
    /// Only tasks of this method.
    pub method: Option<String>,
    /// `cpu` (default: most CPU first) or `age` (oldest first).
    pub sort: Option<String>,
    /// At most this many (default 500, capped at 10 000).
    pub limit: Option<usize>,
}

pub(crate) struct Observer {
    /// Off only to measure what observing costs (`Config::observe`).
    enabled: bool,
    conns: Mutex<HashMap<u64, Arc<ConnState>>>,
    /// CPU tasks answered after a stop while still on a worker (they reach no
    /// checkpoint): kept visible until their thread is back. Only a task on a
    /// worker qualifies, so there are never more than worker threads; the cap
    /// holds that bound even so.
    abandoned: Mutex<HashMap<u64, Arc<TaskShared>>>,
    abandoned_cap: usize,
    started: Instant,
    pub metrics: metrics::Metrics,
}

impl Observer {
    /// `max_threads`: the most compute worker threads there can be
    /// (configured plus replacements), which bounds the abandoned tasks.
    pub fn new(enabled: bool, methods: &[&str], max_threads: usize) -> Observer {
        Observer {
            enabled,
            conns: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(HashMap::new()),
            abandoned_cap: max_threads.max(1),
            started: Instant::now(),
            metrics: metrics::Metrics::new(methods),
        }
    }

    pub fn conn_opened(&self, c: &Arc<ConnState>) {
        if !self.enabled {
            return;
        }
        if let Ok(mut m) = self.conns.lock() {
            m.insert(c.id, c.clone());
        }
    }

    pub fn conn_closed(&self, c: &ConnState) {
        if let Ok(mut m) = self.conns.lock() {
            m.remove(&c.id);
        }
    }

    pub fn task_finished(&self, t: &Arc<TaskShared>, outcome: &Outcome) {
        if !self.enabled {
            return;
        }
        self.metrics.task_finished(t, outcome.label());
        // Answered after a stop while its future still runs on a worker: it
        // leaves the connection's table now, so keep it in view here.
        if t.kind == TaskKind::Cpu && t.stopped().is_some() && t.stats.state() == JobState::Running
        {
            if let Ok(mut m) = self.abandoned.lock() {
                m.retain(|_, t| t.stats.state() == JobState::Running);
                if m.len() < self.abandoned_cap {
                    m.insert(t.id, t.clone());
                }
            }
        }
    }

    /// Abandoned tasks still on a worker (see [`TaskInfo::state`]).
    fn abandoned(&self) -> Vec<Arc<TaskShared>> {
        match self.abandoned.lock() {
            Ok(mut m) => {
                m.retain(|_, t| t.stats.state() == JobState::Running);
                m.values().cloned().collect()
            }
            Err(_) => Vec::new(),
        }
    }

    /// How many abandoned tasks are still on a worker.
    pub fn abandoned_count(&self) -> usize {
        self.abandoned().len()
    }

    pub fn refused(&self, reason: &str) {
        self.metrics.refused(reason);
    }

    pub fn connections(&self) -> Vec<Arc<ConnState>> {
        self.conns
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn connection(&self, id: u64) -> Option<Arc<ConnState>> {
        self.conns.lock().ok()?.get(&id).cloned()
    }

    pub fn find_task(&self, id: u64) -> Option<Arc<TaskShared>> {
        self.connections()
            .into_iter()
            .find_map(|c| c.task(id))
            .or_else(|| self.abandoned().into_iter().find(|t| t.id == id))
    }

    /// One task as the admin API shows it, abandoned ones included.
    pub fn task_info(&self, id: u64) -> Option<TaskInfo> {
        if let Some(t) = self.connections().into_iter().find_map(|c| c.task(id)) {
            return Some(task_info(&t));
        }
        let t = self.abandoned().into_iter().find(|t| t.id == id)?;
        Some(abandoned_info(&t))
    }

    /// Kills a task: its client gets -32004. False if no such task.
    pub fn kill(&self, id: u64) -> bool {
        match self.find_task(id) {
            Some(t) => {
                t.stop(Stopped::Killed);
                tracing::info!(task = id, method = %t.method, "task killed by an operator");
                true
            }
            None => false,
        }
    }

    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub fn tasks(&self, q: &TaskQuery) -> Vec<TaskInfo> {
        let conns = match q.conn {
            Some(id) => self.connection(id).into_iter().collect(),
            None => self.connections(),
        };
        let abandoned = self
            .abandoned()
            .into_iter()
            .filter(|t| q.conn.is_none_or(|c| c == t.conn))
            .map(|t| abandoned_info(&t));
        let mut out: Vec<TaskInfo> = conns
            .iter()
            .flat_map(|c| c.tasks())
            .map(|t| task_info(&t))
            .chain(abandoned)
            .filter(|t| q.state.as_deref().is_none_or(|s| s == t.state))
            .filter(|t| q.method.as_deref().is_none_or(|m| m == t.method))
            .collect();
        match q.sort.as_deref() {
            Some("age") => out.sort_by_key(|t| std::cmp::Reverse(t.age_ms)),
            _ => out.sort_by(|a, b| b.cpu_ms.total_cmp(&a.cpu_ms)),
        }
        out.truncate(q.limit.unwrap_or(500).min(10_000));
        out
    }
}

pub(crate) fn task_info(t: &TaskShared) -> TaskInfo {
    let state = match t.kind {
        TaskKind::Io => "running",
        TaskKind::Cpu => t.stats.state().as_str(),
    };
    TaskInfo {
        id: t.id,
        conn: t.conn,
        request_id: t
            .request_id
            .as_ref()
            .map(|i| i.to_value())
            .unwrap_or(Value::Null),
        method: t.method.to_string(),
        kind: t.kind.as_str(),
        state,
        age_ms: t.created.elapsed().as_millis() as u64,
        cpu_ms: t.stats.cpu_time().as_secs_f64() * 1000.0,
        progress: t.last_progress().unwrap_or(Value::Null),
        not_yielding: t.stats.not_yielding(),
        stopping: t.stopped().map(|s| s.to_string()),
        memory_bytes: t.stats.memory_bytes(),
        memory_flagged: t.stats.memory_flagged(),
    }
}

/// An abandoned task: answered after a stop, still on a worker.
fn abandoned_info(t: &TaskShared) -> TaskInfo {
    TaskInfo {
        state: "abandoned",
        ..task_info(t)
    }
}

pub(crate) fn conn_info(c: &ConnState) -> ConnInfo {
    ConnInfo {
        id: c.id,
        peer: c.peer.to_string(),
        opened_at_ms: c
            .opened_at
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        age_ms: c.opened.elapsed().as_millis() as u64,
        inflight: c.inflight_len(),
        bytes_in: c.bytes_in.load(Ordering::Relaxed),
        bytes_out: c.bytes_out.load(Ordering::Relaxed),
        messages_in: c.messages_in.load(Ordering::Relaxed),
        messages_out: c.messages_out.load(Ordering::Relaxed),
    }
}

/// Counts of live tasks by state.
pub(crate) fn count_states(tasks: &[Arc<TaskShared>]) -> [u64; 4] {
    let mut n = [0u64; 4];
    for t in tasks {
        let s = match t.kind {
            TaskKind::Io => JobState::Running,
            TaskKind::Cpu => t.stats.state(),
        };
        n[s as usize] += 1;
    }
    n
}
