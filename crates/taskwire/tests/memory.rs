//! Memory attributed to tasks, the memory budget, and tasks that never reach
//! a checkpoint staying in view. This binary installs the counting allocator,
//! as the `taskwire` binary does.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use taskwire::alloc::{allocated_bytes, CountingAlloc};
use taskwire::{Ctx, Registry, TaskError};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const MIB: u64 = 1 << 20;

#[derive(Deserialize, JsonSchema)]
struct Hold {
    mib: u64,
}

/// Allocates `mib` MiB, touches every page, and holds it across checkpoints
/// until stopped (or 60 s pass: a failed test does not burn a core forever).
async fn hold(ctx: Ctx, p: Hold) -> Result<u64, TaskError> {
    let mut v = vec![0u8; (p.mib.min(1024) * MIB) as usize];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    let end = Instant::now() + Duration::from_secs(60);
    while Instant::now() < end {
        std::hint::black_box(&mut v);
        ctx.checkpoint().await?;
    }
    Ok(v.len() as u64)
}

/// An I/O task that allocates `mib` MiB and holds it on a timer for 60 s (or
/// until stopped).
async fn hold_io(_ctx: Ctx, p: Hold) -> Result<u64, TaskError> {
    let mut v = vec![0u8; (p.mib.min(1024) * MIB) as usize];
    for i in (0..v.len()).step_by(4096) {
        v[i] = 1;
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    Ok(std::hint::black_box(v).len() as u64)
}

static RELEASE_STUCK: AtomicBool = AtomicBool::new(false);

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

/// Burns CPU without a single checkpoint until the test releases it (or 30 s
/// pass), then returns.
async fn stuck(_ctx: Ctx, _p: Nothing) -> Result<u64, TaskError> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut x = 0u64;
    while !RELEASE_STUCK.load(Ordering::Relaxed) && Instant::now() < end {
        x = std::hint::black_box(x.wrapping_add(1));
    }
    Ok(x)
}

fn registry() -> Registry {
    let mut r = common::builtins();
    r.io("hold_io", "Holds `mib` MiB on a timer.", hold_io)
        .and_then(|r| r.cpu("hold", "Holds `mib` MiB until stopped.", hold))
        .and_then(|r| r.cpu("stuck", "Burns CPU without checkpoints.", stuck))
        .expect("register");
    r
}

async fn task_of(addr: std::net::SocketAddr, method: &str) -> Option<Value> {
    let v = admin_json(addr, "GET", &format!("/admin/tasks?method={method}")).await;
    v["tasks"].as_array()?.first().cloned()
}

