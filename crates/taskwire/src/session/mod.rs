//! Sessions: the unit of delivery moves from the socket to the session.
//!
//! A connection that opens a session numbers its responses (here, in
//! [`Session::respond`], under the session's lock, in the order they are
//! queued for the writer, which is the order it sends them) and keeps each
//! one until the client acknowledges it. When the connection ends in any way
//! but a client's close 1000, the session detaches: its tasks go on (their
//! table lives here, not in the connection), their responses are kept, within
//! the session's buffer, for the session's window. A resume on a new
//! connection swaps in the new writer, replays what the client has not seen,
//! and the numbering goes on.
//!
//! Bounds: each session's buffer (bytes and responses); detached sessions and
//! the bytes they hold, per client address and in all, the oldest ending
//! early at a bound. Tokens are random (the OS source), kept only as SHA-256
//! hashes, compared in constant time and never logged.
//!
//! Lock order: the store, then a session. [`Session::respond`] takes the
//! session's lock alone, and reports to the store after releasing it.

pub mod frames;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use subtle::ConstantTimeEq;

use crate::protocol::{self, codes, ErrorObject, Id};
use crate::sync::lock;
use crate::task::{Stopped, TaskShared};
use frames::SECRET_BYTES;

/// The close code for a connection whose session was resumed elsewhere.
pub(crate) const CLOSE_RESUMED_ELSEWHERE: u16 = 4001;

/// The tasks in flight of a connection, or of its session across
/// connections: by task id, and request id to task id (ids are unique among
/// the requests still in flight).
#[derive(Default)]
pub(crate) struct Inflight {
    pub(crate) tasks: HashMap<u64, Arc<TaskShared>>,
    pub(crate) ids: HashMap<Id, u64>,
    /// For a session's table, the connection that may add to it (0: any).
    /// A resume moves it under this lock, so that a request the old
    /// connection was still reading can never start after the resume's
    /// `inflight` list was made (the client would send it again).
    pub(crate) writer: u64,
}

/// The connection a session is attached to, as the session sees it.
pub(crate) trait Attachment: Send + Sync {
    /// The connection's id.
    fn conn_id(&self) -> u64;
    /// Queues a frame for the writer without waiting (the session's buffer
    /// already bounds what an attached client can leave unread).
    fn push_text(&self, text: String);
    /// Closes the connection with this code.
    fn close(&self, code: u16, reason: &'static str);
}

/// Who may resume a session: what the upgrade established about the caller.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Owner(Arc<str>);

/// The session owner's key, from what the upgrade gives: the caller's
/// identity as the connect hook named it (`token#i` for the built-in token
/// check; none for an anonymous caller) and the page's Origin (if any). The
/// one place that says what "the same credentials" means for a resume.
pub(crate) fn owner_key(identity: Option<&str>, origin: Option<&str>) -> Owner {
    // Lengths first, so that no identity and origin can be cut to look like
    // another pair.
    let (id, o) = (identity.unwrap_or(""), origin.unwrap_or(""));
    Owner(
        format!(
            "{}:{}:{id}{}:{o}",
            u8::from(identity.is_some()),
            id.len(),
            u8::from(origin.is_some())
        )
        .into(),
    )
}

/// Every bound of the store (the settings of the same names).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bounds {
    pub window: Duration,
    pub buffer_bytes: usize,
    pub buffer_responses: usize,
    pub detached_per_ip: usize,
    pub bytes_per_ip: usize,
    pub detached_total: usize,
    pub bytes_total: usize,
}

/// Whether a session is attached to a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum SessionState {
    /// A connection is attached.
    Attached,
    /// Waiting for its client to resume.
    Detached,
}

