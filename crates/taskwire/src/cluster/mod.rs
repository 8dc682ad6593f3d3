//! The cluster: nodes share CPU work over NATS, used as a wire only.
//!
//! Placement, fairness and the one answer per request stay taskwire's; NATS
//! carries messages between nodes (core NATS, at most once), and failure
//! detection is ours, by heartbeats.
//!
//! 1. **Joining.** Every node subscribes to [`BEAT_SUBJECT`] and to its inbox
//!    `taskwire.node.<name>`, and announces itself every `cluster_beat_ms`
//!    (500 ms by default) with its spare workers, queue length, a sequence
//!    number and an incarnation (random per process). The peers table holds
//!    the nodes heard within `cluster_dead_ms` (3 s by default).
//! 2. **Offloading.** A CPU task whose params were kept is queued locally in
//!    a [`Claimed`](crate::compute::Claimed) job. If it is still waiting after
//!    `cluster_offload_ms` and a peer announced spare workers, the origin
//!    starts an offer (the task's [`Claim`] leaves `FREE`, so no local worker
//!    starts it meanwhile) and sends it; the peer accepts only if it has a
//!    free worker at that moment, and runs the task in its own pool under a
//!    fairness group of the origin connection (node + connection). A refusal
//!    (or no answer within [`OFFER_TIMEOUT`]) hands the task back.
//! 3. **Running elsewhere.** The peer forwards progress (coalesced as on one
//!    node), and at the end the outcome and the CPU time used, which the
//!    origin charges to the origin connection. Cancels, deadlines (the time
//!    left is sent), disconnects and kills go to the peer as `Cancel`.
//! 4. **Failure.** A peer silent for `cluster_dead_ms` is lost: the origin
//!    answers its tasks `-32008 {"node":..}`, and a peer cancels the tasks of
//!    an origin it no longer hears. NATS down: no beats arrive, every peer is
//!    lost after `cluster_dead_ms`, and the node serves alone (logged, the
//!    `taskwire_cluster_nats_connected` gauge) until the client reconnects.
//!
//! 5. **WebAssembly modules** installed on one node reach every node, by
//!    hash (`modules.rs`), and a wasm task runs on a peer only on the code
//!    it was admitted with.
//!
//! Files: this one (membership, the origin's side, failure detection);
//! `host.rs` (the peer's side: running a task for another node);
//! `modules.rs` (the same WebAssembly modules on every node); `wire.rs`
//! (the messages and their chunks).

mod host;
mod modules;
mod wire;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use axum::http::Extensions;
use futures_util::StreamExt;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;

use crate::compute::{Claim, ComputePool};
use crate::observe::{Hooks, Observer, TaskQuery};
use crate::protocol::{codes, Params};
use crate::registry::{Registry, TaskDef, TaskFuture};
use crate::sync::lock;
use crate::task::{stop_signal, CallerInfo, Ctx, Outcome, Stopped, TaskError, TaskShared};
use crate::wasm::Lane;
use host::RemoteConn;
pub(crate) use wire::WireParams;
use wire::{Beat, Msg, Partials, WireOutcome};

/// Where every node announces itself.
const BEAT_SUBJECT: &str = "taskwire.beat";
/// How long an origin waits for a peer to accept or refuse an offer.
const OFFER_TIMEOUT: Duration = Duration::from_secs(1);
/// Most peers kept in the table; beats from more nodes are ignored.
const MAX_PEERS: usize = 256;
/// How long a stopped task that never reaches a checkpoint is waited for.
const STOP_GRACE: Duration = Duration::from_secs(1);
/// Upper bounds (µs) of the remote dispatch latency histogram's buckets:
/// 25 µs apart around the 300 µs a dispatch on loopback should take.
const LATENCY_BUCKETS_US: [u64; 28] = [
    50, 100, 150, 200, 225, 250, 275, 300, 325, 350, 375, 400, 425, 450, 475, 500, 600, 750, 1_000,
    2_000, 5_000, 10_000, 50_000, 250_000, 1_000_000, 5_000_000, 10_000_000, 30_000_000,
];

/// What a node needs to join a cluster.
#[derive(Clone, Debug)]
pub(crate) struct Settings {
    pub url: String,
    pub node: String,
    pub offload_after: Duration,
    pub beat: Duration,
    pub dead_after: Duration,
}

/// What the cluster uses of the server it belongs to.
pub(crate) struct Parts {
    pub registry: Registry,
    pub pool: ComputePool,
    pub hooks: Arc<dyn Hooks>,
    pub observer: Arc<Observer>,
    pub states: Option<Arc<Extensions>>,
    pub next_task: Arc<AtomicU64>,
    /// The WebAssembly modules, kept the same on every node.
    pub wasm: Arc<Lane>,
}

/// The default node name: the host's name and this process's id.
pub(crate) fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".to_string());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    format!("{host}-{}", std::process::id())
}

struct Peer {
    inc: u64,
    last: Instant,
    /// Spare workers as last announced, less the offers sent since.
    spare: usize,
    queued: u32,
    workers: u32,
}

/// What a peer said of an offer.
enum OfferReply {
    Accepted,
    Refused,
}

/// A task this node sent to a peer.
struct Sent {
    node: Arc<str>,
    task: Arc<TaskShared>,
    reply: Option<oneshot::Sender<OfferReply>>,
    done: Option<oneshot::Sender<(Outcome, u64)>>,
    /// The peer's task id, once it accepted.
    remote_id: Option<u64>,
}