/// An I/O task's allocations count for it too (its first poll runs in the
/// connection's reader, later ones on a Tokio task of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_io_task_s_memory_is_attributed() {
    let server = TestServer::with_registry(config(), registry()).await;
    let mut c = server.client().await;
    c.request("io", "hold_io", json!({"mib": 32})).await;
    assert!(
        eventually(|| async {
            task_of(server.addr, "hold_io")
                .await
                .is_some_and(|t| t["memoryBytes"].as_u64().unwrap_or(0) >= 32 * MIB)
        })
        .await,
        "memoryBytes shows the I/O task's 32 MiB"
    );
    c.send(json!({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "io"}}))
        .await;
    assert_eq!(code(&c.response("io").await), -32800);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_is_attributed_and_budgeted() {
    assert!(taskwire::alloc::installed());
    let mut cfg = config();
    cfg.workers = Some(2);
    // Room for what this process holds now and a little more, not for 128 MiB more.
    cfg.memory_budget_bytes = Some((allocated_bytes() + 48 * MIB) as usize);
    let server = TestServer::with_registry(cfg, registry()).await;
    let mut c = server.client().await;
    c.request("h", "hold", json!({"mib": 128})).await;

    // The table shows what the task holds.
    assert!(
        eventually(|| async {
            task_of(server.addr, "hold")
                .await
                .is_some_and(|t| t["memoryBytes"].as_u64().unwrap_or(0) >= 128 * MIB)
        })
        .await,
        "memoryBytes shows the held 128 MiB"
    );

    // Past the budget, new CPU work is refused for memory...
    let end = Instant::now() + WAIT;
    let refusal = loop {
        let r = c
            .call("probe", "hash_chain", json!({"seed": 1, "rounds": 1}))
            .await;
        if r["error"]["data"]["reason"] == "memory" {
            break r;
        }
        assert!(
            Instant::now() < end,
            "a CPU task is refused while over the budget"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(code(&refusal), -32001, "{refusal}");
    assert!(refusal["error"]["data"]["retryAfterMs"].as_u64().unwrap() >= 50);
    // ...while I/O tasks still run.
    let echo = c.call("e", "echo", json!({"value": "still here"})).await;
    assert_eq!(echo["result"], "still here");

    // The holder is flagged for the operator, and the figures are exported.
    assert!(
        eventually(|| async {
            task_of(server.addr, "hold")
                .await
                .is_some_and(|t| t["memoryFlagged"] == true)
        })
        .await,
        "the largest task is flagged"
    );
    let stats = admin_json(server.addr, "GET", "/admin/stats").await;
    assert_eq!(stats["memory"]["overBudget"], true, "{stats}");
    assert_eq!(stats["memory"]["counted"], true, "{stats}");
    assert!(stats["memory"]["largestTaskBytes"].as_u64().unwrap() >= 128 * MIB);
    let (_, metrics) = http(server.addr, "GET", "/metrics", None).await;
    assert!(
        metrics.contains("taskwire_memory_over_budget 1"),
        "{metrics}"
    );
    assert!(metrics.contains("taskwire_memory_allocated_bytes"));
    assert!(metrics.contains("taskwire_memory_largest_task_bytes"));

    // Once the holder is cancelled, its memory is freed and CPU work admitted.
    c.send(json!({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": "h"}}))
        .await;
    let r = c.response("h").await;
    assert_eq!(code(&r), -32800, "{r}");
    let end = Instant::now() + WAIT;
    loop {
        let r = c
            .call("again", "hash_chain", json!({"seed": 1, "rounds": 1}))
            .await;
        if r["result"]["digest"] == "10451216379200822465" {
            break;
        }
        assert!(Instant::now() < end, "admitted again under the budget: {r}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let flagged = task_of(server.addr, "hold").await;
    assert!(flagged.is_none(), "the holder is gone: {flagged:?}");
    drop(c);
    server.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_task_without_checkpoints_stays_listed_until_its_thread_is_back() {
    let mut cfg = config();
    cfg.workers = Some(1);
    cfg.non_yield_after = Duration::from_millis(50);
    let server = TestServer::with_registry(cfg, registry()).await;
    let mut c = server.client().await;
    c.request(1, "stuck", json!({})).await;
    let end = Instant::now() + WAIT;
    let id = loop {
        if let Some(t) = task_of(server.addr, "stuck").await {
            if t["state"] == "running" {
                break t["id"].as_u64().unwrap();
            }
        }
        assert!(Instant::now() < end, "the stuck task runs");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    admin_json(server.addr, "POST", &format!("/admin/tasks/{id}/kill")).await;
    // Answered after the stop grace, though its thread still runs it.
    let r = c.response(1).await;
    assert_eq!(code(&r), -32004, "{r}");
    // The connection goes too: the task stays in view, flagged.
    drop(c);
    let listed = task_of(server.addr, "stuck").await.expect("still listed");
    assert_eq!(listed["id"], id);
    assert_eq!(listed["state"], "abandoned", "{listed}");
    assert_eq!(listed["notYielding"], true, "{listed}");
    assert_eq!(listed["stopping"], "killed by an operator", "{listed}");
    let one = admin_json(server.addr, "GET", &format!("/admin/tasks/{id}")).await;
    assert_eq!(one["state"], "abandoned");
    let stats = admin_json(server.addr, "GET", "/admin/stats").await;
    assert_eq!(stats["tasks"]["abandoned"], 1, "{stats}");

    // Its thread comes back: then, and only then, it leaves the table.
    RELEASE_STUCK.store(true, Ordering::Relaxed);
    assert!(
        eventually(|| async { task_of(server.addr, "stuck").await.is_none() }).await,
        "gone once the worker returned"
    );
    let stats = admin_json(server.addr, "GET", "/admin/stats").await;
    assert_eq!(stats["tasks"]["abandoned"], 0, "{stats}");
    server.stop().await.unwrap();
}
