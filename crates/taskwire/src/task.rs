//! What a task sees: its [`Ctx`] (cancellation, deadline, progress,
//! checkpoints, who is calling, shared state) and the [`TaskError`] it returns.

use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::http::Extensions;
use futures_util::FutureExt;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::compute::{self, JobStats, TaskLabel};
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
/// `?` turns any error into one: an error type of your own, `std::io::Error`,
/// `serde_json::Error`, anything that implements `std::error::Error + Send +
/// Sync + 'static` is answered `-32603` with its message, its sources
/// appended after `": "` (as anyhow's `{:#}` prints a chain). `?` on
/// [`Ctx::checkpoint`] gives a stop its own code (`-32800`, `-32002`,
/// `-32004`, `-32005`). Choose another code with [`TaskError::with_code`] or
/// [`TaskResultExt::code`]:
///
/// ```
/// use taskwire::{Ctx, TaskError, TaskResultExt};
///
/// async fn read_config(ctx: Ctx, path: String) -> Result<usize, TaskError> {
///     ctx.checkpoint().await?; // a stop keeps its code
///     let text = std::fs::read_to_string(&path).code(-32050)?; // an application code
///     let value: serde_json::Value = serde_json::from_str(&text)?; // -32603
///     Ok(value.as_object().map_or(0, |o| o.len()))
/// }
/// ```
///
/// `TaskError` does not implement `std::error::Error` itself (as
/// `anyhow::Error` does not): that is what lets one `From` take every error
/// type. A panic in a task is not a `TaskError`: it is answered `-32003`.
#[derive(Debug)]
pub enum TaskError {
    /// The params do not fit the task (`-32602`); name the field.
    InvalidParams(String),
    /// The task failed with an error of its own.
    Failed {
        /// An application code (use codes outside the protocol's reserved
        /// ranges), or `-32603` for an error converted by `?`.
        code: i32,
        /// What went wrong.
        message: String,
        /// Details for the client.
        data: Option<Value>,
    },
    /// The server failed (`-32603`).
    Internal(String),
    /// The task stopped because it was told to.
    Stopped(Stopped),
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::InvalidParams(m) => write!(f, "invalid params: {m}"),
            TaskError::Failed { message, .. } => f.write_str(message),
            TaskError::Internal(m) => write!(f, "internal error: {m}"),
            TaskError::Stopped(s) => write!(f, "{s}"),
        }
    }
}

/// Every error converts, so `?` works in a task on any of them. A [`Stopped`]
/// is found by downcasting, so the stop keeps its own code.
impl<E> From<E> for TaskError
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn from(e: E) -> Self {
        if let Some(s) = (&e as &dyn std::any::Any).downcast_ref::<Stopped>() {
            return TaskError::Stopped(*s);
        }
        TaskError::Failed {
            code: codes::INTERNAL_ERROR,
            message: error_chain(&e),
            data: None,
        }
    }
}

/// Most bytes of an error message built from an error chain: a message may
/// quote client input, and it goes back in one frame.
const MAX_CHAIN_BYTES: usize = 4096;

