//! Observe and kill: the live table of connections and tasks, and the
//! Prometheus metrics. The admin API and the dashboard that read them are
//! served by `http/admin.rs`.
//!
//! The live registry costs nothing per task: tasks already live in their
//! connection's in-flight table (needed for cancellation), so the observer only
//! keeps the map of connections and walks their tables when asked.

pub mod api;
pub(crate) mod metrics;
mod process;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;

pub use api::{ConnInfo, OutcomeKind, RefusalReason, TaskInfo, TaskState};

use crate::compute::JobState;
use crate::sync::lock;
use crate::task::{CallerInfo, Stopped, TaskKind, TaskShared};

/// What the live table needs of a connection. A trait rather than the
/// connection's own type, so that `observe` sits below `conn` in the module
/// order (conn reports to observe; observe never imports conn).
pub(crate) trait ConnView: Send + Sync {
    /// The connection's id.
    fn id(&self) -> u64;
    /// The connection as the admin API lists it.
    fn info(&self) -> ConnInfo;
    /// One of its live tasks.
    fn task(&self, id: u64) -> Option<Arc<TaskShared>>;
    /// Its live tasks.
    fn tasks(&self) -> Vec<Arc<TaskShared>>;
    /// Replies queued for its writer.
    fn outbound_depth(&self) -> usize;
    /// Closes it with this WebSocket close code and reason.
    fn close_with(&self, code: u16, reason: &'static str);
    /// The session it opened or resumed, while it is attached to it.
    fn session(&self) -> Option<u64> {
        None
    }
}

/// Where the tasks of detached sessions are found: they belong to no
/// connection until a resume, and must stay listed (and killable) meanwhile.
pub(crate) trait SessionTasks: Send + Sync {
    /// Every detached session's tasks: (session id, the connection last
    /// attached, the task).
    fn detached_tasks(&self) -> Vec<(u64, u64, Arc<TaskShared>)>;
}

/// What the connection and the HTTP side tell the observer, as they happen.
///
/// The server holds one `Arc<dyn Hooks>`: the live [`Observer`], or `()`
/// when observing is off (`Config::observe`, which exists to measure what
/// observing costs), so that the off switch is decided once at start and
/// not tested on every event.
pub(crate) trait Hooks: Send + Sync {
    /// A WebSocket connection was accepted; it is listed until `conn_closed`.
    fn conn_opened(&self, c: Arc<dyn ConnView>);
    /// The connection has ended and every task it started has settled.
    fn conn_closed(&self, id: u64);
    /// A task has been answered (or dropped unanswered, for a notification).
    fn task_finished(&self, t: &Arc<TaskShared>, kind: OutcomeKind);
    /// A request, upgrade or connection was refused.
    fn refused(&self, reason: RefusalReason);
}

/// Observing off: nothing is listed or counted.
impl Hooks for () {
    fn conn_opened(&self, _: Arc<dyn ConnView>) {}
    fn conn_closed(&self, _: u64) {}
    fn task_finished(&self, _: &Arc<TaskShared>, _: OutcomeKind) {}
    fn refused(&self, _: RefusalReason) {}
}

/// Filters and order for listing tasks.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub(crate) struct TaskQuery {
    /// Only this connection's tasks.
    pub(crate) conn: Option<u64>,
    /// Only tasks in this state.
    pub(crate) state: Option<String>,
    /// Only tasks of this method.
    pub(crate) method: Option<String>,
    /// `cpu` (default: most CPU first) or `age` (oldest first).
    pub(crate) sort: Option<String>,
    /// At most this many (default 500, capped at 10 000).
    pub(crate) limit: Option<usize>,
}

/// The live implementation of [`Hooks`]: the table of connections (whose
/// in-flight maps hold the tasks), abandoned tasks, and the metrics.
pub(crate) struct Observer {
    conns: Mutex<HashMap<u64, Arc<dyn ConnView>>>,
    /// CPU tasks answered after a stop while still on a worker (they reach no
    /// checkpoint): kept visible until their thread is back. Only a task on a
    /// worker qualifies, so there are never more than worker threads; the cap
    /// holds that bound even so.
    abandoned: Mutex<HashMap<u64, Arc<TaskShared>>>,
    abandoned_cap: usize,
    /// The session store, for detached sessions' tasks (set once at start).
    sessions: std::sync::OnceLock<Arc<dyn SessionTasks>>,
    started: Instant,
    pub metrics: metrics::Metrics,
}