/// One session, as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionInfo {
    /// The session's id.
    pub id: u64,
    /// Attached or detached.
    pub state: SessionState,
    /// The connection attached, if any.
    pub conn: Option<u64>,
    /// The client's address group.
    pub peer: String,
    /// When it was opened (ms since the Unix epoch).
    pub opened_at_ms: u64,
    /// When it detached (ms since the Unix epoch), if it is detached.
    pub detached_at_ms: Option<u64>,
    /// Responses kept (unacknowledged).
    pub buffered_responses: usize,
    /// Bytes of the responses kept.
    pub buffered_bytes: usize,
    /// Tasks in flight.
    pub tasks: usize,
    /// The session's window, in milliseconds.
    pub window_ms: u64,
}

/// Counters of what sessions went through (for the admin API and metrics).
#[derive(Clone, Copy, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SessionCounts {
    /// Sessions opened.
    pub opened: u64,
    /// Connections that ended with their session detached.
    pub detached: u64,
    /// Successful resumes.
    pub resumed: u64,
    /// Resumes refused (`-32020`).
    pub refused: u64,
    /// Sessions whose window ran out.
    pub expired: u64,
    /// Detached sessions ended early at a bound of the store.
    pub evicted: u64,
    /// Sessions ended by the client (close 1000) or by an operator.
    pub ended: u64,
    /// Responses replaced by `-32021` because the buffer was full.
    pub dropped: u64,
    /// Sessions open now (attached or detached).
    pub open: u64,
    /// Detached sessions now.
    pub detached_now: u64,
    /// Bytes held by detached sessions now.
    pub detached_bytes: u64,
}

struct Inner {
    attached: Option<Arc<dyn Attachment>>,
    /// When it detached, and the detach's generation (its expiry timer's key).
    detached: Option<(Instant, SystemTime)>,
    generation: u64,
    ended: bool,
    token_hash: [u8; 32],
    /// The number of the last response numbered.
    seq: u64,
    buffer: VecDeque<(u64, String)>,
    bytes: usize,
    /// The bytes this session counts for in the store's detached totals.
    accounted: usize,
    /// The window's timer while detached: aborted by a resume or an end, so
    /// that a session resumed a thousand times holds no thousand sleepers.
    timer: Option<tokio::task::AbortHandle>,
}

/// One session: its tasks, its buffer of unacknowledged responses, its
/// attachment.
pub(crate) struct Session {
    pub(crate) id: u64,
    owner: Owner,
    group: IpAddr,
    window: Duration,
    opened_at: SystemTime,
    buffer_bytes: usize,
    buffer_responses: usize,
    /// The session's tasks, across its connections.
    pub(crate) table: Arc<Mutex<Inflight>>,
    inner: Mutex<Inner>,
}

