//! `/ws`: the checks before a WebSocket upgrade (Host, Origin, the connect
//! hook, the bounds on open connections, shutdown) and the upgrade itself,
//! which hands the socket to `conn`.

use std::net::{IpAddr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;

use super::accept::log_refusal;
use super::security::{self, request_host};
use crate::app::App;
use crate::caller::{self, Caller, ConnectRequest};
use crate::conn::ConnLimits;
use crate::limit::{Keyed, KeyedSlot, Slot};
use crate::observe::RefusalReason;
use crate::protocol::SUBPROTOCOL;
use crate::session;
use crate::task::CallerInfo;

/// Replies gathered before a write to the socket (flushed at every batch end).
const WRITE_BUFFER: usize = 32 << 10;

/// Bytes read from the socket at a time. The read buffer is allocated up front
/// and is the largest single cost of an idle connection (4 KiB made one cost
/// ~13 KiB in all); a frame larger than it grows the buffer for as long as it
/// is read, so only idle memory changes with it, not what can be received.
const READ_BUFFER: usize = 512;

/// Room in the write buffer beyond the largest message, for control frames.
const PONG_ROOM: usize = 4 << 10;

/// Counts an open WebSocket for as long as it lives.
struct ConnSlot {
    slot: Option<Slot>,
    app: Arc<App>,
}

impl ConnSlot {
    fn acquire(app: &Arc<App>) -> Option<ConnSlot> {
        Some(ConnSlot {
            slot: Some(Slot::acquire(&app.open_conns, app.cfg.max_connections)?),
            app: app.clone(),
        })
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        // Given back before the notification: shutdown, woken, reads the count.
        self.slot.take();
        self.app.conns_changed.notify_waiters();
    }
}

/// Everything that keeps a connection counted; dropped when it closes.
struct Slots {
    _conn: ConnSlot,
    _ip: Option<KeyedSlot<IpAddr, ()>>,
    /// What the connect hook holds for the connection (a token's slot).
    _held: caller::Held,
}

/// Why an upgrade was refused, before it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    Host,
    Origin,
    PerIp,
    Full,
    HttpPerIp,
    HttpFull,
}

impl Refusal {
    /// The metrics label.
    pub(super) fn reason(self) -> RefusalReason {
        match self {
            Refusal::Host => RefusalReason::Host,
            Refusal::Origin => RefusalReason::Origin,
            Refusal::PerIp => RefusalReason::ConnectionsPerIp,
            Refusal::Full => RefusalReason::Connections,
            Refusal::HttpPerIp => RefusalReason::HttpConnectionsPerIp,
            Refusal::HttpFull => RefusalReason::HttpConnections,
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Refusal::Host => (StatusCode::FORBIDDEN, "host not allowed"),
            Refusal::Origin => (StatusCode::FORBIDDEN, "origin not allowed"),
            Refusal::PerIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            ),
            Refusal::Full | Refusal::HttpFull => {
                (StatusCode::SERVICE_UNAVAILABLE, "too many connections")
            }
            Refusal::HttpPerIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            ),
        };
        (status, text).into_response()
    }
}

/// The answer to an upgrade the connect hook refused.
fn hook_refusal(r: &caller::Refusal) -> Response {
    let mut resp = (r.status(), r.message().to_owned()).into_response();
    if r.status() == StatusCode::UNAUTHORIZED {
        // RFC 9110: a 401 names the scheme it wants.
        resp.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    resp
}

/// The checks before the connect hook, cheapest and most telling first:
/// host, on a loopback listener (403), then origin (403).
fn check_request(app: &App, headers: &HeaderMap, uri: &Uri) -> Result<(), Refusal> {
    let cfg = &app.cfg;
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    // A server on loopback is meant for this machine: a page elsewhere that
    // re-points its own name to 127.0.0.1 must not reach it.
    if security::is_loopback(cfg.addr.ip())
        && !security::host_allowed(request_host(headers, uri), &cfg.allowed_hosts)
    {
        return Err(Refusal::Host);
    }
    if !security::origin_allowed(
        text(header::ORIGIN),
        text(header::HOST),
        &cfg.allowed_origins,
        cfg.require_origin,
    ) {
        return Err(Refusal::Origin);
    }
    Ok(())
}

/// Runs the connect hook, bounded: past `request_head_timeout` (what a client
/// gets to send its request head, so the slowest an upgrade may be answered)
/// the upgrade is refused 503, at shutdown 503, and a hook that panics
/// refuses it 500, without taking the connection's task down with it.
async fn run_hook(app: &App, req: &ConnectRequest) -> Result<Caller, caller::Refusal> {
    let Some(hook) = &app.connect_hook else {
        return Ok(Caller::anonymous());
    };
    let failed = |status, message, log: &str| {
        if let Some(suppressed) = app.refusal_log.allow(Instant::now()) {
            tracing::error!(peer = %req.peer(), suppressed, "connect hook {log}");
        }
        Err(caller::Refusal::new(status, message))
    };
    let run = AssertUnwindSafe(hook.connect_boxed(req)).catch_unwind();
    tokio::select! {
        r = tokio::time::timeout(app.cfg.request_head_timeout, run) => match r {
            Ok(Ok(answer)) => answer,
            Ok(Err(_panic)) => failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "connect hook failed",
                "panicked",
            ),
            Err(_) => failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "connect hook timed out",
                "timed out (request_head_timeout)",
            ),
        },
        _ = app.shutdown.cancelled() => Err(caller::Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down",
        )
        .counted_as(RefusalReason::ShuttingDown)),
    }
}

