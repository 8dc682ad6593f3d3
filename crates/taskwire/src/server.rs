//! The HTTP side: the router (`/ws`, `/healthz`, `/metrics`, `/admin`, the
//! dashboard), served from taskwire's own accept loop or mounted in an
//! application's router, and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::compute::ComputePool;
use crate::config::Config;
use crate::conn::ConnLimits;
use crate::limit::{Keyed, KeyedSlot, Slot};
use crate::observe::{AdminAccess, Hooks, Observer, RefusalReason};
use crate::protocol::SUBPROTOCOL;
use crate::registry::Registry;
use crate::security::{self, LogLimiter};

/// Everything a connection needs, shared.
pub(crate) struct App {
    pub cfg: Config,
    pub registry: Registry,
    pub discover: Box<RawValue>,
    pub pool: ComputePool,
    /// The live table and metrics, read by the admin API (empty when
    /// observing is off).
    pub observer: Arc<Observer>,
    /// Where connections report what happens: `observer`, or `()` when
    /// observing is off.
    pub hooks: Arc<dyn Hooks>,
    /// The admin API's access rule, shared with its handlers.
    pub admin: Arc<AdminAccess>,
    pub shutdown: CancellationToken,
    pub next_task: AtomicU64,
    pub next_conn: AtomicU64,
    /// Open WebSockets: in all, and per address group.
    open_conns: Arc<AtomicUsize>,
    conns_changed: Notify,
    per_ip: Arc<Keyed<IpAddr>>,
    /// Open connections per configured client token, by index.
    token_conns: Vec<Arc<AtomicUsize>>,
    /// Connections not upgraded to WebSocket: in all, and per address group.
    http_conns: Arc<AtomicUsize>,
    http_per_ip: Arc<Keyed<IpAddr>>,
    /// Fired when the shutdown deadline passes: whatever is still open ends.
    pub hard_stop: CancellationToken,
    /// Bytes of replies queued and batch answers kept, over every connection
    /// (bounded by `outbound_bytes_total`).
    pub outbound_total: Arc<AtomicUsize>,
    /// Refusals and accept errors are logged at most once a second.
    refusal_log: LogLimiter,
}

/// taskwire's service: the compute pool, the task registry and the state of
/// every connection, served either from its own listener ([`Server::bind`],
/// [`Server::run`]) or mounted in an application's own axum router
/// ([`Server::build`], [`Server::router`], [`Server::shutdown`]).
pub struct Server {
    app: Arc<App>,
    /// Set by [`Server::bind`]; a server made by [`Server::build`] has none.
    listener: Option<TcpListener>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field(
                "addr",
                &self.listener.as_ref().and_then(|l| l.local_addr().ok()),
            )
            .finish()
    }
}

/// Triggers a graceful shutdown of a running [`Server`] from elsewhere.
#[derive(Clone, Debug)]
pub struct ShutdownHandle(CancellationToken);

impl ShutdownHandle {
    /// Starts the graceful shutdown.
    pub fn shutdown(&self) {
        self.0.cancel();
    }
}

/// Why a request reached taskwire's router without a client address.
const NO_CONNECT_INFO: &str = "taskwire needs the client address: serve the app with \
`app.into_make_service_with_connect_info::<std::net::SocketAddr>()`";

