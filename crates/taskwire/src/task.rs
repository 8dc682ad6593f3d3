//! What a task sees: its [`Ctx`] (cancellation, deadline, progress,
//! checkpoints) and the [`TaskError`] it returns.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::compute::{self, JobStats};
use crate::protocol::{codes, ErrorObject, Id};
use crate::sync::{lock, Outbox};

/// Whether a task runs on the I/O runtime or on the compute pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// Waits on timers, sockets or other futures; runs on Tokio's threads.
    Io,
    /// Burns CPU; runs on the compute pool, time-sliced at checkpoints.
    Cpu,
    /// A WebAssembly module's `run`: on the compute pool like a CPU task, but
    /// sliced and stopped at epoch deadlines, with no checkpoints of its own.
    Wasm,
}

impl TaskKind {
    /// `"io"`, `"cpu"` or `"wasm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskKind::Io => "io",
            TaskKind::Cpu => "cpu",
            TaskKind::Wasm => "wasm",
        }
    }

    /// Whether tasks of this kind run on the compute pool (and take its
    /// admission permit).
    pub fn on_pool(self) -> bool {
        matches!(self, TaskKind::Cpu | TaskKind::Wasm)
    }
}

/// Why a task was told to stop. The first reason wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Stopped {
    /// The client sent `$/cancelRequest`.
    #[error("cancelled by the client")]
    Cancelled,
    /// The connection closed.
    #[error("cancelled: the connection closed")]
    Disconnected,
    /// The deadline passed.
    #[error("deadline exceeded")]
    DeadlineExceeded,
    /// An operator killed the task.
    #[error("killed by an operator")]
    Killed,
    /// The server is shutting down.
    #[error("the server is shutting down")]
    Shutdown,
}

impl Stopped {
    fn to_u8(self) -> u8 {
        match self {
            Stopped::Cancelled => 1,
            Stopped::Disconnected => 2,
            Stopped::DeadlineExceeded => 3,
            Stopped::Killed => 4,
            Stopped::Shutdown => 5,
        }
    }

    fn from_u8(v: u8) -> Option<Stopped> {
        Some(match v {
            1 => Stopped::Cancelled,
            2 => Stopped::Disconnected,
            3 => Stopped::DeadlineExceeded,
            4 => Stopped::Killed,
            5 => Stopped::Shutdown,
            _ => return None,
        })
    }

    /// The protocol's error code for this reason.
    pub fn code(self) -> i32 {
        match self {
            Stopped::Cancelled | Stopped::Disconnected => codes::CANCELLED,
            Stopped::DeadlineExceeded => codes::DEADLINE_EXCEEDED,
            Stopped::Killed => codes::KILLED,
            Stopped::Shutdown => codes::SHUTTING_DOWN,
        }
    }
}

/// The error a task returns.
///
/// A task reports its own failures with [`TaskError::InvalidParams`] or
/// [`TaskError::Failed`]; `?` on [`Ctx::checkpoint`] turns a stop into
/// [`TaskError::Stopped`], which the server answers with the right code.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    /// The params do not fit the task (`-32602`); name the field.
    #[error("invalid params: {0}")]
    InvalidParams(String),
    /// The task failed with an application error of its own.
    #[error("{message}")]
    Failed {
        /// An application code (use codes outside the protocol's reserved ranges).
        code: i32,
        /// What went wrong.
        message: String,
        /// Details for the client.
        data: Option<Value>,
    },
    /// The server failed (`-32603`).
    #[error("internal error: {0}")]
    Internal(String),
    /// The task stopped because it was told to.
    #[error(transparent)]
    Stopped(#[from] Stopped),
}

impl TaskError {
    /// An application failure with a code and message.
    pub fn failed(code: i32, message: impl Into<String>) -> Self {
        TaskError::Failed {
            code,
            message: message.into(),
            data: None,
        }
    }

    pub(crate) fn to_error_object(&self, timeout_ms: Option<u64>) -> ErrorObject {
        match self {
            TaskError::InvalidParams(m) => ErrorObject::invalid_params(m),
            TaskError::Failed {
                code,
                message,
                data,
            } => ErrorObject {
                code: *code,
                message: message.clone(),
                data: data.clone(),
            },
            TaskError::Internal(m) => {
                ErrorObject::new(codes::INTERNAL_ERROR, format!("internal error: {m}"))
            }
            TaskError::Stopped(s) => stopped_error(*s, timeout_ms),
        }
    }
}

