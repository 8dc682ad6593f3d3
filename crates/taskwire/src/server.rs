//! The HTTP side: configuration, the router (`/ws`, `/healthz`, `/metrics`,
//! `/admin`, the dashboard) and graceful shutdown.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::compute::{ComputeConfig, ComputePool};
use crate::config::{AuthToken, RateLimit, TlsConfig};
use crate::connection::ConnLimits;
use crate::observe::Observer;
use crate::protocol::SUBPROTOCOL;
use crate::registry::Registry;
use crate::security::{self, CountSlot, IpSlot, PerIp};

/// Server settings. Every field has a working default, and the defaults suit
/// local use: see docs/SECURITY.md before exposing a server to the internet.
/// [`crate::config::Settings`] builds one from a file, the environment and flags.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:7878`).
    pub addr: SocketAddr,
    /// Largest WebSocket message accepted; larger ones close the connection
    /// with 1009 (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Requests in flight per connection before `-32001 connection_inflight`
    /// (default 1024). Every element of a batch holds a place until the
    /// batch's answer is sent.
    pub max_inflight_per_connection: usize,
    /// Most elements of one batch; a longer batch gets one `-32600` and
    /// nothing in it runs (default 256).
    pub max_batch: usize,
    /// Open connections before new upgrades get HTTP 503 (default 10 000).
    pub max_connections: usize,
    /// Open connections per client IP address before new upgrades get HTTP 429
    /// (default: no limit).
    pub max_connections_per_ip: Option<usize>,
    /// Cap on any task's deadline (default 1 hour).
    pub max_task_timeout: Duration,
    /// How long in-flight tasks get to finish on shutdown (default 5 s).
    pub shutdown_grace: Duration,
    /// WebSocket ping period; two unanswered pings close the connection (default 20 s).
    pub ping_interval: Duration,
    /// WebSocket Ping frames a client may send; one beyond the rate closes the
    /// connection with 1008, as each makes the server queue a Pong (default
    /// 10 per second, bursts of 20).
    pub ping_rate: RateLimit,
    /// Capacity of each connection's outbound queue (default 1024 messages).
    pub outbound_queue: usize,
    /// Bytes each connection's outbound queue may hold (default 4 MiB): with
    /// the message count, what bounds the memory a client that does not read
    /// can pin until the write timeout closes it.
    pub outbound_bytes: usize,
    /// How long a reply may wait for room in the outbound queue, or a write for
    /// the socket, before the client is closed as a slow consumer (default 10 s).
    pub write_timeout: Duration,
    /// Bearer token for `/admin`; without one, `/admin` answers loopback peers only.
    pub admin_token: Option<String>,
    /// Page origins (`https://app.example.com`) allowed to open `/ws` besides
    /// the server's own host; `*` allows any. Others get HTTP 403 (default: none).
    pub allowed_origins: Vec<String>,
    /// Refuse upgrades that carry no `Origin` header, i.e. non-browser
    /// clients (default false).
    pub require_origin: bool,
    /// Client tokens; when any is configured, `/ws` requires one (header,
    /// `token` query parameter or `taskwire_token` cookie) and answers 401
    /// without (default: none, `/ws` is open).
    pub auth_tokens: Vec<AuthToken>,
    /// Serve `wss://` and `https://` with this certificate (default: plain).
    pub tls: Option<TlsConfig>,
    /// Request rate per connection; excess requests get `-32001 rate_limited`
    /// (default: no limit).
    pub rate_limit: Option<RateLimit>,
    /// The compute pool.
    pub compute: ComputeConfig,
    /// Keep the live table of connections and the per-task metrics (default
    /// true). Off only to measure what observing costs.
    pub observe: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addr: SocketAddr::from(([127, 0, 0, 1], 7878)),
            max_frame_bytes: 1 << 20,
            max_inflight_per_connection: 1024,
            max_batch: crate::protocol::DEFAULT_MAX_BATCH,
            max_connections: 10_000,
            max_connections_per_ip: None,
            max_task_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            ping_rate: RateLimit {
                per_second: 10,
                burst: 20,
            },
            outbound_queue: 1024,
            outbound_bytes: 4 << 20,
            write_timeout: Duration::from_secs(10),
            admin_token: None,
            allowed_origins: Vec::new(),
            require_origin: false,
            auth_tokens: Vec::new(),
            tls: None,
            rate_limit: None,
            compute: ComputeConfig::default(),
            observe: true,
        }
    }
}

/// Everything a connection needs, shared.
pub(crate) struct App {
    pub cfg: Config,
    pub registry: Registry,
    pub discover: Box<RawValue>,
    pub pool: ComputePool,
    pub observer: Observer,
    pub shutdown: CancellationToken,
    pub next_task: AtomicU64,
    pub next_conn: AtomicU64,
    open_conns: AtomicUsize,
    conns_changed: Notify,
    per_ip: Arc<PerIp>,
    /// Open connections per configured client token, by index.
    token_conns: Vec<Arc<AtomicUsize>>,
}

/// A bound server, ready to run.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
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

