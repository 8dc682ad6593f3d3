//! Observe and kill: the admin API, the live table and /metrics, end to end.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::json;
use taskwire::Config;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// (metric name, sorted labels) -> value.
type Series = HashMap<(String, Vec<(String, String)>), f64>;

/// Parses the Prometheus/OpenMetrics text format.
fn parse_metrics(text: &str) -> Series {
    let mut out = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("series value");
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => {
                let body = rest.strip_suffix('}').expect("closing brace");
                let mut labels: Vec<(String, String)> = body
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .map(|kv| {
                        let (k, v) = kv.split_once('=').expect("label k=v");
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                labels.sort();
                (n.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        out.insert((name, labels), value.parse::<f64>().expect("value"));
    }
    out
}

fn metric(m: &Series, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut l: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    l.sort();
    *m.get(&(name.to_string(), l)).unwrap_or(&0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_sequence() {
    let mut cfg = config();
    cfg.connection_cpu_limit = 1;
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    for i in 0..3 {
        c.call(i, "echo", json!({"value": i})).await;
    }
    c.call(10, "crash", json!({"message": "x"})).await;
    c.call(11, "sleep", json!({"ms": 5000, "_meta": {"timeoutMs": 20}}))
        .await;
    c.request(12, "runaway", json!({})).await;
    // The connection's one CPU slot is taken: this is refused.
    assert_eq!(code(&c.call(13, "spin", json!({"ms": 1})).await), -32001);
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":12}}))
        .await;
    c.response(12).await;
    c.call(
        14,
        "count_primes",
        json!({"below": 20_000_000, "_meta": {"progressToken": 1}}),
    )
    .await;

    let (status, body) = http(s.addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let m = parse_metrics(&body);
    let fin = "taskwire_tasks_finished_total";
    assert_eq!(
        metric(&m, fin, &[("method", "echo"), ("outcome", "ok")]),
        3.0
    );
    assert_eq!(
        metric(&m, fin, &[("method", "crash"), ("outcome", "crashed")]),
        1.0
    );
    assert_eq!(
        metric(&m, fin, &[("method", "sleep"), ("outcome", "timeout")]),
        1.0
    );
    assert_eq!(
        metric(&m, fin, &[("method", "runaway"), ("outcome", "cancelled")]),
        1.0
    );
    assert_eq!(
        metric(&m, fin, &[("method", "count_primes"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            "taskwire_admission_refusals_total",
            &[("reason", "connection_queue")]
        ),
        1.0
    );
    assert_eq!(metric(&m, "taskwire_connections_open", &[]), 1.0);
    // Histograms: one observation of run time per finished echo, CPU time per CPU task.
    assert_eq!(
        metric(&m, "taskwire_task_run_seconds_count", &[("method", "echo")]),
        3.0
    );
    assert_eq!(
        metric(
            &m,
            "taskwire_task_cpu_seconds_count",
            &[("method", "count_primes")]
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            "taskwire_task_cpu_seconds_sum",
            &[("method", "count_primes")]
        ) > 0.0
    );
    assert_eq!(metric(&m, "taskwire_pool_workers", &[]), s_workers() as f64);
    assert!(m
        .keys()
        .any(|(n, _)| n == "taskwire_progress_coalesced_total"));
    assert!(m.keys().any(|(n, _)| n == "taskwire_outbound_queue_depth"));
    assert!(m
        .keys()
        .any(|(n, _)| n == "taskwire_pool_utilisation_ratio"));
    assert_eq!(metric(&m, "taskwire_runtime_workers", &[]), 2.0);
    assert!(metric(&m, "taskwire_runtime_alive_tasks", &[]) >= 2.0);
    assert!(m
        .keys()
        .any(|(n, l)| n == "taskwire_task_queue_wait_seconds_bucket" && !l.is_empty()));
}

fn s_workers() -> usize {
    Config::default().compute().workers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_a_runaway_and_the_cpu_goes_idle() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.request("r", "runaway", json!({})).await;
    let mut id = 0;
    for _ in 0..500 {
        let v = admin_json(s.addr, "GET", "/admin/tasks?sort=cpu&limit=5").await;
        if let Some(t) = v["tasks"].as_array().and_then(|t| t.first()) {
            if t["cpuMs"].as_f64().unwrap_or(0.0) > 0.0 {
                assert_eq!(t["method"], "runaway");
                assert_eq!(t["kind"], "cpu");
                assert_eq!(t["requestId"], "r");
                id = t["id"].as_u64().unwrap();
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(id > 0, "the runaway shows up with CPU time");
    let one = admin_json(s.addr, "GET", &format!("/admin/tasks/{id}")).await;
    assert_eq!(one["id"], id);
    let v = admin_json(s.addr, "POST", &format!("/admin/tasks/{id}/kill")).await;
    assert_eq!(v["killed"], true);
    assert_eq!(code(&c.response("r").await), -32004);
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/stats").await;
            v["pool"]["busy"] == 0 && v["tasks"]["running"] == 0
        })
        .await
    );
    assert_pool_idle(s.addr).await;
    // Gone: 404 for the task and for a second kill.
    assert_eq!(
        http(s.addr, "GET", &format!("/admin/tasks/{id}"), None)
            .await
            .0,
        404
    );
    assert_eq!(
        http(s.addr, "POST", &format!("/admin/tasks/{id}/kill"), None)
            .await
            .0,
        404
    );
    // Its connection lives on.
    assert_eq!(c.call(1, "echo", json!({"value": 1})).await["result"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_follows_connections_and_empties() {
    let s = TestServer::start(config()).await;
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut c = s.client().await;
        c.request(1, "sleep", json!({"ms": 60_000})).await;
        c.request(2, "runaway", json!({})).await;
        clients.push(c);
    }
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/tasks").await;
            v["tasks"].as_array().map(|t| t.len()) == Some(6)
        })
        .await
    );
    let conns = admin_json(s.addr, "GET", "/admin/connections").await;
    let conns = conns["connections"].as_array().unwrap().clone();
    assert_eq!(conns.len(), 3);
    assert_eq!(conns[0]["inflight"], 2);
    assert!(conns[0]["bytesIn"].as_u64().unwrap() > 0);
    let first = conns[0]["id"].as_u64().unwrap();
    let only = admin_json(
        s.addr,
        "GET",
        &format!("/admin/tasks?conn={first}&method=sleep"),
    )
    .await;
    assert_eq!(only["tasks"].as_array().unwrap().len(), 1);

    // An operator closes one connection: its tasks go with it.
    let v = admin_json(s.addr, "POST", &format!("/admin/connections/{first}/close")).await;
    assert_eq!(v["closed"], true);
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/tasks").await;
            v["tasks"].as_array().map(|t| t.len()) == Some(4)
        })
        .await
    );
    clients.clear();
    assert!(
        eventually(|| async {
            let t = admin_json(s.addr, "GET", "/admin/tasks").await;
            let c = admin_json(s.addr, "GET", "/admin/connections").await;
            t["tasks"].as_array().map(|t| t.is_empty()) == Some(true)
                && c["connections"].as_array().map(|c| c.is_empty()) == Some(true)
        })
        .await,
        "the registry empties when connections close"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_needs_the_token_when_one_is_set() {
    let cfg = Config {
        admin_token: Some("s3cret".into()),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    for path in [
        "/admin/tasks",
        "/admin/stats",
        "/admin/connections",
        "/metrics",
    ] {
        assert_eq!(http(s.addr, "GET", path, None).await.0, 401, "{path}");
        assert_eq!(
            http(s.addr, "GET", path, Some("wrong")).await.0,
            401,
            "{path}"
        );
        assert_eq!(
            http(s.addr, "GET", path, Some("s3cret")).await.0,
            200,
            "{path}"
        );
    }
    assert_eq!(
        http(s.addr, "GET", "/admin/stats?token=s3cret", None)
            .await
            .0,
        200
    );
    assert_eq!(
        http(s.addr, "POST", "/admin/tasks/1/kill", None).await.0,
        401
    );
    // The WebSocket and health check are not admin.
    assert_eq!(http(s.addr, "GET", "/healthz", None).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_snapshots() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.request(1, "runaway", json!({})).await;
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /admin/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        s.addr
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(sock).lines();
    let mut snapshots = 0;
    let mut saw_runaway = false;
    let read = async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(data) = line.strip_prefix("data: ") {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                assert!(v["stats"]["pool"]["workers"].as_u64().unwrap() >= 1);
                // The counts and the table come from one walk: they add up.
                let counted: u64 = v["stats"]["tasks"]
                    .as_object()
                    .unwrap()
                    .values()
                    .map(|n| n.as_u64().unwrap())
                    .sum();
                assert_eq!(counted, v["tasks"].as_array().unwrap().len() as u64, "{v}");
                snapshots += 1;
                saw_runaway |= v["tasks"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["method"] == "runaway");
                if snapshots >= 3 && saw_runaway {
                    break;
                }
            }
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("snapshots arrive");
    assert!(saw_runaway);
    // The stream ends with the server, so shutdown does not hang on it.
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_files_are_served() {
    let s = TestServer::start(config()).await;
    let (status, body) = http(s.addr, "GET", "/", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("<html") || body.contains("<!doctype") || body.contains("<!DOCTYPE"));
    let (status, body) = http(s.addr, "GET", "/taskwire.js", None).await;
    assert_eq!(status, 200);
    assert!(body.contains("export"));
    assert_eq!(http(s.addr, "GET", "/nope.js", None).await.0, 404);
}

/// Every series as Prometheus names it: units in names, counters `_total`, a
/// ratio `_ratio`; the standard `process_*` series and `taskwire_build_info`;
/// no series that can never leave 0 (the pool's histograms of an I/O method);
/// and the page's heartbeat (`$/ping`) is no task: it is counted nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metric_names_follow_prometheus_conventions() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    // A CPU task, so that its histograms have a sample.
    assert!(c
        .call(1, "hash_chain", json!({"seed": 1, "rounds": 1000}))
        .await["result"]
        .is_object());
    let text = || async {
        let (status, text) = http(s.addr, "GET", "/metrics", None).await;
        assert_eq!(status, 200);
        text
    };
    let before = text().await;
    let m = parse_metrics(&before);

    // Every TYPE line: a counter's samples end in `_total`, and no gauge's
    // name pretends to be one.
    let mut types = HashMap::new();
    for line in before.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("# TYPE name kind");
            types.insert(name.to_string(), kind.to_string());
        }
    }
    for (name, kind) in &types {
        assert!(
            name.starts_with("taskwire_") || name.starts_with("process_"),
            "{name} has the server's prefix or the standard process_ one"
        );
        if kind == "gauge" {
            assert!(
                !name.ends_with("_total"),
                "{name}: a gauge named as a counter"
            );
        }
    }
    for ((name, _), _) in m.iter() {
        let family = types
            .keys()
            .filter(|t| name.starts_with(t.as_str()))
            .max_by_key(|t| t.len())
            .unwrap_or_else(|| panic!("{name} has a TYPE line"));
        if types[family] == "counter" {
            assert!(
                name.ends_with("_total") || name.ends_with("_created"),
                "counter sample {name} ends in _total"
            );
        }
    }
    for (name, kind) in [
        ("taskwire_pool_utilisation_ratio", "gauge"),
        ("taskwire_pool_queue_depth", "gauge"),
        ("taskwire_pool_non_yielding_tasks", "counter"),
        ("taskwire_pool_cpu_seconds", "counter"),
        ("taskwire_memory_trims", "counter"),
        ("taskwire_tasks_finished", "counter"),
        ("taskwire_admission_refusals", "counter"),
        ("taskwire_task_run_seconds", "histogram"),
        ("taskwire_build", "info"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    for old in [
        "taskwire_pool_utilisation",
        "taskwire_pool_queued",
        "taskwire_pool_non_yielding",
    ] {
        assert!(!types.contains_key(old), "{old} is gone");
    }
    let ratio = metric(&m, "taskwire_pool_utilisation_ratio", &[]);
    assert!((0.0..=1.0).contains(&ratio), "a ratio: {ratio}");
    assert!(metric(&m, "taskwire_pool_cpu_seconds_total", &[]) > 0.0);

    // The build, as an info series.
    assert_eq!(
        metric(
            &m,
            "taskwire_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );

    // The standard process series, from /proc.
    if cfg!(target_os = "linux") {
        assert!(metric(&m, "process_resident_memory_bytes", &[]) > 1e6);
        assert!(metric(&m, "process_virtual_memory_bytes", &[]) > 1e6);
        // In clock ticks (10 ms): present, possibly still 0 in a quiet process.
        assert!(m.contains_key(&("process_cpu_seconds_total".to_string(), vec![])));
        assert!(metric(&m, "process_open_fds", &[]) >= 3.0);
        let max = metric(&m, "process_max_fds", &[]);
        assert!(max >= metric(&m, "process_open_fds", &[]), "{max}");
        let start = metric(&m, "process_start_time_seconds", &[]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        // Started in the last day, not in the future (generous: clocks and
        // the kernel's tick rounding).
        assert!(
            start > now - 86_400.0 && start < now + 5.0,
            "{start} vs {now}"
        );
    }

    // The pool's histograms exist for CPU methods only: an I/O task never
    // waits for a worker nor uses one.
    let series = |name: &str, method: &str| {
        m.keys()
            .any(|(n, l)| n == name && l.iter().any(|(k, v)| k == "method" && v == method))
    };
    assert!(series("taskwire_task_cpu_seconds_count", "hash_chain"));
    assert!(series(
        "taskwire_task_queue_wait_seconds_count",
        "count_primes"
    ));
    for io in ["echo", "sleep"] {
        assert!(!series("taskwire_task_cpu_seconds_count", io), "{io}");
        assert!(
            !series("taskwire_task_queue_wait_seconds_count", io),
            "{io}"
        );
        assert!(series("taskwire_task_run_seconds_count", io), "{io}");
    }
    // The counting allocator is not installed in this test binary: its
    // figure would read 0 for ever.
    if !taskwire::alloc::installed() {
        assert!(!types.contains_key("taskwire_memory_allocated_bytes"));
    }

    // The dashboard's probe: `$/ping`, answered by the connection, not a task.
    let finished = |m: &Series| -> f64 {
        m.iter()
            .filter(|((n, _), _)| n == "taskwire_tasks_finished_total")
            .map(|(_, v)| v)
            .sum()
    };
    let runs = |m: &Series| -> f64 {
        m.iter()
            .filter(|((n, _), _)| n == "taskwire_task_run_seconds_count")
            .map(|(_, v)| v)
            .sum()
    };
    let stats = admin_json(s.addr, "GET", "/admin/stats").await;
    for i in 0..20 {
        let r = c.call(100 + i, "$/ping", json!({})).await;
        assert_eq!(r["result"], json!({}), "{r}");
    }
    let after = parse_metrics(&text().await);
    assert_eq!(finished(&after), finished(&m));
    assert_eq!(runs(&after), runs(&m));
    let stats2 = admin_json(s.addr, "GET", "/admin/stats").await;
    assert_eq!(stats["finished"], stats2["finished"]);
    s.stop().await.unwrap();
}

/// A page cannot read the status of a refused WebSocket upgrade: a plain
/// GET of `/ws` answers the same checks, so the dashboard can say "token
/// missing or refused" rather than only "disconnected".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_of_ws_answers_the_upgrade_checks() {
    let token = "dashboard-token-0123456789";
    let cfg = Config {
        auth_tokens: vec![taskwire::config::AuthToken {
            token: token.into(),
            max_connections: None,
            max_inflight: None,
            rate_limit: None,
        }],
        ..config()
    };
    let s = TestServer::start(cfg).await;
    assert_eq!(http(s.addr, "GET", "/ws", None).await.0, 401);
    assert_eq!(
        http(s.addr, "GET", "/ws", Some("wrong-token-0123456789"))
            .await
            .0,
        401
    );
    let (status, _) = http(s.addr, "GET", "/ws", Some(token)).await;
    assert!(
        status != 401 && (400..500).contains(&status),
        "admitted, but not an upgrade: {status}"
    );
    let (status, _) = http(s.addr, "GET", &format!("/ws?token={token}"), None).await;
    assert!(status != 401, "{status}");
    s.stop().await.unwrap();
}

/// The admin JSON is defined once, in `taskwire::observe::api`: what a real
/// server sends deserializes into those types and serializes back to the very
/// same JSON (no field the types miss, none they add).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_json_round_trips_through_the_library_types() {
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use taskwire::observe::api::{
        ConnList, OutcomeKind, RefusalReason, Snapshot, Stats, TaskInfo, TaskList, TaskState,
    };

    fn round_trip<T: Serialize + DeserializeOwned>(what: &str, v: &serde_json::Value) -> T {
        let typed: T = serde_json::from_value(v.clone())
            .unwrap_or_else(|e| panic!("{what} does not fit its type: {e}\n{v}"));
        assert_eq!(
            &serde_json::to_value(&typed).unwrap(),
            v,
            "{what} round trip"
        );
        typed
    }

    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    assert_eq!(c.call(1, "echo", json!({"value": 1})).await["result"], 1);
    c.request("r", "runaway", json!({})).await;
    let mut id = 0;
    for _ in 0..500 {
        let v = admin_json(s.addr, "GET", "/admin/tasks").await;
        let list: TaskList = round_trip("/admin/tasks", &v);
        if let Some(t) = list.tasks.iter().find(|t| t.method == "runaway") {
            assert_eq!(t.kind, taskwire::TaskKind::Cpu);
            id = t.id;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(id > 0, "the runaway is listed");
    let one: TaskInfo = round_trip(
        "/admin/tasks/{id}",
        &admin_json(s.addr, "GET", &format!("/admin/tasks/{id}")).await,
    );
    assert_eq!(one.id, id);
    let running = format!("/admin/tasks?state={}", TaskState::Running.label());
    let _: TaskList = round_trip(&running, &admin_json(s.addr, "GET", &running).await);
    let conns: ConnList = round_trip(
        "/admin/connections",
        &admin_json(s.addr, "GET", "/admin/connections").await,
    );
    assert_eq!(conns.connections.len(), 1);
    let stats: Stats = round_trip(
        "/admin/stats",
        &admin_json(s.addr, "GET", "/admin/stats").await,
    );
    assert_eq!(stats.connections, 1);
    assert!(stats.finished.get(OutcomeKind::Ok) >= 1, "the echo");

    // One snapshot of the event stream.
    let mut sock = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let req = format!(
        "GET /admin/events HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        s.addr
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut lines = BufReader::new(sock).lines();
    let data = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(data) = line.strip_prefix("data: ") {
                return Some(data.to_string());
            }
        }
        None
    })
    .await
    .expect("a snapshot arrives")
    .expect("the stream has a snapshot");
    let v: serde_json::Value = serde_json::from_str(&data).unwrap();
    let snap: Snapshot = round_trip("/admin/events snapshot", &v);
    assert!(snap.stats.pool.workers >= 1);

    // Every refusal reason is exported, at 0 until it happens.
    let (status, text) = http(s.addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    let m = parse_metrics(&text);
    for r in RefusalReason::ALL {
        let key = (
            "taskwire_admission_refusals_total".to_string(),
            vec![("reason".to_string(), r.label().to_string())],
        );
        assert!(m.contains_key(&key), "{} exported", r.label());
    }

    let v = admin_json(s.addr, "POST", &format!("/admin/tasks/{id}/kill")).await;
    assert_eq!(v["killed"], true);
    assert_eq!(code(&c.response("r").await), -32004);
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/stats").await;
            v["pool"]["busy"] == 0
        })
        .await
    );
    s.stop().await.unwrap();
}

/// With observing off the server reports to the no-op hooks: tasks run and
/// are answered, the admin API answers with empty tables and zero counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn observing_off_lists_and_counts_nothing() {
    let s = TestServer::start(Config {
        observe: false,
        ..config()
    })
    .await;
    let mut c = s.client().await;
    assert_eq!(c.call(1, "echo", json!({"value": 7})).await["result"], 7);
    let conns = admin_json(s.addr, "GET", "/admin/connections").await;
    assert_eq!(conns["connections"], json!([]));
    let stats: taskwire::observe::api::Stats =
        serde_json::from_value(admin_json(s.addr, "GET", "/admin/stats").await).unwrap();
    assert_eq!(stats.finished, Default::default());
    assert_eq!(stats.connections, 0);
    s.stop().await.unwrap();
}
