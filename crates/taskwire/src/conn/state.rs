//! What a connection's parts share: its identity, counters, in-flight table,
//! outbound budget and the channel to its writer. Only what more than one of
//! the reader, the writer, the tasks and the admin view touch lives here; the
//! reader keeps its own rate limits and shutdown flag.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::close_code;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::RateLimit;
use crate::protocol::{self, codes, ErrorObject, Id};
use crate::session::{Attachment, Inflight, Owner, Responded, Session, SessionStore};
use crate::sync::{lock, Outbox, PushError};
use crate::task::{CallerInfo, Outbound, Stopped, TaskShared};

/// The limits of one connection: the server's, or those its connect hook
/// gave (a token's own limits, for one).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ConnLimits {
    pub max_inflight: usize,
    pub rate: Option<RateLimit>,
}

/// Why a task was not entered in the in-flight table.
pub(super) enum Refused {
    /// Answered with this error.
    Answer(ErrorObject),
    /// The connection's session was resumed on another connection while this
    /// one still read: the request is dropped unanswered, as if the cut had
    /// come before it (the client re-sends it on the new connection).
    Superseded,
}

/// The state of one connection, shared by its reader, writer, tasks and the admin view.
pub(crate) struct ConnState {
    pub id: u64,
    pub peer: SocketAddr,
    /// Who is calling, shared with every task it starts (`None`: anonymous).
    pub caller: Option<Arc<CallerInfo>>,
    pub opened_at: SystemTime,
    pub opened: Instant,
    pub(super) tx: Arc<Outbox<Outbound>>,
    /// The tasks in flight: made at the first task (an idle connection holds
    /// no table), or taken over from the session this connection resumes.
    pub(super) inflight: OnceLock<Arc<Mutex<Inflight>>>,
    /// The session this connection opened or resumed.
    pub(super) session: OnceLock<Arc<Session>>,
    pub(super) sessions: Arc<SessionStore>,
    /// Who the upgrade said the client is: a resume must match it.
    pub(super) owner: Owner,
    /// The client closed with 1000: its session ends instead of detaching.
    pub(super) closed_normally: AtomicBool,
    pub cpu_admitted: Arc<AtomicUsize>,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_in: AtomicU64,
    pub messages_out: AtomicU64,
    /// Fired to make the connection close (admin, slow consumer, heartbeat).
    pub closing: CancellationToken,
    pub(super) close_reason: Mutex<Option<(u16, &'static str)>>,
    /// Heartbeat pings sent since the client last answered (a Pong or a text
    /// frame; a client's own Ping is no answer).
    pub(super) missed_pongs: AtomicU32,
    /// Requests admitted whose answer is not yet queued for the writer, and
    /// the signal that it fell to zero.
    pub(super) unanswered: AtomicUsize,
    pub(super) answered: Notify,
    pub(super) write_timeout: Duration,
    /// Bytes of replies queued for the writer, bytes of answers kept by
    /// unfinished batches, and the most the two may hold together.
    pub(super) queued_bytes: AtomicUsize,
    pub(super) kept_bytes: AtomicUsize,
    /// The same bytes summed over every connection, and the most they may be.
    pub(super) total_bytes: Arc<AtomicUsize>,
    pub(super) total_limit: usize,
    pub(super) outbound_bytes: usize,
    /// Batch elements answered whose batch's answer is not yet sent: each
    /// holds an in-flight place, as a running task does.
    pub(super) held: AtomicUsize,
    /// Signalled when the writer has drained what it could.
    pub(super) drained: Notify,
    pub(super) max_inflight: usize,
}

impl ConnState {
    /// Messages waiting for the writer.
    pub(crate) fn outbound_depth(&self) -> usize {
        self.tx.len()
    }

    pub(crate) fn inflight_len(&self) -> usize {
        self.inflight.get().map_or(0, |t| lock(t).tasks.len())
    }

    /// The tasks of this connection (for the admin view).
    pub(crate) fn tasks(&self) -> Vec<Arc<TaskShared>> {
        self.inflight
            .get()
            .map(|t| lock(t).tasks.values().cloned().collect())
            .unwrap_or_default()
    }

    pub(crate) fn task(&self, id: u64) -> Option<Arc<TaskShared>> {
        self.inflight
            .get()
            .and_then(|t| lock(t).tasks.get(&id).cloned())
    }

    /// The in-flight table, made on first use.
    pub(super) fn table(&self) -> &Arc<Mutex<Inflight>> {
        self.inflight.get_or_init(Arc::default)
    }

    /// The session, if this connection opened or resumed one.
    pub(super) fn session(&self) -> Option<&Arc<Session>> {
        self.session.get()
    }

