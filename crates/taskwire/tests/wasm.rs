//! The WebAssembly lane against a real server: modules installed over the
//! admin API and from `wasm_dir`, guests that never cooperate sliced and
//! stopped, memory limits, traps, hot swaps, and the lane's own limits.
#![cfg(feature = "wasm")]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;

use common::*;
use serde_json::{json, Value};

/// A task that never ends and never calls anything.
const FOREVER: &str = r#"(module (func (export "run") (loop br 0)))"#;
/// The minimum: `run` returns at once.
const EMPTY: &str = r#"(module (func (export "run")))"#;
/// Grows its memory a page at a time, filling each page, and never stops.
const GROW: &str = include_str!("modules/grow.wat");

/// A module that burns `2^iterations_log2` loop turns, then answers `"tag"`.
fn tagged(tag: &str, iterations_log2: u32) -> String {
    let json = format!("\"{tag}\"");
    format!(
        r#"(module
  (import "taskwire" "result" (func $result (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "{escaped}")
  (func (export "run") (local $i i64)
    (loop
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if 0 (i64.lt_u (local.get $i) (i64.shl (i64.const 1) (i64.const {iterations_log2})))))
    (call $result (i32.const 0) (i32.const {len}))))"#,
        escaped = json.replace('"', "\\22"),
        len = json.len()
    )
}

async fn install(addr: SocketAddr, name: &str, module: &[u8]) -> Value {
    let (status, body) =
        common::http_with_body(addr, "PUT", &format!("/admin/wasm/{name}"), None, module).await;
    assert_eq!(status, 200, "install {name}: {body}");
    serde_json::from_str(&body).expect("json")
}

