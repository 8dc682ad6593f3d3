//! The admin API's JSON, defined once: the server serializes these types and
//! `taskwire top` (or any Rust client) deserializes the same ones. Field names
//! are camelCase on the wire; the dashboard (web/dashboard.js) reads them too,
//! and a test checks every field it reads against a real server.

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use crate::task::OutcomeKind;
pub use crate::task::TaskKind;

/// Where a live task is, as the admin API lists it.
///
/// The discriminants index per-state counts (`state as usize`), in the order
/// of [`TaskState::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Admitted, never run yet.
    Queued = 0,
    /// Running now (an I/O task is always `running`).
    Running = 1,
    /// Preempted at a checkpoint, waiting for its next slice.
    Yielded = 2,
    /// Waiting for something other than the CPU.
    Waiting = 3,
    /// Told to stop and already answered, but still on a worker thread
    /// because it reaches no checkpoint (listed until that thread is back).
    Abandoned = 4,
}

impl TaskState {
    /// Every state, in discriminant order.
    pub const ALL: [TaskState; 5] = [
        TaskState::Queued,
        TaskState::Running,
        TaskState::Yielded,
        TaskState::Waiting,
        TaskState::Abandoned,
    ];

    /// The name in the admin API and the `state` metrics label.
    pub fn label(self) -> &'static str {
        match self {
            TaskState::Queued => "queued",
            TaskState::Running => "running",
            TaskState::Yielded => "yielded",
            TaskState::Waiting => "waiting",
            TaskState::Abandoned => "abandoned",
        }
    }
}

impl From<crate::compute::JobState> for TaskState {
    fn from(s: crate::compute::JobState) -> TaskState {
        use crate::compute::JobState;
        match s {
            JobState::Queued => TaskState::Queued,
            JobState::Running => TaskState::Running,
            JobState::Yielded => TaskState::Yielded,
            JobState::Waiting => TaskState::Waiting,
        }
    }
}

/// Why a request, an upgrade or a connection was refused: the `reason` of a
/// `-32001 overloaded` error and the `reason` label of
/// `taskwire_admission_refusals_total`.
///
/// The discriminants index the refusal counters, in the order of
/// [`RefusalReason::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalReason {
    /// The connection has its most requests in flight.
    ConnectionInflight = 0,
    /// The connection has its most CPU tasks admitted.
    ConnectionQueue = 1,
    /// The client's address (IPv6 /64) has its most CPU tasks admitted.
    AddressLimit = 2,
    /// The compute pool's queue is full.
    QueueFull = 3,
    /// The process is over its memory budget.
    Memory = 4,
    /// The connection sends faster than its rate limit.
    RateLimited = 5,
    /// The server is shutting down.
    ShuttingDown = 6,
    /// The server has its most WebSocket connections.
    Connections = 7,
    /// The client's address has its most WebSocket connections.
    ConnectionsPerIp = 8,
    /// The client's token has its most WebSocket connections.
    ConnectionsPerToken = 9,
    /// The server has its most connections not upgraded to WebSocket.
    HttpConnections = 10,
    /// The client's address has its most connections not upgraded.
    HttpConnectionsPerIp = 11,
    /// The request named a host that is not allowed (DNS rebinding).
    Host = 12,
    /// A state-changing admin request came from another site.
    CrossSite = 13,
    /// The upgrade came from a page of an origin that is not allowed.
    Origin = 14,
    /// The upgrade carried no valid token.
    Unauthorized = 15,
    /// The application's connect hook refused the upgrade (or failed).
    ConnectHook = 16,
    /// Every WebAssembly instance slot is taken (`wasm_instances`).
    WasmInstances = 17,
}

impl RefusalReason {
    /// Every reason, in discriminant order.
    pub const ALL: [RefusalReason; 18] = [
        RefusalReason::ConnectionInflight,
        RefusalReason::ConnectionQueue,
        RefusalReason::AddressLimit,
        RefusalReason::QueueFull,
        RefusalReason::Memory,
        RefusalReason::RateLimited,
        RefusalReason::ShuttingDown,
        RefusalReason::Connections,
        RefusalReason::ConnectionsPerIp,
        RefusalReason::ConnectionsPerToken,
        RefusalReason::HttpConnections,
        RefusalReason::HttpConnectionsPerIp,
        RefusalReason::Host,
        RefusalReason::CrossSite,
        RefusalReason::Origin,
        RefusalReason::Unauthorized,
        RefusalReason::ConnectHook,
        RefusalReason::WasmInstances,
    ];

    /// The name on the wire and in metrics.
    pub fn label(self) -> &'static str {
        match self {
            RefusalReason::ConnectionInflight => "connection_inflight",
            RefusalReason::ConnectionQueue => "connection_queue",
            RefusalReason::AddressLimit => "address_limit",
            RefusalReason::QueueFull => "queue_full",
            RefusalReason::Memory => "memory",
            RefusalReason::RateLimited => "rate_limited",
            RefusalReason::ShuttingDown => "shutting_down",
            RefusalReason::Connections => "connections",
            RefusalReason::ConnectionsPerIp => "connections_per_ip",
            RefusalReason::ConnectionsPerToken => "connections_per_token",
            RefusalReason::HttpConnections => "http_connections",
            RefusalReason::HttpConnectionsPerIp => "http_connections_per_ip",
            RefusalReason::Host => "host",
            RefusalReason::CrossSite => "cross_site",
            RefusalReason::Origin => "origin",
            RefusalReason::Unauthorized => "unauthorized",
            RefusalReason::ConnectHook => "connect_hook",
            RefusalReason::WasmInstances => "wasm_instances",
        }
    }
}

