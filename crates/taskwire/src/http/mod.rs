//! The HTTP half: [`Server`] (bind, build, run, router, shutdown), the
//! router (`/ws`, `/healthz`, `/metrics`, `/admin`, the dashboard), served
//! from taskwire's own accept loop or mounted in an application's router, and
//! graceful shutdown.
//!
//! - `accept.rs`: the own accept loop (request-head timeout, the bounds
//!   before the upgrade, the TLS handshake).
//! - `upgrade.rs`: the `/ws` handler and the checks before the upgrade.
//! - `security.rs`: origin, Host, trusted proxies, cross-site rules (the
//!   tokens are a connect hook, `caller::TokenAuth`).
//! - `admin.rs`: the admin API and the dashboard's files.
//! - `tls.rs`: the rustls acceptor.

mod accept;
mod admin;
pub(crate) mod security;
mod tls;
mod upgrade;
mod wasm_admin;

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::app::{new_app, App};
use crate::caller::{ConnectHook, DynConnectHook};
use crate::config::Config;
use crate::error::Error;
use crate::registry::Registry;

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

/// A [`Server`] with more than a configuration and a registry: made by
/// [`Server::builder`], finished by [`ServerBuilder::bind`] or
/// [`ServerBuilder::build`] as the `Server` functions of the same names.
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// use taskwire::{Caller, Config, ConnectRequest, Refusal, Registry, Server};
///
/// async fn who(req: &ConnectRequest) -> Result<Caller, Refusal> {
///     let user = req.header("x-user").ok_or(Refusal::unauthorized("who are you?"))?;
///     Ok(Caller::new(user))
/// }
///
/// let server = Server::builder(Config::default(), Registry::new())
///     .connect_hook(who)
///     .bind()
///     .await?;
/// # Ok(())
/// # }
/// ```
pub struct ServerBuilder {
    cfg: Config,
    registry: Registry,
    hook: Option<Arc<dyn DynConnectHook>>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("addr", &self.cfg.addr)
            .field("connect_hook", &self.hook.is_some())
            .finish()
    }
}

impl ServerBuilder {
    /// Decides who may connect, and who they are, before each WebSocket
    /// upgrade ([`ConnectHook`]). It replaces the `tokens` setting's check:
    /// setting both is an [`Error::Config`] (hold a
    /// [`TokenAuth`](crate::TokenAuth) in the hook to accept tokens as well).
    pub fn connect_hook(mut self, hook: impl ConnectHook) -> ServerBuilder {
        self.hook = Some(Arc::new(hook));
        self
    }

    /// As [`Server::bind`].
    pub async fn bind(self) -> Result<Server, Error> {
        Server::bind_with(self.cfg, self.registry, self.hook).await
    }

    /// As [`Server::build`].
    pub fn build(self) -> Result<Server, Error> {
        Server::build_with(self.cfg, self.registry, self.hook)
    }
}

/// Why a request reached taskwire's router without a client address.
const NO_CONNECT_INFO: &str = "taskwire needs the client address: serve the app with \
`app.into_make_service_with_connect_info::<std::net::SocketAddr>()`";

impl Server {
    /// A server with options beyond the configuration, such as a
    /// [`ConnectHook`]; finish it with [`ServerBuilder::bind`] or
    /// [`ServerBuilder::build`].
    pub fn builder(cfg: Config, registry: Registry) -> ServerBuilder {
        ServerBuilder {
            cfg,
            registry,
            hook: None,
        }
    }