/// The admin view of the server's running tasks of `method`.
async fn running(addr: SocketAddr, method: &str) -> Vec<Value> {
    let list = admin_json(addr, "GET", "/admin/tasks").await;
    list["tasks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|t| t["method"] == method)
        .collect()
}

/// Waits until a task of `method` has been on a worker; its task id. A task
/// told to stop is passed over: the admin view keeps one in sight while its
/// last slice ends, after its answer.
async fn wait_running(addr: SocketAddr, method: &str) -> u64 {
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if let Some(t) = running(addr, method)
            .await
            .into_iter()
            .find(|t| t["cpuMs"].as_f64().unwrap_or(0.0) > 0.0 && t["stopping"].is_null())
        {
            return t["id"].as_u64().unwrap_or(0);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{method} never ran");
}

/// No worker lost to a guest: none was flagged as not yielding, so the
/// watchdog started no replacement.
async fn assert_no_worker_lost(addr: SocketAddr) {
    let stats = admin_json(addr, "GET", "/admin/stats").await;
    assert_eq!(stats["pool"]["nonYieldingTotal"], 0, "{stats}");
    assert_eq!(
        stats["pool"]["liveWorkers"], stats["pool"]["workers"],
        "{stats}"
    );
}

/// CPU time of the compute workers (threads named `taskwire-cpu`), from
/// /proc: what a guest still looping would keep burning.
fn workers_cpu() -> std::time::Duration {
    let mut ticks = 0u64;
    if let Ok(dir) = std::fs::read_dir("/proc/self/task") {
        for t in dir.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.rsplit_once(')') else {
                continue;
            };
            if !head.contains("taskwire-cpu") {
                continue;
            }
            let f: Vec<&str> = rest.split_whitespace().collect();
            ticks += f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    // USER_HZ is 100 on every Linux the project supports.
    std::time::Duration::from_millis(ticks * 10)
}

/// Right after a stop the workers are idle: over a second they use less
/// than a quarter of it (a guest still looping would use all of it), the
/// pool has nothing running, and no worker was lost.
async fn assert_idle_after_stop(addr: SocketAddr, what: &str) {
    let before = workers_cpu();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let used = workers_cpu().saturating_sub(before);
    assert!(
        used < std::time::Duration::from_millis(250),
        "after {what} the workers used {used:?} of CPU in a second"
    );
    assert_pool_idle(addr).await;
    assert_no_worker_lost(addr).await;
}

fn small_config() -> taskwire::Config {
    let mut cfg = config();
    cfg.workers = Some(2);
    cfg.wasm_instances = 100;
    cfg.wasm_memory_limit = 8 << 20;
    cfg.wasm_memory_budget = 64 << 20;
    cfg
}

#[tokio::test]
async fn a_loop_that_never_yields_is_cancelled_killed_timed_out_and_dropped() {
    let server = TestServer::start(small_config()).await;
    install(server.addr, "forever", FOREVER.as_bytes()).await;
    let mut c = server.client().await;

    // $/cancelRequest.
    c.request(1, "forever", json!({})).await;
    wait_running(server.addr, "forever").await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}))
        .await;
    assert_eq!(code(&c.response(1).await), -32800);
    assert_idle_after_stop(server.addr, "$/cancelRequest").await;

    // An operator's kill.
    c.request(2, "forever", json!({})).await;
    let id = wait_running(server.addr, "forever").await;
    admin_json(server.addr, "POST", &format!("/admin/tasks/{id}/kill")).await;
    assert_eq!(code(&c.response(2).await), -32004);
    assert_idle_after_stop(server.addr, "an admin kill").await;

    // Its deadline.
    let r = c
        .call(3, "forever", json!({"_meta": {"timeoutMs": 300}}))
        .await;
    assert_eq!(code(&r), -32002, "{r}");
    assert_eq!(r["error"]["data"]["timeoutMs"], 300);
    assert_idle_after_stop(server.addr, "its deadline").await;

    // A disconnect.
    let mut other = server.client().await;
    other.request(4, "forever", json!({})).await;
    wait_running(server.addr, "forever").await;
    drop(other);
    assert!(
        eventually(|| async { running(server.addr, "forever").await.is_empty() }).await,
        "the disconnected client's task ended"
    );
    assert_idle_after_stop(server.addr, "a disconnect").await;
    // The connection lives on.
    assert_eq!(c.call(5, "echo", json!({"value": 1})).await["result"], 1);

    // A module installed at run time has its per-method series like a
    // registered task: every outcome above is counted under its name.
    let (status, text) = common::http_with_body(server.addr, "GET", "/metrics", None, b"").await;
    assert_eq!(status, 200);
    for outcome in ["cancelled", "killed", "timeout"] {
        let series =
            format!("taskwire_tasks_finished_total{{method=\"forever\",outcome=\"{outcome}\"}} ");
        let count = text
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .and_then(|v| v.trim().parse::<f64>().ok());
        assert!(count.unwrap_or(0.0) >= 1.0, "no `{series}` in\n{text}");
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("taskwire_task_cpu_seconds_count{method=\"forever\"}")),
        "{text}"
    );
}

#[tokio::test]
async fn the_minimum_module_answers_null_and_discover_lists_it_as_wasm() {
    let server = TestServer::start(small_config()).await;
    let info = install(server.addr, "empty", EMPTY.as_bytes()).await;
    assert_eq!(info["name"], "empty");
    assert_eq!(info["size"], EMPTY.len());
    assert_eq!(info["sha256"].as_str().map(str::len), Some(64));
    let mut c = server.client().await;
    assert_eq!(c.call(1, "empty", json!({})).await["result"], Value::Null);
    let d = c.call(2, "rpc.discover", json!({})).await;
    let methods = d["result"]["methods"].as_array().expect("methods");
    let m = methods
        .iter()
        .find(|m| m["name"] == "empty")
        .expect("listed");
    assert_eq!(m["kind"], "wasm");
    assert!(methods
        .iter()
        .any(|m| m["name"] == "echo" && m["kind"] == "io"));
    let list = admin_json(server.addr, "GET", "/admin/wasm").await;
    assert_eq!(list["modules"][0]["name"], "empty");
}