impl From<&crate::compute::Refusal> for RefusalReason {
    fn from(r: &crate::compute::Refusal) -> RefusalReason {
        use crate::compute::Refusal;
        match r {
            Refusal::ConnectionQueue { .. } => RefusalReason::ConnectionQueue,
            Refusal::AddressLimit { .. } => RefusalReason::AddressLimit,
            Refusal::QueueFull { .. } => RefusalReason::QueueFull,
            Refusal::Memory { .. } => RefusalReason::Memory,
            Refusal::ShuttingDown => RefusalReason::ShuttingDown,
        }
    }
}

/// One task as the admin API shows it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TaskInfo {
    /// Server-wide task id.
    pub id: u64,
    /// The connection it belongs to now: the one that started it, or the one
    /// that resumed its session (for a detached session's task, the
    /// connection last attached, now gone).
    pub conn: u64,
    /// Its session, if its connection opened or resumed one.
    #[serde(default)]
    pub session: Option<u64>,
    /// Whether its session is detached (no connection; it waits for a resume).
    #[serde(default)]
    pub detached: bool,
    /// Who started it: its connection's caller (`null` when anonymous).
    #[serde(default)]
    pub caller: Option<String>,
    /// The JSON-RPC id of its request (`null` for a notification).
    pub request_id: Value,
    /// Its method.
    pub method: String,
    /// `io` or `cpu`.
    pub kind: TaskKind,
    /// Where it is now.
    pub state: TaskState,
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
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ConnInfo {
    /// Connection id.
    pub id: u64,
    /// The peer's address.
    pub peer: String,
    /// Who is calling, as the connect hook named it (`token#<n>` for a
    /// configured token); `null` when anonymous.
    #[serde(default)]
    pub caller: Option<String>,
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

/// `GET /admin/tasks`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct TaskList {
    /// The tasks, in the order asked for.
    pub tasks: Vec<TaskInfo>,
}

/// `GET /admin/connections`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConnList {
    /// The open connections, by id.
    pub connections: Vec<ConnInfo>,
}

/// Live tasks by state.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct TaskCounts {
    /// Admitted, never run yet.
    pub queued: u64,
    /// Running now.
    pub running: u64,
    /// Preempted, waiting for their next slice.
    pub yielded: u64,
    /// Waiting for something other than the CPU.
    pub waiting: u64,
    /// Answered after a stop, still on a worker.
    pub abandoned: u64,
}

impl TaskCounts {
    /// The count of one state.
    pub fn get(&self, s: TaskState) -> u64 {
        match s {
            TaskState::Queued => self.queued,
            TaskState::Running => self.running,
            TaskState::Yielded => self.yielded,
            TaskState::Waiting => self.waiting,
            TaskState::Abandoned => self.abandoned,
        }
    }

    /// Counts one more task in state `s`.
    pub fn add(&mut self, s: TaskState, n: u64) {
        let slot = match s {
            TaskState::Queued => &mut self.queued,
            TaskState::Running => &mut self.running,
            TaskState::Yielded => &mut self.yielded,
            TaskState::Waiting => &mut self.waiting,
            TaskState::Abandoned => &mut self.abandoned,
        };
        *slot += n;
    }
}

/// The compute pool, in `/admin/stats`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PoolInfo {
    /// Configured workers.
    pub workers: usize,
    /// Worker threads alive, including replacements for stuck ones.
    pub live_workers: usize,
    /// Workers running a task now.
    pub busy: usize,
    /// Fraction of the configured workers busy (recent window).
    pub utilisation: f64,
    /// CPU tasks waiting for a worker.
    pub queued: usize,
    /// CPU tasks admitted and not finished.
    pub admitted: usize,
    /// CPU tasks ever flagged as not yielding.
    pub non_yielding_total: u64,
    /// CPU time run on the pool, ever, in ms.
    pub cpu_ms_total: f64,
    /// Client addresses (IPv6 /64s) holding CPU slots.
    pub addresses: usize,
    /// CPU tasks finished per second (recent average).
    pub completion_rate: f64,
}

/// Memory, in `/admin/stats`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemoryInfo {
    /// Memory as the budget counts it.
    pub used_bytes: u64,
    /// Resident set size of the process.
    pub rss_bytes: u64,
    /// Bytes live through the counting allocator (0 without it).
    pub allocated_bytes: u64,
    /// The budget past which new CPU tasks are refused.
    pub budget_bytes: u64,
    /// Whether `usedBytes` comes from the counting allocator (else RSS).
    pub counted: bool,
    /// Whether new CPU tasks are refused for memory now.
    pub over_budget: bool,
    /// Memory held by the largest live task.
    pub largest_task_bytes: u64,
    /// Times freed memory was handed back to the operating system.
    pub trims: u64,
}

