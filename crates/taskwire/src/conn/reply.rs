//! Where an answer goes and how it is made exactly once: a [`Reply`] per
//! admitted request answers on every path (finished, failed, panicked,
//! stopped, or dropped unsent); a [`Batch`] gathers its elements' answers into
//! one array within the connection's outbound budget; [`supervise`] runs a task
//! to its outcome on Tokio or on the compute pool.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tracing::{Instrument, Level};

use super::state::ConnState;
use super::STOP_GRACE;
use crate::app::App;
use crate::compute::{task_event, JobState, Permit};
use crate::protocol::{self, codes, ErrorObject, Id};
use crate::registry::TaskFuture;
use crate::sync::lock;
use crate::task::{
    guarded, panic_message, stop_signal, Outbound, Outcome, Stopped, TaskError, TaskShared,
};

/// Collects the answers of one batch and sends them as one array.
///
/// Until that array is sent, every element holds an in-flight place of its
/// connection (`held`) and every answer kept counts against the outbound
/// budget (`kept_bytes`): a batch waiting on one long task cannot pin more
/// than the budget however many quick elements it holds.
pub(super) struct Batch {
    len: usize,
    slots: Mutex<Vec<Option<String>>>,
    remaining: AtomicUsize,
    /// Bytes of the answers kept so far.
    kept: AtomicUsize,
    /// In a session, the elements' tasks: they leave the session's table
    /// when the array is kept, not one by one (a resume in between would see
    /// an element neither in flight nor answered).
    done: Mutex<Vec<Arc<TaskShared>>>,
}

impl Batch {
    pub(super) fn new(len: usize) -> Arc<Batch> {
        Arc::new(Batch {
            len,
            slots: Mutex::new(vec![None; len]),
            remaining: AtomicUsize::new(len),
            kept: AtomicUsize::new(0),
            done: Mutex::new(Vec::new()),
        })
    }

    /// In a session, keeps an element's task in the table until the array is
    /// kept (see `done`).
    fn hold(&self, conn: &ConnState, task: Option<&Arc<TaskShared>>) {
        if let (Some(t), Some(_)) = (task, conn.session()) {
            lock(&self.done).push(t.clone());
        }
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
            conn.overdraw_total(short.len());
            short
        });
        if let Some(t) = &text {
            self.kept.fetch_add(t.len(), Ordering::AcqRel);
        }
        if let Some(slot) = lock(&self.slots).get_mut(index) {
            *slot = text;
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 {
            return None;
        }
        let slots = std::mem::take(&mut *lock(&self.slots));
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
            conn.overdraw_total(all.len());
            out = Some(all);
        }
        // A batch of notifications is answered with nothing.
        conn.kept_bytes.fetch_sub(kept, Ordering::AcqRel);
        conn.give_total(kept);
        conn.held.fetch_sub(self.len, Ordering::AcqRel);
        out
    }
}

/// Where a request's answer goes.
#[derive(Clone)]
pub(super) enum Dest {
    Direct,
    Batch(Arc<Batch>, usize),
}

impl Dest {
    pub(super) async fn deliver(&self, conn: &ConnState, text: Option<String>, id: Option<&Id>) {
        self.deliver_for(conn, text, id, None).await
    }

    /// Delivers the answer of `done` (taken out of a session's table as its
    /// answer is kept; see [`Reply::settle`]).
    async fn deliver_for(
        &self,
        conn: &ConnState,
        text: Option<String>,
        id: Option<&Id>,
        done: Option<&Arc<TaskShared>>,
    ) {
        match self {
            Dest::Direct => {
                let mut text = text.map(|t| conn.fit(t, id));
                let done = done.map(std::slice::from_ref).unwrap_or(&[]);
                if conn.respond_in_session(&mut text, id, done) {
                    return;
                }
                if let Some(t) = text {
                    conn.send(t).await;
                }
            }
            Dest::Batch(b, i) => {
                b.hold(conn, done);
                if let Some(all) = b.fill(conn, *i, text, id) {
                    if let Some(all) = batch_in_session(conn, b, all) {
                        conn.push(Outbound::Text(all)).await;
                    }
                }
            }
        }
    }