fn hash(secret: &[u8; SECRET_BYTES]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A fresh secret from the operating system's random source.
fn new_secret() -> Result<[u8; SECRET_BYTES], getrandom::Error> {
    let mut s = [0u8; SECRET_BYTES];
    getrandom::fill(&mut s)?;
    Ok(s)
}

/// How [`Session::respond`] went, for the store's accounting.
pub(crate) enum Responded {
    /// Kept (and sent, if attached).
    Kept,
    /// Kept while detached: the store's totals must be brought up to date.
    KeptDetached,
    /// The session is over: nobody will ever read it.
    Gone,
}

impl Session {
    /// Numbers a response, keeps it until acknowledged, and sends it if a
    /// connection is attached. A response that does not fit the buffer is
    /// replaced by a short `-32021` for its id: every request is still
    /// answered exactly once, and the buffer passes its bound by at most one
    /// short error per request in flight. An attached client whose
    /// unacknowledged responses pass the buffer does not read: it is closed
    /// (1008) and the session detaches.
    ///
    /// `done` are the tasks this answers (a batch's array answers several), taken out of the session's table
    /// under the same lock: a resume then sees it either still in flight or
    /// among the kept responses, never neither (the client would send it
    /// again) nor both.
    pub(crate) fn respond(
        &self,
        text: String,
        id: Option<&Id>,
        dropped: &AtomicU64,
        done: &[Arc<TaskShared>],
    ) -> Responded {
        let mut s = lock(&self.inner);
        for task in done {
            self.forget_task(task);
        }
        if s.ended {
            return Responded::Gone;
        }
        let fits =
            s.buffer.len() < self.buffer_responses && s.bytes + text.len() <= self.buffer_bytes;
        let text = if fits {
            text
        } else {
            dropped.fetch_add(1, Ordering::Relaxed);
            // One response larger than the whole buffer is no sign of a
            // client that does not read; unacknowledged ones piling up are.
            if let (Some(a), false) = (&s.attached, s.buffer.is_empty()) {
                a.close(axum::extract::ws::close_code::POLICY, "session buffer full");
            }
            protocol::error_text(
                id,
                &ErrorObject::with_data(
                    codes::RESULT_DROPPED,
                    "result dropped: the session's buffer was full while the client was away",
                    serde_json::json!({ "bytes": text.len() }),
                ),
            )
        };
        s.seq += 1;
        let seq = s.seq;
        s.bytes += text.len();
        match &s.attached {
            Some(a) => {
                let a = a.clone();
                s.buffer.push_back((seq, text.clone()));
                a.push_text(text);
                Responded::Kept
            }
            None => {
                s.buffer.push_back((seq, text));
                Responded::KeptDetached
            }
        }
    }

    /// Takes a finished task out of the session's table.
    pub(crate) fn forget_task(&self, task: &TaskShared) {
        let mut m = lock(&self.table);
        m.tasks.remove(&task.id);
        if let Some(rid) = &task.request_id {
            if m.ids.get(rid) == Some(&task.id) {
                m.ids.remove(rid);
            }
        }
    }

    /// Frees every kept response numbered up to `seq`.
    pub(crate) fn ack(&self, seq: u64) {
        let mut s = lock(&self.inner);
        free_through(&mut s, seq);
    }

    /// Whether this connection is the one attached.
    pub(crate) fn attached_to(&self, conn: u64) -> bool {
        lock(&self.inner)
            .attached
            .as_ref()
            .is_some_and(|a| a.conn_id() == conn)
    }

    fn info(&self) -> SessionInfo {
        let s = lock(&self.inner);
        let ms = |t: SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0)
        };
        SessionInfo {
            id: self.id,
            state: if s.attached.is_some() {
                SessionState::Attached
            } else {
                SessionState::Detached
            },
            conn: s.attached.as_ref().map(|a| a.conn_id()),
            peer: self.group.to_string(),
            opened_at_ms: ms(self.opened_at),
            detached_at_ms: s.detached.map(|(_, t)| ms(t)),
            buffered_responses: s.buffer.len(),
            buffered_bytes: s.bytes,
            tasks: lock(&self.table).tasks.len(),
            window_ms: self.window.as_millis() as u64,
        }
    }

    /// The session's tasks still running.
    fn tasks(&self) -> Vec<Arc<TaskShared>> {
        lock(&self.table).tasks.values().cloned().collect()
    }
}

fn free_through(s: &mut Inner, seq: u64) {
    while s.buffer.front().is_some_and(|(n, _)| *n <= seq) {
        if let Some((_, t)) = s.buffer.pop_front() {
            s.bytes -= t.len();
        }
    }
    if s.buffer.is_empty() && s.buffer.capacity() > 16 {
        s.buffer.shrink_to(16);
    }
}

/// Detached sessions of one address group, oldest first.
#[derive(Default)]
struct Group {
    order: VecDeque<u64>,
    bytes: usize,
}

#[derive(Default)]
struct StoreInner {
    /// Every session open: attached ones (at most one per connection) and
    /// detached ones (bounded per address and in all).
    sessions: HashMap<u64, Arc<Session>>,
    groups: HashMap<IpAddr, Group>,
    detached: usize,
    detached_bytes: usize,
}

/// Why a resume was refused: all are answered alike (`-32020`).
#[derive(Debug)]
pub(crate) struct Refused;