/// Finished tasks by [`OutcomeKind`], and requests refused, since start.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Finished {
    /// [`OutcomeKind::Ok`].
    pub ok: u64,
    /// [`OutcomeKind::Error`].
    pub error: u64,
    /// [`OutcomeKind::Crashed`].
    pub crashed: u64,
    /// [`OutcomeKind::Cancelled`].
    pub cancelled: u64,
    /// [`OutcomeKind::Timeout`].
    pub timeout: u64,
    /// [`OutcomeKind::Killed`].
    pub killed: u64,
    /// [`OutcomeKind::Shutdown`].
    pub shutdown: u64,
    /// Requests, upgrades and connections refused, for any [`RefusalReason`].
    pub refused: u64,
}

impl Finished {
    /// The count of one outcome.
    pub fn get(&self, k: OutcomeKind) -> u64 {
        match k {
            OutcomeKind::Ok => self.ok,
            OutcomeKind::Error => self.error,
            OutcomeKind::Crashed => self.crashed,
            OutcomeKind::Cancelled => self.cancelled,
            OutcomeKind::Timeout => self.timeout,
            OutcomeKind::Killed => self.killed,
            OutcomeKind::Shutdown => self.shutdown,
        }
    }

    /// Sets the count of one outcome.
    pub fn set(&mut self, k: OutcomeKind, n: u64) {
        let slot = match k {
            OutcomeKind::Ok => &mut self.ok,
            OutcomeKind::Error => &mut self.error,
            OutcomeKind::Crashed => &mut self.crashed,
            OutcomeKind::Cancelled => &mut self.cancelled,
            OutcomeKind::Timeout => &mut self.timeout,
            OutcomeKind::Killed => &mut self.killed,
            OutcomeKind::Shutdown => &mut self.shutdown,
        };
        *slot = n;
    }
}

/// `GET /admin/stats`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    /// Open WebSocket connections.
    pub connections: usize,
    /// Live tasks by state.
    pub tasks: TaskCounts,
    /// The compute pool.
    pub pool: PoolInfo,
    /// Memory.
    pub memory: MemoryInfo,
    /// Finished tasks by outcome, and refusals.
    pub finished: Finished,
    /// Time since the server started, in ms.
    pub uptime_ms: u64,
}

/// One `snapshot` event of `GET /admin/events`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Snapshot {
    /// As `/admin/stats`.
    pub stats: Stats,
    /// The busiest tasks first, as `/admin/tasks`.
    pub tasks: Vec<TaskInfo>,
}

/// `POST /admin/tasks/{id}/kill`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Killed {
    /// Always `true`: a task that is not there is a 404.
    pub killed: bool,
}

/// `POST /admin/connections/{id}/close`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Closed {
    /// Always `true`: a connection that is not there is a 404.
    pub closed: bool,
}

/// The body of an admin 404.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiError {
    /// What was not found.
    pub error: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enums_index_their_counters_and_name_themselves_as_serde_does() {
        for (i, s) in TaskState::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
            assert_eq!(serde_json::to_value(s).unwrap(), s.label());
        }
        for (i, r) in RefusalReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
            assert_eq!(serde_json::to_value(r).unwrap(), r.label());
        }
    }

    /// The pool names its refusals itself too (it sits below this module):
    /// both names must agree.
    #[test]
    fn pool_refusals_keep_their_names() {
        use crate::compute::Refusal;
        let ms = 5;
        for r in [
            Refusal::ConnectionQueue { retry_after_ms: ms },
            Refusal::AddressLimit { retry_after_ms: ms },
            Refusal::QueueFull { retry_after_ms: ms },
            Refusal::Memory { retry_after_ms: ms },
            Refusal::ShuttingDown,
        ] {
            assert_eq!(RefusalReason::from(&r).label(), r.reason());
        }
    }

    #[test]
    fn finished_has_a_field_per_outcome_and_refused() {
        let mut f = Finished::default();
        for (i, k) in OutcomeKind::ALL.iter().enumerate() {
            f.set(*k, i as u64 + 1);
        }
        let v = serde_json::to_value(f).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), OutcomeKind::ALL.len() + 1);
        for (i, k) in OutcomeKind::ALL.iter().enumerate() {
            assert_eq!(obj[k.label()], i as u64 + 1);
            assert_eq!(f.get(*k), i as u64 + 1);
        }
        assert_eq!(obj["refused"], 0);
    }

    #[test]
    fn task_counts_have_a_field_per_state() {
        let mut c = TaskCounts::default();
        for (i, s) in TaskState::ALL.iter().enumerate() {
            c.add(*s, i as u64 + 1);
        }
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(v.as_object().unwrap().len(), TaskState::ALL.len());
        for (i, s) in TaskState::ALL.iter().enumerate() {
            assert_eq!(v[s.label()], i as u64 + 1);
            assert_eq!(c.get(*s), i as u64 + 1);
        }
    }
}
