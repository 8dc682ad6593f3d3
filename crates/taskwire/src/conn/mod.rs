//! One WebSocket connection, in the order a request travels:
//!
//! ```text
//!  socket ──▶ reader ──▶ admit ──▶ task (Tokio, or the compute pool) ──▶ reply ──▶ writer ──▶ socket
//!             reader.rs  admit.rs   reply.rs: supervise                 reply.rs   writer.rs
//! ```
//!
//! - [`reader`](reader) only parses, rate-limits and dispatches; it never awaits a task.
//! - [`admit`](admit) turns one request into an admitted task or one answer.
//! - [`reply`](reply) runs the task to its outcome and answers exactly once,
//!   whatever happens (a `Reply` answers from `Drop` on any lost path).
//! - [`writer`](writer) is the only place that writes to the socket.
//! - [`state`](state) is what those parts share, and the admin view reads.

mod admit;
mod reader;
mod reply;
mod state;
mod view;
mod writer;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::ws::WebSocket;
use futures_util::StreamExt;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) use state::{ConnLimits, ConnState};

use crate::app::App;
use crate::session::Owner;
use crate::task::{CallerInfo, Stopped};
use reader::Reader;

/// How long a closed connection goes on reading (and dropping) what its peer
/// sends, so that its close frame is read before the socket goes.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// How long a stopped CPU task gets to reach its next checkpoint before its
/// request is answered anyway (it keeps its not-yielding flag in the table).
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Serves one upgraded WebSocket until it closes.
pub(crate) async fn serve(
    app: Arc<App>,
    socket: WebSocket,
    peer: SocketAddr,
    limits: ConnLimits,
    caller: Option<Arc<CallerInfo>>,
    owner: Owner,
) {
    let id = app.next_conn.fetch_add(1, Ordering::Relaxed);
    // Debug level: an enabled span costs every connection ~0.5 KiB in the
    // subscriber's registry, 7% of an idle connection; `--log taskwire=debug`
    // turns it on with the connection's other debug lines. The caller is
    // written with `?`, escaped: a hook may echo what a client sent.
    let who = CallerInfo::id_of(&caller);
    let span = tracing::debug_span!("conn", id, %peer, caller = who.map(tracing::field::debug));
    async move {
        let tx = Arc::new(crate::sync::Outbox::new(app.cfg.outbound_queue));
        let conn = Arc::new(ConnState {
            id,
            peer,
            caller,
            opened_at: SystemTime::now(),
            opened: Instant::now(),
            tx,
            inflight: OnceLock::new(),
            session: OnceLock::new(),
            sessions: app.sessions.clone(),
            owner,
            closed_normally: AtomicBool::new(false),
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
            total_bytes: app.outbound_total.clone(),
            total_limit: app.cfg.outbound_bytes_total,
            outbound_bytes: app.cfg.outbound_bytes,
            held: AtomicUsize::new(0),
            drained: Notify::new(),
            max_inflight: limits.max_inflight,
        });
        app.hooks.conn_opened(conn.clone());
        tracing::debug!("connection opened");
        let (sink, mut stream) = socket.split();
        let writer = tokio::spawn(
            writer::writer(app.clone(), conn.clone(), sink).instrument(tracing::Span::current()),
        );
        Reader::new(&app, &conn, limits.rate).run(&mut stream).await;
        // Links: when the connection goes, its work goes, unless a session
        // keeps it: any end but the client's close 1000 detaches the session
        // (whose tasks and answers then wait for a resume).
        let detached = match conn.session() {
            Some(s) if !conn.closed_normally.load(Ordering::Acquire) => {
                app.sessions.detach(s, conn.id);
                true
            }
            Some(s) => {
                if s.attached_to(conn.id) {
                    app.sessions.end(s.id, Stopped::Disconnected);
                }
                false
            }
            None => {
                conn.stop_all(Stopped::Disconnected);
                false
            }
        };
        conn.closing.cancel();
        let _ = writer.await;
        // The close frame is sent: read (and drop) what the peer still sends
        // for a moment, until it closes too. Closing a socket with unread data
        // makes the kernel reset the connection, and the reset can destroy the
        // close frame, and its code, before the client reads it.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
        // Nobody drains the queue any more: refuse what late tasks send and
        // drop what is queued (progress entries hold their tasks).
        for msg in conn.tx.close() {
            conn.forget(&msg);
        }
        // Stay in the live table (and hold the connection's slot) until every
        // task has settled, so that what a closed connection still costs stays
        // visible; bounded, as a task that never yields is answered after STOP_GRACE.
        // A detached session's tasks are no longer this connection's.
        if !detached {
            let _ =
                tokio::time::timeout(STOP_GRACE + Duration::from_millis(500), conn.all_answered())
                    .await;
        }
        app.hooks.conn_closed(conn.id);
        tracing::debug!("connection closed");
    }
    .instrument(span)
    .await
}
