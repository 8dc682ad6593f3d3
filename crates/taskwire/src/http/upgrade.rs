//! `/ws`: the checks before a WebSocket upgrade (Host, Origin, token, the
//! bounds on open connections, shutdown) and the upgrade itself, which hands
//! the socket to `conn`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::accept::log_refusal;
use super::security::{self, request_host};
use crate::app::App;
use crate::conn::ConnLimits;
use crate::limit::{Keyed, KeyedSlot, Slot};
use crate::observe::RefusalReason;
use crate::protocol::SUBPROTOCOL;

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
    _token: Option<Slot>,
}

/// Why an upgrade was refused, before it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    Host,
    Origin,
    Unauthorized,
    PerIp,
    PerToken,
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
            Refusal::Unauthorized => RefusalReason::Unauthorized,
            Refusal::PerIp => RefusalReason::ConnectionsPerIp,
            Refusal::PerToken => RefusalReason::ConnectionsPerToken,
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
            Refusal::Unauthorized => (StatusCode::UNAUTHORIZED, "a valid token is required"),
            Refusal::PerIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            ),
            Refusal::PerToken => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections with this token",
            ),
            Refusal::Full | Refusal::HttpFull => {
                (StatusCode::SERVICE_UNAVAILABLE, "too many connections")
            }
            Refusal::HttpPerIp => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address",
            ),
        };
        let mut r = (status, text).into_response();
        if self == Refusal::Unauthorized {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        r
    }
}

/// The checks before an upgrade, cheapest and most telling first: host, on a
/// loopback listener (403), origin (403), token (401), per-IP and per-token
/// connections (429), then the server's total (503).
fn admit_upgrade(
    app: &Arc<App>,
    peer: SocketAddr,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Slots, ConnLimits), Refusal> {
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
    let token = if cfg.auth_tokens.is_empty() {
        None
    } else {
        let presented = security::presented_tokens(headers, uri.query());
        match security::find_token(&cfg.auth_tokens, &presented) {
            Some(i) => Some(i),
            None => return Err(Refusal::Unauthorized),
        }
    };
    let ip = match cfg.max_connections_per_ip {
        None => None,
        Some(max) => match Keyed::acquire(&app.per_ip, crate::limit::address_group(peer.ip()), max)
        {
            Some(s) => Some(s),
            None => return Err(Refusal::PerIp),
        },
    };
    let spec = token.and_then(|i| Some((cfg.auth_tokens.get(i)?, app.token_conns.get(i)?)));
    let token_slot = match spec {
        Some((t, count)) => match t.max_connections {
            None => None,
            Some(max) => match Slot::acquire(count, max) {
                Some(s) => Some(s),
                None => return Err(Refusal::PerToken),
            },
        },
        None => None,
    };
    let Some(conn) = ConnSlot::acquire(app) else {
        return Err(Refusal::Full);
    };
    let t = spec.map(|(t, _)| t);
    let limits = ConnLimits {
        max_inflight: t
            .and_then(|t| t.max_inflight)
            .unwrap_or(cfg.max_inflight_per_connection),
        rate: t.and_then(|t| t.rate_limit).or(cfg.rate_limit()),
    };
    Ok((
        Slots {
            _conn: conn,
            _ip: ip,
            _token: token_slot,
        },
        limits,
    ))
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
    let (slots, limits) = match admit_upgrade(&app, peer, &headers, &uri) {
        Ok(x) => x,
        Err(refusal) => {
            app.hooks.refused(refusal.reason());
            log_refusal(&app, refusal, peer);
            return refusal.into_response();
        }
    };
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
                _ = crate::conn::serve(app, socket, peer, limits) => {}
                _ = hard.cancelled() => {}
            }
        })
}
