//! One WebSocket connection: a reader that only parses, admits and dispatches,
//! a single writer fed by one bounded channel, and the in-flight table.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::compute::{JobState, Permit};
use crate::config::RateLimit;
use crate::observe::RefusalReason;
use crate::protocol::{self, codes, ErrorObject, Frame, Id, Rejected, Request};
use crate::security::TokenBucket;
use crate::server::App;
use crate::task::{
    stopped_error, Ctx, Outbound, Outcome, Stopped, TaskError, TaskInit, TaskKind, TaskShared,
};

/// How long a stopped CPU task gets to reach its next checkpoint before its
/// request is answered anyway (it keeps its not-yielding flag in the table).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Most messages the writer gathers before a flush.
const MAX_BATCH: usize = 64;

/// The limits of one connection: the server's, or those of the token it presented.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    pub max_inflight: usize,
    pub rate: Option<RateLimit>,
}

#[derive(Default)]
struct Inflight {
    tasks: HashMap<u64, Arc<TaskShared>>,
    ids: HashMap<Id, u64>,
}

/// The state of one connection, shared by its reader, writer, tasks and the admin view.
pub(crate) struct ConnState {
    pub id: u64,
    pub peer: SocketAddr,
    pub opened_at: SystemTime,
    pub opened: Instant,
    tx: mpsc::Sender<Outbound>,
    inflight: Mutex<Inflight>,
    pub cpu_admitted: Arc<AtomicUsize>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Fired to make the connection close (admin, slow consumer, heartbeat).
    pub closing: CancellationToken,
    close_reason: Mutex<Option<(u16, &'static str)>>,
    /// Heartbeat pings sent since the client last answered (a Pong or a text
    /// frame; a client's own Ping is no answer).
    missed_pongs: AtomicU32,
    /// Requests admitted whose answer is not yet queued for the writer, and
    /// the signal that it fell to zero.
    unanswered: AtomicUsize,
    answered: Notify,
    write_timeout: Duration,
    /// Bytes of replies queued for the writer, bytes of answers kept by
    /// unfinished batches, and the most the two may hold together.
    queued_bytes: AtomicUsize,
    kept_bytes: AtomicUsize,
    outbound_bytes: usize,
    /// Batch elements answered whose batch's answer is not yet sent: each
    /// holds an in-flight place, as a running task does.
    held: AtomicUsize,
    max_batch: usize,
    /// Signalled when the writer has drained what it could.
    drained: Notify,
    shutting_down: AtomicBool,
    max_inflight: usize,
    /// The request rate limit; only the reader touches it.
    bucket: Mutex<Option<TokenBucket>>,
}

impl ConnState {
    /// Messages waiting for the writer.
    pub fn outbound_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn inflight_len(&self) -> usize {
        self.inflight.lock().map(|m| m.tasks.len()).unwrap_or(0)
    }

    /// The tasks of this connection (for the admin view).
    pub fn tasks(&self) -> Vec<Arc<TaskShared>> {
        self.inflight
            .lock()
            .map(|m| m.tasks.values().cloned().collect())
            .unwrap_or_default()
    }

    pub fn task(&self, id: u64) -> Option<Arc<TaskShared>> {
        self.inflight.lock().ok()?.tasks.get(&id).cloned()
    }

    /// Asks the connection to close with this code (first reason wins).
    pub fn close_with(&self, code: u16, reason: &'static str) {
        if let Ok(mut r) = self.close_reason.lock() {
            r.get_or_insert((code, reason));
        }
        self.closing.cancel();
    }

    fn remove(&self, task: &TaskShared) {
        if let Ok(mut m) = self.inflight.lock() {
            m.tasks.remove(&task.id);
            if let Some(rid) = &task.request_id {
                if m.ids.get(rid) == Some(&task.id) {
                    m.ids.remove(rid);
                }
            }
        }
    }

    /// One request's worth of the rate limit, or how long until there is one.
    fn take_rate_token(&self) -> Result<(), Duration> {
        match self.bucket.lock() {
            Ok(mut b) => match b.as_mut() {
                Some(b) => b.take(Instant::now()),
                None => Ok(()),
            },
            // A poisoned lock means a panic elsewhere; do not refuse for it.
            Err(_) => Ok(()),
        }
    }

