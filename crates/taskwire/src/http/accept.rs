//! The own accept loop's side of a connection: the bounds on connections not
//! yet upgraded (checked before anything is read), the TLS handshake and HTTP
//! under the request-head timeout, and a write deadline on every socket.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request};
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::security;
use super::upgrade::Refusal;
use crate::app::App;
use crate::limit::{Keyed, KeyedSlot, Slot};
use crate::observe::RefusalReason;

/// The answers to a connection refused before HTTP is spoken: written with
/// one non-blocking write, best effort, then the socket is closed.
const REFUSED_PER_IP: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const REFUSED_FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Admits or refuses one accepted TCP connection against the HTTP bounds and
/// spawns its task. Refused ones are closed at once, so that a flood of
/// connections that never send a request cannot hold descriptors.
pub(super) fn accept_one(
    app: &Arc<App>,
    router: &Router,
    tls: Option<&tokio_rustls::TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
) {
    let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
    let slot = match HttpSlot::acquire(app, peer.ip()) {
        Ok(s) => s,
        Err(refusal) => {
            app.hooks.refused(refusal.reason());
            log_refusal(app, refusal.reason(), peer);
            if tls.is_none() {
                let _ = tcp.try_write(match refusal {
                    Refusal::HttpPerIp => REFUSED_PER_IP,
                    _ => REFUSED_FULL,
                });
            }
            return;
        }
    };
    // Replies are small and latency matters: don't let Nagle hold them.
    let _ = tcp.set_nodelay(true);
    tokio::spawn(serve_tcp(
        app.clone(),
        router.clone(),
        tls.cloned(),
        tcp,
        peer,
        slot,
    ));
}

/// One warn line per second at most, with the count of those suppressed: a
/// flood must not flood the log too.
pub(super) fn log_refusal(app: &App, reason: RefusalReason, peer: SocketAddr) {
    if let Some(suppressed) = app.refusal_log.allow(Instant::now()) {
        tracing::warn!(
            %peer,
            reason = reason.label(),
            suppressed,
            "refused a connection"
        );
    }
}

/// One TCP connection until it upgrades or closes: the TLS handshake (under the
/// request-head timeout), then HTTP.
async fn serve_tcp(
    app: Arc<App>,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tcp: TcpStream,
    peer: SocketAddr,
    slot: HttpSlot,
) {
    let _slot = slot;
    let Some(acceptor) = tls else {
        return serve_http(&app, router, tcp, peer).await;
    };
    let handshake = tokio::time::timeout(app.cfg.request_head_timeout, acceptor.accept(tcp));
    let stream = tokio::select! {
        r = handshake => r,
        _ = app.shutdown.cancelled() => return,
    };
    match stream {
        Ok(Ok(stream)) => serve_http(&app, router, stream, peer).await,
        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
    }
}

/// HTTP/1.1 on one connection, with hyper's request-head timeout (which also
/// closes an idle keep-alive connection); ends when the connection closes or
/// upgrades to a WebSocket (which then lives on in its own task).
async fn serve_http<I>(app: &Arc<App>, router: Router, io: I, peer: SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        // What `into_make_service_with_connect_info` gives a mounted router:
        // the router's own layer turns it into the client's address.
        req.extensions_mut().insert(ConnectInfo(peer));
        let mut router = router.clone();
        tower_service::Service::call(&mut router, req)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.cfg.request_head_timeout);
    // Twice the WebSocket write timeout: an upgraded connection keeps this
    // layer, and its own slow-consumer close (1008) must come first.
    let io = WriteDeadline::new(io, app.cfg.write_timeout.saturating_mul(2));
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let done = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = app.shutdown.cancelled() => None,
    };
    let result = match done {
        Some(r) => r,
        None => {
            // Finish the request in progress, take no other; the hard stop
            // ends what does not (a head never finished, a client not reading).
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                r = conn.as_mut() => r,
                _ = app.hard_stop.cancelled() => return,
            }
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            tracing::debug!(%peer, "request head timed out");
        } else {
            tracing::debug!(%peer, "HTTP connection: {e}");
        }
    }
}

/// Fails a write that has made no progress for `limit`, so that an HTTP client
/// that stops reading a response (an event stream, a large admin answer) is
/// closed instead of holding its connection for ever. The timer exists only
/// while a write is stalled.
struct WriteDeadline<I> {
    io: I,
    limit: Duration,
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<I> WriteDeadline<I> {
    fn new(io: I, limit: Duration) -> Self {
        WriteDeadline {
            io,
            limit,
            stalled: None,
        }
    }

    fn check<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for WriteDeadline<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.check(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.check(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.check(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_shutdown(cx);
        self.check(cx, r)
    }
}

/// Counts a connection that is not (yet) a WebSocket, in total and against its
/// address group, from accept until it upgrades or closes.
struct HttpSlot {
    app: Arc<App>,
    total: Option<Slot>,
    ip: Option<KeyedSlot<IpAddr, ()>>,
}

impl HttpSlot {
    fn acquire(app: &Arc<App>, peer: IpAddr) -> Result<HttpSlot, Refusal> {
        let cfg = &app.cfg;
        // A trusted proxy carries many clients: only the total bounds it.
        let ip = if security::trusted(peer, &cfg.trusted_proxies) {
            None
        } else {
            match Keyed::acquire(
                &app.http_per_ip,
                crate::limit::address_group(peer),
                cfg.max_http_connections_per_ip,
            ) {
                Some(s) => Some(s),
                None => return Err(Refusal::HttpPerIp),
            }
        };
        let Some(total) = Slot::acquire(&app.http_conns, cfg.max_http_connections) else {
            return Err(Refusal::HttpFull);
        };
        Ok(HttpSlot {
            app: app.clone(),
            total: Some(total),
            ip,
        })
    }
}

impl Drop for HttpSlot {
    fn drop(&mut self) {
        self.ip.take();
        self.total.take();
        // Shutdown waits for this count to reach zero.
        self.app.conns_changed.notify_waiters();
    }
}