    fn try_deliver(
        &self,
        conn: &ConnState,
        text: Option<String>,
        id: Option<&Id>,
        done: Option<&Arc<TaskShared>>,
    ) {
        match self {
            Dest::Direct => {
                let mut text = text.map(|t| conn.fit(t, id));
                if conn.respond_in_session(
                    &mut text,
                    id,
                    done.map(std::slice::from_ref).unwrap_or(&[]),
                ) {
                    return;
                }
                if let Some(t) = text {
                    conn.try_send(t);
                }
            }
            Dest::Batch(b, i) => {
                b.hold(conn, done);
                if let Some(all) = b.fill(conn, *i, text, id) {
                    if let Some(all) = batch_in_session(conn, b, all) {
                        conn.try_push(all);
                    }
                }
            }
        }
    }
}

/// A batch's answer on a connection with a session goes through the session
/// as one numbered frame (its bytes, counted as queued by the batch, are
/// counted again when the session queues it); without one it comes back.
fn batch_in_session(conn: &ConnState, batch: &Batch, all: String) -> Option<String> {
    if conn.session().is_none() {
        return Some(all);
    }
    conn.forget_bytes(all.len());
    let mut text = Some(all);
    let done = std::mem::take(&mut *lock(&batch.done));
    conn.respond_in_session(&mut text, None, &done);
    None
}

/// The answer to one request: sent exactly once, on every path. [`Reply::finish`]
/// sends it; if the reply is dropped unsent (its task was lost), `Drop` answers.
pub(super) struct Reply {
    pub(super) app: Arc<App>,
    pub(super) conn: Arc<ConnState>,
    pub(super) task: Arc<TaskShared>,
    pub(super) dest: Dest,
    pub(super) done: bool,
}

impl Reply {
    /// Takes the task out of the tables and renders its answer.
    fn settle(&mut self, outcome: &Outcome) -> Option<String> {
        self.done = true;
        // In a session, an answer takes its task out of the table as it is
        // kept (the session's lock makes the two one step for a resume).
        if self.conn.session().is_none() {
            self.conn.remove(&self.task);
        }
        // A task lost because the server is going away is answered as
        // stopped by the shutdown: count it as it is answered.
        let shutdown = Outcome::Err(TaskError::Stopped(Stopped::Shutdown));
        let outcome = match outcome {
            Outcome::Lost if self.app.shutdown.is_cancelled() => &shutdown,
            o => o,
        };
        self.app.hooks.task_finished(&self.task, outcome.kind());
        log_outcome(&self.task, outcome);
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

    pub(super) async fn finish(mut self, outcome: Outcome) {
        // The latest progress must reach the client before the response: in
        // a session, on whichever connection is attached now.
        if self.conn.session().is_some() {
            self.task.flush_progress();
        } else if self.task.close_progress() {
            self.conn
                .send_outbound(Outbound::Progress(self.task.clone()))
                .await;
        }
        let text = self.settle(&outcome);
        let id = self.task.request_id.as_ref();
        self.dest
            .deliver_for(&self.conn, text, id, Some(&self.task))
            .await;
        self.conn.answered_one();
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let text = self.settle(&Outcome::Lost);
        self.dest.try_deliver(
            &self.conn,
            text,
            self.task.request_id.as_ref(),
            Some(&self.task),
        );
        self.conn.answered_one();
    }
}

/// Logs the outcomes an operator wants to hear of, naming the task. A crash
/// is logged here, where it is certain (a panic caught and turned into
/// `-32003`), rather than by a panic hook, which would also see panics
/// caught and recovered elsewhere; a hook can tell a task's panic by
/// [`crate::current_task`] and stay quiet. A kill is logged where the
/// operator asks for it.
fn log_outcome(task: &TaskShared, outcome: &Outcome) {
    let Some(l) = task.stats.label() else {
        return;
    };
    match outcome {
        Outcome::Crashed(msg) => {
            task_event!(Level::WARN, l, "task crashed: {}", protocol::log_text(msg));
        }
        Outcome::Err(TaskError::Stopped(Stopped::DeadlineExceeded)) => {
            task_event!(
                Level::INFO,
                l,
                timeout_ms = task.timeout_ms,
                "task timed out"
            );
        }
        Outcome::Lost => task_event!(Level::WARN, l, "task lost"),
        _ => {}
    }
}

/// A CPU task that may run on another node: its params as received, their
/// bytes counted against the connection's outbound budget until it ends.
pub(super) struct Offload {
    #[cfg(feature = "cluster")]
    params: crate::cluster::WireParams,
    /// A WebAssembly task's module hash.
    #[cfg(feature = "cluster")]
    module: Option<String>,
    bytes: usize,
    conn: Arc<ConnState>,
}

impl Offload {
    /// Keeps the params of a CPU task, if the server is in a cluster and the
    /// connection's budget has room (else the task runs here only).
    #[cfg(feature = "cluster")]
    pub(super) fn keep(
        app: &App,
        conn: &Arc<ConnState>,
        params: &crate::protocol::Params<'_>,
        module: Option<String>,
    ) -> Option<Offload> {
        app.cluster.as_ref()?;
        let params = crate::cluster::keep_params(params);
        let bytes = params.bytes();
        if !conn.keep(bytes) {
            return None;
        }
        Some(Offload {
            params,
            module,
            bytes,
            conn: conn.clone(),
        })
    }

