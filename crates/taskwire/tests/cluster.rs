//! Two servers in this process joined through a real `nats-server` on a free
//! port (Debian's; `scripts/test` installs it), node A's one worker busy so
//! that its CPU tasks go to node B: payloads past NATS's 1 MiB `max_payload`
//! cross in chunks, and the params a task keeps to be offered are bounded by
//! its connection's outbound budget. Only 127.0.0.1 is used; no timing is
//! asserted.
#![cfg(feature = "cluster")]

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use taskwire::{Config, Ctx, Registry, TaskError};

#[derive(Deserialize, JsonSchema)]
struct Big {
    /// Carried in, to be measured.
    pad: String,
    /// Bytes of the result's `out`.
    out: usize,
}

#[derive(Deserialize, JsonSchema)]
struct Pad {
    /// Carried in only to make the params large (never read).
    #[allow(dead_code)]
    pad: String,
}

fn registry() -> Registry {
    let mut r = builtins();
    r.cpu(
        "big",
        "Measures its params and returns `out` bytes, with a large progress value.",
        |ctx: Ctx, p: Big| async move {
            ctx.progress(json!({ "blob": "z".repeat(300_000) }));
            // Lets the progress go out before the answer closes it.
            for _ in 0..200 {
                ctx.checkpoint().await?;
                std::thread::sleep(Duration::from_micros(500));
            }
            Ok::<_, TaskError>(json!({ "len": p.pad.len(), "out": "y".repeat(p.out) }))
        },
    )
    .expect("registers");
    r.cpu(
        "hold",
        "Holds its worker until stopped; its params are padding.",
        |ctx: Ctx, _p: Pad| async move {
            loop {
                ctx.checkpoint().await?;
                std::thread::sleep(Duration::from_millis(1));
            }
            #[allow(unreachable_code)]
            Ok::<Value, TaskError>(Value::Null)
        },
    )
    .expect("registers");
    r
}

fn node(name: &str, nats_port: u16) -> Config {
    let mut cfg = config();
    cfg.workers = Some(1);
    cfg.max_frame_bytes = 8 << 20;
    cfg.outbound_bytes = 16 << 20;
    cfg.nats = Some(format!("nats://127.0.0.1:{nats_port}"));
    cfg.node = Some(name.to_string());
    cfg
}

/// A `nats-server` on a free port of 127.0.0.1, killed on drop.
struct Nats {
    child: std::process::Child,
    port: u16,
}