    /// A numbered response: through the session when there is one (which
    /// keeps it until acknowledged, and sends it to whichever connection is
    /// attached now); `false` when there is no session.
    ///
    /// `done`: the tasks this answers, which leave the session's table as
    /// its answer enters the session's buffer (see [`Session::respond`]).
    pub(super) fn respond_in_session(
        &self,
        text: &mut Option<String>,
        id: Option<&Id>,
        done: &[Arc<TaskShared>],
    ) -> bool {
        let Some(session) = self.session.get() else {
            return false;
        };
        match text.take() {
            Some(t) => {
                if let Responded::KeptDetached =
                    session.respond(t, id, &self.sessions.dropped, done)
                {
                    self.sessions.account(session);
                }
            }
            None => {
                for task in done {
                    session.forget_task(task);
                }
            }
        }
        true
    }

    /// Asks the connection to close with this code (first reason wins).
    pub(crate) fn close_with(&self, code: u16, reason: &'static str) {
        lock(&self.close_reason).get_or_insert((code, reason));
        self.closing.cancel();
    }

    /// The in-flight task answering the request with this id.
    pub(super) fn task_by_request(&self, id: &Id) -> Option<Arc<TaskShared>> {
        let m = lock(self.inflight.get()?);
        m.ids.get(id).and_then(|t| m.tasks.get(t)).cloned()
    }

    /// Enters a task in the in-flight table: refused for a duplicate id, or
    /// when the tasks and the batch elements held reach the in-flight limit.
    pub(super) fn insert(&self, task: &Arc<TaskShared>) -> Result<(), Refused> {
        let mut m = lock(self.table());
        if m.writer != 0 && m.writer != self.id {
            return Err(Refused::Superseded);
        }
        if task
            .request_id
            .as_ref()
            .is_some_and(|rid| m.ids.contains_key(rid))
        {
            return Err(Refused::Answer(ErrorObject::invalid_request(
                "duplicate id: a request with this id is still in flight",
            )));
        }
        if m.tasks.len() + self.held.load(Ordering::Acquire) >= self.max_inflight {
            return Err(Refused::Answer(ErrorObject::overloaded(
                crate::observe::RefusalReason::ConnectionInflight.label(),
                100,
            )));
        }
        m.tasks.insert(task.id, task.clone());
        if let Some(rid) = &task.request_id {
            m.ids.insert(rid.clone(), task.id);
        }
        Ok(())
    }

    pub(super) fn remove(&self, task: &TaskShared) {
        let Some(table) = self.inflight.get() else {
            return;
        };
        let mut m = lock(table);
        m.tasks.remove(&task.id);
        if let Some(rid) = &task.request_id {
            if m.ids.get(rid) == Some(&task.id) {
                m.ids.remove(rid);
            }
        }
    }

    /// One admitted request has been answered.
    pub(super) fn answered_one(&self) {
        if self.unanswered.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.answered.notify_waiters();
        }
    }

    /// Resolves once every admitted request has been answered.
    pub(super) async fn all_answered(&self) {
        loop {
            let answered = self.answered.notified();
            if self.unanswered.load(Ordering::Acquire) == 0 {
                return;
            }
            answered.await;
        }
    }

    pub(super) fn stop_all(&self, why: Stopped) {
        for t in self.tasks() {
            t.stop(why);
        }
    }

    /// Queues text for the writer. Waits at most `write_timeout` for room: a
    /// client that does not read its replies is closed, not buffered for.
    pub(super) async fn send(&self, text: String) {
        self.send_outbound(Outbound::Text(text)).await
    }

    pub(super) async fn send_outbound(&self, msg: Outbound) {
        let n = outbound_len(&msg);
        // The common case neither waits nor allocates. Only a client that
        // does not keep up makes an answer wait, and that wait is boxed:
        // inlined, its timers would sit in every connection's reader future
        // (which holds the deepest `send` it may await) and cost each idle
        // connection about a KiB.
        if n == 0 || self.reserve(n) {
            if let Err(msg) = self.try_hand_over(msg) {
                Box::pin(self.wait_to_push(msg)).await;
            }
            return;
        }
        Box::pin(self.wait_for_room(msg, n)).await;
    }

    /// Waits (at most `write_timeout`) for `n` bytes of the budget, then queues:
    /// the queue is bounded in bytes as well as messages, so a client that does
    /// not read cannot pin more than `outbound_bytes` of replies.
    async fn wait_for_room(&self, msg: Outbound, n: usize) {
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
        self.push(msg).await;
    }

    /// Hands a message whose bytes are already counted to the writer.
    pub(super) async fn push(&self, msg: Outbound) {
        if let Err(msg) = self.try_hand_over(msg) {
            Box::pin(self.wait_to_push(msg)).await;
        }
    }