impl Observer {
    /// `methods`: every registered task and its kind. `max_threads`: the
    /// most compute worker threads there can be (configured plus
    /// replacements), which bounds the abandoned tasks.
    pub(crate) fn new(methods: &[(&str, TaskKind)], max_threads: usize) -> Observer {
        Observer {
            conns: Mutex::new(HashMap::new()),
            abandoned: Mutex::new(HashMap::new()),
            abandoned_cap: max_threads.max(1),
            sessions: std::sync::OnceLock::new(),
            started: Instant::now(),
            metrics: metrics::Metrics::new(methods),
        }
    }

    /// Abandoned tasks still on a worker (see [`TaskInfo::state`]).
    fn abandoned(&self) -> Vec<Arc<TaskShared>> {
        let mut m = lock(&self.abandoned);
        m.retain(|_, t| t.stats.state() == JobState::Running);
        m.values().cloned().collect()
    }

    /// How many abandoned tasks are still on a worker.
    pub(crate) fn abandoned_count(&self) -> usize {
        self.abandoned().len()
    }

    pub(crate) fn connections(&self) -> Vec<Arc<dyn ConnView>> {
        lock(&self.conns).values().cloned().collect()
    }

    pub(crate) fn connection(&self, id: u64) -> Option<Arc<dyn ConnView>> {
        lock(&self.conns).get(&id).cloned()
    }

    /// Where the tasks of detached sessions are found.
    pub(crate) fn set_sessions(&self, sessions: Arc<dyn SessionTasks>) {
        let _ = self.sessions.set(sessions);
    }

    /// The tasks of detached sessions.
    fn detached(&self) -> Vec<(u64, u64, Arc<TaskShared>)> {
        self.sessions
            .get()
            .map(|s| s.detached_tasks())
            .unwrap_or_default()
    }

    pub(crate) fn find_task(&self, id: u64) -> Option<Arc<TaskShared>> {
        self.connections()
            .into_iter()
            .find_map(|c| c.task(id))
            .or_else(|| {
                self.detached()
                    .into_iter()
                    .find_map(|(_, _, t)| (t.id == id).then_some(t))
            })
            .or_else(|| self.abandoned().into_iter().find(|t| t.id == id))
    }

    /// One task as the admin API shows it, abandoned ones included.
    pub(crate) fn task_info(&self, id: u64) -> Option<TaskInfo> {
        if let Some(i) = self.connections().into_iter().find_map(|c| {
            c.task(id)
                .map(|t| live_info(&t, c.id(), c.session(), false))
        }) {
            return Some(i);
        }
        if let Some((sid, conn, t)) = self.detached().into_iter().find(|(_, _, t)| t.id == id) {
            return Some(live_info(&t, conn, Some(sid), true));
        }
        let t = self.abandoned().into_iter().find(|t| t.id == id)?;
        Some(abandoned_info(&t))
    }

    /// Kills a task: its client gets -32004. False if no such task.
    pub(crate) fn kill(&self, id: u64) -> bool {
        match self.find_task(id) {
            Some(t) => {
                t.stop(Stopped::Killed);
                match t.stats.label() {
                    Some(l) => crate::compute::task_event!(
                        tracing::Level::INFO,
                        l,
                        "task killed by an operator"
                    ),
                    None => tracing::info!(task = id, "task killed by an operator"),
                }
                true
            }
            None => false,
        }
    }

    pub(crate) fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    pub(crate) fn tasks(&self, q: &TaskQuery) -> Vec<TaskInfo> {
        self.tasks_counted(q).0
    }

