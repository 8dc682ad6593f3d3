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

use axum::extract::{ConnectInfo, OriginalUri, Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::{stream, Stream, StreamExt};
use serde_json::{json, Value};

use super::metrics::Live;
use super::{conn_info, count_states, TaskQuery};
use crate::server::App;

/// How often the event stream sends a snapshot.
const SNAPSHOT_EVERY: Duration = Duration::from_millis(250);
/// Tasks per snapshot, busiest first: enough for a dashboard, bounded in size.
const SNAPSHOT_TASKS: usize = 500;

mod files {
    include!(concat!(env!("OUT_DIR"), "/web_files.rs"));
}

pub(crate) fn routes(app: Arc<App>) -> Router<Arc<App>> {
    let guarded = Router::new()
        .route("/admin/tasks", get(list_tasks))
        .route("/admin/tasks/{id}", get(one_task))
        .route("/admin/tasks/{id}/kill", post(kill_task))
        .route("/admin/connections", get(list_conns))
        .route("/admin/connections/{id}/close", post(close_conn))
        .route("/admin/stats", get(stats))
        .route("/admin/events", get(events))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app, authorize));
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
        Some(expected) => presented.iter().any(|t| crate::security::same(t, expected)),
        None => crate::security::is_loopback(peer),
    }
}

async fn authorize(
    State(app): State<Arc<App>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let cfg = &app.cfg;
    let ok = admin_allowed(
        cfg.admin_token.as_deref(),
        &crate::security::bearer_or_query_tokens(req.headers(), req.uri().query()),
        peer.ip(),
    );
    // Let in for being local: the page that asks must be local too, not a
    // foreign name re-pointed to 127.0.0.1. A token cannot be had that way.
    if ok
        && cfg.admin_token.is_none()
        && !crate::security::host_allowed(
            crate::server::request_host(req.headers(), req.uri()),
            &cfg.allowed_hosts,
        )
    {
        app.observer.refused("host");
        return (StatusCode::FORBIDDEN, "host not allowed").into_response();
    }
    if ok
        && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS)
        && !crate::security::same_site_request(req.headers(), &cfg.allowed_origins)
    {
        app.observer.refused("cross_site");
        return (StatusCode::FORBIDDEN, "cross-site request refused").into_response();
    }
    if !ok {
        let msg = if app.cfg.admin_token.is_some() {
            "admin token required"
        } else {
            "admin is reachable from loopback only (configure an admin token)"
        };
        return (StatusCode::UNAUTHORIZED, msg).into_response();
    }
    next.run(req).await
}

async fn list_tasks(State(app): State<Arc<App>>, Query(q): Query<TaskQuery>) -> Json<Value> {
    Json(json!({ "tasks": app.observer.tasks(&q) }))
}

async fn one_task(State(app): State<Arc<App>>, Path(id): Path<u64>) -> Response {
    match app.observer.task_info(id) {
        Some(t) => Json(t).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such task"})),
        )
            .into_response(),
    }
}

async fn kill_task(State(app): State<Arc<App>>, Path(id): Path<u64>) -> Response {
    if app.observer.kill(id) {
        Json(json!({ "killed": true })).into_response()
    } else {
        (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such task"})),
        )
            .into_response()
    }
}

async fn list_conns(State(app): State<Arc<App>>) -> Json<Value> {
    let mut conns: Vec<_> = app
        .observer
        .connections()
        .iter()
        .map(|c| conn_info(c))
        .collect();
    conns.sort_by_key(|c| c.id);
    Json(json!({ "connections": conns }))
}

async fn close_conn(State(app): State<Arc<App>>, Path(id): Path<u64>) -> Response {
    match app.observer.connection(id) {
        Some(c) => {
            c.close_with(axum::extract::ws::close_code::AWAY, "closed by an operator");
            tracing::info!(conn = id, "connection closed by an operator");
            Json(json!({ "closed": true })).into_response()
        }
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "no such connection"})),
        )
            .into_response(),
    }
}

fn live(app: &App) -> Live {
    let conns = app.observer.connections();
    let tasks: Vec<_> = conns.iter().flat_map(|c| c.tasks()).collect();
    let rt = tokio::runtime::Handle::current().metrics();
    let pool = app.pool.stats();
    Live {
        open_conns: conns.len(),
        runtime: (
            rt.num_workers(),
            rt.num_alive_tasks(),
            rt.global_queue_depth(),
        ),
        states: count_states(&tasks),
        abandoned: app.observer.abandoned_count(),
        largest_task_memory: tasks
            .iter()
            .map(|t| t.stats.memory_bytes())
            .max()
            .unwrap_or(0)
            .max(pool.largest_task_memory),
        pool,
        outbound_depth: conns.iter().map(|c| c.outbound_depth()).sum(),
    }
}

fn stats_value(app: &App) -> Value {
    let l = live(app);
    let finished: serde_json::Map<String, Value> = app
        .observer
        .metrics
        .totals()
        .into_iter()
        .map(|(k, v)| (k.to_string(), Value::from(v)))
        .collect();
    json!({
        "connections": l.open_conns,
        "tasks": {
            "queued": l.states[0], "running": l.states[1],
            "yielded": l.states[2], "waiting": l.states[3],
            "abandoned": l.abandoned,
        },
        "pool": {
            "workers": l.pool.workers,
            "liveWorkers": l.pool.live_workers,
            "busy": l.pool.busy,
            "utilisation": l.pool.utilisation,
            "queued": l.pool.queued,
            "admitted": l.pool.admitted,
            "nonYieldingTotal": l.pool.non_yielding_total,
            "cpuMsTotal": l.pool.cpu_ns_total as f64 / 1e6,
            "addresses": l.pool.addresses,
            "completionRate": l.pool.completion_rate,
        },
        "memory": {
            "usedBytes": l.pool.memory_used,
            "rssBytes": l.pool.memory_rss,
            "allocatedBytes": crate::alloc::allocated_bytes(),
            "budgetBytes": l.pool.memory_budget,
            "counted": l.pool.memory_counted,
            "overBudget": l.pool.over_memory_budget,
            "largestTaskBytes": l.largest_task_memory,
            "trims": l.pool.memory_trims,
        },
        "finished": finished,
        "uptimeMs": app.observer.uptime_ms(),
    })
}

async fn stats(State(app): State<Arc<App>>) -> Json<Value> {
    Json(stats_value(&app))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let text = app.observer.metrics.render(&live(&app));
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
    State(app): State<Arc<App>>,
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
        let data = json!({ "stats": stats_value(&app), "tasks": app.observer.tasks(&q) });
        let ev = Event::default()
            .event("snapshot")
            .json_data(data)
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
        let presented = crate::security::bearer_or_query_tokens(&h, Some("a=1"));
        assert!(presented.is_empty());
        h.insert(header::AUTHORIZATION, "Bearer abc".parse().unwrap());
        let presented = crate::security::bearer_or_query_tokens(&h, Some("token=xyz"));
        assert_eq!(presented, vec!["abc", "xyz"]);
    }
}