/// A task this node runs for a peer.
struct Hosted {
    origin: Arc<str>,
    origin_inc: u64,
    task: Arc<TaskShared>,
}

/// Per-peer counts and the dispatch latency, for `/metrics`.
#[derive(Default)]
struct Metrics {
    sent: Mutex<HashMap<Arc<str>, (u64, u64)>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    latency_count: AtomicU64,
    latency_sum_us: AtomicU64,
    lost: AtomicU64,
}

/// This node's membership of a cluster.
pub(crate) struct Cluster {
    node: Arc<str>,
    inc: u64,
    set: Settings,
    parts: Parts,
    client: OnceLock<async_nats::Client>,
    connected: AtomicBool,
    peers: Mutex<HashMap<Arc<str>, Peer>>,
    /// Fired when a peer announces spare workers.
    spare_seen: Notify,
    sent: Mutex<HashMap<u64, Sent>>,
    hosted: Mutex<HashMap<(Arc<str>, u64), Hosted>>,
    groups: Mutex<HashMap<u64, Arc<RemoteConn>>>,
    partials: Mutex<Partials>,
    /// Comparing and fetching WebAssembly modules (`modules.rs`).
    modules: Mutex<modules::ModuleSync>,
    metrics: Metrics,
    /// Held while a task is placed here or queued for a peer.
    placing: Mutex<()>,
    seq: AtomicU64,
    xfer: AtomicU64,
    /// The server's shutdown began: no more offers taken.
    stop: CancellationToken,
    /// The shutdown's grace is over: hosted tasks stop, the node leaves.
    hard_stop: CancellationToken,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("node", &self.node).finish()
    }
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // Only distinguishes restarts: time is good enough then.
        return std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
    }
    u64::from_le_bytes(b)
}

/// The NATS URL as logged: credentials in it (`nats://user:pass@host`) are
/// not.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_string(),
    }
}

fn inbox(node: &str) -> String {
    format!("taskwire.node.{node}")
}

/// Where a node answers its peers' admin questions (request/reply).
fn admin_subject(node: &str) -> String {
    format!("taskwire.admin.{node}")
}

/// Most tasks a node lists for the cluster table: its own table's default.
const CLUSTER_TABLE_TASKS: usize = 500;
/// How long the cluster table waits for each peer's part.
const TABLE_TIMEOUT: Duration = Duration::from_secs(1);

fn stopped_to_u8(s: Stopped) -> u8 {
    match s {
        Stopped::Cancelled => 1,
        Stopped::Disconnected => 2,
        Stopped::DeadlineExceeded => 3,
        Stopped::Killed => 4,
        Stopped::Shutdown => 5,
    }
}

fn stopped_from_u8(v: u8) -> Stopped {
    match v {
        2 => Stopped::Disconnected,
        3 => Stopped::DeadlineExceeded,
        4 => Stopped::Killed,
        5 => Stopped::Shutdown,
        _ => Stopped::Cancelled,
    }
}

fn to_wire(o: &Outcome, timeout_ms: Option<u64>) -> WireOutcome {
    match o {
        Outcome::Ok(v) => WireOutcome::Ok(v.clone()),
        Outcome::Err(TaskError::Stopped(s)) => WireOutcome::Stopped(stopped_to_u8(*s)),
        Outcome::Err(e) => {
            let eo = e.to_error_object(timeout_ms);
            WireOutcome::Err {
                code: eo.code,
                message: eo.message,
                data: eo.data,
            }
        }
        Outcome::Crashed(m) => WireOutcome::Crashed(m.clone()),
        Outcome::Lost => WireOutcome::Lost,
    }
}

fn from_wire(o: WireOutcome) -> Outcome {
    match o {
        WireOutcome::Ok(v) => Outcome::Ok(v),
        WireOutcome::Stopped(s) => Outcome::Err(TaskError::Stopped(stopped_from_u8(s))),
        WireOutcome::Err {
            code,
            message,
            data,
        } => Outcome::Err(TaskError::Failed {
            code,
            message,
            data,
        }),
        WireOutcome::Crashed(m) => Outcome::Crashed(m),
        WireOutcome::Lost => Outcome::Lost,
    }
}

/// The answer to a task whose node was lost.
fn node_lost(node: &str) -> Outcome {
    Outcome::Err(TaskError::Failed {
        code: codes::NODE_LOST,
        message: format!("the node running the task was lost ({node}); it may have run in part"),
        data: Some(serde_json::json!({ "node": node })),
    })
}

/// The params of a request, kept as text so that another node can run it.
pub(crate) fn keep_params(p: &Params<'_>) -> WireParams {
    match p {
        Params::None => WireParams::None,
        Params::Raw(r) => WireParams::Object((*r).to_owned()),
        Params::Owned(r) => WireParams::Object(r.clone()),
        Params::Array(r) => WireParams::Array((*r).to_owned()),
    }
}

impl WireParams {
    /// Bytes the kept params hold, counted against the connection's bounds.
    pub(crate) fn bytes(&self) -> usize {
        self.len()
    }

    /// The task's future for these params (`None` if they do not fit it).
    pub(crate) fn call(&self, def: &TaskDef, ctx: Ctx) -> Option<TaskFuture> {
        // The task copies what it needs before `call` returns (its future is
        // 'static), so the params are borrowed only here.
        let p = match self {
            WireParams::None => Params::None,
            WireParams::Object(r) => Params::Raw(r),
            WireParams::Array(r) => Params::Array(r),
        };
        (def.call)(ctx, p).ok()
    }
}