#[tokio::test]
async fn traps_are_answered_trapped_and_the_connection_lives_on() {
    let server = TestServer::start(small_config()).await;
    let cases = [
        (
            "unreach",
            r#"(module (func (export "run") unreachable))"#,
            "unreachable",
        ),
        (
            "oob",
            r#"(module (memory 1) (func (export "run") (drop (i32.load (i32.const 0x7ffffff0)))))"#,
            "out of bounds",
        ),
        (
            "deep",
            r#"(module (func $f (export "run") (call $f)))"#,
            "stack",
        ),
    ];
    let mut c = server.client().await;
    for (i, (name, wat, expect)) in cases.into_iter().enumerate() {
        install(server.addr, name, wat.as_bytes()).await;
        let r = c.call(i as u64, name, json!({})).await;
        assert_eq!(code(&r), -32011, "{r}");
        let msg = r["error"]["message"].as_str().unwrap_or("");
        assert!(msg.contains(expect), "{name}: {msg}");
    }
    assert_eq!(c.call(9, "echo", json!({"value": 2})).await["result"], 2);
    assert_no_worker_lost(server.addr).await;
}

#[tokio::test]
async fn a_memory_grow_loop_is_answered_memory_limit() {
    let server = TestServer::start(small_config()).await;
    let mut c = server.client().await;
    // The server's limit, then a module's own lower one.
    install(server.addr, "grow", GROW.as_bytes()).await;
    let r = c.call(1, "grow", json!({})).await;
    assert_eq!(code(&r), -32010, "{r}");
    assert_eq!(r["error"]["data"]["limitBytes"], 8 << 20);
    let (status, body) = common::http_with_body(
        server.addr,
        "PUT",
        "/admin/wasm/grow?memory_limit_bytes=1048576",
        None,
        GROW.as_bytes(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = c.call(2, "grow", json!({})).await;
    assert_eq!(code(&r), -32010, "{r}");
    assert_eq!(r["error"]["data"]["limitBytes"], 1 << 20);
    // Over the server's limit is refused at install.
    let (status, _) = common::http_with_body(
        server.addr,
        "PUT",
        "/admin/wasm/grow2?memory_limit_bytes=1073741824",
        None,
        GROW.as_bytes(),
    )
    .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_budget_over_all_wasm_tasks_holds() {
    let mut cfg = small_config();
    cfg.wasm_memory_limit = 4 << 20;
    cfg.wasm_memory_budget = 5 << 20;
    let server = TestServer::start(cfg).await;
    // Holds 3 MiB (48 pages) and loops: two of them pass the 5 MiB budget.
    let hold = r#"(module (memory 48) (func (export "run") (loop br 0)))"#;
    install(server.addr, "hold", hold.as_bytes()).await;
    let mut c = server.client().await;
    c.request(1, "hold", json!({})).await;
    wait_running(server.addr, "hold").await;
    // The task table (dashboard, `taskwire top`) shows it as a wasm task
    // holding its linear memory.
    let row = running(server.addr, "hold").await.pop().expect("listed");
    assert_eq!(row["kind"], "wasm", "{row}");
    assert!(row["memoryBytes"].as_u64().unwrap_or(0) >= 3 << 20, "{row}");
    let r = c.call(2, "hold", json!({})).await;
    assert_eq!(code(&r), -32010, "{r}");
    assert_eq!(r["error"]["data"]["limitBytes"], 5 << 20);
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}))
        .await;
    assert_eq!(code(&c.response(1).await), -32800);
    // The first one's share went back: a new one fits.
    c.request(3, "hold", json!({})).await;
    wait_running(server.addr, "hold").await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":3}}))
        .await;
    assert_eq!(code(&c.response(3).await), -32800);
}