/// An error and its sources joined with `": "`, as anyhow's `{:#}` does.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        if out.len() > MAX_CHAIN_BYTES {
            break;
        }
        let _ = write!(out, ": {s}");
        source = s.source();
    }
    if out.len() > MAX_CHAIN_BYTES {
        let mut end = MAX_CHAIN_BYTES;
        while !out.is_char_boundary(end) {
            end -= 1;
        }
        out.truncate(end);
        out.push('…');
    }
    out
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

    /// A boxed error, as many libraries return: `Box<dyn Error + Send +
    /// Sync>` is not itself an `Error`, so `?` cannot take it (use
    /// `.map_err(TaskError::from_boxed)?`). Answered as `?` answers an error.
    pub fn from_boxed(e: Box<dyn std::error::Error + Send + Sync + 'static>) -> Self {
        if let Some(s) = e.downcast_ref::<Stopped>() {
            return TaskError::Stopped(*s);
        }
        TaskError::Failed {
            code: codes::INTERNAL_ERROR,
            message: error_chain(&*e),
            data: None,
        }
    }

    /// `-32602`: the params do not fit (name the field in `message`).
    pub fn invalid_params(message: impl Into<String>) -> Self {
        TaskError::InvalidParams(message.into())
    }

    /// The same error answered with `code` instead. A stop keeps its own
    /// code: the client tells a cancel or a deadline by it.
    pub fn with_code(self, code: i32) -> Self {
        match self {
            TaskError::Stopped(s) => TaskError::Stopped(s),
            TaskError::Failed { message, data, .. } => TaskError::Failed {
                code,
                message,
                data,
            },
            other => TaskError::Failed {
                code,
                message: other.to_string(),
                data: None,
            },
        }
    }

    /// The same error with `data` for the client. A stop keeps the data
    /// the protocol gives it.
    pub fn with_data(self, data: Value) -> Self {
        match self {
            TaskError::Stopped(s) => TaskError::Stopped(s),
            TaskError::Failed { code, message, .. } => TaskError::Failed {
                code,
                message,
                data: Some(data),
            },
            other => TaskError::Failed {
                code: other.code(),
                message: other.to_string(),
                data: Some(data),
            },
        }
    }

    /// The code the client is answered with.
    pub fn code(&self) -> i32 {
        match self {
            TaskError::InvalidParams(_) => codes::INVALID_PARAMS,
            TaskError::Failed { code, .. } => *code,
            TaskError::Internal(_) => codes::INTERNAL_ERROR,
            TaskError::Stopped(s) => s.code(),
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

/// `.code(n)` on a `Result` whose error converts into a [`TaskError`]: the
/// error is answered with code `n` (a stop keeps its own code).
///
/// ```
/// use taskwire::{TaskError, TaskResultExt};
///
/// fn parse(text: &str) -> Result<u64, TaskError> {
///     text.parse::<u64>().code(-32050)
/// }
/// let e = parse("x").unwrap_err();
/// assert_eq!(e.code(), -32050);
/// assert_eq!(e.to_string(), "invalid digit found in string");
/// ```
pub trait TaskResultExt<T> {
    /// The error, if any, answered with `code`.
    fn code(self, code: i32) -> Result<T, TaskError>;
}

impl<T, E: Into<TaskError>> TaskResultExt<T> for Result<T, E> {
    fn code(self, code: i32) -> Result<T, TaskError> {
        self.map_err(|e| e.into().with_code(code))
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

/// Who is calling, as the connect hook said: one per connection, shared by
/// every task it starts (an anonymous connection has none at all).
#[derive(Clone, Debug, Default)]
pub(crate) struct CallerInfo {
    /// The identity (a user id, a subject), if the hook named one.
    pub id: Option<Box<str>>,
    /// The typed values the hook attached.
    pub extensions: Extensions,
}

impl CallerInfo {
    /// The identity of a connection's caller, `None` when anonymous.
    pub(crate) fn id_of(caller: &Option<Arc<CallerInfo>>) -> Option<&str> {
        caller.as_ref().and_then(|c| c.id.as_deref())
    }
}

/// The values [`Ctx::extensions`] shows a task of an anonymous connection.
static NO_EXTENSIONS: LazyLock<Extensions> = LazyLock::new(Extensions::new);

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
    /// Where notifications go: the connection's writer, or that of the
    /// connection that resumed the task's session.
    outbound: Option<Arc<Outbox<Outbound>>>,
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
    /// Who started it: shared with its connection, `None` when anonymous.
    pub caller: Option<Arc<CallerInfo>>,
    /// The registry's shared state (`None` when it has none).
    state: Option<Arc<Extensions>>,
    progress_token: Option<Box<RawValue>>,
    progress: Mutex<ProgressSlot>,
    progress_calls: AtomicU64,
    progress_sent: AtomicU64,
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
    pub caller: Option<Arc<CallerInfo>>,
    pub state: Option<Arc<Extensions>>,
}

impl TaskShared {
    pub(crate) fn new(init: TaskInit) -> Arc<TaskShared> {
        let created = Instant::now();
        let label = TaskLabel::new(
            init.id,
            init.conn,
            init.request_id.as_ref(),
            init.method.clone(),
            CallerInfo::id_of(&init.caller),
        );
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
            stats: Arc::new(JobStats::for_task(label)),
            caller: init.caller,
            state: init.state,
            progress_token: init.progress_token,
            progress: Mutex::new(ProgressSlot {
                outbound: Some(init.outbound),
                ..ProgressSlot::default()
            }),
            progress_calls: AtomicU64::new(0),
            progress_sent: AtomicU64::new(0),
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

    pub(crate) fn set_progress(self: &Arc<Self>, value: Box<RawValue>) {
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
            && slot
                .outbound
                .as_ref()
                .is_some_and(|o| o.try_push(Outbound::Progress(self.clone())).is_ok())
        {
            slot.queued = true;
        }
    }

    /// The task's session was resumed on another connection: its progress
    /// goes there now. A notification queued on the old connection was
    /// dropped with its queue, so the latest value is queued again.
    pub(crate) fn retarget(self: &Arc<Self>, outbound: Arc<Outbox<Outbound>>) {
        let mut slot = lock(&self.progress);
        slot.outbound = Some(outbound);
        slot.queued = false;
        if slot.unsent && !slot.closed && self.progress_token.is_some() {
            let pushed = slot
                .outbound
                .as_ref()
                .is_some_and(|o| o.try_push(Outbound::Progress(self.clone())).is_ok());
            slot.queued = pushed;
        }
    }

    /// Queues the final progress notification, if one is due, on the task's
    /// current connection (without waiting: a session's client that does not
    /// read is bounded by its buffer, not by this queue).
    pub(crate) fn flush_progress(self: &Arc<Self>) {
        if !self.close_progress() {
            return;
        }
        let slot = lock(&self.progress);
        let pushed = slot
            .outbound
            .as_ref()
            .is_some_and(|o| o.try_push(Outbound::Progress(self.clone())).is_ok());
        drop(slot);
        if !pushed {
            lock(&self.progress).queued = false;
        }
    }

    /// Called by the writer: the notification to send now, if any.
    pub(crate) fn take_progress_text(&self) -> Option<String> {
        let token = self.progress_token.as_ref();
        self.take_unsent_progress(|value| Some(crate::protocol::progress_text(token?, value)))
            .flatten()
    }

    /// For a task run for another node: the latest value to forward, if any
    /// (the same pacing as [`TaskShared::take_progress_text`]).
    #[cfg(feature = "cluster")]
    pub(crate) fn take_progress_value(&self) -> Option<Box<RawValue>> {
        self.take_unsent_progress(|value| value.to_owned())
    }

    /// Marks the latest progress value sent and hands it to `send`, if one is
    /// waiting: the one place the pacing's bookkeeping is done.
    fn take_unsent_progress<T>(&self, send: impl FnOnce(&RawValue) -> T) -> Option<T> {
        let mut slot = lock(&self.progress);
        slot.queued = false;
        if !slot.unsent {
            return None;
        }
        slot.unsent = false;
        slot.last_sent = Some(Instant::now());
        self.progress_sent.fetch_add(1, Ordering::Relaxed);
        slot.latest.as_deref().map(send)
    }

    /// Whether its client asked for progress.
    #[cfg(feature = "cluster")]
    pub(crate) fn wants_progress(&self) -> bool {
        self.progress_token.is_some()
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
            .field("caller", &self.caller())
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
                caller: None,
                state: None,
            }),
        }
    }

    /// The parts of a fresh detached context the `with_*` setters fill in.
    fn detached_parts(&mut self) -> &mut TaskShared {
        // Only `detached` hands out a context nobody else holds yet; a clone
        // would share it, and a server's context belongs to its connection.
        Arc::get_mut(&mut self.shared)
            .expect("Ctx::with_caller, with_extension and with_state apply to a fresh Ctx::detached, before it is cloned")
    }

    /// A detached context that acts for `id`, as a connect hook's
    /// [`Caller`](crate::Caller) would make it: for unit tests.
    ///
    /// ```
    /// # use taskwire::Ctx;
    /// #[derive(Clone)]
    /// struct Plan(&'static str);
    ///
    /// let ctx = Ctx::detached("greet").with_caller("alice").with_extension(Plan("pro"));
    /// assert_eq!(ctx.caller(), Some("alice"));
    /// assert_eq!(ctx.extension::<Plan>().map(|p| p.0), Some("pro"));
    /// ```
    ///
    /// # Panics
    /// On a context that was cloned, or that a server made: set these on a
    /// fresh [`Ctx::detached`].
    pub fn with_caller(mut self, id: impl Into<String>) -> Ctx {
        let caller = self
            .detached_parts()
            .caller
            .get_or_insert_with(Arc::default);
        Arc::make_mut(caller).id = Some(id.into().into_boxed_str());
        self
    }

    /// A detached context whose caller carries `value` among its extensions
    /// (see [`Ctx::extension`]); for unit tests.
    ///
    /// # Panics
    /// As [`Ctx::with_caller`].
    pub fn with_extension<T: Clone + Send + Sync + 'static>(mut self, value: T) -> Ctx {
        let caller = self
            .detached_parts()
            .caller
            .get_or_insert_with(Arc::default);
        Arc::make_mut(caller).extensions.insert(value);
        self
    }

    /// A detached context that sees `state` as a server's tasks see what
    /// [`Registry::with_state`](crate::Registry::with_state) holds; for unit tests.
    ///
    /// ```
    /// # use std::sync::atomic::{AtomicU64, Ordering};
    /// # use taskwire::Ctx;
    /// #[derive(Default)]
    /// struct Hits(AtomicU64);
    ///
    /// let ctx = Ctx::detached("hit").with_state(Hits::default());
    /// ctx.state::<Hits>().unwrap().0.fetch_add(1, Ordering::Relaxed);
    /// assert_eq!(ctx.state::<Hits>().unwrap().0.load(Ordering::Relaxed), 1);
    /// ```
    ///
    /// # Panics
    /// As [`Ctx::with_caller`].
    pub fn with_state<S: Send + Sync + 'static>(mut self, state: S) -> Ctx {
        let states = self.detached_parts().state.get_or_insert_with(Arc::default);
        Arc::make_mut(states).insert(Arc::new(state));
        self
    }

    /// Who is calling: the identity the connect hook gave this task's
    /// connection (a user id, a subject; `token#<n>` for the `n`-th
    /// configured token, from 0), or `None` for an anonymous connection.
    pub fn caller(&self) -> Option<&str> {
        self.shared.caller.as_ref()?.id.as_deref()
    }

    /// The typed values the connect hook attached to this task's connection
    /// (empty for an anonymous one).
    pub fn extensions(&self) -> &Extensions {
        match &self.shared.caller {
            Some(c) => &c.extensions,
            None => &NO_EXTENSIONS,
        }
    }

    /// One value the connect hook attached, by type.
    pub fn extension<T: Send + Sync + 'static>(&self) -> Option<&T> {
        self.extensions().get::<T>()
    }

    /// The registry's shared state of type `S`
    /// ([`Registry::with_state`](crate::Registry::with_state)).
    ///
    /// A missing type is a programming error, answered as an internal error
    /// (`-32603`) that names the type; use `?`.
    pub fn state<S: Send + Sync + 'static>(&self) -> Result<Arc<S>, TaskError> {
        self.shared
            .state
            .as_ref()
            .and_then(|s| s.get::<Arc<S>>())
            .cloned()
            .ok_or_else(|| {
                TaskError::Internal(format!(
                    "no shared state of type {}: add it with Registry::with_state",
                    std::any::type_name::<S>()
                ))
            })
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

pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// The task's future with stop and panic handling: what runs on either executor.
pub(crate) async fn guarded<F>(task: Arc<TaskShared>, fut: F) -> Outcome
where
    F: Future<Output = TaskOutput>,
{
    let stop = task.token.clone();
    tokio::select! {
        biased;
        _ = stop.cancelled() => {
            Outcome::Err(task.stopped().unwrap_or(Stopped::Cancelled).into())
        }
        r = std::panic::AssertUnwindSafe(fut).catch_unwind() => match r {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => Outcome::Err(e),
            Err(p) => Outcome::Crashed(panic_message(&*p)),
        },
    }
}

/// Resolves once the task is told to stop, firing the deadline itself.
pub(crate) async fn stop_signal(task: &TaskShared) -> Stopped {
    match task.deadline {
        Some(d) => {
            tokio::select! {
                _ = task.token.cancelled() => {}
                _ = tokio::time::sleep_until(d.into()) => { task.stop(Stopped::DeadlineExceeded); }
            }
        }
        None => task.token.cancelled().await,
    }
    task.stopped().unwrap_or(Stopped::Cancelled)
}

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

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn any_error_converts_with_its_sources() {
        fn io() -> Result<(), TaskError> {
            Err(std::io::Error::other("disk on fire"))?;
            Ok(())
        }
        let e = io().unwrap_err();
        assert_eq!(e.code(), codes::INTERNAL_ERROR);
        assert_eq!(e.to_error_object(None).message, "disk on fire");
        let e = TaskError::from(Outer(std::io::Error::other("inner")));
        assert_eq!(e.to_string(), "outer: inner");
        let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(Stopped::Shutdown);
        assert_eq!(TaskError::from_boxed(boxed).code(), codes::SHUTTING_DOWN);
        let boxed: Box<dyn std::error::Error + Send + Sync> = "plain".into();
        assert_eq!(TaskError::from_boxed(boxed).to_string(), "plain");
        let e = TaskError::from(Outer(std::io::Error::other("x".repeat(10_000))));
        assert!(e.to_string().len() <= MAX_CHAIN_BYTES + '…'.len_utf8());
    }

    #[test]
    fn a_stop_keeps_its_code() {
        fn stop() -> Result<(), TaskError> {
            Err(Stopped::Killed)?;
            Ok(())
        }
        let e = stop().unwrap_err();
        assert!(matches!(e, TaskError::Stopped(Stopped::Killed)));
        assert_eq!(e.code(), codes::KILLED);
        // Neither a chosen code nor data overrides the stop's own.
        let e = Err::<(), _>(Stopped::DeadlineExceeded)
            .code(-32050)
            .unwrap_err();
        assert_eq!(e.code(), codes::DEADLINE_EXCEEDED);
        let e = TaskError::Stopped(Stopped::Cancelled).with_data(Value::Null);
        assert_eq!(e.code(), codes::CANCELLED);
    }

    #[test]
    fn a_chosen_code_and_data() {
        let e = "x".parse::<u64>().code(-32050).unwrap_err();
        let o = e.to_error_object(None);
        assert_eq!(
            (o.code, o.message.as_str()),
            (-32050, "invalid digit found in string")
        );
        let o = TaskError::invalid_params("`n` too large")
            .with_data(serde_json::json!({"max": 93}))
            .to_error_object(None);
        assert_eq!(o.code, codes::INVALID_PARAMS);
        assert_eq!(o.message, "invalid params: `n` too large");
        assert_eq!(o.data, Some(serde_json::json!({"max": 93})));
        let o = TaskError::failed(-32051, "no")
            .with_code(-32052)
            .to_error_object(None);
        assert_eq!((o.code, o.message.as_str()), (-32052, "no"));
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