    /// The tasks as [`Observer::tasks`] lists them, and the counts by state
    /// of every task that matched, before the listing's limit: one walk, so
    /// that a snapshot's counts and its table agree (a dashboard's tiles add
    /// up to its table's count).
    pub(crate) fn tasks_counted(&self, q: &TaskQuery) -> (Vec<TaskInfo>, api::TaskCounts) {
        let conns = match q.conn {
            Some(id) => self.connection(id).into_iter().collect(),
            None => self.connections(),
        };
        let abandoned = self
            .abandoned()
            .into_iter()
            .filter(|t| q.conn.is_none_or(|c| c == t.conn))
            .map(|t| abandoned_info(&t));
        // A detached session's tasks are listed under the connection last
        // attached (gone, hence marked detached) until a resume lists them
        // under the new one.
        let detached = self
            .detached()
            .into_iter()
            .filter(|(_, c, _)| q.conn.is_none_or(|q| q == *c))
            .map(|(sid, c, t)| live_info(&t, c, Some(sid), true));
        let mut out: Vec<TaskInfo> = conns
            .iter()
            .flat_map(|c| {
                let (id, sid) = (c.id(), c.session());
                c.tasks()
                    .into_iter()
                    .map(move |t| live_info(&t, id, sid, false))
            })
            .chain(detached)
            .chain(abandoned)
            .filter(|t| q.state.as_deref().is_none_or(|s| s == t.state.label()))
            .filter(|t| q.method.as_deref().is_none_or(|m| m == t.method))
            .collect();
        let mut counts = api::TaskCounts::default();
        for t in &out {
            counts.add(t.state, 1);
        }
        match q.sort.as_deref() {
            Some("age") => out.sort_by_key(|t| std::cmp::Reverse(t.age_ms)),
            _ => out.sort_by(|a, b| b.cpu_ms.total_cmp(&a.cpu_ms)),
        }
        out.truncate(q.limit.unwrap_or(500).min(10_000));
        (out, counts)
    }
}

impl Hooks for Observer {
    fn conn_opened(&self, c: Arc<dyn ConnView>) {
        lock(&self.conns).insert(c.id(), c);
    }

    fn conn_closed(&self, id: u64) {
        lock(&self.conns).remove(&id);
    }

    fn task_finished(&self, t: &Arc<TaskShared>, kind: OutcomeKind) {
        self.metrics.task_finished(t, kind);
        // Answered after a stop while its future still runs on a worker: it
        // leaves the connection's table now, so keep it in view here.
        if t.kind.on_pool() && t.stopped().is_some() && t.stats.state() == JobState::Running {
            let mut m = lock(&self.abandoned);
            m.retain(|_, t| t.stats.state() == JobState::Running);
            if m.len() < self.abandoned_cap {
                m.insert(t.id, t.clone());
            }
        }
    }

    fn refused(&self, reason: RefusalReason) {
        self.metrics.refused(reason);
    }
}

/// A live task's state as listed (an I/O task is always running).
fn live_state(t: &TaskShared) -> TaskState {
    match t.kind {
        TaskKind::Io => TaskState::Running,
        TaskKind::Cpu | TaskKind::Wasm => t.stats.state().into(),
    }
}

/// A live task as listed: `conn` is the connection it is charged to now (a
/// resumed session's tasks move to the connection that resumed it),
/// `session` its session, `detached` whether that session is detached.
fn live_info(t: &TaskShared, conn: u64, session: Option<u64>, detached: bool) -> TaskInfo {
    TaskInfo {
        conn,
        session,
        detached,
        ..task_info(t)
    }
}

pub(crate) fn task_info(t: &TaskShared) -> TaskInfo {
    TaskInfo {
        id: t.id,
        conn: t.conn,
        session: None,
        detached: false,
        caller: CallerInfo::id_of(&t.caller).map(str::to_owned),
        request_id: t
            .request_id
            .as_ref()
            .map(|i| i.to_value())
            .unwrap_or(Value::Null),
        method: t.method.to_string(),
        kind: t.kind,
        state: live_state(t),
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
        state: TaskState::Abandoned,
        ..task_info(t)
    }
}

/// Counts of live tasks by state; abandoned ones are counted by the caller.
pub(crate) fn count_states(tasks: &[Arc<TaskShared>]) -> api::TaskCounts {
    let mut n = api::TaskCounts::default();
    for t in tasks {
        n.add(live_state(t), 1);
    }
    n
}