#[tokio::test]
async fn modules_are_replaced_and_removed_while_their_tasks_run() {
    let server = TestServer::start(small_config()).await;
    let v1 = install(server.addr, "swap", tagged("v1", 31).as_bytes()).await;
    let mut c = server.client().await;
    c.request(1, "swap", json!({})).await;
    wait_running(server.addr, "swap").await;
    let v2 = install(server.addr, "swap", tagged("v2", 0).as_bytes()).await;
    assert_ne!(v1["sha256"], v2["sha256"]);
    // New calls get the new code at once, while the old task still runs.
    assert_eq!(c.call(2, "swap", json!({})).await["result"], "v2");
    // The installed code is found by its hash (the old one is no longer
    // installed).
    let v2_sha = v2["sha256"].as_str().expect("sha256");
    let (status, body) = common::http_with_body(
        server.addr,
        "GET",
        &format!("/admin/wasm/sha256/{v2_sha}"),
        None,
        b"",
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(body, tagged("v2", 0));
    let v1_sha = v1["sha256"].as_str().expect("sha256");
    let (status, _) = common::http_with_body(
        server.addr,
        "GET",
        &format!("/admin/wasm/sha256/{v1_sha}"),
        None,
        b"",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = http(server.addr, "DELETE", "/admin/wasm/swap", None).await;
    assert_eq!(status, 200);
    assert_eq!(code(&c.call(3, "swap", json!({})).await), -32601);
    // The old task finishes on its old code.
    assert_eq!(c.response(1).await["result"], "v1");
    let list = admin_json(server.addr, "GET", "/admin/wasm").await;
    assert_eq!(list["modules"], json!([]));
    let (status, _) = http(server.addr, "DELETE", "/admin/wasm/swap", None).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn installs_are_checked_and_the_lanes_limits_hold() {
    let mut cfg = small_config();
    cfg.wasm_max_modules = 2;
    cfg.wasm_instances = 2;
    let server = TestServer::start(cfg).await;
    let put = |name: &'static str, body: &'static [u8]| {
        let addr = server.addr;
        async move {
            common::http_with_body(addr, "PUT", &format!("/admin/wasm/{name}"), None, body).await
        }
    };
    // A built-in's name, a bad name, bytes that are not a module, a module
    // without `run`, an import the lane does not offer.
    assert_eq!(put("echo", EMPTY.as_bytes()).await.0, 409);
    assert_eq!(put("rpc.x", EMPTY.as_bytes()).await.0, 400);
    assert_eq!(put("junk", b"\0asm junk").await.0, 400);
    let (s, body) = put("norun", b"(module)").await;
    assert_eq!(s, 400);
    assert!(body.contains("run"), "{body}");
    let (s, body) = put(
        "imp",
        br#"(module (import "env" "f" (func)) (func (export "run")))"#,
    )
    .await;
    assert_eq!(s, 400);
    assert!(body.contains("env.f"), "{body}");
    // At most two modules; replacing one is always allowed.
    assert_eq!(put("a", FOREVER.as_bytes()).await.0, 200);
    assert_eq!(put("b", EMPTY.as_bytes()).await.0, 200);
    assert_eq!(put("c", EMPTY.as_bytes()).await.0, 409);
    assert_eq!(put("b", EMPTY.as_bytes()).await.0, 200);
    // At most two instances: the third call is refused, nothing runs.
    let mut c = server.client().await;
    c.request(1, "a", json!({})).await;
    c.request(2, "a", json!({})).await;
    let r = c.call(3, "b", json!({})).await;
    assert_eq!(code(&r), -32001, "{r}");
    assert_eq!(r["error"]["data"]["reason"], "wasm_instances");
    for id in [1, 2] {
        c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":id}}))
            .await;
        assert_eq!(code(&c.response(id).await), -32800);
    }
    // The slots came back.
    assert_eq!(c.call(4, "b", json!({})).await["result"], Value::Null);
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The guest crate's module, built if it is missing or stale (cargo decides).
fn hash_chain_guest() -> Vec<u8> {
    let dir = repo_root().join("guests/hash_chain");
    let status = std::process::Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-wasip1",
            "--manifest-path",
        ])
        .arg(dir.join("Cargo.toml"))
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "building guests/hash_chain (rustup target add wasm32-wasip1)"
    );
    std::fs::read(dir.join("target/wasm32-wasip1/release/hash_chain.wasm")).expect("the guest")
}

#[tokio::test]
async fn the_rust_guest_gives_the_builtins_digests_with_progress() {
    let server = TestServer::start(small_config()).await;
    install(server.addr, "wasm_hash_chain", &hash_chain_guest()).await;
    let mut c = server.client().await;
    for (i, (seed, rounds, digest)) in [
        (1u64, 1u64, "10451216379200822465"),
        (0, 1_000_000, "1880736892155664098"),
        (42, 10, "8123981347576678140"),
    ]
    .into_iter()
    .enumerate()
    {
        let r = c
            .call(
                i as u64,
                "wasm_hash_chain",
                json!({"seed": seed, "rounds": rounds}),
            )
            .await;
        assert_eq!(r["result"]["digest"], digest, "{r}");
        let native = c
            .call(
                100 + i as u64,
                "hash_chain",
                json!({"seed": seed, "rounds": rounds}),
            )
            .await;
        assert_eq!(native["result"], r["result"]);
    }
    // Progress, as a native task reports it.
    let r = c
        .call(
            10,
            "wasm_hash_chain",
            json!({"seed": 3, "rounds": 20_000_000, "_meta": {"progressToken": "p"}}),
        )
        .await;
    assert!(r["result"]["digest"].is_string(), "{r}");
    assert!(
        c.seen
            .iter()
            .any(|m| m["method"] == "$/progress" && m["params"]["token"] == "p"),
        "progress was sent: {:?}",
        c.seen
    );
    // The guest's own error.
    let r = c.call(11, "wasm_hash_chain", json!({"seed": 1})).await;
    assert_eq!(code(&r), -32602, "{r}");
    assert!(r["error"]["message"]
        .as_str()
        .unwrap_or("")
        .contains("rounds"));
}

#[tokio::test]
async fn a_newcomer_runs_beside_64_loops_of_one_connection() {
    let server = TestServer::start(small_config()).await;
    install(server.addr, "forever", FOREVER.as_bytes()).await;
    install(server.addr, "wasm_hash_chain", &hash_chain_guest()).await;
    let mut flood = server.client().await;
    for id in 0..64 {
        flood.request(id, "forever", json!({})).await;
    }
    wait_running(server.addr, "forever").await;
    let mut newcomer = server.client().await;
    let r = newcomer
        .call(1, "hash_chain", json!({"seed": 0, "rounds": 1_000_000}))
        .await;
    assert_eq!(r["result"]["digest"], "1880736892155664098");
    let r = newcomer
        .call(
            2,
            "wasm_hash_chain",
            json!({"seed": 0, "rounds": 1_000_000}),
        )
        .await;
    assert_eq!(r["result"]["digest"], "1880736892155664098");
    drop(flood);
    assert!(
        eventually(|| async { running(server.addr, "forever").await.is_empty() }).await,
        "the flood's tasks ended with its connection"
    );
    assert_pool_idle(server.addr).await;
    assert_no_worker_lost(server.addr).await;
}

#[tokio::test]
async fn wasm_dir_registers_modules_at_start() {
    let dir = std::env::temp_dir().join(format!("taskwire-wasm-dir-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("hello.wat"), tagged("hello", 0)).expect("write");
    std::fs::write(
        dir.join("hello.toml"),
        "summary = \"Says hello\"\nmemory_limit_bytes = 1048576\n[params]\ntype = \"object\"\n",
    )
    .expect("write");
    std::fs::write(dir.join("notes.txt"), "not a module").expect("write");
    let mut cfg = small_config();
    cfg.wasm_dir = Some(dir.clone());
    let server = TestServer::start(cfg).await;
    let mut c = server.client().await;
    assert_eq!(c.call(1, "hello", json!({})).await["result"], "hello");
    let d = c.call(2, "rpc.discover", json!({})).await;
    let m = d["result"]["methods"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "hello").cloned())
        .expect("listed");
    assert_eq!(m["summary"], "Says hello");
    assert_eq!(m["memoryLimitBytes"], 1 << 20);
    std::fs::remove_dir_all(&dir).ok();

    // A module that does not compile stops the server from starting, naming it.
    let bad = std::env::temp_dir().join(format!("taskwire-wasm-bad-{}", std::process::id()));
    std::fs::create_dir_all(&bad).expect("temp dir");
    std::fs::write(bad.join("broken.wat"), "(module").expect("write");
    let mut cfg = small_config();
    cfg.wasm_dir = Some(bad.clone());
    cfg.addr = "127.0.0.1:0".parse().expect("addr");
    let Err(err) = taskwire::Server::bind(cfg, builtins()).await else {
        panic!("a broken module was accepted");
    };
    assert!(err.to_string().contains("broken.wat"), "{err}");
    std::fs::remove_dir_all(&bad).ok();
}