impl Server {
    /// Starts the compute pool and prepares the routes, without a listener:
    /// for mounting taskwire in an application's own axum router.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use std::net::SocketAddr;
    /// use axum::{routing::get, Router};
    /// use taskwire::{Config, Registry, Server};
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// // Binds nothing; decides whether the Host check against DNS rebinding applies.
    /// let config = Config { addr: listener.local_addr()?, ..Config::default() };
    /// let mut registry = Registry::new();
    /// taskwire::builtin::register(&mut registry);
    /// let tw = Server::build(config, registry)?;
    /// let app = Router::new()
    ///     .route("/hello", get(|| async { "hello" }))
    ///     .nest_service("/tasks", tw.router());
    /// axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
    ///     .with_graceful_shutdown(async move {
    ///         taskwire::shutdown_signal().await;
    ///         tw.shutdown().await;
    ///     })
    ///     .await
    /// # }
    /// ```
    ///
    /// `config.addr` is not bound, but the Host check against DNS rebinding
    /// applies when it is a loopback address: set it to the application's
    /// listener address. The TLS settings belong to taskwire's own listener:
    /// with them set this is an error (terminate TLS in the application).
    /// An invalid configuration ([`Config::validate`]) is an
    /// [`io::ErrorKind::InvalidInput`] error naming the setting.
    pub fn build(cfg: Config, registry: Registry) -> io::Result<Server> {
        if cfg.tls_cert.is_some() || cfg.tls_key.is_some() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "tls_cert/tls_key: a server mounted in another app serves no TLS of its \
                 own; terminate TLS in the app, or use Server::bind",
            ));
        }
        Ok(Server {
            app: new_app(cfg, registry)?,
            listener: None,
            tls: None,
        })
    }

    /// Binds the listener and starts the compute pool.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use taskwire::{Config, Registry, Server};
    /// let mut registry = Registry::new();
    /// taskwire::builtin::register(&mut registry);
    /// let server = Server::bind(Config::default(), registry).await?;
    /// println!("listening on {}", server.local_addr()?);
    /// server.run(taskwire::shutdown_signal()).await
    /// # }
    /// ```
    ///
    /// An invalid configuration ([`Config::validate`]) or unreadable TLS files
    /// are an [`io::ErrorKind::InvalidInput`] error naming the setting.
    pub async fn bind(cfg: Config, registry: Registry) -> io::Result<Server> {
        let invalid =
            |e: crate::config::ConfigError| io::Error::new(io::ErrorKind::InvalidInput, e);
        cfg.validate().map_err(invalid)?;
        let tls = match &cfg.tls() {
            Some(t) => Some(crate::tls::acceptor(t).map_err(invalid)?),
            None => None,
        };
        // Bound before the pool starts: a port in use costs no threads.
        let listener = TcpListener::bind(cfg.addr).await?;
        Ok(Server {
            app: new_app(cfg, registry)?,
            listener: Some(listener),
            tls,
        })
    }

    /// The bound address (useful with port 0); an
    /// [`io::ErrorKind::NotConnected`] error for a server made by
    /// [`Server::build`], which has no listener of its own.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.listener {
            Some(l) => l.local_addr(),
            None => Err(io::Error::new(
                io::ErrorKind::NotConnected,
                "built for mounting (Server::build): the app's listener has the address",
            )),
        }
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.app.shutdown.clone())
    }

    /// taskwire's routes, state applied: `/ws` (the WebSocket), `/healthz`,
    /// `/metrics`, `/admin/…` and the dashboard at `/` and `/{file}`.
    ///
    /// Mount it under a prefix with [`Router::nest_service`]
    /// (`app.nest_service("/tasks", tw.router())`, whatever the app's state
    /// type), which routes `/tasks`, `/tasks/` and everything below; axum's
    /// `nest` routes `/tasks` but not `/tasks/`, where the dashboard lives.
    /// The dashboard's URLs are relative to its page, so it works under any
    /// prefix; `/tasks` redirects to `/tasks/`. Or [`Router::merge`] it to
    /// serve taskwire at the root.
    ///
    /// Every route needs the client address: serve the application with
    /// `into_make_service_with_connect_info::<SocketAddr>()`. Without it each
    /// request is answered 500 with a message saying so (there is no safe
    /// guess: loopback would open the admin API to everyone). The
    /// `trusted_proxies` setting applies to that address as under
    /// [`Server::run`]. The defences before the upgrade (request-head
    /// timeout, bounds on connections not yet upgraded) live in
    /// [`Server::run`]'s accept loop: a mounting application sets its own
    /// (docs/SECURITY.md, "When taskwire is mounted in your own application").
    pub fn router(&self) -> Router {
        router(self.app.clone())
    }

    /// The graceful shutdown, for a server mounted with [`Server::router`]:
    /// upgrades are refused (503) from now on, in-flight tasks get the grace
    /// period, the rest are answered `-32005`, every WebSocket is closed with
    /// 1001 and the compute pool stops. Returns at the latest
    /// [`SHUTDOWN_MARGIN`] after the grace period; WebSockets still open then
    /// are dropped. Calling it again returns at once.
    ///
    /// Call it from the application's shutdown signal (axum's
    /// `with_graceful_shutdown`), before axum waits for its HTTP connections:
    /// taskwire's event streams end here, so that wait can finish.
    pub async fn shutdown(&self) {
        self.app.shutdown.cancel();
        finish(&self.app).await;
    }

    /// Serves until `signal` resolves (or a [`ShutdownHandle`] fires), then shuts
    /// down gracefully: stops accepting, gives in-flight tasks the grace period,
    /// answers the rest `-32005` and closes every WebSocket with 1001.
    ///
    /// Returns at the latest [`SHUTDOWN_MARGIN`] after the grace period,
    /// whatever clients hold open (a half-sent request head, an event stream
    /// or a WebSocket that does not read): what is still open then is dropped.
    ///
    /// A server made by [`Server::build`] binds `addr` here.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let app = self.app.clone();
        let listener = match self.listener {
            Some(l) => l,
            None => TcpListener::bind(app.cfg.addr).await?,
        };
        let router = router(app.clone());
        let stop = app.shutdown.clone();
        let mut signal = std::pin::pin!(signal);
        loop {
            let accepted = tokio::select! {
                _ = &mut signal => {
                    stop.cancel();
                    break;
                }
                _ = stop.cancelled() => break,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((tcp, peer)) => accept_one(&app, &router, self.tls.as_ref(), tcp, peer),
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than
                    // spin, as axum and hyper do.
                    if let Some(suppressed) = app.refusal_log.allow(Instant::now()) {
                        tracing::warn!(suppressed, "accept: {e}");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                }
            }
        }
        tracing::info!("shutting down");
        // Nothing new gets in: the port is closed at once.
        drop(listener);
        finish(&app).await;
        Ok(())
    }
}

