//! `/admin` (JSON, with an SSE stream), `/metrics`, and the dashboard's files.
//!
//! Secure by default: with a token configured, every admin and metrics request
//! must carry it (`Authorization: Bearer …` or `?token=…`); with none, only
//! loopback peers are answered, and only when they name a loopback host (DNS
//! rebinding). A state-changing request a page on another site made is
//! refused either way (cross-site request forgery).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, FromRef, OriginalUri, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{stream, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::app::{AdminAccess, App};
use crate::compute::ComputePool;
use crate::http::security;
use crate::observe::api::{
    ApiError, Closed, ConnList, Killed, MemoryInfo, PoolInfo, RefusalReason, Snapshot, Stats,
    TaskList, TaskState,
};
use crate::observe::metrics::{Live, RuntimeStats};
use crate::observe::{count_states, Hooks, Observer, TaskQuery};
use crate::session::{SessionCounts, SessionInfo, SessionStore};
use crate::task::Stopped;

/// What the admin handlers may reach: the observer, the pool's figures and
/// the access rule, not the whole server (its connections' limits, its
/// registry, its listener slots).
#[derive(Clone)]
pub(crate) struct AdminState {
    pub observer: Arc<Observer>,
    pub hooks: Arc<dyn Hooks>,
    pub pool: ComputePool,
    pub access: Arc<AdminAccess>,
    /// The event stream ends with the server.
    pub shutdown: CancellationToken,
    /// Bytes of replies queued and batch answers kept, over every connection.
    pub outbound_total: Arc<std::sync::atomic::AtomicUsize>,
    /// The WebAssembly modules (`/admin/wasm`).
    pub wasm: Arc<crate::wasm::Lane>,
    /// Sessions, attached and detached.
    pub sessions: Arc<SessionStore>,
    /// This node's cluster, when it is in one.
    #[cfg(feature = "cluster")]
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl FromRef<Arc<App>> for AdminState {
    fn from_ref(app: &Arc<App>) -> AdminState {
        AdminState {
            observer: app.observer.clone(),
            hooks: app.hooks.clone(),
            pool: app.pool.clone(),
            access: app.admin.clone(),
            shutdown: app.shutdown.clone(),
            outbound_total: app.outbound_total.clone(),
            wasm: app.wasm.clone(),
            sessions: app.sessions.clone(),
            #[cfg(feature = "cluster")]
            cluster: app.cluster.clone(),
        }
    }
}

/// How often the event stream sends a snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(250);
/// Tasks per snapshot, busiest first: enough for a dashboard, bounded in size.
const SNAPSHOT_TASKS: usize = 500;

// The generated table is `pub` for its use here; this module keeps it private.
#[allow(unreachable_pub)]
mod files {
    include!(concat!(env!("OUT_DIR"), "/web_files.rs"));
}

pub(crate) fn routes(app: &Arc<App>) -> Router<Arc<App>> {
    let guarded = Router::new()
        .route("/admin/tasks", get(list_tasks))
        .route("/admin/tasks/{id}", get(one_task))
        .route("/admin/tasks/{id}/kill", post(kill_task))
        .route(
            "/admin/tasks/{node}/{id}/kill",
            post(|state, Path((node, id)): Path<(String, String)>| {
                kill_task(state, Path(format!("{node}/{id}")))
            }),
        )
        .route("/admin/connections", get(list_conns))
        .route("/admin/connections/{id}/close", post(close_conn))
        .route("/admin/sessions", get(list_sessions))
        .route("/admin/sessions/{id}/end", post(end_session))
        .route("/admin/stats", get(stats))
        .route("/admin/cluster", get(cluster))
        .route("/admin/cluster/tasks", get(cluster_tasks))
        .route("/admin/events", get(events))
        .route("/metrics", get(metrics))
        .merge(super::wasm_admin::routes())
        .route_layer(middleware::from_fn_with_state(
            AdminState::from_ref(app),
            authorize,
        ));
    Router::new()
        .route("/", get(index))
        .route("/{name}", get(|Path(name): Path<String>| file_owned(name)))
        .merge(guarded)
}

/// The dashboard's page. Its URLs are relative to it, so it must be served
/// at a path ending in `/`: mounted at `/tasks`, a request for `/tasks` is
/// sent to `/tasks/`. The Location is relative (the last segment and a
/// slash), so that it stays right behind a proxy that strips a prefix of its
/// own.
async fn index(OriginalUri(uri): OriginalUri) -> Response {
    let path = uri.path();
    if path.ends_with('/') {
        return serve_file("index.html");
    }
    let last = path.rsplit('/').next().unwrap_or_default();
    let query = uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    Redirect::temporary(&format!("{last}/{query}")).into_response()
}

async fn file_owned(name: String) -> Response {
    serve_file(&name)
}

fn serve_file(name: &str) -> Response {
    match files::FILES.iter().find(|(n, _, _)| *n == name) {
        Some((_, mime, body)) => ([(header::CONTENT_TYPE, *mime)], *body).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The admin rule: the configured token if there is one, else loopback only.
pub(crate) fn admin_allowed(
    configured: Option<&str>,
    presented: &[&str],
    peer: std::net::IpAddr,
) -> bool {
    match configured {
        Some(expected) => presented.iter().any(|t| security::same(t, expected)),
        None => security::is_loopback(peer),
    }
}

async fn authorize(
    State(app): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let cfg = &*app.access;
    let ok = admin_allowed(
        cfg.token.as_deref(),
        &security::bearer_or_query_tokens(req.headers(), req.uri().query()),
        peer.ip(),
    );
    // Let in for being local: the page that asks must be local too, not a
    // foreign name re-pointed to 127.0.0.1. A token cannot be had that way.
    if ok
        && cfg.token.is_none()
        && !security::host_allowed(
            security::request_host(req.headers(), req.uri()),
            &cfg.allowed_hosts,
        )
    {
        app.hooks.refused(RefusalReason::Host);
        return (StatusCode::FORBIDDEN, "host not allowed").into_response();
    }
    if ok
        && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && !security::same_site_request(req.headers(), &cfg.allowed_origins)
    {
        app.hooks.refused(RefusalReason::CrossSite);
        return (StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    if !ok {
        let msg = if cfg.token.is_some() {
            "admin token required"
        } else {
            "admin is reachable from loopback only (configure an admin token)"
        };
        return (StatusCode::UNAUTHORIZED, msg).into_response();
    }
    next.run(req).await
}

async fn list_tasks(State(app): State<AdminState>, Query(q): Query<TaskQuery>) -> Json<TaskList> {
    Json(TaskList {
        tasks: app.observer.tasks(&q),
    })
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ApiError {
            error: format!("no such {what}"),
        }),
    )
        .into_response()
}

async fn one_task(State(app): State<AdminState>, Path(id): Path<u64>) -> Response {
    match app.observer.task_info(id) {
        Some(t) => Json(t).into_response(),
        None => not_found("task"),
    }
}

/// `GET /admin/cluster`: this node, its peers, and where its tasks sent
/// elsewhere run (`"B/17"`: task 17 of node B).
async fn cluster(State(app): State<AdminState>) -> Response {
    #[cfg(feature = "cluster")]
    if let Some(c) = &app.cluster {
        let mut v = c.summary();
        let sent: Vec<_> = c
            .sent_tasks()
            .into_iter()
            .map(|(id, node, remote)| {
                serde_json::json!({
                    "id": id,
                    "node": node.as_ref(),
                    "remoteId": remote.map(|r| format!("{node}/{r}")),
                })
            })
            .collect();
        v["sentTasks"] = serde_json::Value::Array(sent);
        return Json(v).into_response();
    }
    let _ = &app;
    Json(serde_json::json!({ "node": null, "natsConnected": false, "peers": [] })).into_response()
}

/// `GET /admin/cluster/tasks`: every node's tasks, each with `node` and a
/// node-qualified `qid` (`B/17`); without a cluster, this node's alone.
async fn cluster_tasks(State(app): State<AdminState>) -> Response {
    #[cfg(feature = "cluster")]
    if let Some(c) = &app.cluster {
        return Json(c.cluster_tasks().await).into_response();
    }
    let tasks = app.observer.tasks(&TaskQuery::default());
    Json(serde_json::json!({ "node": null, "tasks": tasks, "unreachable": [] })).into_response()
}

/// `POST /admin/tasks/{id}/kill`: `id` is a task of this node, or
/// `NODE/ID` for a task of any node of the cluster (sent there, not confirmed).
async fn kill_task(State(app): State<AdminState>, Path(id): Path<String>) -> Response {
    let local = match id.split_once('/') {
        None => id.parse::<u64>().ok(),
        #[cfg(feature = "cluster")]
        Some((node, n)) => {
            let Ok(n) = n.parse::<u64>() else {
                return not_found("task");
            };
            match &app.cluster {
                Some(c) if c.node() == node => Some(n),
                Some(c) => {
                    return if c.kill_on(node, n).await {
                        Json(Killed { killed: true }).into_response()
                    } else {
                        not_found("node")
                    };
                }
                None => None,
            }
        }
        #[cfg(not(feature = "cluster"))]
        Some(_) => None,
    };
    let Some(id) = local else {
        return not_found("task");
    };
    if app.observer.kill(id) {
        Json(Killed { killed: true }).into_response()
    } else {
        not_found("task")
    }
}

async fn list_conns(State(app): State<AdminState>) -> Json<ConnList> {
    let mut connections: Vec<_> = app
        .observer
        .connections()
        .iter()
        .map(|c| c.info())
        .collect();
    connections.sort_by_key(|c| c.id);
    Json(ConnList { connections })
}

async fn close_conn(State(app): State<AdminState>, Path(id): Path<u64>) -> Response {
    match app.observer.connection(id) {
        Some(c) => {
            c.close_with(axum::extract::ws::close_code::AWAY, "closed by an operator");
            tracing::info!(conn = id, "connection closed by an operator");
            Json(Closed { closed: true }).into_response()
        }
        None => not_found("connection"),
    }
}

/// `GET /admin/sessions`: every session and the store's counters.
#[derive(serde::Serialize)]
struct SessionList {
    sessions: Vec<SessionInfo>,
    counts: SessionCounts,
}

async fn list_sessions(State(app): State<AdminState>) -> Json<SessionList> {
    Json(SessionList {
        sessions: app.sessions.list(),
        counts: app.sessions.counts(),
    })
}

/// `POST /admin/sessions/{id}/end`: its tasks are killed, its responses
/// freed, its connection (if any) closed; a resume gets `-32020`.
async fn end_session(State(app): State<AdminState>, Path(id): Path<u64>) -> Response {
    if app.sessions.end(id, Stopped::Killed) {
        tracing::info!(session = id, "session ended by an operator");
        Json(Closed { closed: true }).into_response()
    } else {
        not_found("session")
    }
}

fn live(app: &AdminState) -> Live {
    let conns = app.observer.connections();
    let tasks: Vec<_> = conns.iter().flat_map(|c| c.tasks()).collect();
    let rt = tokio::runtime::Handle::current().metrics();
    let pool = app.pool.stats();
    let mut states = count_states(&tasks);
    states.add(TaskState::Abandoned, app.observer.abandoned_count() as u64);
    Live {
        open_conns: conns.len(),
        runtime: RuntimeStats {
            workers: rt.num_workers(),
            alive_tasks: rt.num_alive_tasks(),
            global_queue_depth: rt.global_queue_depth(),
        },
        states,
        largest_task_memory: tasks
            .iter()
            .map(|t| t.stats.memory_bytes())
            .max()
            .unwrap_or(0)
            .max(pool.largest_task_memory),
        pool,
        outbound_depth: conns.iter().map(|c| c.outbound_depth()).sum(),
        outbound_bytes: app
            .outbound_total
            .load(std::sync::atomic::Ordering::Relaxed),
    }
}

fn stats_now(app: &AdminState) -> Stats {
    let l = live(app);
    let p = &l.pool;
    Stats {
        connections: l.open_conns,
        tasks: l.states,
        pool: PoolInfo {
            workers: p.workers,
            live_workers: p.live_workers,
            busy: p.busy,
            utilisation: p.utilisation,
            queued: p.queued,
            admitted: p.admitted,
            non_yielding_total: p.non_yielding_total,
            cpu_ms_total: p.cpu_ns_total as f64 / 1e6,
            addresses: p.addresses,
            completion_rate: p.completion_rate,
        },
        memory: MemoryInfo {
            used_bytes: p.memory_used,
            rss_bytes: p.memory_rss,
            allocated_bytes: crate::alloc::allocated_bytes(),
            budget_bytes: p.memory_budget,
            counted: p.memory_counted,
            over_budget: p.over_memory_budget,
            largest_task_bytes: l.largest_task_memory,
            trims: p.memory_trims,
        },
        finished: app.observer.metrics.totals(),
        uptime_ms: app.observer.uptime_ms(),
    }
}

async fn stats(State(app): State<AdminState>) -> Json<Stats> {
    Json(stats_now(&app))
}

async fn metrics(State(app): State<AdminState>) -> Response {
    let mut text = app.observer.metrics.render(&live(&app));
    // The sessions' families go before the exposition's final `# EOF`.
    let end = text.rfind("# EOF").unwrap_or(text.len());
    text.insert_str(end, &app.sessions.openmetrics());
    #[cfg(feature = "cluster")]
    if let Some(c) = &app.cluster {
        let end = text.rfind("# EOF").unwrap_or(text.len());
        text.insert_str(end, &c.openmetrics());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// A snapshot every 250 ms, made when the client is ready for it: a slow
/// client gets fewer snapshots, never a growing buffer.
async fn events(
    State(app): State<AdminState>,
    Query(q): Query<HashMap<String, String>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let limit = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(SNAPSHOT_TASKS)
        .min(10_000);
    let stop = app.shutdown.clone();
    let mut tick = tokio::time::interval(SNAPSHOT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let s = stream::unfold((app, tick), move |(app, mut tick)| async move {
        tick.tick().await;
        let q = TaskQuery {
            limit: Some(limit),
            ..TaskQuery::default()
        };
        let (tasks, counts) = app.observer.tasks_counted(&q);
        // The counts of the same walk as the table, so that they add up.
        let mut stats = stats_now(&app);
        stats.tasks = counts;
        let data = Snapshot { stats, tasks };
        let ev = Event::default()
            .event("snapshot")
            .json_data(&data)
            .unwrap_or_else(|_| Event::default().event("error"));
        Some((Ok(ev), (app, tick)))
    })
    // Ends with the server, so that graceful shutdown does not wait on it.
    .take_until(async move { stop.cancelled().await });
    Sse::new(s).keep_alive(KeepAlive::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;
    use std::net::IpAddr;

    #[test]
    fn admin_rule() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let lo6: IpAddr = "::1".parse().unwrap();
        let remote: IpAddr = "203.0.113.9".parse().unwrap();
        // No token configured: loopback only.
        assert!(admin_allowed(None, &[], lo));
        assert!(admin_allowed(None, &[], lo6));
        // What a dual-stack listener on [::] sees for 127.0.0.1.
        assert!(admin_allowed(
            None,
            &[],
            "::ffff:127.0.0.1".parse().unwrap()
        ));
        assert!(!admin_allowed(
            None,
            &[],
            "::ffff:203.0.113.9".parse().unwrap()
        ));
        assert!(!admin_allowed(None, &[], remote));
        assert!(!admin_allowed(None, &["anything"], remote));
        // A token configured: the token, from anywhere, and nothing else.
        assert!(admin_allowed(Some("s3cret"), &["s3cret"], remote));
        assert!(admin_allowed(Some("s3cret"), &["stale", "s3cret"], remote));
        assert!(!admin_allowed(Some("s3cret"), &[], lo));
        assert!(!admin_allowed(Some("s3cret"), &["s3cre"], lo));
        assert!(!admin_allowed(Some("s3cret"), &["s3cret!"], lo));
    }

    #[test]
    fn admin_takes_no_cookie() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "taskwire_token=s3cret".parse().unwrap());
        let presented = security::bearer_or_query_tokens(&h, Some("a=1"));
        assert!(presented.is_empty());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        let presented = security::bearer_or_query_tokens(&h, Some("token=xyz"));
        assert_eq!(presented, vec!["abc", "xyz"]);
    }
}