pub(crate) fn stopped_error(s: Stopped, timeout_ms: Option<u64>) -> ErrorObject {
    match s {
        Stopped::DeadlineExceeded => ErrorObject::with_data(
            s.code(),
            s.to_string(),
            serde_json::json!({ "timeoutMs": timeout_ms.unwrap_or(0) }),
        ),
        _ => ErrorObject::new(s.code(), s.to_string()),
    }
}

/// Progress notifications of one task are sent at most this often; faster
/// updates are coalesced, keeping the latest.
pub(crate) const PROGRESS_INTERVAL: Duration = Duration::from_millis(50);

/// What goes to a connection's writer.
pub(crate) enum Outbound {
    /// A response or a batch, already serialized.
    Text(String),
    /// This task has progress to send: the writer takes the latest value.
    Progress(Arc<TaskShared>),
}

#[derive(Default)]
pub(crate) struct ProgressSlot {
    latest: Option<Box<RawValue>>,
    unsent: bool,
    queued: bool,
    closed: bool,
    last_sent: Option<Instant>,
}

/// Everything the server knows about one running task. Shared by the task's
/// [`Ctx`], its connection's in-flight table and the admin view.
pub(crate) struct TaskShared {
    pub id: u64,
    pub conn: u64,
    pub request_id: Option<Id>,
    pub method: Arc<str>,
    pub kind: TaskKind,
    pub created: Instant,
    pub timeout_ms: Option<u64>,
    pub deadline: Option<Instant>,
    stop: AtomicU8,
    pub token: CancellationToken,
    pub stats: Arc<JobStats>,
    progress_token: Option<Box<RawValue>>,
    progress: Mutex<ProgressSlot>,
    progress_calls: AtomicU64,
    progress_sent: AtomicU64,
    outbound: Arc<Outbox<Outbound>>,
}

pub(crate) struct TaskInit {
    pub id: u64,
    pub conn: u64,
    pub request_id: Option<Id>,
    pub method: Arc<str>,
    pub kind: TaskKind,
    pub timeout_ms: Option<u64>,
    pub progress_token: Option<Box<RawValue>>,
    pub outbound: Arc<Outbox<Outbound>>,
}

impl TaskShared {
    pub(crate) fn new(init: TaskInit) -> Arc<TaskShared> {
        let created = Instant::now();
        Arc::new(TaskShared {
            id: init.id,
            conn: init.conn,
            request_id: init.request_id,
            method: init.method.clone(),
            kind: init.kind,
            created,
            timeout_ms: init.timeout_ms,
            deadline: init
                .timeout_ms
                .map(|ms| created + Duration::from_millis(ms)),
            stop: AtomicU8::new(0),
            token: CancellationToken::new(),
            stats: Arc::new(JobStats::for_task(init.id, init.method)),
            progress_token: init.progress_token,
            progress: Mutex::new(ProgressSlot::default()),
            progress_calls: AtomicU64::new(0),
            progress_sent: AtomicU64::new(0),
            outbound: init.outbound,
        })
    }

    /// Tells the task to stop; returns false if it was already told.
    pub(crate) fn stop(&self, why: Stopped) -> bool {
        let first = self
            .stop
            .compare_exchange(0, why.to_u8(), Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        self.token.cancel();
        first
    }

    pub(crate) fn stopped(&self) -> Option<Stopped> {
        Stopped::from_u8(self.stop.load(Ordering::Acquire))
    }

    pub(crate) fn last_progress(&self) -> Option<Value> {
        let slot = lock(&self.progress);
        slot.latest
            .as_ref()
            .and_then(|v| serde_json::from_str(v.get()).ok())
    }

    fn set_progress(self: &Arc<Self>, value: Box<RawValue>) {
        let mut slot = lock(&self.progress);
        if slot.closed {
            return;
        }
        slot.latest = Some(value);
        if self.progress_token.is_none() {
            // Kept for the admin view only.
            return;
        }
        slot.unsent = true;
        self.progress_calls.fetch_add(1, Ordering::Relaxed);
        if slot.queued {
            return;
        }
        let due = slot
            .last_sent
            .is_none_or(|t| t.elapsed() >= PROGRESS_INTERVAL);
        if due
            && self
                .outbound
                .try_push(Outbound::Progress(self.clone()))
                .is_ok()
        {
            slot.queued = true;
        }
    }

    /// Called by the writer: the notification to send now, if any.
    pub(crate) fn take_progress_text(&self) -> Option<String> {
        let mut slot = lock(&self.progress);
        slot.queued = false;
        if !slot.unsent {
            return None;
        }
        slot.unsent = false;
        slot.last_sent = Some(Instant::now());
        self.progress_sent.fetch_add(1, Ordering::Relaxed);
        let token = self.progress_token.as_ref()?;
        let value = slot.latest.as_ref()?;
        Some(crate::protocol::progress_text(token, value))
    }

    /// Progress updates that were folded into a later notification.
    pub(crate) fn progress_coalesced(&self) -> u64 {
        self.progress_calls
            .load(Ordering::Relaxed)
            .saturating_sub(self.progress_sent.load(Ordering::Relaxed))
    }

    /// Called just before the response: no progress after it, and whether the
    /// latest value still has to go out first.
    pub(crate) fn close_progress(&self) -> bool {
        let mut slot = lock(&self.progress);
        slot.closed = true;
        let need = slot.unsent && !slot.queued;
        if need {
            slot.queued = true;
        }
        need
    }
}

/// A task's handle on the server: cancellation, deadline, progress, checkpoints.
///
/// Cheap to clone. A CPU task must call [`Ctx::checkpoint`] in its loops (about
/// every 100 µs of work): that is where it is preempted and where it learns that
/// it was cancelled, timed out or killed.
#[derive(Clone)]
pub struct Ctx {
    pub(crate) shared: Arc<TaskShared>,
}

impl std::fmt::Debug for Ctx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctx")
            .field("task", &self.shared.id)
            .field("method", &self.shared.method)
            .finish()
    }
}