    /// Queues a message if the channel has room; gives it back when full.
    fn try_hand_over(&self, msg: Outbound) -> Result<(), Outbound> {
        match self.tx.try_push(msg) {
            Ok(()) => Ok(()),
            Err(PushError::Closed(msg)) => {
                self.forget(&msg);
                Ok(())
            }
            Err(PushError::Full(msg)) => Err(msg),
        }
    }

    /// A counted message that will never be written (the writer is gone, or
    /// it waited too long): its bytes leave the budgets.
    pub(super) fn forget(&self, msg: &Outbound) {
        self.forget_bytes(outbound_len(msg));
    }

    pub(super) fn forget_bytes(&self, n: usize) {
        if n > 0 {
            self.queued_bytes.fetch_sub(n, Ordering::AcqRel);
            self.give_total(n);
        }
    }

    /// Waits (at most `write_timeout`) for room in a full channel.
    async fn wait_to_push(&self, msg: Outbound) {
        let n = outbound_len(&msg);
        match tokio::time::timeout(self.write_timeout, self.tx.push(msg)).await {
            Ok(Ok(())) => {}
            Ok(Err(msg)) => self.forget(&msg),
            Err(_) => {
                self.forget_bytes(n);
                self.close_with(close_code::POLICY, "slow consumer");
            }
        }
    }

    /// Takes `n` bytes of the outbound budget. A message still goes when the
    /// queue is empty, so that answers kept by a batch waiting on a long task
    /// never starve the connection's other answers (nor close it as a slow
    /// consumer): what waits is bounded by the budget plus one answer.
    /// The server-wide budget applies to every message, so that what all
    /// connections pin together stays bounded.
    pub(super) fn reserve(&self, n: usize) -> bool {
        if !self.take_total(n) {
            return false;
        }
        let kept = self.kept_bytes.load(Ordering::Acquire);
        let ok = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |cur| {
                (cur == 0 || cur + kept + n <= self.outbound_bytes).then_some(cur + n)
            })
            .is_ok();
        if !ok {
            self.give_total(n);
        }
        ok
    }

    /// Takes `n` bytes of the server-wide outbound budget if it has room.
    fn take_total(&self, n: usize) -> bool {
        self.total_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
                (t + n <= self.total_limit).then_some(t + n)
            })
            .is_ok()
    }

    /// Gives `n` bytes back to the server-wide budget.
    pub(super) fn give_total(&self, n: usize) {
        self.total_bytes.fetch_sub(n, Ordering::AcqRel);
    }

    /// Counts `n` bytes in the server-wide budget without asking (an answer
    /// that cannot wait: at most one per request).
    pub(super) fn overdraw_total(&self, n: usize) {
        self.total_bytes.fetch_add(n, Ordering::AcqRel);
    }

    /// Keeps `n` bytes of a batch's answer if the budget has room; never waits.
    pub(super) fn keep(&self, n: usize) -> bool {
        if !self.take_total(n) {
            return false;
        }
        let queued = self.queued_bytes.load(Ordering::Acquire);
        let ok = self
            .kept_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |k| {
                (queued + k + n <= self.outbound_bytes).then_some(k + n)
            })
            .is_ok();
        if !ok {
            self.give_total(n);
        }
        ok
    }

    pub(super) fn try_send(&self, text: String) {
        // The drop path cannot wait: it overdraws the budget rather than lose
        // an answer, and the message bound still holds.
        self.queued_bytes.fetch_add(text.len(), Ordering::AcqRel);
        self.overdraw_total(text.len());
        self.try_push(text);
    }

    pub(super) fn try_push(&self, text: String) {
        match self.tx.try_push(Outbound::Text(text)) {
            Ok(()) => {}
            Err(PushError::Closed(msg)) => self.forget(&msg),
            Err(PushError::Full(msg)) => {
                self.forget(&msg);
                self.close_with(close_code::POLICY, "slow consumer");
            }
        }
    }

    /// An answer larger than the whole outbound budget is replaced by a short
    /// error: no single message is larger than the budget, which is what lets
    /// the WebSocket's write buffer be capped.
    pub(super) fn fit(&self, text: String, id: Option<&Id>) -> String {
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
}

impl Attachment for ConnState {
    fn conn_id(&self) -> u64 {
        self.id
    }

    fn push_text(&self, text: String) {
        self.try_send(text);
    }

    fn close(&self, code: u16, reason: &'static str) {
        self.close_with(code, reason);
    }
}

/// The bytes a message counts for in the outbound budgets (progress is
/// rendered late and counted by the writer's own bound instead).
pub(super) fn outbound_len(msg: &Outbound) -> usize {
    match msg {
        Outbound::Text(t) => t.len(),
        Outbound::Progress(_) => 0,
    }
}