/// What a successful resume hands back.
pub(crate) struct Resumed {
    pub session: Arc<Session>,
    /// The tasks whose progress must now go to the new connection.
    pub tasks: Vec<Arc<TaskShared>>,
}

/// Every session of the server.
pub(crate) struct SessionStore {
    bounds: Bounds,
    inner: Mutex<StoreInner>,
    next_id: AtomicU64,
    opened: AtomicU64,
    detached: AtomicU64,
    resumed: AtomicU64,
    refused: AtomicU64,
    expired: AtomicU64,
    evicted: AtomicU64,
    ended: AtomicU64,
    pub(crate) dropped: AtomicU64,
    me: Weak<SessionStore>,
}

impl std::fmt::Debug for SessionStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionStore")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl SessionStore {
    pub(crate) fn new(bounds: Bounds) -> Arc<SessionStore> {
        Arc::new_cyclic(|me| SessionStore {
            bounds,
            inner: Mutex::default(),
            next_id: AtomicU64::new(1),
            opened: AtomicU64::new(0),
            detached: AtomicU64::new(0),
            resumed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            me: me.clone(),
        })
    }

    /// Opens a session attached to `conn`, whose tasks live in `table`; the
    /// answer's text for request `id` is queued on `conn` before the call
    /// returns, so that nothing numbered can precede it.
    pub(crate) fn open(
        &self,
        (owner, peer): (Owner, IpAddr),
        window_ms: Option<u64>,
        table: Arc<Mutex<Inflight>>,
        conn: Arc<dyn Attachment>,
        id: Option<&Id>,
        install: &dyn Fn(&Arc<Session>),
    ) -> Result<Arc<Session>, ErrorObject> {
        let secret = new_secret().map_err(|_| {
            ErrorObject::new(codes::INTERNAL_ERROR, "internal error: no random source")
        })?;
        let window = match window_ms {
            Some(ms) => self.bounds.window.min(Duration::from_millis(ms)),
            None => self.bounds.window,
        };
        let sid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Arc::new(Session {
            id: sid,
            owner,
            group: crate::limit::address_group(peer),
            window,
            opened_at: SystemTime::now(),
            buffer_bytes: self.bounds.buffer_bytes,
            buffer_responses: self.bounds.buffer_responses,
            table,
            inner: Mutex::new(Inner {
                attached: Some(conn.clone()),
                detached: None,
                generation: 0,
                ended: false,
                token_hash: hash(&secret),
                seq: 0,
                buffer: VecDeque::new(),
                bytes: 0,
                accounted: 0,
                timer: None,
            }),
        });
        let mut inner = lock(&self.inner);
        inner.sessions.insert(sid, session.clone());
        self.opened.fetch_add(1, Ordering::Relaxed);
        // Installed under the session's lock, and the answer queued before
        // it is released: a response finishing meanwhile waits for the lock
        // and is numbered after the answer, which is where the client starts
        // counting.
        let _s = lock(&session.inner);
        lock(&session.table).writer = conn.conn_id();
        install(&session);
        if let Some(id) = id {
            let answer = serde_json::json!({
                "session": sid.to_string(),
                "token": frames::token_text(sid, &secret),
                "windowMs": window.as_millis() as u64,
                "maxBufferedBytes": self.bounds.buffer_bytes,
                "maxBufferedResponses": self.bounds.buffer_responses,
            });
            if let Ok(raw) = serde_json::value::to_raw_value(&answer) {
                conn.push_text(protocol::success_text(id, &raw));
            }
        }
        drop(_s);
        drop(inner);
        Ok(session)
    }

    /// Resumes a session on a new connection: checks the token (its hash, in
    /// constant time) and the owner, spends the token, closes a connection
    /// still attached (4001), and queues the answer and the replay of what is
    /// numbered above `seq` on `conn`, under the session's lock, so that a
    /// response finishing meanwhile comes after them.
    pub(crate) fn resume(
        &self,
        params: &frames::ResumeParams,
        owner: &Owner,
        conn: Arc<dyn Attachment>,
        id: Option<&Id>,
        install: &dyn Fn(&Arc<Session>),
    ) -> Result<Resumed, Refused> {
        let refused = || {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Refused
        };
        let Ok(secret) = new_secret() else {
            return Err(refused());
        };
        let mut inner = lock(&self.inner);
        let Some(session) = inner.sessions.get(&params.session).cloned() else {
            return Err(refused());
        };
        let mut s = lock(&session.inner);
        // Both checks run whatever the first said, and the hash compare takes
        // the same time wherever the hashes differ.
        let token_ok = s.token_hash.ct_eq(&hash(&params.secret));
        let owner_ok = session.owner == *owner;
        if s.ended || !bool::from(token_ok) || !owner_ok {
            return Err(refused());
        }
        s.token_hash = hash(&secret);
        s.generation += 1;
        if let Some(t) = s.timer.take() {
            t.abort();
        }
        install(&session);
        if let Some(old) = s.attached.take() {
            old.close(CLOSE_RESUMED_ELSEWHERE, "session resumed elsewhere");
        }
        if s.detached.take().is_some() {
            let bytes = s.accounted;
            s.accounted = 0;
            inner.detached -= 1;
            inner.detached_bytes -= bytes;
            if let Some(g) = inner.groups.get_mut(&session.group) {
                g.bytes -= bytes;
                g.order.retain(|&x| x != session.id);
                if g.order.is_empty() {
                    inner.groups.remove(&session.group);
                }
            }
        }
        let seq = params.seq.min(s.seq);
        free_through(&mut s, seq);
        let inflight: Vec<serde_json::Value> = {
            let mut t = lock(&session.table);
            t.writer = conn.conn_id();
            t.ids.keys().map(Id::to_value).collect()
        };
        if let Some(id) = id {
            let answer = serde_json::json!({
                "session": session.id.to_string(),
                "token": frames::token_text(session.id, &secret),
                "inflight": inflight,
                "replay": s.buffer.len(),
            });
            if let Ok(raw) = serde_json::value::to_raw_value(&answer) {
                conn.push_text(protocol::success_text(id, &raw));
            }
        }
        for (_, text) in &s.buffer {
            conn.push_text(text.clone());
        }
        s.attached = Some(conn);
        drop(s);
        drop(inner);
        self.resumed.fetch_add(1, Ordering::Relaxed);
        let tasks = session.tasks();
        Ok(Resumed { session, tasks })
    }

    /// The connection `conn` ended otherwise than by its client's close 1000:
    /// the session keeps its tasks and responses for its window (unless
    /// another connection has already resumed it).
    pub(crate) fn detach(&self, session: &Arc<Session>, conn: u64) {
        let mut inner = lock(&self.inner);
        let mut s = lock(&session.inner);
        if s.ended || s.attached.as_ref().is_none_or(|a| a.conn_id() != conn) {
            return;
        }
        s.attached = None;
        s.detached = Some((Instant::now(), SystemTime::now()));
        s.generation += 1;
        let generation = s.generation;
        s.accounted = s.bytes;
        inner.detached += 1;
        inner.detached_bytes += s.bytes;
        let g = inner.groups.entry(session.group).or_default();
        g.order.push_back(session.id);
        g.bytes += s.bytes;
        // The window's timer (the generation guards against a timer that
        // fires as a resume takes the lock).
        let store = self.me.clone();
        let (sid, window) = (session.id, session.window);
        let timer = tokio::spawn(async move {
            tokio::time::sleep(window).await;
            if let Some(store) = store.upgrade() {
                store.expire(sid, generation);
            }
        });
        s.timer = Some(timer.abort_handle());
        drop(s);
        self.detached.fetch_add(1, Ordering::Relaxed);
        let doomed = self.over_bounds(&mut inner, session.group);
        drop(inner);
        self.end_all(doomed, &self.evicted);
    }

    /// Brings the store's detached totals up to date with a detached
    /// session's buffer, and ends the oldest at a bound.
    pub(crate) fn account(&self, session: &Arc<Session>) {
        let mut inner = lock(&self.inner);
        let mut s = lock(&session.inner);
        if s.ended || s.detached.is_none() {
            return;
        }
        let grown = s.bytes.saturating_sub(s.accounted);
        let shrunk = s.accounted.saturating_sub(s.bytes);
        s.accounted = s.bytes;
        drop(s);
        inner.detached_bytes = inner.detached_bytes + grown - shrunk;
        if let Some(g) = inner.groups.get_mut(&session.group) {
            g.bytes = g.bytes + grown - shrunk;
        }
        let doomed = self.over_bounds(&mut inner, session.group);
        drop(inner);
        self.end_all(doomed, &self.evicted);
    }

    /// Takes out the detached sessions that must end for the store to be
    /// within its bounds: at an address's bound, that address's oldest; at the
    /// total bound, the oldest of the address holding the most.
    fn over_bounds(&self, inner: &mut StoreInner, group: IpAddr) -> Vec<Arc<Session>> {
        let b = self.bounds;
        let mut doomed = Vec::new();
        loop {
            let victim_group = match inner.groups.get(&group) {
                Some(g) if g.order.len() > b.detached_per_ip || g.bytes > b.bytes_per_ip => {
                    Some(group)
                }
                _ if inner.detached > b.detached_total => inner
                    .groups
                    .iter()
                    .max_by_key(|(_, g)| g.order.len())
                    .map(|(k, _)| *k),
                _ if inner.detached_bytes > b.bytes_total => inner
                    .groups
                    .iter()
                    .max_by_key(|(_, g)| g.bytes)
                    .map(|(k, _)| *k),
                _ => None,
            };
            let Some(vg) = victim_group else {
                return doomed;
            };
            let sid = inner
                .groups
                .get_mut(&vg)
                .and_then(|g| g.order.front().copied());
            match sid.and_then(|sid| self.take_out(inner, sid)) {
                Some(s) => doomed.push(s),
                // Cannot happen (a group in the map has a session); leave
                // rather than loop.
                None => return doomed,
            }
        }
    }

    /// Removes a session from the store and its totals; marks it ended.
    fn take_out(&self, inner: &mut StoreInner, sid: u64) -> Option<Arc<Session>> {
        let session = inner.sessions.remove(&sid)?;
        let mut s = lock(&session.inner);
        s.ended = true;
        if s.detached.take().is_some() {
            let bytes = s.accounted;
            inner.detached -= 1;
            inner.detached_bytes -= bytes;
            if let Some(g) = inner.groups.get_mut(&session.group) {
                g.bytes -= bytes;
                g.order.retain(|&x| x != sid);
                if g.order.is_empty() {
                    inner.groups.remove(&session.group);
                }
            }
        }
        s.accounted = 0;
        s.attached = None;
        if let Some(t) = s.timer.take() {
            t.abort();
        }
        s.buffer = VecDeque::new();
        s.bytes = 0;
        drop(s);
        Some(session)
    }

    /// Stops the tasks of sessions taken out (outside the store's lock: a
    /// stopped task's answer goes through its session, which drops it).
    fn end_all(&self, doomed: Vec<Arc<Session>>, counter: &AtomicU64) {
        for session in doomed {
            counter.fetch_add(1, Ordering::Relaxed);
            for t in session.tasks() {
                t.stop(Stopped::Disconnected);
            }
        }
    }

    fn expire(&self, sid: u64, generation: u64) {
        let mut inner = lock(&self.inner);
        let due = inner.sessions.get(&sid).is_some_and(|s| {
            let s = lock(&s.inner);
            s.generation == generation && s.detached.is_some()
        });
        if !due {
            return;
        }
        let doomed: Vec<_> = self.take_out(&mut inner, sid).into_iter().collect();
        drop(inner);
        self.end_all(doomed, &self.expired);
    }

    /// Ends a session: its client closed with 1000, or an operator ended it.
    /// Its tasks are stopped with `why`. False if there is no such session.
    pub(crate) fn end(&self, sid: u64, why: Stopped) -> bool {
        let mut inner = lock(&self.inner);
        let attached = inner
            .sessions
            .get(&sid)
            .and_then(|s| lock(&s.inner).attached.clone());
        let Some(session) = self.take_out(&mut inner, sid) else {
            return false;
        };
        drop(inner);
        if let Some(a) = attached {
            a.close(axum::extract::ws::close_code::NORMAL, "session ended");
        }
        self.ended.fetch_add(1, Ordering::Relaxed);
        for t in session.tasks() {
            t.stop(why);
        }
        true
    }

    /// The server is going away, and its sessions with it: every one ends and
    /// its tasks stop (a resume after a restart gets `-32020` anyway).
    pub(crate) fn shutdown(&self) {
        let mut inner = lock(&self.inner);
        let ids: Vec<u64> = inner.sessions.keys().copied().collect();
        let doomed: Vec<_> = ids
            .into_iter()
            .filter_map(|sid| self.take_out(&mut inner, sid))
            .collect();
        drop(inner);
        for session in doomed {
            for t in session.tasks() {
                t.stop(Stopped::Shutdown);
            }
        }
    }

    /// Every session open, for the admin view.
    pub(crate) fn list(&self) -> Vec<SessionInfo> {
        let sessions: Vec<_> = lock(&self.inner).sessions.values().cloned().collect();
        let mut out: Vec<_> = sessions.iter().map(|s| s.info()).collect();
        out.sort_by_key(|i| i.id);
        out
    }

    /// The counters and totals as OpenMetrics families (for `/metrics`).
    pub(crate) fn openmetrics(&self) -> String {
        use std::fmt::Write as _;
        let c = self.counts();
        let mut out = String::new();
        for (name, help, v) in [
            ("opened", "Sessions opened.", c.opened),
            (
                "detached",
                "Connections that ended with their session detached.",
                c.detached,
            ),
            (
                "resumed",
                "Sessions resumed on a new connection.",
                c.resumed,
            ),
            ("refused", "Resumes refused (-32020).", c.refused),
            (
                "expired",
                "Detached sessions whose window ran out.",
                c.expired,
            ),
            (
                "evicted",
                "Detached sessions ended early at a bound.",
                c.evicted,
            ),
            (
                "ended",
                "Sessions ended by their client (close 1000) or an operator.",
                c.ended,
            ),
            (
                "responses_dropped",
                "Responses replaced by -32021: the session's buffer was full.",
                c.dropped,
            ),
        ] {
            let _ = write!(
                out,
                "# TYPE taskwire_sessions_{name} counter\n# HELP taskwire_sessions_{name} {help}\ntaskwire_sessions_{name}_total {v}\n"
            );
        }
        for (name, help, v) in [
            ("open", "Sessions open now, attached or detached.", c.open),
            ("detached_now", "Detached sessions now.", c.detached_now),
            (
                "detached_bytes",
                "Bytes of responses kept by detached sessions now.",
                c.detached_bytes,
            ),
        ] {
            let _ = write!(
                out,
                "# TYPE taskwire_sessions_{name} gauge\n# HELP taskwire_sessions_{name} {help}\ntaskwire_sessions_{name} {v}\n"
            );
        }
        out
    }

    /// The counters and the current totals.
    pub(crate) fn counts(&self) -> SessionCounts {
        let inner = lock(&self.inner);
        let c = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SessionCounts {
            opened: c(&self.opened),
            detached: c(&self.detached),
            resumed: c(&self.resumed),
            refused: c(&self.refused),
            expired: c(&self.expired),
            evicted: c(&self.evicted),
            ended: c(&self.ended),
            dropped: c(&self.dropped),
            open: inner.sessions.len() as u64,
            detached_now: inner.detached as u64,
            detached_bytes: inner.detached_bytes as u64,
        }
    }
}
