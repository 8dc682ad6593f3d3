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
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::value::RawValue;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::compute::{ComputeConfig, ComputePool};
use crate::observe::Observer;
use crate::protocol::SUBPROTOCOL;
use crate::registry::Registry;

/// Server settings. Every field has a working default.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address to listen on (default `127.0.0.1:7878`).
    pub addr: SocketAddr,
    /// Largest WebSocket message accepted; larger ones close the connection
    /// with 1009 (default 1 MiB).
    pub max_frame_bytes: usize,
    /// Requests in flight per connection before `-32001 connection_inflight` (default 1024).
    pub max_inflight_per_connection: usize,
    /// Open connections before new upgrades get HTTP 503 (default 10 000).
    pub max_connections: usize,
    /// Cap on any task's deadline (default 1 hour).
    pub max_task_timeout: Duration,
    /// How long in-flight tasks get to finish on shutdown (default 5 s).
    pub shutdown_grace: Duration,
    /// WebSocket ping period; two unanswered pings close the connection (default 20 s).
    pub ping_interval: Duration,
    /// Capacity of each connection's outbound queue (default 1024 messages).
    pub outbound_queue: usize,
    /// How long a reply may wait for room in the outbound queue, or a write for
    /// the socket, before the client is closed as a slow consumer (default 10 s).
    pub write_timeout: Duration,
    /// Bearer token for `/admin`; without one, `/admin` answers loopback peers only.
    pub admin_token: Option<String>,
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
            max_connections: 10_000,
            max_task_timeout: Duration::from_secs(3600),
            shutdown_grace: Duration::from_secs(5),
            ping_interval: Duration::from_secs(20),
            outbound_queue: 1024,
            write_timeout: Duration::from_secs(10),
            admin_token: None,
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
}

/// A bound server, ready to run.
pub struct Server {
    app: Arc<App>,
    listener: TcpListener,
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
    pub async fn bind(cfg: Config, registry: Registry) -> io::Result<Server> {
        let listener = TcpListener::bind(cfg.addr).await?;
        let discover = serde_json::value::to_raw_value(&registry.discover())
            .map_err(|e| io::Error::other(format!("rpc.discover: {e}")))?;
        let pool = ComputePool::new(cfg.compute.clone());
        let app = Arc::new(App {
            observer: Observer::new(
                cfg.observe,
                &registry.tasks().iter().map(|t| t.name()).collect::<Vec<_>>(),
            ),
            registry,
            discover,
            pool,
            shutdown: CancellationToken::new(),
            next_task: AtomicU64::new(1),
            next_conn: AtomicU64::new(1),
            open_conns: AtomicUsize::new(0),
            conns_changed: Notify::new(),
            cfg,
        });
        Ok(Server { app, listener })
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
        axum::serve(
            self.listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(stop)
        .await?;
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

async fn ws_handler(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    if app.shutdown.is_cancelled() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
    }
    let Some(slot) = ConnSlot::acquire(&app) else {
        app.observer.refused("connections");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections").into_response();
    };
    let max = app.cfg.max_frame_bytes;
    // A small read buffer and no write buffer keep an idle connection at a few
    // KiB instead of tungstenite's default 128 KiB.
    ws.protocols([SUBPROTOCOL])
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let _slot = slot;
            crate::connection::serve(app, socket, peer).await;
        })
}