/// The state shared by every connection, and the compute pool started.
fn new_app(cfg: Config, registry: Registry) -> io::Result<Arc<App>> {
    cfg.validate()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let discover = serde_json::value::to_raw_value(&registry.discover())
        .map_err(|e| io::Error::other(format!("rpc.discover: {e}")))?;
    let pool = ComputePool::new(cfg.compute());
    let observer = Arc::new(Observer::new(
        &registry
            .tasks()
            .iter()
            .map(|t| t.name())
            .collect::<Vec<_>>(),
        {
            let c = cfg.compute();
            c.workers + c.max_extra_workers
        },
    ));
    // Decided once: with observing off, connections report to no-op hooks.
    let hooks: Arc<dyn Hooks> = if cfg.observe {
        observer.clone()
    } else {
        Arc::new(())
    };
    Ok(Arc::new(App {
        observer,
        hooks,
        admin: Arc::new(AdminAccess {
            token: cfg.admin_token.clone(),
            allowed_hosts: cfg.allowed_hosts.clone(),
            allowed_origins: cfg.allowed_origins.clone(),
        }),
        registry,
        discover,
        pool,
        shutdown: CancellationToken::new(),
        next_task: AtomicU64::new(1),
        next_conn: AtomicU64::new(1),
        open_conns: Arc::default(),
        conns_changed: Notify::new(),
        per_ip: Arc::default(),
        token_conns: cfg.auth_tokens.iter().map(|_| Arc::default()).collect(),
        http_conns: Arc::default(),
        http_per_ip: Arc::default(),
        hard_stop: CancellationToken::new(),
        outbound_total: Arc::default(),
        refusal_log: LogLimiter::new(Duration::from_secs(1)),
        cfg,
    }))
}