/// Whether a task was answered as lost with its node.
pub(crate) fn is_node_lost(o: &Outcome) -> bool {
    matches!(o, Outcome::Err(TaskError::Failed { code, .. }) if *code == codes::NODE_LOST)
}

/// Removes a sent task's entry when the offload ends or is dropped, and tells
/// the peer to stop it if it may still run there.
struct SentGuard {
    cluster: Arc<Cluster>,
    rid: u64,
    node: Arc<str>,
    cancel_on_drop: bool,
}

impl Drop for SentGuard {
    fn drop(&mut self) {
        let was = lock(&self.cluster.sent).remove(&self.rid);
        if self.cancel_on_drop && was.is_some() {
            let c = self.cluster.clone();
            let (node, rid) = (self.node.clone(), self.rid);
            tokio::spawn(async move {
                let msg = Msg::Cancel {
                    from: c.node.to_string(),
                    rid,
                    why: stopped_to_u8(Stopped::Cancelled),
                };
                c.send(&node, &msg).await;
            });
        }
    }
}

impl Cluster {
    /// Joins the cluster (connecting in the background, and again whenever
    /// the connection is lost). From `shutdown` on it takes no more tasks
    /// from peers; at `hard_stop` (the end of the shutdown's grace) it stops
    /// the tasks it runs for peers, answers them, and leaves.
    pub(crate) fn start(
        set: Settings,
        parts: Parts,
        shutdown: CancellationToken,
        hard_stop: CancellationToken,
    ) -> Arc<Cluster> {
        let c = Arc::new(Cluster {
            node: Arc::from(set.node.as_str()),
            inc: random_u64(),
            set,
            parts,
            client: OnceLock::new(),
            connected: AtomicBool::new(false),
            peers: Mutex::new(HashMap::new()),
            spare_seen: Notify::new(),
            sent: Mutex::new(HashMap::new()),
            hosted: Mutex::new(HashMap::new()),
            groups: Mutex::new(HashMap::new()),
            partials: Mutex::new(Partials::default()),
            modules: Mutex::new(modules::ModuleSync::default()),
            metrics: Metrics::default(),
            placing: Mutex::new(()),
            seq: AtomicU64::new(0),
            xfer: AtomicU64::new(random_u64() >> 1),
            stop: shutdown,
            hard_stop,
        });
        match tokio::runtime::Handle::try_current() {
            Ok(h) => {
                h.spawn(run(c.clone()));
            }
            Err(_) => tracing::error!("cluster: no Tokio runtime to join from; serving alone"),
        }
        c
    }