    /// The answer to a frame refused by the rate limit.
    fn rate_limited(app: &App, wait: Duration) -> ErrorObject {
        app.hooks.refused(RefusalReason::RateLimited);
        let retry = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
        ErrorObject::overloaded(RefusalReason::RateLimited.label(), retry)
    }

    /// One admitted request has been answered.
    fn answered_one(&self) {
        if self.unanswered.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answered.notify_waiters();
        }
    }

    /// Resolves once every admitted request has been answered.
    async fn all_answered(&self) {
        loop {
            let answered = self.answered.notified();
            if self.unanswered.load(Ordering::Acquire) == 0 {
                return;
            }
            answered.await;
        }
    }

    fn stop_all(&self, why: Stopped) {
        for t in self.tasks() {
            t.stop(why);
        }
    }

    /// Queues text for the writer. Waits at most `write_timeout` for room: a
    /// client that does not read its replies is closed, not buffered for.
    async fn send(&self, text: String) {
        self.send_outbound(Outbound::Text(text)).await
    }

    async fn send_outbound(&self, msg: Outbound) {
        let n = match &msg {
            Outbound::Text(t) => t.len(),
            Outbound::Progress(_) => 0,
        };
        if n > 0 {
            // The queue is bounded in bytes as well as messages: a client that
            // does not read cannot pin more than `outbound_bytes` of replies.
            let room = async {
                loop {
                    let drained = self.drained.notified();
                    if self.reserve(n) {
                        return;
                    }
                    drained.await;
                }
            };
            if tokio::time::timeout(self.write_timeout, room)
                .await
                .is_err()
            {
                self.close_with(close_code::POLICY, "slow consumer");
                return;
            }
        }
        self.push(msg).await;
    }

    /// Hands a message whose bytes are already counted to the writer.
    async fn push(&self, msg: Outbound) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(msg)) => {
                if tokio::time::timeout(self.write_timeout, self.tx.send(msg))
                    .await
                    .is_err()
                {
                    self.close_with(close_code::POLICY, "slow consumer");
                }
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Takes `n` bytes of the outbound budget. A message still goes when the
    /// queue is empty, so that answers kept by a batch waiting on a long task
    /// never starve the connection's other answers (nor close it as a slow
    /// consumer): what waits is bounded by the budget plus one answer.
    fn reserve(&self, n: usize) -> bool {
        let kept = self.kept_bytes.load(Ordering::Acquire);
        self.queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == 0 || cur + kept + n <= self.outbound_bytes).then_some(cur + n)
            })
            .is_ok()
    }

    /// Keeps `n` bytes of a batch's answer if the budget has room; never waits.
    fn keep(&self, n: usize) -> bool {
        let queued = self.queued_bytes.load(Ordering::Acquire);
        self.kept_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                (queued + k + n <= self.outbound_bytes).then_some(k + n)
            })
            .is_ok()
    }

    fn try_send(&self, text: String) {
        // The drop path cannot wait: it overdraws the budget rather than lose
        // an answer, and the message bound still holds.
        self.queued_bytes.fetch_add(text.len(), Ordering::AcqRel);
        self.try_push(text);
    }

    fn try_push(&self, text: String) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Outbound::Text(text)) {
            self.close_with(close_code::POLICY, "slow consumer");
        }
    }

    /// An answer larger than the whole outbound budget is replaced by a short
    /// error: no single message is larger than the budget, which is what lets
    /// the WebSocket's write buffer be capped.
    fn fit(&self, text: String, id: Option<&Id>) -> String {
        if text.len() <= self.outbound_bytes {
            return text;
        }
        protocol::error_text(
            id,
            &ErrorObject::new(
                codes::INTERNAL_ERROR,
                "internal error: answer dropped: too large",
            ),
        )
    }

    /// Takes `n` tokens of the request rate limit, one at a time: `None` when
    /// there is no limit, else for each token whether it was there (or how
    /// long until one is).
    fn take_rate(&self, need: &[bool]) -> Option<Vec<Result<(), Duration>>> {
        let mut guard = self.bucket.lock().ok()?;
        let bucket = guard.as_mut()?;
        let now = Instant::now();
        Some(
            need.iter()
                .map(|&n| if n { bucket.take(now) } else { Ok(()) })
                .collect(),
        )
    }
}