impl Server {
    /// Binds the listener and starts the compute pool.
    ///
    /// ```no_run
    /// # async fn run() -> std::io::Result<()> {
    /// use taskwire::{Config, Registry, Server};
    /// let server = Server::bind(Config::default(), Registry::with_builtins()).await?;
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
        let tls = match &cfg.tls {
            Some(t) => Some(crate::tls::acceptor(t).map_err(invalid)?),
            None => None,
        };
        let listener = TcpListener::bind(cfg.addr).await?;
        let discover = serde_json::value::to_raw_value(&registry.discover())
            .map_err(|e| io::Error::other(format!("rpc.discover: {e}")))?;
        let pool = ComputePool::new(cfg.compute.clone());
        let app = Arc::new(App {
            observer: Observer::new(
                cfg.observe,
                &registry
                    .tasks()
                    .iter()
                    .map(|t| t.name())
                    .collect::<Vec<_>>(),
            ),
            registry,
            discover,
            pool,
            shutdown: CancellationToken::new(),
            next_task: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            open_conns: AtomicUsize::new(0),
            conns_changed: Notify::new(),
            per_ip: Arc::default(),
            token_conns: cfg.auth_tokens.iter().map(|_| Arc::default()).collect(),
            cfg,
        });
        Ok(Server { app, listener, tls })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// A handle that starts the graceful shutdown.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.app.shutdown.clone())
    }

    /// Serves until `signal` resolves (or a [`ShutdownHandle`] fires), then shuts
    /// down gracefully: stops accepting, gives in-flight tasks the grace period,
    /// answers the rest `-32005` and closes every WebSocket with 1001.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) -> io::Result<()> {
        let app = self.app.clone();
        let token = app.shutdown.clone();
        let router = router(app.clone());
        let stop = {
            let token = token.clone();
            async move {
                tokio::select! {
                    _ = signal => token.cancel(),
                    _ = token.cancelled() => {}
                }
                tracing::info!("shutting down");
            }
        };
        let service = router.into_make_service_with_connect_info::<SocketAddr>();
        match self.tls {
            None => {
                use axum::serve::ListenerExt;
                // Replies are small and latency matters: don't let Nagle hold them.
                let listener = self.listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                axum::serve(listener, service)
                    .with_graceful_shutdown(stop)
                    .await?
            }
            Some(acceptor) => {
                use axum::serve::ListenerExt;
                // tap_io gives the listener axum's `ConnectInfo<SocketAddr>`.
                let listener =
                    crate::tls::TlsListener::spawn(self.listener, acceptor, token.clone())?
                        .tap_io(|_| {});
                axum::serve(listener, service)
                    .with_graceful_shutdown(stop)
                    .await?
            }
        }
        // Upgraded connections are ours to wait for, not hyper's.
        let deadline = app.cfg.shutdown_grace + Duration::from_secs(3);
        let _ = tokio::time::timeout(deadline, async {
            loop {
                let changed = app.conns_changed.notified();
                if app.open_conns.load(Ordering::Acquire) == 0 {
                    break;
                }
                changed.await;
            }
        })
        .await;
        app.pool.shutdown();
        Ok(())
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
        .merge(crate::observe::routes(app.clone()))
        .with_state(app)
}

/// Replies gathered before a write to the socket (flushed at every batch end).
const WRITE_BUFFER: usize = 32 << 10;

/// Room in the write buffer beyond the largest message, for control frames.
const PONG_ROOM: usize = 4 << 10;

/// Counts an open connection for as long as it lives.
struct ConnSlot(Arc<App>);

impl ConnSlot {
    fn acquire(app: &Arc<App>) -> Option<ConnSlot> {
        let prev = app.open_conns.fetch_add(1, Ordering::AcqRel);
        if prev >= app.cfg.max_connections {
            app.open_conns.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnSlot(app.clone()))
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open_conns.fetch_sub(1, Ordering::AcqRel);
        self.0.conns_changed.notify_waiters();
    }
}

/// Everything that keeps a connection counted; dropped when it closes.
struct Slots {
    _conn: ConnSlot,
    _ip: Option<IpSlot>,
    _token: Option<CountSlot>,
}

/// Why an upgrade was refused, before it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Refusal {
    Origin,
    Unauthorized,
    PerIp,
    PerToken,
    Full,
}

impl Refusal {
    /// The metrics label.
    fn reason(self) -> &'static str {
        match self {
            Refusal::Origin => "origin",
            Refusal::Unauthorized => "unauthorized",
            Refusal::PerIp => "connections_per_ip",
            Refusal::PerToken => "connections_per_token",
            Refusal::Full => "connections",
        }
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let (status, text) = match self {
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
            Refusal::Full => (StatusCode::SERVICE_UNAVAILABLE, "too many connections"),
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

/// The checks before an upgrade, cheapest and most telling first: origin
/// (403), token (401), per-IP and per-token connections (429), then the
/// server's total (503).
fn admit_upgrade(
    app: &Arc<App>,
    peer: SocketAddr,
    headers: &HeaderMap,
    uri: &Uri,
) -> Result<(Slots, ConnLimits), Refusal> {
    let cfg = &app.cfg;
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
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
        Some(max) => match PerIp::acquire(&app.per_ip, peer.ip(), max) {
            Some(s) => Some(s),
            None => return Err(Refusal::PerIp),
        },
    };
    let spec = token.and_then(|i| Some((cfg.auth_tokens.get(i)?, app.token_conns.get(i)?)));
    let token_slot = match spec {
        Some((t, count)) => match t.max_connections {
            None => None,
            Some(max) => match CountSlot::acquire(count, max) {
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
        rate: t.and_then(|t| t.rate_limit).or(cfg.rate_limit),
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
            app.observer.refused(refusal.reason());
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
        .read_buffer_size(4096)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(max_write)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _slots = slots;
            crate::connection::serve(app, socket, peer, limits).await;
        })
}