impl Nats {
    fn start() -> Nats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let child = Command::new("/usr/sbin/nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs it)");
        Nats { child, port }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Nodes A and B with these settings, once they see each other.
async fn pair(a: Config, b: Config) -> (TestServer, TestServer) {
    let a = TestServer::with_registry(a, registry()).await;
    let b = TestServer::with_registry(b, registry()).await;
    for s in [a.addr, b.addr] {
        assert!(
            eventually(|| async move {
                admin_json(s, "GET", "/admin/cluster").await["peers"]
                    .as_array()
                    .is_some_and(|p| p.len() == 1)
            })
            .await,
            "the nodes see each other"
        );
    }
    (a, b)
}

/// The id on A of the task for request `request`, once A lists it.
async fn task_id(a: SocketAddr, request: i64) -> Option<u64> {
    admin_json(a, "GET", "/admin/tasks").await["tasks"]
        .as_array()?
        .iter()
        .find(|t| t["requestId"] == request)?["id"]
        .as_u64()
}

/// Whether A sent request `request`'s task to a peer that accepted it.
async fn runs_elsewhere(a: SocketAddr, request: i64) -> bool {
    let Some(id) = task_id(a, request).await else {
        return false;
    };
    admin_json(a, "GET", "/admin/cluster").await["sentTasks"]
        .as_array()
        .is_some_and(|s| s.iter().any(|t| t["id"] == id && t["remoteId"].is_string()))
}

/// Whether request `request`'s task runs on A's own worker.
async fn runs_here(a: SocketAddr, request: i64) -> bool {
    let tasks = admin_json(a, "GET", "/admin/tasks").await;
    let started = tasks["tasks"].as_array().is_some_and(|ts| {
        ts.iter()
            .any(|t| t["requestId"] == request && t["state"] != "queued")
    });
    started && !runs_elsewhere(a, request).await
}

/// How many of A's tasks B ran, from B's metrics.
async fn received_from_a(b: SocketAddr) -> u64 {
    let (_, metrics) = http(b, "GET", "/metrics", None).await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("taskwire_cluster_tasks_received_total{peer=\"A\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Cancels request `id` (with request `with`) and sees it answered so.
async fn cancel(c: &mut Client, with: i64, id: i64) {
    c.request(with, "$/cancelRequest", json!({ "id": id }))
        .await;
    assert_eq!(code(&c.response(id).await), -32800);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn params_progress_and_results_past_one_mib_cross_in_chunks() {
    let nats = Nats::start();
    let (a, b) = pair(node("A", nats.port), node("B", nats.port)).await;
    let mut c = a.client().await;
    // A's one worker is taken: the next CPU task goes to B.
    c.request(1, "runaway", json!({})).await;
    let pad = "x".repeat(1_500_000);
    c.request(
        2,
        "big",
        json!({ "pad": pad, "out": 2_000_000, "_meta": { "progressToken": "p" } }),
    )
    .await;
    let v = c.response(2).await;
    assert_eq!(v["result"]["len"], 1_500_000, "{}", &v.to_string()[..200]);
    assert_eq!(v["result"]["out"].as_str().map(str::len), Some(2_000_000));
    let progress: Vec<&Value> = c
        .seen
        .iter()
        .filter(|m| m["method"] == "$/progress")
        .collect();
    assert!(
        progress
            .iter()
            .any(|m| m["params"]["value"]["blob"].as_str().map(str::len) == Some(300_000)),
        "the large progress value arrived"
    );
    assert_eq!(received_from_a(b.addr).await, 1, "it ran on B");
    cancel(&mut c, 3, 1).await;
}

/// A task keeps its params to be offered only while its connection's
/// outbound budget has room for them; past it the task runs at home (and is
/// answered), even with a peer idle. Bytes kept are given back at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_at_its_budget_keeps_its_tasks_at_home() {
    let nats = Nats::start();
    // 64 KiB of budget: one task's 40 KB of params fits, two do not.
    let small = |name| {
        let mut cfg = node(name, nats.port);
        cfg.max_frame_bytes = 64 << 10;
        cfg.outbound_bytes = 64 << 10;
        cfg
    };
    let (a, b) = pair(small("A"), small("B")).await;
    let pad = "x".repeat(40_000);
    let mut c = a.client().await;
    c.request(1, "runaway", json!({})).await;
    assert!(
        eventually(|| runs_here(a.addr, 1)).await,
        "request 1 occupies A"
    );
    // Kept (40 KB of 64 KiB) and offered: B runs it.
    c.request(2, "hold", json!({ "pad": pad })).await;
    assert!(
        eventually(|| runs_elsewhere(a.addr, 2)).await,
        "request 2 runs on B"
    );
    // 40 KB more do not fit: this one waits for A's worker only.
    c.request(3, "big", json!({ "pad": pad, "out": 0 })).await;
    assert!(
        eventually(|| async { task_id(a.addr, 3).await.is_some() }).await,
        "A lists request 3"
    );
    // B is free again and says so; a task that could be offered would be
    // now, before anything else is sent.
    cancel(&mut c, 4, 2).await;
    let bb = b.addr;
    assert!(
        eventually(|| async move {
            admin_json(bb, "GET", "/admin/tasks").await["tasks"]
                .as_array()
                .is_some_and(Vec::is_empty)
        })
        .await,
        "B is idle"
    );
    // Request 2's bytes were given back: request 5 is kept, offered, and
    // takes B's worker, which request 3 never asked for.
    c.request(5, "hold", json!({ "pad": pad })).await;
    assert!(
        eventually(|| runs_elsewhere(a.addr, 5)).await,
        "request 5 runs on B"
    );
    assert!(!runs_elsewhere(a.addr, 3).await, "request 3 stayed on A");
    assert_eq!(
        received_from_a(b.addr).await,
        2,
        "B ran requests 2 and 5 only"
    );
    // A's worker is freed: request 3 runs there and is answered.
    cancel(&mut c, 6, 1).await;
    let v = c.response(3).await;
    assert_eq!(v["result"]["len"], 40_000, "{v}");
    cancel(&mut c, 7, 5).await;
    assert_eq!(received_from_a(b.addr).await, 2, "request 3 ran on A");
}