/// Collects the answers of one batch and sends them as one array.
///
/// Until that array is sent, every element holds an in-flight place of its
/// connection (`held`) and every answer kept counts against the outbound
/// budget (`kept_bytes`): a batch waiting on one long task cannot pin more
/// than the budget however many quick elements it holds.
struct Batch {
    len: usize,
    slots: Mutex<Vec<Option<String>>>,
    remaining: AtomicUsize,
    /// Bytes of the answers kept so far.
    kept: AtomicUsize,
}

impl Batch {
    fn new(len: usize) -> Arc<Batch> {
        Arc::new(Batch {
            len,
            slots: Mutex::new(vec![None; len]),
            remaining: AtomicUsize::new(len),
            kept: AtomicUsize::new(0),
        })
    }

    /// Keeps one element's answer; returns the array text when it was the
    /// last, its bytes already counted in the connection's queued bytes.
    fn fill(
        &self,
        conn: &ConnState,
        index: usize,
        text: Option<String>,
        id: Option<&Id>,
    ) -> Option<String> {
        conn.held.fetch_add(1, Ordering::AcqRel);
        let text = text.map(|t| {
            if conn.keep(t.len()) {
                return t;
            }
            let short = protocol::error_text(
                id,
                &ErrorObject::new(
                    codes::INTERNAL_ERROR,
                    "internal error: answer dropped: batch too large",
                ),
            );
            // A short error overdraws the budget: at most one per element.
            conn.kept_bytes.fetch_add(short.len(), Ordering::AcqRel);
            short
        });
        if let Some(t) = &text {
            self.kept.fetch_add(t.len(), Ordering::AcqRel);
        }
        if let Ok(mut slots) = self.slots.lock() {
            if let Some(slot) = slots.get_mut(index) {
                *slot = text;
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let slots = self
            .slots
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        let kept = self.kept.load(Ordering::Acquire);
        let mut out = None;
        if slots.iter().any(Option::is_some) {
            let mut all = String::with_capacity(kept + self.len + 2);
            all.push('[');
            for part in slots.into_iter().flatten() {
                if all.len() > 1 {
                    all.push(',');
                }
                all.push_str(&part);
            }
            all.push(']');
            // The kept bytes become queued bytes: the answer is already paid for.
            conn.queued_bytes.fetch_add(all.len(), Ordering::AcqRel);
            out = Some(all);
        }
        // A batch of notifications is answered with nothing.
        conn.kept_bytes.fetch_sub(kept, Ordering::AcqRel);
        conn.held.fetch_sub(self.len, Ordering::AcqRel);
        out
    }
}

/// Where a request's answer goes.
#[derive(Clone)]
enum Dest {
    Direct,
    Batch(Arc<Batch>, usize),
}

impl Dest {
    async fn deliver(&self, conn: &ConnState, text: Option<String>, id: Option<&Id>) {
        match self {
            Dest::Direct => {
                if let Some(t) = text {
                    conn.send(conn.fit(t, id)).await;
                }
            }
            Dest::Batch(b, i) => {
                if let Some(all) = b.fill(conn, *i, text, id) {
                    conn.push(Outbound::Text(all)).await;
                }
            }
        }
    }

    fn try_deliver(&self, conn: &ConnState, text: Option<String>, id: Option<&Id>) {
        match self {
            Dest::Direct => {
                if let Some(t) = text {
                    conn.try_send(conn.fit(t, id));
                }
            }
            Dest::Batch(b, i) => {
                if let Some(all) = b.fill(conn, *i, text, id) {
                    conn.try_push(all);
                }
            }
        }
    }
}

/// The answer to one request: sent exactly once, on every path. [`Reply::finish`]
/// sends it; if the reply is dropped unsent (its task was lost), `Drop` answers.
pub(crate) struct Reply {
    app: Arc<App>,
    conn: Arc<ConnState>,
    task: Arc<TaskShared>,
    dest: Dest,
    done: bool,
}

impl Reply {
    /// Takes the task out of the tables and renders its answer.
    fn settle(&mut self, outcome: &Outcome) -> Option<String> {
        self.done = true;
        self.conn.remove(&self.task);
        // A task lost because the server is going away is answered as
        // stopped by the shutdown: count it as it is answered.
        let shutdown = Outcome::Err(TaskError::Stopped(Stopped::Shutdown));
        let outcome = match outcome {
            Outcome::Lost if self.app.shutdown.is_cancelled() => &shutdown,
            o => o,
        };
        self.app.hooks.task_finished(&self.task, outcome.kind());
        let id = self.task.request_id.as_ref()?;
        let t = &self.task;
        Some(match outcome {
            Outcome::Ok(v) => protocol::success_text(id, v),
            Outcome::Err(e) => protocol::error_text(Some(id), &e.to_error_object(t.timeout_ms)),
            Outcome::Crashed(msg) => protocol::error_text(
                Some(id),
                &ErrorObject::new(codes::CRASHED, format!("task crashed: {msg}")),
            ),
            Outcome::Lost => protocol::error_text(
                Some(id),
                &ErrorObject::new(codes::INTERNAL_ERROR, "internal error: the task was lost"),
            ),
        })
    }

    async fn finish(mut self, outcome: Outcome) {
        // The latest progress must reach the client before the response.
        if self.task.close_progress() {
            self.conn
                .send_outbound(Outbound::Progress(self.task.clone()))
                .await;
        }
        let text = self.settle(&outcome);
        let id = self.task.request_id.as_ref();
        self.dest.deliver(&self.conn, text, id).await;
        self.conn.answered_one();
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let text = self.settle(&Outcome::Lost);
        self.dest
            .try_deliver(&self.conn, text, self.task.request_id.as_ref());
        self.conn.answered_one();
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic".to_string()
    }
}

/// The task's future with stop and panic handling: what runs on either executor.
async fn guarded(task: Arc<TaskShared>, fut: crate::registry::TaskFuture) -> Outcome {
    let stop = task.token.clone();
    tokio::select! {
        biased;
        _ = stop.cancelled() => {
            Outcome::Err(task.stopped().unwrap_or(Stopped::Cancelled).into())
        }
        r = AssertUnwindSafe(fut).catch_unwind() => match r {
            Ok(Ok(v)) => Outcome::Ok(v),
            Ok(Err(e)) => Outcome::Err(e),
            Err(p) => Outcome::Crashed(panic_message(&*p)),
        },
    }
}

/// Resolves once the task is told to stop, firing the deadline itself.
async fn stop_signal(task: &TaskShared) -> Stopped {
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

async fn supervise(
    app: Arc<App>,
    reply: Reply,
    fut: crate::registry::TaskFuture,
    permit: Option<Permit>,
) {
    let task = reply.task.clone();
    let outcome = match permit {
        None => {
            task.stats.set_state(JobState::Running);
            tokio::select! {
                biased;
                out = guarded(task.clone(), fut) => out,
                why = stop_signal(&task) => Outcome::Err(why.into()),
            }
        }
        Some(permit) => {
            let mut handle = app
                .pool
                .spawn(
                    task.conn,
                    task.stats.clone(),
                    permit,
                    guarded(task.clone(), fut),
                )
                .fallible();
            tokio::select! {
                biased;
                out = &mut handle => out.unwrap_or(Outcome::Lost),
                why = stop_signal(&task) => {
                    // A queued job is dropped at once; a running one stops at its
                    // next checkpoint. Either way the CPU is released before we answer,
                    // unless the task never reaches a checkpoint.
                    match tokio::time::timeout(STOP_GRACE, handle.cancel()).await {
                        Ok(Some(out)) => out,
                        _ => Outcome::Err(why.into()),
                    }
                }
            }
        }
    };
    reply.finish(outcome).await;
}

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn serve(app: Arc<App>, socket: WebSocket, peer: SocketAddr, limits: ConnLimits) {
    let id = app.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("conn", id, %peer);
    async move {
        let (tx, rx) = mpsc::channel(app.cfg.outbound_queue);
        let conn = Arc::new(ConnState {
            id,
            peer,
            opened_at: SystemTime::now(),
            opened: Instant::now(),
            tx,
            inflight: Mutex::new(Inflight::default()),
            cpu_admitted: Arc::new(AtomicUsize::new(0)),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            closing: CancellationToken::new(),
            close_reason: Mutex::new(None),
            missed_pongs: AtomicU32::new(0),
            unanswered: AtomicUsize::new(0),
            answered: Notify::new(),
            write_timeout: app.cfg.write_timeout,
            queued_bytes: AtomicUsize::new(0),
            kept_bytes: AtomicUsize::new(0),
            outbound_bytes: app.cfg.outbound_bytes,
            held: AtomicUsize::new(0),
            max_batch: app.cfg.max_batch,
            drained: Notify::new(),
            shutting_down: AtomicBool::new(false),
            max_inflight: limits.max_inflight,
            bucket: Mutex::new(limits.rate.map(|r| TokenBucket::new(r, Instant::now()))),
        });
        app.hooks.conn_opened(&conn);
        tracing::debug!("connection opened");
        let (sink, stream) = socket.split();
        let writer = tokio::spawn(
            writer(app.clone(), conn.clone(), sink, rx).instrument(tracing::Span::current()),
        );
        reader(&app, &conn, stream).await;
        // Links: when the connection goes, its work goes.
        conn.stop_all(Stopped::Disconnected);
        conn.closing.cancel();
        let _ = writer.await;
        // Stay in the live table (and hold the connection's slot) until every
        // task has settled, so that what a closed connection still costs stays
        // visible; bounded, as a task that never yields is answered after STOP_GRACE.
        let _ = tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), conn.all_answered())
            .await;
        app.hooks.conn_closed(&conn);
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await
}

async fn reader(app: &Arc<App>, conn: &Arc<ConnState>, mut stream: SplitStream<WebSocket>) {
    let shutdown = app.shutdown.clone();
    // Every Ping makes the WebSocket layer queue a Pong: pings beyond this
    // rate are a flood no error can answer.
    let mut pings = TokenBucket::new(app.cfg.ping_rate(), Instant::now());
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let msg = tokio::select! {
            biased;
            _ = conn.closing.cancelled() => return,
            _ = shutdown.cancelled(), if grace.is_none() => {
                conn.shutting_down.store(true, Ordering::Relaxed);
                grace = Some(tokio::time::Instant::now() + app.cfg.shutdown_grace);
                continue;
            }
            // Shutting down: leave as soon as nothing is in flight, or when
            // the grace period ends.
            _ = async {
                match grace {
                    Some(g) => {
                        let _ = tokio::time::timeout_at(g, conn.all_answered()).await;
                    }
                    None => std::future::pending::<()>().await,
                }
            } => {
                shutdown_connection(conn).await;
                return;
            }
            m = stream.next() => m,
        };
        let msg = match msg {
            None => return,
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                if let Some((code, reason)) = close_for(e) {
                    conn.close_with(code, reason);
                }
                return;
            }
        };
        match msg {
            Message::Text(text) => {
                conn.missed_pongs.store(0, Ordering::Relaxed);
                conn.bytes_in
                    .fetch_add(text.len() as u64, Ordering::Relaxed);
                conn.messages_in.fetch_add(1, Ordering::Relaxed);
                handle_text(app, conn, text.as_str()).await;
            }
            Message::Binary(b) => {
                conn.bytes_in.fetch_add(b.len() as u64, Ordering::Relaxed);
                let err = match conn.take_rate_token() {
                    Ok(()) => ErrorObject::invalid_request("binary frames are not supported"),
                    Err(wait) => ConnState::rate_limited(app, wait),
                };
                conn.send(protocol::error_text(None, &err)).await;
            }
            Message::Ping(_) => {
                if pings.take(Instant::now()).is_err() {
                    conn.close_with(close_code::POLICY, "ping rate limit");
                    return;
                }
            }
            Message::Pong(_) => conn.missed_pongs.store(0, Ordering::Relaxed),
            Message::Close(_) => return,
        }
    }
}

