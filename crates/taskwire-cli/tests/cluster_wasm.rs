//! WebAssembly modules in a cluster, as operators run it: a real
//! `nats-server` and two `taskwire serve --nats` processes. A module
//! installed, replaced or removed on either node reaches the other, by hash;
//! a wasm task waiting on a busy node runs on its peer, on the same code. No
//! timing is asserted: every wait is bounded and checks an outcome.

// The set-up below is cluster.rs's, copied until both use tests/common.
#![allow(dead_code)]

mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for anything to happen on a shared machine.
const WAIT: Duration = Duration::from_secs(30);
const NATS: &str = "/usr/sbin/nats-server";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A child process, killed on drop.
struct Killed(Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nats(port: u16) -> Killed {
    let child = Command::new(NATS)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server (scripts/test installs it)");
    // Ready once it accepts connections.
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    Killed(child)
}

struct Node {
    proc: Killed,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    name: &'static str,
}

fn node(name: &'static str, nats_port: u16) -> Node {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .arg("serve")
        .args([
            "--addr",
            "127.0.0.1:0",
            "--nice",
            "0",
            "--workers",
            "1",
            "--demo",
        ])
        .args([
            "--nats",
            &format!("nats://127.0.0.1:{nats_port}"),
            "--node",
            name,
        ])
        .env(
            "RUST_LOG",
            std::env::var("CLUSTER_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskwire");
    let (addr, _stdout) = common::listening_addr(&mut child);
    let log = common::capture_stderr(&mut child);
    // The stdout pipe is kept open by leaking nothing: the server writes
    // only its first line there.
    std::mem::forget(_stdout);
    Node {
        proc: Killed(child),
        addr,
        log,
        name,
    }
}

impl Node {
    fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
    fn get(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let mut r = ureq::get(&url).call().expect("admin GET");
        r.body_mut().read_json().expect("JSON")
    }
    fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.addr);
        let mut r = ureq::get(&url).call().expect("metrics");
        r.body_mut().read_to_string().expect("text")
    }
    fn post(&self, path: &str) -> u16 {
        let url = format!("http://{}{path}", self.addr);
        match ureq::post(&url).send_empty() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(c)) => c,
            Err(e) => panic!("{e}"),
        }
    }
    fn peers(&self) -> usize {
        self.get("/admin/cluster")["peers"]
            .as_array()
            .map_or(0, Vec::len)
    }
    fn tasks(&self) -> Vec<Value> {
        self.get("/admin/tasks")["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(n: &Node) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", n.addr))
        .await
        .expect("connect");
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Reads until the response with this id, counting progress on the way.
async fn answer(ws: &mut Ws, id: i64, progress: &mut usize) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let m = ws.next().await.expect("open").expect("frame");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("JSON");
            if v["method"] == "$/progress" {
                *progress += 1;
                continue;
            }
            if v["id"] == id {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("an answer to request {id} in time"))
}

/// Two nodes that have seen each other.
fn pair(port: u16) -> (Node, Node) {
    let a = node("A", port);
    let b = node("B", port);
    until("the nodes to see each other", || {
        a.peers() == 1 && b.peers() == 1
    });
    (a, b)
}

/// The peer task id `A` sent its task `origin_id` to, once accepted.
fn remote_id(a: &Node, origin_id: u64) -> Option<String> {
    a.get("/admin/cluster")["sentTasks"]
        .as_array()?
        .iter()
        .find(|t| t["id"] == origin_id)
        .and_then(|t| t["remoteId"].as_str().map(str::to_string))
}

/// Waits until A's request `request` has started on A's own worker (not
/// queued, not sent): requests sent together may otherwise start in either
/// order, and the one meant to occupy A could be the one sent to B.
fn until_started_here(a: &Node, request: i64) {
    until("the request to start on A", || {
        a.tasks().into_iter().any(|t| {
            t["requestId"] == request
                && t["state"] != "queued"
                && t["id"]
                    .as_u64()
                    .is_some_and(|id| remote_id(a, id).is_none())
        })
    });
}

/// A's task id of the request with this JSON-RPC id.
fn task_id(n: &Node, request: i64) -> Option<u64> {
    n.tasks()
        .into_iter()
        .find(|t| t["requestId"] == request)
        .and_then(|t| t["id"].as_u64())
}

/// Never ends, and never reaches a checkpoint: only the engine can stop it.
const FOREVER: &str = r#"(module (func (export "run") (loop br 0)))"#;
/// Returns at once: answered `null`.
const QUICK: &str = r#"(module (func (export "run")))"#;

fn put(n: &Node, name: &str, body: &str) -> Value {
    let url = format!("http://{}/admin/wasm/{name}", n.addr);
    let mut r = ureq::put(&url).send(body).expect("PUT a module");
    r.body_mut().read_json().expect("JSON")
}

fn delete(n: &Node, name: &str) -> u16 {
    let url = format!("http://{}/admin/wasm/{name}", n.addr);
    match ureq::delete(&url).call() {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(c)) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The node's modules: (name, sha256, installed at).
fn modules(n: &Node) -> Vec<(String, String, u64)> {
    n.get("/admin/wasm")["modules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["sha256"].as_str().unwrap_or_default().to_string(),
                m["installedAtMs"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_installed_on_one_node_reaches_the_other_and_runs_there() {
    let port = free_port();
    let _nats = nats(port);
    let (a, b) = tokio::task::spawn_blocking(move || pair(port))
        .await
        .expect("pair");

    // Installed on A: B gets the same bytes, hash and install time.
    let info = put(&a, "forever", FOREVER);
    let sha = info["sha256"].as_str().expect("sha256").to_string();
    until("B to install A's module", || modules(&b) == modules(&a));
    assert_eq!(modules(&b)[0].1, sha);

    // A's one worker is busy: the wasm task waits there, then runs on B,
    // where the engine stops it on cancel.
    let mut ws = connect(&a).await;
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":1,"method":"runaway","params":{}}),
    )
    .await;
    until_started_here(&a, 1);
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":2,"method":"forever","params":{}}),
    )
    .await;
    until("the wasm task to run on B", || {
        b.tasks()
            .iter()
            .any(|t| t["method"] == "forever" && t["kind"] == "wasm")
    });
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":2}}),
    )
    .await;
    let mut progress = 0;
    let v = answer(&mut ws, 2, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");
    until("B's task table to empty", || b.tasks().is_empty());

    // Replaced on B: A runs the new code, wherever it runs.
    std::thread::sleep(Duration::from_millis(5));
    let info = put(&b, "forever", QUICK);
    let new_sha = info["sha256"].as_str().expect("sha256").to_string();
    assert_ne!(new_sha, sha);
    until("A to take B's replacement", || {
        modules(&a).first().is_some_and(|m| m.1 == new_sha)
    });
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":3,"method":"forever","params":{}}),
    )
    .await;
    let v = answer(&mut ws, 3, &mut progress).await;
    assert_eq!(v["result"], Value::Null, "{v}");

    // Removed on A: gone from B too, and not brought back.
    assert_eq!(delete(&a, "forever"), 200);
    until("B to remove it", || modules(&b).is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(modules(&a).is_empty() && modules(&b).is_empty());
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":4,"method":"forever","params":{}}),
    )
    .await;
    let v = answer(&mut ws, 4, &mut progress).await;
    assert_eq!(v["error"]["code"], -32601, "{v}");

    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}),
    )
    .await;
    let v = answer(&mut ws, 1, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");
    let _ = b.log();
}