    /// Without the `cluster` feature a task runs here only.
    #[cfg(not(feature = "cluster"))]
    pub(super) fn keep(
        _: &App,
        _: &Arc<ConnState>,
        _: &crate::protocol::Params<'_>,
        _: Option<String>,
    ) -> Option<Offload> {
        None
    }
}

impl Drop for Offload {
    fn drop(&mut self) {
        self.conn.kept_bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.conn.give_total(self.bytes);
    }
}

/// Waits for a stopped local job to let go of its worker, within `STOP_GRACE`.
async fn stop_local<T>(
    task: &TaskShared,
    handle: async_task::FallibleTask<T, Arc<crate::compute::JobMeta>>,
    why: Stopped,
    out: impl FnOnce(T) -> Option<Outcome>,
) -> Outcome {
    match tokio::time::timeout(STOP_GRACE, handle.cancel()).await {
        Ok(Some(o)) => out(o).unwrap_or(Outcome::Err(why.into())),
        Ok(None) => Outcome::Err(why.into()),
        Err(_) => {
            if let Some(l) = task.stats.label() {
                task_event!(
                    Level::WARN,
                    l,
                    stop = %why,
                    "task answered as stopped, but it has not reached a checkpoint and still holds a worker"
                );
            }
            Outcome::Err(why.into())
        }
    }
}

/// A CPU task in a cluster: queued here, and offered to a peer if it waits
/// past `cluster_offload_ms`; whichever side wins its claim runs it. The
/// permit (the connection's and the pool's slots) is held here for as long
/// as the task runs, wherever it runs.
#[cfg(feature = "cluster")]
async fn supervise_clustered(
    app: &Arc<App>,
    cluster: &Arc<crate::cluster::Cluster>,
    task: &Arc<TaskShared>,
    fut: TaskFuture,
    permit: Permit,
    offload: Offload,
) -> Outcome {
    let def = app.registry.get(&task.method);
    let idempotent = def.is_some_and(|d| d.is_idempotent());
    let mut outcome = place_and_run(app, cluster, task, fut, &offload).await;
    // An idempotent task whose node was lost runs once more, on another
    // node or here; nothing else is ever run twice.
    if idempotent && crate::cluster::is_node_lost(&outcome) && task.stopped().is_none() {
        let again = def.and_then(|d| {
            offload.params.call(
                d,
                crate::task::Ctx {
                    shared: task.clone(),
                },
            )
        });
        if let Some(fut) = again {
            if let Some(l) = task.stats.label() {
                task_event!(
                    Level::INFO,
                    l,
                    "its node was lost: running it again (idempotent)"
                );
            }
            outcome = place_and_run(app, cluster, task, fut, &offload).await;
        }
    }
    drop(permit);
    drop(offload);
    outcome
}

/// One placement of a clustered task: here, or on the peer that takes it.
#[cfg(feature = "cluster")]
async fn place_and_run(
    app: &Arc<App>,
    cluster: &Arc<crate::cluster::Cluster>,
    task: &Arc<TaskShared>,
    fut: TaskFuture,
    offload: &Offload,
) -> Outcome {
    use crate::compute::{Claim, Claimed};
    let claim = Arc::new(Claim::default());
    let job = Claimed::new(claim.clone(), guarded(task.clone(), fut));
    let mut handle = {
        // A local worker is free: the task is this node's. Checked and
        // queued as one step, so that two tasks do not both see the one
        // free worker.
        let _placing = cluster.placing();
        if app.pool.spare() > 0 {
            claim.take_local();
        } else if cluster.can_offer() {
            // No local worker is free: for `cluster_offload_ms` the task
            // waits for a peer rather than for a slice here. Held before it
            // is queued: a worker's next time slice could otherwise start it
            // before the offer is made, and a started task never leaves.
            claim.hold();
        }
        app.pool
            .spawn(task.conn, task.stats.clone(), None, job)
            .fallible()
    };
    let remote = cluster.offload(
        task,
        &claim,
        &offload.params,
        offload.module.as_deref(),
        task.conn,
    );
    tokio::pin!(remote);
    let mut remote_live = true;
    {
        loop {
            tokio::select! {
                biased;
                out = &mut handle => break match out {
                    Some(Some(o)) => o,
                    // A peer won the claim: its outcome comes from the offload.
                    Some(None) if remote_live => (&mut remote).await.unwrap_or(Outcome::Lost),
                    _ => Outcome::Lost,
                },
                out = &mut remote, if remote_live => match out {
                    Some(o) => break o,
                    None => remote_live = false,
                },
                // While a peer has it (or is being offered it) the offload
                // carries the stop to the peer and returns its answer.
                why = stop_signal(task), if !claim.is_remote() || !remote_live => {
                    if claim.take_local() {
                        break stop_local(task, handle, why, |o| o).await;
                    }
                }
            }
        }
    }
}

async fn supervise(
    app: Arc<App>,
    reply: Reply,
    fut: TaskFuture,
    permit: Option<Permit>,
    offload: Option<Offload>,
) {
    let task = reply.task.clone();
    #[cfg(feature = "cluster")]
    if let (Some(cluster), Some(offload)) = (app.cluster.clone(), offload) {
        if let Some(permit) = permit {
            let outcome = supervise_clustered(&app, &cluster, &task, fut, permit, offload).await;
            reply.finish(outcome).await;
            return;
        }
    }
    #[cfg(not(feature = "cluster"))]
    drop(offload);
    let outcome = match permit {
        None => {
            task.stats.set_state(JobState::Running);
            // Memory is attributed to an I/O task as to a CPU task: what
            // each poll allocates and frees counts for the task.
            let mut run = std::pin::pin!(guarded(task.clone(), fut));
            let attributed = std::future::poll_fn(|cx| {
                let _entered = task.stats.enter();
                std::future::Future::poll(run.as_mut(), cx)
            });
            tokio::select! {
                biased;
                out = attributed => out,
                why = stop_signal(&task) => Outcome::Err(why.into()),
            }
        }
        Some(permit) => {
            let mut handle = app
                .pool
                .spawn(
                    reply.conn.charge().0,
                    task.stats.clone(),
                    permit,
                    guarded(task.clone(), fut),
                )
                .fallible();
            tokio::select! {
                biased;
                out = &mut handle => out.unwrap_or(Outcome::Lost),
                // A queued job is dropped at once; a running one stops at its
                // next checkpoint. Either way the CPU is released before we answer,
                // unless the task never reaches a checkpoint.
                why = stop_signal(&task) => stop_local(&task, handle, why, Some).await,
            }
        }
    };
    reply.finish(outcome).await;
}

/// Runs an admitted task: an I/O task is polled once in place (an instant
/// one, such as `echo`, is answered without a spawn), anything else continues
/// on a Tokio task of its own that answers when it ends.
pub(super) async fn start(
    app: &Arc<App>,
    conn: &Arc<ConnState>,
    task: Arc<TaskShared>,
    mut fut: TaskFuture,
    permit: Option<Permit>,
    offload: Option<Offload>,
    dest: Dest,
) {
    conn.unanswered.fetch_add(1, Ordering::AcqRel);
    let reply = Reply {
        app: app.clone(),
        conn: conn.clone(),
        task: task.clone(),
        dest,
        done: false,
    };
    if permit.is_none() {
        // A task that is not ready at once moves to a task of its own, which
        // polls it again straight away, so the no-op waker used here is never
        // relied on.
        if let Some(outcome) = poll_once(&mut fut, &task) {
            reply.finish(outcome).await;
            return;
        }
    }
    let span = tracing::debug_span!("task", id = task.id, method = %task.method);
    tokio::spawn(supervise(app.clone(), reply, fut, permit, offload).instrument(span));
}

/// Polls a task once, catching a panic; `None` while it is pending.
fn poll_once(fut: &mut TaskFuture, task: &TaskShared) -> Option<Outcome> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    let _entered = task.stats.enter();
    match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(&mut cx))) {
        Ok(std::task::Poll::Pending) => None,
        Ok(std::task::Poll::Ready(Ok(v))) => Some(Outcome::Ok(v)),
        Ok(std::task::Poll::Ready(Err(e))) => Some(Outcome::Err(e)),
        Err(p) => Some(Outcome::Crashed(panic_message(&*p))),
    }
}