/// Answers what is still running with -32005 and closes with 1001.
async fn shutdown_connection(conn: &Arc<ConnState>) {
    conn.stop_all(Stopped::Shutdown);
    let _ =
        tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), conn.all_answered()).await;
    conn.close_with(close_code::AWAY, "server shutting down");
}

/// The close code for what the WebSocket layer refused to read; `None` when
/// the peer is gone and there is nobody to tell.
fn close_for(e: axum::Error) -> Option<(u16, &'static str)> {
    let inner = e.into_inner();
    match inner.downcast_ref::<tungstenite::Error>()? {
        tungstenite::Error::Capacity(_) => Some((close_code::SIZE, "message too big")),
        tungstenite::Error::Utf8(_) => Some((close_code::INVALID, "text frame is not UTF-8")),
        tungstenite::Error::Protocol(_) => Some((close_code::PROTOCOL, "protocol violation")),
        _ => None,
    }
}

/// A cancel only ever frees resources: the rate limit does not count it.
fn rate_exempt(r: &Result<Request<'_>, Rejected>) -> bool {
    matches!(r, Ok(req) if req.method == protocol::CANCEL_METHOD)
}

async fn handle_text(app: &Arc<App>, conn: &Arc<ConnState>, text: &str) {
    // The rate limit counts every element and every frame, invalid ones
    // included, before anything is answered: what a client can make the
    // server parse, check and answer is bounded by the rate, not by its input.
    match protocol::parse_frame_limited(text, conn.max_batch) {
        Frame::Invalid(err) => {
            let err = match conn.take_rate_token() {
                Ok(()) => err,
                Err(wait) => ConnState::rate_limited(app, wait),
            };
            conn.send(protocol::error_text(None, &err)).await
        }
        Frame::Single(r) => {
            if !rate_exempt(&r) {
                if let Err(wait) = conn.take_rate_token() {
                    let err = ConnState::rate_limited(app, wait);
                    let (id, silent) = match &r {
                        Ok(req) => (req.id.as_ref(), req.id.is_none()),
                        Err(rej) => (rej.id.as_ref(), rej.notification),
                    };
                    if !silent {
                        conn.send(protocol::error_text(id, &err)).await;
                    }
                    return;
                }
            }
            handle_one(app, conn, r, Dest::Direct).await
        }
        Frame::Batch(items) => {
            let need: Vec<bool> = items.iter().map(|r| !rate_exempt(r)).collect();
            let taken = conn.take_rate(&need);
            if let Some(taken) = &taken {
                // A batch that finds the bucket empty gets one error, not one
                // per element: a flood of batches is answered frame for frame.
                let refused_all = need.iter().any(|&n| n)
                    && need.iter().zip(taken).all(|(&n, t)| !n || t.is_err());
                if refused_all {
                    let wait = taken
                        .iter()
                        .find_map(|t| t.err())
                        .unwrap_or(Duration::from_millis(1));
                    let err = ConnState::rate_limited(app, wait);
                    conn.send(protocol::error_text(None, &err)).await;
                    return;
                }
            }
            let batch = Batch::new(items.len());
            for (i, r) in items.into_iter().enumerate() {
                let dest = Dest::Batch(batch.clone(), i);
                match taken.as_ref().and_then(|t| t.get(i)) {
                    Some(Err(wait)) => {
                        let err = ConnState::rate_limited(app, *wait);
                        let (id, silent) = match &r {
                            Ok(req) => (req.id.clone(), req.id.is_none()),
                            Err(rej) => (rej.id.clone(), rej.notification),
                        };
                        let text = (!silent).then(|| protocol::error_text(id.as_ref(), &err));
                        dest.deliver(conn, text, id.as_ref()).await;
                    }
                    _ => handle_one(app, conn, r, dest).await,
                }
            }
        }
    }
}