/// The bounds after the hook: per-IP connections (429), then the server's
/// total (503). The caller's own limits replace the server's.
fn count_connection(
    app: &Arc<App>,
    peer: SocketAddr,
    caller: Caller,
) -> Result<(Slots, ConnLimits, Option<Arc<CallerInfo>>), Refusal> {
    let cfg = &app.cfg;
    let ip = match cfg.max_connections_per_ip {
        None => None,
        Some(max) => match Keyed::acquire(&app.per_ip, crate::limit::address_group(peer.ip()), max)
        {
            Some(s) => Some(s),
            None => return Err(Refusal::PerIp),
        },
    };
    let Some(conn) = ConnSlot::acquire(app) else {
        return Err(Refusal::Full);
    };
    let (info, own, held) = caller.into_parts();
    let limits = ConnLimits {
        max_inflight: own.max_inflight.unwrap_or(cfg.max_inflight_per_connection),
        rate: own.rate.or(cfg.rate_limit()),
    };
    let slots = Slots {
        _conn: conn,
        _ip: ip,
        _held: held,
    };
    Ok((slots, limits, info))
}

/// Counts and logs a refusal, and answers it.
fn refuse(app: &App, reason: RefusalReason, peer: SocketAddr, resp: Response) -> Response {
    app.hooks.refused(reason);
    log_refusal(app, reason, peer);
    resp
}

pub(super) async fn ws_handler(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    // Not extracted outright: a plain GET (not an upgrade) is checked as an
    // upgrade would be, so a page, which cannot read the status of a refused
    // WebSocket upgrade, can learn from a `fetch` of this URL why it was
    // refused (401: token missing or refused; 403: origin or host).
    ws: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    if let Err(r) = check_request(&app, &headers, &uri) {
        return refuse(&app, r.reason(), peer, r.into_response());
    }
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let req = ConnectRequest::new(peer, headers, uri);
    let caller = match run_hook(&app, &req).await {
        Ok(c) => c,
        Err(r) => return refuse(&app, r.reason(), peer, hook_refusal(&r)),
    };
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let (slots, limits, caller) = match count_connection(&app, peer, caller) {
        Ok(x) => x,
        Err(r) => return refuse(&app, r.reason(), peer, r.into_response()),
    };
    // What a resume must present again: the same identity and Origin.
    let owner = session::owner_key(CallerInfo::id_of(&caller), origin.as_deref());
    let ws = match ws {
        Ok(ws) => ws,
        // Admitted, but not an upgrade: axum's own answer (400, 426, ...);
        // the slots just taken are released.
        Err(not_an_upgrade) => return not_an_upgrade.into_response(),
    };
    let max = app.cfg.max_frame_bytes;
    // The write buffer's cap: what the writer feeds (one flush's worth plus
    // one message, and no message is larger than the outbound budget) plus
    // room for Pongs. A client that reads neither its replies nor its pongs
    // finds the buffer full instead of growing it, and its next write times
    // out: closed as a slow consumer (1008).
    let max_write = WRITE_BUFFER + app.cfg.outbound_bytes + PONG_ROOM;
    // A small read buffer keeps an idle connection at a few KiB instead of
    // tungstenite's default 128 KiB. The write buffer only grows as replies
    // are fed to it: the writer feeds every reply that is ready and flushes
    // once, so a burst of replies costs one send(2), not one each (measured:
    // send(2) was 63% of the server's time at 8x16 pipelined echos without it).
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _slots = slots;
            let hard = app.hard_stop.clone();
            // Past the shutdown deadline, a WebSocket that has not closed
            // (its client does not read) is dropped.
            tokio::select! {
                _ = crate::conn::serve(app, socket, peer, limits, caller, owner) => {}
                _ = hard.cancelled() => {}
            }
        })
}