    /// Held while a task is placed: "is a worker free?" and queueing the
    /// task are one step.
    pub(crate) fn placing(&self) -> std::sync::MutexGuard<'_, ()> {
        lock(&self.placing)
    }

    /// This node's name.
    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Peers in the table now.
    pub(crate) fn peer_count(&self) -> usize {
        lock(&self.peers).len()
    }

    /// Whether the NATS connection is up.
    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    async fn publish(&self, subject: String, payload: Vec<u8>) {
        if !self.connected() {
            // A disconnected client would buffer; the peers' failure
            // detection already treats this node as gone.
            return;
        }
        if let Some(cl) = self.client.get() {
            if let Err(e) = cl.publish(subject, payload.into()).await {
                tracing::debug!(error = %e, "cluster publish failed");
            }
        }
    }

    async fn send(&self, node: &str, msg: &Msg) {
        let xfer = self.xfer.fetch_add(1, Ordering::Relaxed);
        for part in wire::encode(msg, xfer) {
            self.publish(inbox(node), part).await;
        }
    }

    /// The peer with the most spare workers, one of them reserved for an offer.
    fn pick_peer(&self) -> Option<Arc<str>> {
        let mut peers = lock(&self.peers);
        let (name, p) = peers
            .iter_mut()
            .filter(|(_, p)| p.spare > 0)
            .max_by_key(|(_, p)| p.spare)?;
        p.spare -= 1;
        Some(name.clone())
    }

    fn note_spare(&self, node: &str, spare: u32) {
        if let Some(p) = lock(&self.peers).get_mut(node) {
            p.spare = spare as usize;
        }
        if spare > 0 {
            self.spare_seen.notify_waiters();
        }
    }

    fn count(&self, node: &Arc<str>, sent: bool) {
        let mut m = lock(&self.metrics.sent);
        if m.len() >= MAX_PEERS * 2 && !m.contains_key(node) {
            return;
        }
        let e = m.entry(node.clone()).or_default();
        if sent {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }

    fn observe_latency(&self, d: Duration) {
        let us = d.as_micros() as u64;
        let m = &self.metrics;
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            if us <= *b {
                m.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        m.latency_count.fetch_add(1, Ordering::Relaxed);
        m.latency_sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Whether a task could be offered now: NATS is up and a peer is known.
    pub(crate) fn can_offer(&self) -> bool {
        self.connected() && !lock(&self.peers).is_empty()
    }

    /// Offers a queued task to peers once it has waited `cluster_offload_ms`.
    /// The caller holds the claim ([`Claim::hold`]) before queuing the task
    /// when no local worker is free; this releases it once no peer can take
    /// the task.
    /// Resolves with its outcome if a peer ran it (the CPU it used is charged
    /// to `group`), with `None` if the task was stopped before anybody took
    /// it, and never if a local worker took it. Dropped while a peer has it:
    /// the peer is told to stop.
    pub(crate) async fn offload(
        self: &Arc<Self>,
        task: &Arc<TaskShared>,
        claim: &Claim,
        params: &WireParams,
        module: Option<&str>,
        group: u64,
    ) -> Option<Outcome> {
        tokio::select! {
            _ = tokio::time::sleep(self.set.offload_after) => {}
            _ = task.token.cancelled() => {
                claim.release();
                return None;
            }
        }
        let (node, guard, done) = loop {
            if !claim.is_free() {
                // A local worker has it.
                return std::future::pending().await;
            }
            if task.token.is_cancelled() {
                claim.release();
                return None;
            }
            let notified = self.spare_seen.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let Some(node) = self.pick_peer() else {
                // Nobody to take it now: it runs here when a worker is free,
                // unless a peer has room first.
                claim.release();
                notified.await;
                continue;
            };
            if !claim.start_offer() {
                if let Some(p) = lock(&self.peers).get_mut(&node) {
                    p.spare += 1;
                }
                continue;
            }
            let (reply_tx, reply_rx) = oneshot::channel();
            let (done_tx, done_rx) = oneshot::channel();
            lock(&self.sent).insert(
                task.id,
                Sent {
                    node: node.clone(),
                    task: task.clone(),
                    reply: Some(reply_tx),
                    done: Some(done_tx),
                    remote_id: None,
                },
            );
            let mut guard = SentGuard {
                cluster: self.clone(),
                rid: task.id,
                node: node.clone(),
                cancel_on_drop: true,
            };
            let timeout_ms = task.deadline.map(|d| {
                d.saturating_duration_since(Instant::now())
                    .as_millis()
                    .max(1) as u64
            });
            let offer = Msg::Offer {
                from: self.node.to_string(),
                inc: self.inc,
                rid: task.id,
                conn: task.conn,
                caller: CallerInfo::id_of(&task.caller).map(str::to_string),
                method: task.method.to_string(),
                params: params.clone(),
                timeout_ms,
                progress: task.wants_progress(),
                module: module.map(str::to_string),
            };
            let sent_at = Instant::now();
            tracing::debug!(task = task.id, peer = %node, "cluster: offering");
            self.send(&node, &offer).await;
            match tokio::time::timeout(OFFER_TIMEOUT, reply_rx).await {
                Ok(Ok(OfferReply::Accepted)) => {
                    tracing::debug!(task = task.id, peer = %node, "cluster: accepted");
                    self.observe_latency(sent_at.elapsed());
                    self.count(&node, true);
                    claim.offer_taken();
                    break (node, guard, done_rx);
                }
                Ok(Ok(OfferReply::Refused)) => {
                    tracing::debug!(task = task.id, peer = %node, "cluster: refused");
                    guard.cancel_on_drop = false;
                    drop(guard);
                    claim.release();
                    claim.offer_refused();
                }
                _ => {
                    tracing::debug!(task = task.id, peer = %node, "cluster: no answer to an offer");
                    // No answer (or the peer was lost): the guard tells the
                    // peer to stop it, should the offer have reached it.
                    drop(guard);
                    claim.release();
                    claim.offer_refused();
                }
            }
        };
        let _guard = guard;
        let mut done = done;
        let mut told = false;
        loop {
            tokio::select! {
                biased;
                r = &mut done => {
                    let (outcome, cpu_ns) = r.unwrap_or_else(|_| (node_lost(&node), 0));
                    self.parts.pool.charge_remote(group, &task.stats, cpu_ns);
                    return Some(outcome);
                }
                why = stop_signal(task), if !told => {
                    told = true;
                    let msg = Msg::Cancel { from: self.node.to_string(), rid: task.id, why: stopped_to_u8(why) };
                    self.send(&node, &msg).await;
                }
            }
        }
    }

    /// Kills task `id` of node `node` (this one or a peer); false if this
    /// node cannot tell (a peer's kill is sent, not confirmed).
    pub(crate) async fn kill_on(&self, node: &str, id: u64) -> bool {
        if !lock(&self.peers).contains_key(node) {
            return false;
        }
        let msg = Msg::Kill {
            from: self.node.to_string(),
            task: id,
        };
        self.send(node, &msg).await;
        true
    }

    /// The tasks this node sent to peers: (origin task id, node, peer task id).
    pub(crate) fn sent_tasks(&self) -> Vec<(u64, Arc<str>, Option<u64>)> {
        lock(&self.sent)
            .iter()
            .map(|(id, s)| (*id, s.node.clone(), s.remote_id))
            .collect()
    }

    /// This node's tasks as the cluster table lists them: each with its
    /// node and node-qualified id (`A/17`), and, for a task sent to a peer,
    /// where it runs (`runsOn: "B/4"`).
    fn own_tasks(&self) -> Vec<serde_json::Value> {
        let sent: HashMap<u64, String> = self
            .sent_tasks()
            .into_iter()
            .filter_map(|(id, node, r)| r.map(|r| (id, format!("{node}/{r}"))))
            .collect();
        let q = TaskQuery {
            limit: Some(CLUSTER_TABLE_TASKS),
            ..TaskQuery::default()
        };
        self.parts
            .observer
            .tasks(&q)
            .into_iter()
            .filter_map(|t| {
                let id = t.id;
                let mut v = serde_json::to_value(t).ok()?;
                v["node"] = serde_json::Value::from(self.node.as_ref());
                v["qid"] = serde_json::Value::from(format!("{}/{id}", self.node));
                if let Some(r) = sent.get(&id) {
                    v["runsOn"] = serde_json::Value::from(r.as_str());
                }
                Some(v)
            })
            .collect()
    }

    /// Every node's tasks: this node's and each peer's that answers within
    /// [`TABLE_TIMEOUT`] (the others are named in `unreachable`).
    pub(crate) async fn cluster_tasks(&self) -> serde_json::Value {
        let mut tasks = self.own_tasks();
        let peers: Vec<Arc<str>> = lock(&self.peers).keys().cloned().collect();
        let mut unreachable = Vec::new();
        if let (Some(client), true) = (self.client.get(), self.connected()) {
            let asks = peers.iter().map(|p| {
                let client = client.clone();
                let subject = admin_subject(p);
                async move {
                    let r = tokio::time::timeout(
                        TABLE_TIMEOUT,
                        client.request(subject, "tasks".into()),
                    )
                    .await;
                    match r {
                        Ok(Ok(m)) => {
                            serde_json::from_slice::<Vec<serde_json::Value>>(&m.payload).ok()
                        }
                        _ => None,
                    }
                }
            });
            let answers = futures_util::future::join_all(asks).await;
            for (p, a) in peers.iter().zip(answers) {
                match a {
                    Some(t) => tasks.extend(t),
                    None => unreachable.push(p.to_string()),
                }
            }
        } else {
            unreachable.extend(peers.iter().map(|p| p.to_string()));
        }
        serde_json::json!({
            "node": self.node.as_ref(),
            "natsConnected": self.connected(),
            "tasks": tasks,
            "unreachable": unreachable,
        })
    }

    /// The cluster's families for `/metrics` (OpenMetrics text).
    pub(crate) fn openmetrics(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(o, "# TYPE taskwire_cluster_nats_connected gauge");
        let _ = writeln!(o, "# HELP taskwire_cluster_nats_connected Whether this node's NATS connection is up (0 or 1).");
        let _ = writeln!(
            o,
            "taskwire_cluster_nats_connected {}",
            u8::from(self.connected())
        );
        let _ = writeln!(o, "# TYPE taskwire_cluster_peers gauge");
        let _ = writeln!(
            o,
            "# HELP taskwire_cluster_peers Peers heard within the failure timeout."
        );
        let _ = writeln!(o, "taskwire_cluster_peers {}", self.peer_count());
        let _ = writeln!(o, "# TYPE taskwire_cluster_nodes_lost counter");
        let _ = writeln!(
            o,
            "# HELP taskwire_cluster_nodes_lost Peers taken as lost after their beats stopped."
        );
        let _ = writeln!(
            o,
            "taskwire_cluster_nodes_lost_total {}",
            self.metrics.lost.load(Ordering::Relaxed)
        );
        let counts = lock(&self.metrics.sent).clone();
        let _ = writeln!(o, "# TYPE taskwire_cluster_tasks_sent counter");
        let _ = writeln!(
            o,
            "# HELP taskwire_cluster_tasks_sent CPU tasks this node sent to each peer."
        );
        for (peer, (s, _)) in &counts {
            let _ = writeln!(
                o,
                "taskwire_cluster_tasks_sent_total{{peer=\"{peer}\"}} {s}"
            );
        }
        let _ = writeln!(o, "# TYPE taskwire_cluster_tasks_received counter");
        let _ = writeln!(
            o,
            "# HELP taskwire_cluster_tasks_received CPU tasks this node ran for each peer."
        );
        for (peer, (_, r)) in &counts {
            let _ = writeln!(
                o,
                "taskwire_cluster_tasks_received_total{{peer=\"{peer}\"}} {r}"
            );
        }
        let m = &self.metrics;
        let _ = writeln!(o, "# TYPE taskwire_cluster_dispatch_seconds histogram");
        let _ = writeln!(o, "# HELP taskwire_cluster_dispatch_seconds From an offer sent to its acceptance by the peer.");
        for (i, b) in LATENCY_BUCKETS_US.iter().enumerate() {
            let _ = writeln!(
                o,
                "taskwire_cluster_dispatch_seconds_bucket{{le=\"{}\"}} {}",
                *b as f64 / 1e6,
                m.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let n = m.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            o,
            "taskwire_cluster_dispatch_seconds_bucket{{le=\"+Inf\"}} {n}"
        );
        let _ = writeln!(
            o,
            "taskwire_cluster_dispatch_seconds_sum {}",
            m.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(o, "taskwire_cluster_dispatch_seconds_count {n}");
        o
    }

    /// The cluster as the admin API shows it.
    pub(crate) fn summary(&self) -> serde_json::Value {
        let peers: Vec<_> = lock(&self.peers)
            .iter()
            .map(|(n, p)| {
                serde_json::json!({
                    "node": n.as_ref(),
                    "spare": p.spare,
                    "workers": p.workers,
                    "queued": p.queued,
                    "lastSeenMs": p.last.elapsed().as_millis() as u64,
                })
            })
            .collect();
        serde_json::json!({
            "node": self.node.as_ref(),
            "natsConnected": self.connected(),
            "peers": peers,
            "sent": lock(&self.sent).len(),
            "hosted": lock(&self.hosted).len(),
        })
    }

    fn on_beat(&self, b: Beat) {
        if *b.node == *self.node {
            if b.inc != self.inc {
                tracing::warn!(node = %b.node, "another node has this node's name");
            }
            return;
        }
        let mut peers = lock(&self.peers);
        let restarted = peers.get(b.node.as_str()).is_some_and(|p| p.inc != b.inc);
        if restarted {
            peers.remove(b.node.as_str());
            drop(peers);
            tracing::warn!(node = %b.node, "peer restarted: its earlier tasks are lost");
            self.peer_lost(&Arc::from(b.node.as_str()));
            peers = lock(&self.peers);
        }
        if !peers.contains_key(b.node.as_str()) {
            if peers.len() >= MAX_PEERS {
                return;
            }
            tracing::info!(node = %b.node, "peer joined");
        }
        peers.insert(
            Arc::from(b.node.as_str()),
            Peer {
                inc: b.inc,
                last: Instant::now(),
                spare: b.spare as usize,
                queued: b.queued,
                workers: b.workers,
            },
        );
        drop(peers);
        if b.spare > 0 {
            self.spare_seen.notify_waiters();
        }
    }

    /// A peer is gone: its tasks here are answered `-32008`; the tasks it
    /// sent here are cancelled.
    fn peer_lost(&self, node: &Arc<str>) {
        self.metrics.lost.fetch_add(1, Ordering::Relaxed);
        let lost: Vec<Sent> = {
            let mut sent = lock(&self.sent);
            let ids: Vec<u64> = sent
                .iter()
                .filter(|(_, s)| s.node == *node)
                .map(|(id, _)| *id)
                .collect();
            ids.into_iter().filter_map(|id| sent.remove(&id)).collect()
        };
        for mut s in lost {
            // An offer still out is refused; a task that ran there is lost.
            s.reply.take();
            if let Some(d) = s.done.take() {
                let _ = d.send((node_lost(node), 0));
            }
        }
        for h in lock(&self.hosted).values() {
            if h.origin == *node {
                h.task.stop(Stopped::Disconnected);
            }
        }
    }

    /// Every beat period: peers silent past `cluster_dead_ms` are lost, and
    /// tasks hosted for an origin not heard from are cancelled.
    fn reap(&self) {
        let dead: Vec<Arc<str>> = {
            let mut peers = lock(&self.peers);
            let dead: Vec<Arc<str>> = peers
                .iter()
                .filter(|(_, p)| p.last.elapsed() > self.set.dead_after)
                .map(|(n, _)| n.clone())
                .collect();
            for n in &dead {
                peers.remove(n);
            }
            dead
        };
        for n in dead {
            tracing::warn!(node = %n, "peer lost: no beat for {:?}", self.set.dead_after);
            self.peer_lost(&n);
        }
        let peers = lock(&self.peers);
        for h in lock(&self.hosted).values() {
            let alive = peers.get(&h.origin).is_some_and(|p| p.inc == h.origin_inc);
            if !alive && h.task.created.elapsed() > self.set.dead_after {
                h.task.stop(Stopped::Disconnected);
            }
        }
    }

    fn beat(&self) -> Beat {
        let pool = &self.parts.pool;
        let s = pool.stats();
        Beat {
            node: self.node.to_string(),
            inc: self.inc,
            seq: self.seq.fetch_add(1, Ordering::Relaxed),
            spare: pool.spare() as u32,
            workers: s.workers as u32,
            queued: s.queued as u32,
            modules: self.parts.wasm.digest(),
        }
    }

    async fn on_msg(self: &Arc<Self>, msg: Msg) {
        match msg {
            Msg::Offer { .. } => {
                let (from, rid) = match &msg {
                    Msg::Offer { from, rid, .. } => (from.clone(), *rid),
                    _ => return,
                };
                match self.host(msg) {
                    Some((task, run)) => {
                        let accept = Msg::Accept {
                            from: self.node.to_string(),
                            rid,
                            task,
                            spare: self.parts.pool.spare().saturating_sub(1) as u32,
                        };
                        // Accepted first, then started: the origin hears of
                        // the task before any progress or answer of it.
                        self.send(&from, &accept).await;
                        tokio::spawn(run);
                    }
                    None => {
                        let refuse = Msg::Refuse {
                            from: self.node.to_string(),
                            rid,
                            spare: self.parts.pool.spare() as u32,
                        };
                        self.send(&from, &refuse).await;
                    }
                }
            }
            Msg::Accept {
                from,
                rid,
                task,
                spare,
            } => {
                if let Some(s) = lock(&self.sent).get_mut(&rid) {
                    s.remote_id = Some(task);
                    if let Some(r) = s.reply.take() {
                        let _ = r.send(OfferReply::Accepted);
                    }
                }
                self.note_spare(&from, spare);
            }
            Msg::Refuse { from, rid, spare } => {
                if let Some(s) = lock(&self.sent).get_mut(&rid) {
                    if let Some(r) = s.reply.take() {
                        let _ = r.send(OfferReply::Refused);
                    }
                }
                self.note_spare(&from, spare);
            }
            Msg::Progress { rid, value, .. } => {
                let task = lock(&self.sent).get(&rid).map(|s| s.task.clone());
                if let Some(t) = task {
                    t.set_progress(value);
                }
            }
            Msg::Done {
                from,
                rid,
                outcome,
                cpu_ns,
                spare,
            } => {
                let s = lock(&self.sent).remove(&rid);
                if let Some(mut s) = s {
                    // Should the answer overtake the acceptance, it stands
                    // for it: the task ran there.
                    if let Some(r) = s.reply.take() {
                        let _ = r.send(OfferReply::Accepted);
                    }
                    if let Some(d) = s.done.take() {
                        let _ = d.send((from_wire(outcome), cpu_ns));
                    }
                }
                // The peer counted the worker of the task that just ended as
                // busy still: it is free now.
                if let Some(p) = lock(&self.peers).get_mut(from.as_str()) {
                    p.spare = (spare as usize)
                        .max(p.spare + 1)
                        .min(p.workers.max(1) as usize);
                }
                self.spare_seen.notify_waiters();
            }
            Msg::ModulesQuery { from } => {
                let list = self.modules_msg();
                self.send(&from, &list).await;
            }
            Msg::Modules {
                from,
                modules,
                removed,
            } => self.merge_modules(&from, modules, removed).await,
            Msg::Fetch { from, sha256 } => {
                if let Some(m) = self.module_msg(&sha256) {
                    self.send(&from, &m).await;
                }
            }
            Msg::Module {
                sha256,
                spec,
                bytes,
                ..
            } => self.on_module(&sha256, spec, &bytes),
            Msg::Cancel { from, rid, why } => {
                let key = (Arc::<str>::from(from.as_str()), rid);
                if let Some(h) = lock(&self.hosted).get(&key) {
                    h.task.stop(stopped_from_u8(why));
                }
            }
            Msg::Kill { from, task } => {
                tracing::info!(node = %from, task, "kill asked by a peer");
                // Hosted tasks are listed by the observer too.
                self.parts.observer.kill(task);
            }
        }
    }
}

/// The node's life in the cluster: connect, subscribe, beat, reap, read.
async fn run(c: Arc<Cluster>) {
    let weak: Weak<Cluster> = Arc::downgrade(&c);
    let opts = async_nats::ConnectOptions::new()
        .name(format!("taskwire {}", c.node))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // Rejoin within a beat or two of NATS coming back, not after the
        // client's default backoff of several seconds.
        .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(500)))
        .event_callback(move |ev| {
            let weak = weak.clone();
            async move {
                let Some(c) = weak.upgrade() else { return };
                match ev {
                    async_nats::Event::Connected => {
                        c.connected.store(true, Ordering::Release);
                        tracing::info!(node = %c.node, "cluster: connected to NATS");
                    }
                    async_nats::Event::Disconnected => {
                        c.connected.store(false, Ordering::Release);
                        tracing::warn!(node = %c.node, "cluster: NATS connection lost; serving alone until it is back");
                    }
                    other => tracing::debug!(event = %other, "cluster: NATS event"),
                }
            }
        });
    let client = match opts.connect(c.set.url.as_str()).await {
        Ok(cl) => cl,
        Err(e) => {
            tracing::error!(error = %e, url = %redacted(&c.set.url), "cluster: cannot use this NATS address; serving alone");
            return;
        }
    };
    if client.connection_state() == async_nats::connection::State::Connected {
        c.connected.store(true, Ordering::Release);
    }
    let _ = c.client.set(client.clone());
    let beats = client.subscribe(BEAT_SUBJECT).await;
    let msgs = client.subscribe(inbox(&c.node)).await;
    let admin = client.subscribe(admin_subject(&c.node)).await;
    let (mut beats, mut msgs, mut admin) = match (beats, msgs, admin) {
        (Ok(b), Ok(m), Ok(a)) => (b, m, a),
        _ => {
            tracing::error!("cluster: cannot subscribe; serving alone");
            return;
        }
    };
    tracing::info!(node = %c.node, url = %redacted(&c.set.url), "cluster: joining");
    let mut tick = tokio::time::interval(c.set.beat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Checked more often than beats come, so that a loss is seen within
    // `cluster_dead_ms` + 100 ms of the last beat, not + one beat period.
    let mut reap = tokio::time::interval((c.set.beat / 5).min(Duration::from_millis(100)));
    reap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = c.hard_stop.cancelled() => break,
            _ = tick.tick() => {
                if c.connected() {
                    if let Ok(b) = serde_json::to_vec(&c.beat()) {
                        c.publish(BEAT_SUBJECT.to_string(), b).await;
                    }
                }
            }
            _ = reap.tick() => c.reap(),
            m = beats.next() => {
                let Some(m) = m else { break };
                if let Ok(b) = serde_json::from_slice::<Beat>(&m.payload) {
                    let ask = (*b.node != *c.node && c.should_ask_modules(&b.node, b.modules))
                        .then(|| b.node.clone());
                    c.on_beat(b);
                    if let Some(peer) = ask {
                        c.send(&peer, &Msg::ModulesQuery { from: c.node.to_string() }).await;
                    }
                }
            }
            m = admin.next() => {
                let Some(m) = m else { break };
                if let Some(reply) = m.reply {
                    let mut tasks = c.own_tasks();
                    // One NATS message: halve the list until it fits.
                    let mut body = serde_json::to_vec(&tasks).unwrap_or_default();
                    while body.len() > 3 * wire::CHUNK_BYTES && !tasks.is_empty() {
                        tasks.truncate(tasks.len() / 2);
                        body = serde_json::to_vec(&tasks).unwrap_or_default();
                    }
                    if c.connected() {
                        let _ = client.publish(reply, body.into()).await;
                    }
                }
            }
            m = msgs.next() => {
                let Some(m) = m else { break };
                let msg = lock(&c.partials).accept(&m.payload);
                if let Some(msg) = msg {
                    c.on_msg(msg).await;
                }
            }
        }
    }
    // Shutting down: the tasks run for peers stop and are answered (-32005
    // at their origins) before the node leaves; the peers stop hearing beats
    // and treat it as lost after `cluster_dead_ms`. A drain lets the last
    // answers out first.
    let hosted: Vec<Arc<TaskShared>> = lock(&c.hosted).values().map(|h| h.task.clone()).collect();
    for t in hosted {
        t.stop(Stopped::Shutdown);
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while !lock(&c.hosted).is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let _ = client.drain().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::ComputeConfig;
    use crate::sync::Outbox;
    use crate::task::{TaskInit, TaskKind};
    use serde_json::value::RawValue;

    /// A node that never connects (no runtime to join from): its tables only.
    fn offline() -> Arc<Cluster> {
        let pool = ComputePool::new(ComputeConfig {
            workers: 1,
            nice: 0,
            ..ComputeConfig::default()
        });
        Cluster::start(
            Settings {
                url: "nats://127.0.0.1:1".into(),
                node: "a".into(),
                offload_after: Duration::from_millis(10),
                beat: Duration::from_millis(500),
                dead_after: Duration::from_secs(3),
            },
            Parts {
                registry: Registry::new(),
                pool,
                hooks: Arc::new(()),
                observer: Arc::new(Observer::new(&[], 1)),
                states: None,
                next_task: Arc::new(AtomicU64::new(1)),
                wasm: Arc::new(Lane::new(
                    &crate::config::Config::default(),
                    &Registry::new(),
                )),
            },
            CancellationToken::new(),
            CancellationToken::new(),
        )
    }

    fn beat(node: &str, inc: u64) -> Beat {
        Beat {
            node: node.into(),
            inc,
            seq: 0,
            spare: 1,
            workers: 1,
            queued: 0,
            modules: 0,
        }
    }

    #[test]
    fn credentials_in_the_url_are_not_logged() {
        assert_eq!(
            redacted("nats://u:secret@10.0.0.1:4222"),
            "nats://***@10.0.0.1:4222"
        );
        assert_eq!(redacted("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }

    #[test]
    fn the_peers_table_is_bounded() {
        let c = offline();
        for i in 0..MAX_PEERS + 50 {
            c.on_beat(beat(&format!("n{i}"), 1));
        }
        assert_eq!(c.peer_count(), MAX_PEERS);
        // Its own beats are not a peer's.
        c.on_beat(beat("a", c.inc));
        assert_eq!(c.peer_count(), MAX_PEERS);
    }

    fn sent_to(c: &Cluster, node: &str, rid: u64) -> oneshot::Receiver<(Outcome, u64)> {
        let (done, rx) = oneshot::channel();
        let task = TaskShared::new(TaskInit {
            id: rid,
            conn: 1,
            request_id: None,
            method: Arc::from("spin"),
            kind: TaskKind::Cpu,
            timeout_ms: None,
            progress_token: None,
            outbound: Arc::new(Outbox::new(1)),
            caller: None,
            state: None,
        });
        lock(&c.sent).insert(
            rid,
            Sent {
                node: Arc::from(node),
                task,
                reply: None,
                done: Some(done),
                remote_id: Some(1),
            },
        );
        rx
    }

    #[test]
    fn a_lost_peer_s_tasks_are_answered_node_lost_and_the_others_go_on() {
        let c = offline();
        c.on_beat(beat("b", 1));
        c.on_beat(beat("c", 1));
        let mut on_b = sent_to(&c, "b", 7);
        let mut on_c = sent_to(&c, "c", 8);
        // Silence past `cluster_dead_ms` for b only.
        if let Some(p) = lock(&c.peers).get_mut("b") {
            p.last = Instant::now() - Duration::from_secs(4);
        }
        c.reap();
        let (o, _) = on_b.try_recv().expect("answered");
        assert!(is_node_lost(&o));
        match o {
            Outcome::Err(TaskError::Failed { data, .. }) => {
                assert_eq!(data, Some(serde_json::json!({"node": "b"})))
            }
            _ => unreachable!(),
        }
        assert!(on_c.try_recv().is_err(), "c's task still runs");
        assert_eq!(c.peer_count(), 1);
    }

    #[test]
    fn a_restarted_peer_loses_its_earlier_tasks_at_once() {
        let c = offline();
        c.on_beat(beat("b", 1));
        let mut rx = sent_to(&c, "b", 7);
        c.on_beat(beat("b", 2));
        assert!(is_node_lost(&rx.try_recv().expect("answered").0));
        assert_eq!(c.peer_count(), 1);
    }

    #[test]
    fn outcomes_cross_the_wire_unchanged() {
        let ok = RawValue::from_string(r#"{"n":1}"#.into()).expect("json");
        for o in [
            Outcome::Ok(ok),
            Outcome::Err(TaskError::Stopped(Stopped::DeadlineExceeded)),
            Outcome::Err(TaskError::Failed {
                code: -32050,
                message: "no".into(),
                data: Some(serde_json::json!([1])),
            }),
            Outcome::Crashed("boom".into()),
        ] {
            let kind = o.kind();
            let back = from_wire(to_wire(&o, Some(5)));
            assert_eq!(back.kind(), kind);
        }
    }
}