async fn handle_one(
    app: &Arc<App>,
    conn: &Arc<ConnState>,
    r: Result<Request<'_>, Rejected>,
    dest: Dest,
) {
    let req = match r {
        Ok(req) => req,
        Err(rej) => {
            let text =
                (!rej.notification).then(|| protocol::error_text(rej.id.as_ref(), &rej.error));
            dest.deliver(conn, text, rej.id.as_ref()).await;
            return;
        }
    };
    let answer = |err: ErrorObject| {
        req.id
            .as_ref()
            .map(|id| protocol::error_text(Some(id), &err))
    };
    let rid = req.id.as_ref();
    match req.method.as_str() {
        protocol::CANCEL_METHOD => {
            let id = req.id.clone();
            if let Some(target) = protocol::cancel_target(req.params) {
                let task = conn
                    .inflight
                    .lock()
                    .ok()
                    .and_then(|m| m.ids.get(&target).and_then(|t| m.tasks.get(t)).cloned());
                if let Some(t) = task {
                    t.stop(Stopped::Cancelled);
                }
            }
            // Sent as a request by mistake: it still gets exactly one answer.
            let text = id.and_then(|id| {
                let null = RawValue::from_string("null".to_string()).ok()?;
                Some(protocol::success_text(&id, &null))
            });
            dest.deliver(conn, text, rid).await;
            return;
        }
        // The protocol's heartbeat: answered here, whatever tasks exist.
        protocol::PING_METHOD => {
            let text = rid.and_then(|id| {
                let empty = RawValue::from_string("{}".to_string()).ok()?;
                Some(protocol::success_text(id, &empty))
            });
            dest.deliver(conn, text, rid).await;
            return;
        }
        protocol::DISCOVER_METHOD => {
            let text = rid.map(|id| protocol::success_text(id, &app.discover));
            dest.deliver(conn, text, rid).await;
            return;
        }
        _ => {}
    }
    let Some(def) = app.registry.get(&req.method) else {
        let text = answer(ErrorObject::method_not_found(&req.method));
        dest.deliver(conn, text, rid).await;
        return;
    };
    if conn.shutting_down.load(Ordering::Relaxed) {
        let text = answer(stopped_error(Stopped::Shutdown, None));
        dest.deliver(conn, text, rid).await;
        return;
    }
    let timeout_ms = req
        .meta
        .timeout_ms
        .unwrap_or(u64::MAX)
        .min(app.cfg.max_task_timeout.as_millis() as u64);
    let task = TaskShared::new(TaskInit {
        id: app.next_task.fetch_add(1, Ordering::Relaxed),
        conn: conn.id,
        request_id: req.id.clone(),
        method: def.name.clone(),
        kind: def.kind,
        timeout_ms: Some(timeout_ms),
        progress_token: req.meta.progress_token,
        outbound: conn.tx.clone(),
    });
    let ctx = Ctx {
        shared: task.clone(),
    };
    let fut = match (def.call)(ctx, req.params) {
        Ok(f) => f,
        Err(err) => {
            let text = answer(err);
            dest.deliver(conn, text, rid).await;
            return;
        }
    };
    // Admission: the connection's in-flight limit, then the pool's queues.
    let refused = match conn.inflight.lock() {
        Err(_) => Some(ErrorObject::new(codes::INTERNAL_ERROR, "internal error")),
        Ok(mut m) => {
            if req.id.as_ref().is_some_and(|rid| m.ids.contains_key(rid)) {
                Some(ErrorObject::invalid_request(
                    "duplicate id: a request with this id is still in flight",
                ))
            } else if m.tasks.len() + conn.held.load(Ordering::Acquire) >= conn.max_inflight {
                Some(ErrorObject::overloaded(
                    RefusalReason::ConnectionInflight.label(),
                    100,
                ))
            } else {
                m.tasks.insert(task.id, task.clone());
                if let Some(rid) = &req.id {
                    m.ids.insert(rid.clone(), task.id);
                }
                None
            }
        }
    };
    if let Some(err) = refused {
        if err.code == codes::OVERLOADED {
            app.hooks.refused(RefusalReason::ConnectionInflight);
        }
        let text = answer(err);
        dest.deliver(conn, text, rid).await;
        return;
    }
    let permit = match def.kind {
        TaskKind::Io => None,
        TaskKind::Cpu => match app.pool.admit_from(&conn.cpu_admitted, conn.peer.ip()) {
            Ok(p) => Some(p),
            Err(refusal) => {
                conn.remove(&task);
                let reason = RefusalReason::from(&refusal);
                app.hooks.refused(reason);
                let text = answer(ErrorObject::overloaded(
                    reason.label(),
                    refusal.retry_after_ms(),
                ));
                dest.deliver(conn, text, rid).await;
                return;
            }
        },
    };
    conn.unanswered.fetch_add(1, Ordering::AcqRel);
    let reply = Reply {
        app: app.clone(),
        conn: conn.clone(),
        task: task.clone(),
        dest,
        done: false,
    };
    let mut fut = fut;
    if permit.is_none() {
        // One poll in place: an instant I/O task (echo, a lookup in memory) is
        // answered without a spawn, a timer or a task switch. A task that is
        // not ready at once moves to a task of its own, which polls it again
        // straight away, so the no-op waker used here is never relied on.
        if let Some(outcome) = poll_once(&mut fut) {
            reply.finish(outcome).await;
            return;
        }
    }
    let span = tracing::debug_span!("task", id = task.id, method = %task.method);
    tokio::spawn(supervise(app.clone(), reply, fut, permit).instrument(span));
}