impl Ctx {
    /// A context attached to no connection: for unit-testing a task function
    /// or running it outside a server. Progress goes nowhere; [`Ctx::stop`]
    /// plays the part of a cancel.
    ///
    /// ```
    /// # use taskwire::{Ctx, Stopped};
    /// let ctx = Ctx::detached("my_task");
    /// ctx.stop(Stopped::Cancelled);
    /// assert_eq!(ctx.stopped(), Some(Stopped::Cancelled));
    /// ```
    pub fn detached(method: &str) -> Ctx {
        // A closed queue: progress is kept for `last_progress` and dropped.
        let outbound = Arc::new(Outbox::new(1));
        drop(outbound.close());
        Ctx {
            shared: TaskShared::new(TaskInit {
                id: 0,
                conn: 0,
                request_id: None,
                method: method.into(),
                kind: TaskKind::Cpu,
                timeout_ms: None,
                progress_token: None,
                outbound,
            }),
        }
    }

    /// Tells the task to stop, as a cancel, deadline or kill would. The first
    /// reason wins.
    pub fn stop(&self, why: Stopped) {
        self.shared.stop(why);
    }

    /// The server-wide id of this task (as shown in the admin API).
    pub fn task_id(&self) -> u64 {
        self.shared.id
    }

    /// The id of the connection that started this task.
    pub fn connection_id(&self) -> u64 {
        self.shared.conn
    }

    /// The method name this task was started under.
    pub fn method(&self) -> &str {
        &self.shared.method
    }

    /// When the task must be done by, if it has a deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.shared.deadline
    }

    /// Why the task was told to stop, if it was.
    pub fn stopped(&self) -> Option<Stopped> {
        self.shared.stopped()
    }

    /// Resolves when the task is told to stop: for I/O tasks that want to clean
    /// up before returning (the server drops an I/O task's future on stop anyway).
    pub async fn cancelled(&self) -> Stopped {
        self.shared.token.cancelled().await;
        self.shared.stopped().unwrap_or(Stopped::Cancelled)
    }

    /// Reports progress. Never blocks: values sent faster than about 20 per
    /// second are coalesced, and the latest always reaches the client before
    /// the response. Only sent if the client asked (`_meta.progressToken`);
    /// always visible in the admin task table.
    pub fn progress(&self, value: impl Serialize) {
        if let Ok(raw) = serde_json::value::to_raw_value(&value) {
            self.shared.set_progress(raw);
        }
    }

    /// The preemption and cancellation point of CPU tasks.
    ///
    /// Returns `Err` once the task is told to stop (use `?`). On the compute
    /// pool it yields the worker when the task's slice is used up. With no
    /// yield due it costs an atomic load or two: call it freely.
    ///
    /// ```
    /// # use taskwire::{Ctx, TaskError};
    /// async fn sum(ctx: Ctx, n: u64) -> Result<u64, TaskError> {
    ///     let mut total = 0u64;
    ///     for i in 0..n {
    ///         total = total.wrapping_add(i);
    ///         if i % 100_000 == 0 {
    ///             ctx.checkpoint().await?;
    ///         }
    ///     }
    ///     Ok(total)
    /// }
    /// ```
    pub fn checkpoint(&self) -> Checkpoint<'_> {
        Checkpoint {
            shared: &self.shared,
            yielded: false,
        }
    }
}