    /// Starts the compute pool and prepares the routes, without a listener:
    /// for mounting taskwire in an application's own axum router.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use std::net::SocketAddr;
    /// use axum::{routing::get, Router};
    /// use taskwire::{Config, Registry, Server};
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// // Binds nothing; decides whether the Host check against DNS rebinding applies.
    /// let config = Config { addr: listener.local_addr()?, ..Config::default() };
    /// let mut registry = Registry::new();
    /// taskwire::builtin::register(&mut registry)?;
    /// let tw = Server::build(config, registry)?;
    /// let app = Router::new()
    ///     .route("/hello", get(|| async { "hello" }))
    ///     .nest_service("/tasks", tw.router());
    /// axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
    ///     .with_graceful_shutdown(async move {
    ///         taskwire::shutdown_signal().await;
    ///         tw.shutdown().await;
    ///     })
    ///     .await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// `config.addr` is not bound, but the Host check against DNS rebinding
    /// applies when it is a loopback address: set it to the application's
    /// listener address. The TLS settings belong to taskwire's own listener:
    /// with them set this is an error (terminate TLS in the application).
    /// An invalid configuration ([`Config::validate`]) is an
    /// [`Error::Config`] naming the setting.
    pub fn build(cfg: Config, registry: Registry) -> Result<Server, Error> {
        Server::build_with(cfg, registry, None)
    }

    fn build_with(
        cfg: Config,
        registry: Registry,
        hook: Option<Arc<dyn DynConnectHook>>,
    ) -> Result<Server, Error> {
        if cfg.tls_cert.is_some() || cfg.tls_key.is_some() {
            return Err(Error::Config(crate::config::ConfigError::Invalid {
                setting: "tls_cert",
                reason: "a server mounted in another app serves no TLS of its own; \
                         terminate TLS in the app, or use Server::bind"
                    .into(),
            }));
        }
        Ok(Server {
            app: new_app(cfg, registry, hook)?,
            listener: None,
            tls: None,
        })
    }

    /// Binds the listener and starts the compute pool.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use taskwire::{Config, Registry, Server};
    /// let mut registry = Registry::new();
    /// taskwire::builtin::register(&mut registry)?;
    /// let server = Server::bind(Config::default(), registry).await?;
    /// println!("listening on {}", server.local_addr()?);
    /// server.run(taskwire::shutdown_signal()).await?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// An invalid configuration ([`Config::validate`]) is an
    /// [`Error::Config`] and unreadable TLS files an [`Error::Tls`], each
    /// naming the setting; a listener that cannot be bound is an
    /// [`Error::Bind`] naming the address.
    pub async fn bind(cfg: Config, registry: Registry) -> Result<Server, Error> {
        Server::bind_with(cfg, registry, None).await
    }

    async fn bind_with(
        cfg: Config,
        registry: Registry,
        hook: Option<Arc<dyn DynConnectHook>>,
    ) -> Result<Server, Error> {
        cfg.validate()?;
        let tls = match &cfg.tls() {
            Some(t) => Some(tls::acceptor(t).map_err(Error::Tls)?),
            None => None,
        };
        // Bound before the pool starts: a port in use costs no threads.
        let listener = bind(cfg.addr).await?;
        Ok(Server {
            app: new_app(cfg, registry, hook)?,
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
    /// 3 s (`SHUTDOWN_MARGIN`) after the grace period; WebSockets still open then
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
    /// Returns at the latest 3 s (`SHUTDOWN_MARGIN`) after the grace period,
    /// whatever clients hold open (a half-sent request head, an event stream
    /// or a WebSocket that does not read): what is still open then is dropped.
    ///
    /// A server made by [`Server::build`] binds `addr` here.
    pub async fn run(self, signal: impl Future<Output = ()> + Send + 'static) -> Result<(), Error> {
        let app = self.app.clone();
        let listener = match self.listener {
            Some(l) => l,
            None => bind(app.cfg.addr).await?,
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
                Ok((tcp, peer)) => accept::accept_one(&app, &router, self.tls.as_ref(), tcp, peer),
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
    // Connections closed by the shutdown detached their sessions: end them,
    // so that their tasks stop before the pool does.
    app.sessions.shutdown();
    app.hard_stop.cancel();
    app.pool.shutdown();
}

/// How long after the grace period shutdown waits for connections to close
/// before it drops them: room for the close handshakes and the last replies.
pub(crate) const SHUTDOWN_MARGIN: Duration = Duration::from_secs(3);

/// Binds the listener; the error names the address.
async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
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
        .route("/ws", get(upgrade::ws_handler))
        .route("/healthz", get(|| async { "ok" }))
        .merge(admin::routes(&app))
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
