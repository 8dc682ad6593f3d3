//! The state every connection shares ([`App`]): placed below `conn/` and
//! `http/` so that a connection names it without importing the HTTP side.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use axum::http::Extensions;
use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::caller::{DynConnectHook, TokenAuth};
use crate::compute::ComputePool;
use crate::config::Config;
use crate::error::Error;
use crate::limit::{Keyed, LogLimiter};
use crate::observe::{Hooks, Observer};
use crate::registry::Registry;
use crate::session::{Bounds, SessionStore};
use crate::wasm::Lane;

/// Who may use the admin API: the settings of [`crate::Config`] it reads.
#[derive(Clone, Debug, Default)]
pub(crate) struct AdminAccess {
    pub(crate) token: Option<String>,
    pub(crate) allowed_hosts: Vec<String>,
    pub(crate) allowed_origins: Vec<String>,
}

/// Everything a connection needs, shared.
pub(crate) struct App {
    pub cfg: Config,
    pub registry: Registry,
    /// The registry's shared state, handed to every task (`None`: none).
    pub states: Option<Arc<Extensions>>,
    /// Who may connect and who they are: the application's hook,
    /// [`TokenAuth`] for configured tokens, or none (anonymous).
    pub(crate) connect_hook: Option<Arc<dyn DynConnectHook>>,
    pub discover: Box<RawValue>,
    /// The WebAssembly modules installed at run time (tasks of kind `wasm`).
    pub wasm: Arc<Lane>,
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
    /// Task ids of this node (shared with the cluster, which numbers the
    /// tasks it runs for peers from the same counter).
    pub next_task: Arc<AtomicU64>,
    pub next_conn: AtomicU64,
    /// Open WebSockets: in all, and per address group.
    pub(crate) open_conns: Arc<AtomicUsize>,
    pub(crate) conns_changed: Notify,
    pub(crate) per_ip: Arc<Keyed<IpAddr>>,
    /// Connections not upgraded to WebSocket: in all, and per address group.
    pub(crate) http_conns: Arc<AtomicUsize>,
    pub(crate) http_per_ip: Arc<Keyed<IpAddr>>,
    /// Fired when the shutdown deadline passes: whatever is still open ends.
    pub hard_stop: CancellationToken,
    /// Bytes of replies queued and batch answers kept, over every connection
    /// (bounded by `outbound_bytes_total`).
    pub outbound_total: Arc<AtomicUsize>,
    /// Refusals and accept errors are logged at most once a second.
    pub(crate) refusal_log: LogLimiter,
    /// Every session, attached or detached.
    pub(crate) sessions: Arc<SessionStore>,
    /// This node's cluster, when `nats` is set.
    #[cfg(feature = "cluster")]
    pub(crate) cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// The state shared by every connection, and the compute pool started.
/// `hook`: the application's connect hook; with none, configured tokens
/// become [`TokenAuth`]. Both at once is a configuration error: which should
/// name the caller would be a guess (a hook can call a `TokenAuth` itself).
pub(crate) fn new_app(
    cfg: Config,
    registry: Registry,
    hook: Option<Arc<dyn DynConnectHook>>,
) -> Result<Arc<App>, Error> {
    cfg.validate()?;
    let connect_hook = match hook {
        Some(_) if !cfg.auth_tokens.is_empty() => {
            return Err(Error::Config(crate::config::ConfigError::Invalid {
                setting: "tokens",
                reason: "a connect hook is set, and it decides who may connect: \
                         hold a taskwire::TokenAuth in the hook to accept tokens too"
                    .into(),
            }))
        }
        Some(h) => Some(h),
        None if cfg.auth_tokens.is_empty() => None,
        None => Some(Arc::new(TokenAuth::new(cfg.auth_tokens.clone())) as Arc<dyn DynConnectHook>),
    };
    let discover = serde_json::value::to_raw_value(&registry.discover())
        .map_err(|e| Error::Io(std::io::Error::other(format!("rpc.discover: {e}"))))?;
    let wasm = Arc::new(Lane::new(&cfg, &registry));
    if let Some(dir) = &cfg.wasm_dir {
        wasm.load_dir(dir).map_err(|reason| {
            Error::Config(crate::config::ConfigError::Invalid {
                setting: "wasm_dir",
                reason,
            })
        })?;
    }
    let pool = ComputePool::new(cfg.compute());
    let observer = Arc::new(Observer::new(
        &registry
            .tasks()
            .iter()
            .map(|t| (t.name(), t.kind()))
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
    let next_task = Arc::new(AtomicU64::new(1));
    let shutdown = CancellationToken::new();
    let hard_stop = CancellationToken::new();
    #[cfg(feature = "cluster")]
    let cluster = cfg.nats.as_ref().filter(|u| !u.is_empty()).map(|url| {
        crate::cluster::Cluster::start(
            crate::cluster::Settings {
                url: url.clone(),
                node: cfg
                    .node
                    .clone()
                    .unwrap_or_else(crate::cluster::default_node_name),
                offload_after: cfg.cluster_offload,
                beat: cfg.cluster_beat,
                dead_after: cfg.cluster_dead_after,
            },
            crate::cluster::Parts {
                registry: registry.clone(),
                pool: pool.clone(),
                hooks: hooks.clone(),
                observer: observer.clone(),
                states: registry.states(),
                next_task: next_task.clone(),
                wasm: wasm.clone(),
            },
            shutdown.clone(),
            hard_stop.clone(),
        )
    });
    let app = Arc::new(App {
        #[cfg(feature = "cluster")]
        cluster,
        observer,
        hooks,
        admin: Arc::new(AdminAccess {
            token: cfg.admin_token.clone(),
            allowed_hosts: cfg.allowed_hosts.clone(),
            allowed_origins: cfg.allowed_origins.clone(),
        }),
        states: registry.states(),
        connect_hook,
        registry,
        discover,
        wasm,
        pool,
        shutdown,
        next_task,
        next_conn: AtomicU64::new(1),
        open_conns: Arc::default(),
        conns_changed: Notify::new(),
        per_ip: Arc::default(),
        http_conns: Arc::default(),
        http_per_ip: Arc::default(),
        hard_stop,
        outbound_total: Arc::default(),
        refusal_log: LogLimiter::new(Duration::from_secs(1)),
        sessions: SessionStore::new(Bounds {
            window: cfg.session_window,
            buffer_bytes: cfg.session_buffer_bytes,
            buffer_responses: cfg.session_buffer_responses,
            detached_per_ip: cfg.sessions_detached_per_ip,
            bytes_per_ip: cfg.session_bytes_per_ip,
            detached_total: cfg.sessions_detached,
            bytes_total: cfg.session_bytes_total,
        }),
        cfg,
    });
    // Detached sessions' tasks belong to no connection: the admin view asks
    // the store for them.
    app.observer.set_sessions(app.sessions.clone());
    Ok(app)
}