/// The end of a graceful shutdown already started (`app.shutdown` fired):
/// waits for the connections to close, up to the deadline, then drops what is
/// left and stops the pool. Shared by [`Server::run`] and [`Server::shutdown`].
async fn finish(app: &Arc<App>) {
    if app.hard_stop.is_cancelled() {
        return;
    }
    // HTTP connections finish their request and close (see `serve_http`; a
    // mounted server has none of its own); WebSockets close with 1001 once
    // their tasks had the grace period.
    let deadline = app.cfg.shutdown_grace + SHUTDOWN_MARGIN;
    let closed = tokio::time::timeout(deadline, async {
        loop {
            let changed = app.conns_changed.notified();
            if app.open_conns.load(Ordering::Acquire) == 0
                && app.http_conns.load(Ordering::Acquire) == 0
            {
                break;
            }
            changed.await;
        }
    })
    .await;
    if closed.is_err() {
        tracing::warn!(
            websockets = app.open_conns.load(Ordering::Acquire),
            http = app.http_conns.load(Ordering::Acquire),
            "shutdown deadline passed: dropping the connections still open"
        );
    }
    app.hard_stop.cancel();
    app.pool.shutdown();
}

/// How long after the grace period shutdown waits for connections to close
/// before it drops them: room for the close handshakes and the last replies.
pub const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// The answers to a connection refused before HTTP is spoken: written with
/// one non-blocking write, best effort, then the socket is closed.
const REFUSED_PER_IP: &[u8] =
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
const REFUSED_FULL: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

/// Admits or refuses one accepted TCP connection against the HTTP bounds and
/// spawns its task. Refused ones are closed at once, so that a flood of
/// connections that never send a request cannot hold descriptors.
fn accept_one(
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
            log_refusal(app, refusal, peer);
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
fn log_refusal(app: &App, refusal: Refusal, peer: SocketAddr) {
    if let Some(suppressed) = app.refusal_log.allow(Instant::now()) {
        tracing::warn!(
            %peer,
            reason = refusal.reason().label(),
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
                security::address_group(peer),
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

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/ws", get(ws_handler))
        .route("/healthz", get(|| async { "ok" }))
        .merge(crate::observe::routes(&app))
        .layer(axum::middleware::map_response(no_framing))
        .layer(axum::middleware::from_fn_with_state(
            app.clone(),
            client_address,
        ))
        .with_state(app)
}

/// Every handler sees the client: the TCP peer, or the address a trusted
/// proxy names. Done here rather than in the accept loop so that a router
/// mounted in another application applies `trusted_proxies` the same way.
async fn client_address(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let Some(ConnectInfo(peer)) = req.extensions().get::<ConnectInfo<SocketAddr>>().copied() else {
        // Guessing would be unsafe (loopback would open the admin API to
        // everyone), so the mounting app's mistake is made plain.
        if let Some(suppressed) = app.refusal_log.allow(Instant::now()) {
            tracing::error!(suppressed, "{NO_CONNECT_INFO}");
        }
        return (StatusCode::INTERNAL_SERVER_ERROR, NO_CONNECT_INFO).into_response();
    };
    let client = security::client_addr(peer, req.headers(), &app.cfg.trusted_proxies);
    req.extensions_mut().insert(ConnectInfo(client));
    next.run(req).await
}

/// No page of ours may be framed by another site (the dashboard's kill
/// buttons could be clickjacked), nor any response sniffed into another type.
async fn no_framing(mut r: Response) -> Response {
    if r.status() != StatusCode::SWITCHING_PROTOCOLS {
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("frame-ancestors 'none'"),
        );
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
        h.insert(
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
    }
    r
}

/// The host a request names: its `Host` header, or the authority of an
/// absolute-form request target.
pub(crate) fn request_host<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
}

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
enum Refusal {
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
    fn reason(self) -> RefusalReason {
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
        Some(max) => match Keyed::acquire(&app.per_ip, security::address_group(peer.ip()), max) {
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

async fn ws_handler(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
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
