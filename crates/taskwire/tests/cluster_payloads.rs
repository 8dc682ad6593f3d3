//! Payloads past NATS's 1 MiB `max_payload` cross the cluster in chunks:
//! params, progress and results of a CPU task that node A hands to node B,
//! two servers in this process joined through a real `nats-server` on a
//! free port (Debian's; `scripts/test` installs it). Only 127.0.0.1 is used.
#![cfg(feature = "cluster")]

mod common;

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

struct Nats(std::process::Child);
impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn params_progress_and_results_past_one_mib_cross_in_chunks() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let _nats = Nats(
        Command::new("/usr/sbin/nats-server")
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs it)"),
    );
    let a = TestServer::with_registry(node("A", port), registry()).await;
    let b = TestServer::with_registry(node("B", port), registry()).await;
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
    let (_, metrics) = http(b.addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("taskwire_cluster_tasks_received_total{peer=\"A\"} 1"),
        "it ran on B"
    );
    c.request(3, "$/cancelRequest", json!({ "id": 1 })).await;
    assert_eq!(code(&c.response(1).await), -32800);
}