impl std::fmt::Debug for Checkpoint<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("task", &self.shared.id)
            .field("yielded", &self.yielded)
            .finish()
    }
}

/// The future returned by [`Ctx::checkpoint`].
#[must_use = "a checkpoint does nothing unless awaited"]
pub struct Checkpoint<'a> {
    shared: &'a TaskShared,
    yielded: bool,
}

impl Future for Checkpoint<'_> {
    type Output = Result<(), Stopped>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(s) = self.shared.stopped() {
            return Poll::Ready(Err(s));
        }
        if !self.yielded && compute::should_yield() {
            self.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(Ok(()))
    }
}

/// Output of a task once erased: its result as JSON text.
pub(crate) type TaskOutput = Result<Box<RawValue>, TaskError>;

/// How a task ended.
pub(crate) enum Outcome {
    Ok(Box<RawValue>),
    Err(TaskError),
    Crashed(String),
    /// The task was dropped without finishing (its executor went away).
    Lost,
}

impl Outcome {
    /// How it is counted. `Lost` is an `error` here: the caller that knows the
    /// server is shutting down answers it as stopped by the shutdown instead
    /// (and counts it so), see the connection's reply.
    pub(crate) fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Ok(_) => OutcomeKind::Ok,
            Outcome::Err(TaskError::Stopped(s)) => match s {
                Stopped::Cancelled | Stopped::Disconnected => OutcomeKind::Cancelled,
                Stopped::DeadlineExceeded => OutcomeKind::Timeout,
                Stopped::Killed => OutcomeKind::Killed,
                Stopped::Shutdown => OutcomeKind::Shutdown,
            },
            Outcome::Err(
                TaskError::InvalidParams(_) | TaskError::Failed { .. } | TaskError::Internal(_),
            )
            | Outcome::Lost => OutcomeKind::Error,
            Outcome::Crashed(_) => OutcomeKind::Crashed,
        }
    }
}

/// How a finished task ended, as metrics and the admin API count it.
///
/// The discriminants index per-kind counters (`kind as usize`), so they run
/// from 0 without gaps, in the order of [`OutcomeKind::ALL`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeKind {
    /// Answered with a result.
    Ok = 0,
    /// Answered with an error the task returned (or an internal error).
    Error = 1,
    /// The task panicked (`-32003`).
    Crashed = 2,
    /// Cancelled by its client, or its connection closed.
    Cancelled = 3,
    /// Its deadline passed.
    Timeout = 4,
    /// Killed by an operator.
    Killed = 5,
    /// Stopped, or lost, because the server is shutting down.
    Shutdown = 6,
}

impl OutcomeKind {
    /// Every kind, in discriminant order.
    pub const ALL: [OutcomeKind; 7] = [
        OutcomeKind::Ok,
        OutcomeKind::Error,
        OutcomeKind::Crashed,
        OutcomeKind::Cancelled,
        OutcomeKind::Timeout,
        OutcomeKind::Killed,
        OutcomeKind::Shutdown,
    ];

    /// The name in metrics labels and the admin API.
    pub fn label(self) -> &'static str {
        match self {
            OutcomeKind::Ok => "ok",
            OutcomeKind::Error => "error",
            OutcomeKind::Crashed => "crashed",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Killed => "killed",
            OutcomeKind::Shutdown => "shutdown",
        }
    }
}

#[cfg(test)]
mod outcome_tests {
    use super::*;

    #[test]
    fn outcome_kinds_index_their_counters() {
        for (i, k) in OutcomeKind::ALL.iter().enumerate() {
            assert_eq!(*k as usize, i, "{k:?} out of order in ALL");
            let json = serde_json::to_value(k).unwrap();
            assert_eq!(json, k.label(), "serde name and label agree");
        }
    }

    #[test]
    fn outcomes_count_as_their_kind() {
        let stopped = |s| Outcome::Err(TaskError::Stopped(s));
        assert_eq!(
            stopped(Stopped::Disconnected).kind(),
            OutcomeKind::Cancelled
        );
        assert_eq!(
            stopped(Stopped::DeadlineExceeded).kind(),
            OutcomeKind::Timeout
        );
        assert_eq!(stopped(Stopped::Shutdown).kind(), OutcomeKind::Shutdown);
        assert_eq!(Outcome::Crashed("x".into()).kind(), OutcomeKind::Crashed);
        assert_eq!(Outcome::Lost.kind(), OutcomeKind::Error);
    }
}
