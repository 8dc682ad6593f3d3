//! The state every connection shares ([`App`]): placed below `conn/` and
//! `http/` so that a connection names it without importing the HTTP side.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::compute::ComputePool;
use crate::config::Config;
use crate::error::Error;
use crate::limit::{Keyed, LogLimiter};
use crate::observe::{Hooks, Observer};
use crate::registry::Registry;
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
    pub next_task: AtomicU64,
    pub next_conn: AtomicU64,
    /// Open WebSockets: in all, and per address group.
    pub(crate) open_conns: Arc<AtomicUsize>,
    pub(crate) conns_changed: Notify,
    pub(crate) per_ip: Arc<Keyed<IpAddr>>,
    /// Open connections per configured client token, by index.
    pub(crate) token_conns: Vec<Arc<AtomicUsize>>,
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
}

/// The state shared by every connection, and the compute pool started.
pub(crate) fn new_app(cfg: Config, registry: Registry) -> Result<Arc<App>, Error> {
    cfg.validate()?;
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
        wasm,
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