/// Polls a task once, catching a panic; `None` while it is pending.
fn poll_once(fut: &mut crate::registry::TaskFuture) -> Option<Outcome> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(std::task::Poll::Pending) => None,
        Ok(std::task::Poll::Ready(Ok(v))) => Some(Outcome::Ok(v)),
        Ok(std::task::Poll::Ready(Err(e))) => Some(Outcome::Err(e)),
        Err(p) => Some(Outcome::Crashed(panic_message(&*p))),
    }
}

async fn writer(
    app: Arc<App>,
    conn: Arc<ConnState>,
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
) {
    let mut ping = tokio::time::interval_at(
        tokio::time::Instant::now() + app.cfg.ping_interval,
        app.cfg.ping_interval,
    );
    let timeout = app.cfg.write_timeout;
    loop {
        let first = tokio::select! {
            biased;
            m = rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
            _ = conn.closing.cancelled() => {
                // Flush what is already queued (the answers of a shutdown), then close.
                while let Ok(m) = rx.try_recv() {
                    if let Some(msg) = render(&conn, m) {
                        if tokio::time::timeout(timeout, sink.feed(msg)).await.is_err() {
                            return;
                        }
                    }
                }
                send_close(&conn, &mut sink, timeout).await;
                return;
            }
            _ = ping.tick() => {
                if conn.missed_pongs.fetch_add(1, Ordering::Relaxed) >= 2 {
                    conn.close_with(close_code::AWAY, "heartbeat timeout");
                    continue;
                }
                // A full write buffer fails the ping at once (it holds the
                // pongs of a client that does not read): a slow consumer too.
                let sent = tokio::time::timeout(timeout, sink.send(Message::Ping(Default::default()))).await;
                if !matches!(sent, Ok(Ok(()))) {
                    conn.close_with(close_code::POLICY, "slow consumer");
                }
                continue;
            }
        };
        // Write everything that is ready, then flush once: one send(2) for many
        // replies, and one deadline for the whole batch rather than a timer each.
        let batch = async {
            let mut next = Some(first);
            let mut n = 0;
            while let Some(m) = next.take() {
                if let Some(msg) = render(&conn, m) {
                    sink.feed(msg).await?;
                }
                n += 1;
                if n < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            conn.drained.notify_waiters();
            sink.flush().await
        };
        match tokio::time::timeout(timeout, batch).await {
            Ok(Ok(())) => {}
            // The peer is gone (nobody reads the close), or the write buffer
            // is full of what the client did not read: a slow consumer.
            Ok(Err(_)) | Err(_) => {
                conn.close_with(close_code::POLICY, "slow consumer");
                send_close(&conn, &mut sink, timeout).await;
                return;
            }
        }
    }
    conn.closing.cancel();
}

/// Sends the close frame with the first reason given (bounded by the write
/// timeout: a client that reads nothing does not hold the connection open).
async fn send_close(conn: &ConnState, sink: &mut SplitSink<WebSocket, Message>, timeout: Duration) {
    conn.closing.cancel();
    let (code, reason) = conn
        .close_reason
        .lock()
        .ok()
        .and_then(|r| *r)
        .unwrap_or((close_code::AWAY, "closing"));
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(timeout, sink.send(Message::Close(Some(frame)))).await;
}

fn render(conn: &ConnState, m: Outbound) -> Option<Message> {
    let text = match m {
        Outbound::Text(t) => {
            conn.queued_bytes.fetch_sub(t.len(), Ordering::AcqRel);
            t
        }
        // A progress value larger than the whole budget is dropped: no single
        // message may outgrow the WebSocket's capped write buffer.
        Outbound::Progress(task) => task
            .take_progress_text()
            .filter(|t| t.len() <= conn.outbound_bytes)?,
    };
    conn.bytes_out
        .fetch_add(text.len() as u64, Ordering::Relaxed);
    conn.messages_out.fetch_add(1, Ordering::Relaxed);
    Some(Message::Text(text.into()))
}
