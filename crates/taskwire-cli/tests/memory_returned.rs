//! Memory comes back after an attack: the `taskwire` binary (with its counting
//! allocator) is run as a process, made to hold well over 100 MiB with
//! 100 000 `sleep` requests with long ids in big batches, and once they
//! are answered its resident set must return near where it was.

use std::process::Stdio;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: usize = 100;
const BATCHES: usize = 4;
const BATCH: usize = 256;
/// How long each attacking request holds its memory.
const HOLD_MS: u64 = 8_000;

struct Server {
    child: Child,
    addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn start() -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(["serve", "--addr", "127.0.0.1:0", "--log", "warn"])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start taskwire");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("the server starts")
        .expect("read")
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("the listening line")
        .to_string();
    Server { child, addr }
}

/// `VmRSS` of the server in KiB. (The same as `taskwire_bench`'s
/// `procfs::rss_kib`, which that crate keeps private.)
fn rss(s: &Server) -> u64 {
    let pid = s.child.id().expect("running");
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

/// `n` requests of `sleep` with 255-byte ids, as one batch.
fn batch(conn: usize, b: usize, ms: u64) -> String {
    let items: Vec<Value> = (0..BATCH)
        .map(|i| {
            let id = format!("{conn:04}-{b:02}-{i:04}-{}", "x".repeat(255));
            json!({"jsonrpc": "2.0", "id": &id[..255], "method": "sleep", "params": {"ms": ms}})
        })
        .collect();
    Value::Array(items).to_string()
}

/// Opens `conns` connections, sends each `BATCHES` batches, returns them
/// without reading the answers.
async fn attack(
    addr: &str,
    conns: usize,
    ms: u64,
) -> Vec<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>
{
    let mut out = Vec::new();
    for c in 0..conns {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("connect");
        for b in 0..BATCHES {
            ws.send(Message::Text(batch(c, b, ms).into()))
                .await
                .expect("send");
        }
        out.push(ws);
    }
    out
}

/// Reads every batch's answer on every connection, then closes them.
async fn drain(
    conns: Vec<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
    >,
) {
    for mut ws in conns {
        let mut answered = 0;
        while answered < BATCHES {
            let m = tokio::time::timeout(Duration::from_secs(60), ws.next())
                .await
                .expect("answers come")
                .expect("open")
                .expect("a message");
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).expect("json");
                let items = v.as_array().expect("a batch answer");
                assert_eq!(items.len(), BATCH);
                assert!(
                    items.iter().all(|i| i["result"]["sleptMs"].is_u64()),
                    "{t:.200}"
                );
                answered += 1;
            }
        }
        let _ = ws.close(None).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rss_returns_after_a_batch_attack() {
    let server = start().await;
    // Warm up once, small, so that the baseline includes what any traffic
    // leaves behind for good (runtime threads, their arenas, tables).
    let warm = attack(&server.addr, 4, 10).await;
    drain(warm).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = rss(&server);

    let conns = attack(&server.addr, CONNECTIONS, HOLD_MS).await;
    // The server may still be reading the last batches: take the peak.
    let mut during = rss(&server);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        during = during.max(rss(&server));
    }
    assert!(
        during > before + 100 * 1024,
        "the attack holds over 100 MiB: {before} KiB before, {during} KiB during"
    );
    drain(conns).await;

    // Back within 10% (+ 8 MiB) once the watchdog has seen the drop.
    let bound = before + before / 10 + 8 * 1024;
    let end = Instant::now() + Duration::from_secs(20);
    let mut after = rss(&server);
    while after > bound && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        after = rss(&server);
    }
    assert!(
        after <= bound,
        "RSS {after} KiB after the attack, {before} KiB before, {during} KiB during"
    );
    eprintln!("RSS: {before} KiB before, {during} KiB during, {after} KiB after");
}
