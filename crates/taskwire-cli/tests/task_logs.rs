//! A crash's and a timeout's log lines name the task: the `taskwire` binary
//! is run as a process and its stderr read while a task crashes. The line must carry the
//! task's connection, request id and method, the client's text must arrive
//! escaped (no forged line), and the binary's panic hook must stay quiet.
//! (The watchdog's line is checked in `watchdog_log.rs`, in process: no
//! built-in task reliably runs long enough without a checkpoint.)

use std::process::Stdio;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(60);

/// The demo tasks (`crash`, `spin`) are offered only on request.
const DEMO_ARGS: &[&str] = &["--demo"];

struct Server {
    child: Child,
    addr: String,
    /// The server's stderr, line by line, ANSI colours taken out.
    log: mpsc::UnboundedReceiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte (a letter).
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

async fn start(args: &[&str]) -> Server {
    start_logging("info", args).await
}

async fn start_logging(level: &str, args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(["serve", "--addr", "127.0.0.1:0", "--log", level])
        .args(DEMO_ARGS)
        .args(args)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start taskwire");
    let err = child.stderr.take().expect("stderr");
    let (tx, log) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut lines = BufReader::new(err).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            if tx.send(strip_ansi(&l)).is_err() {
                break;
            }
        }
    });
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("the server starts")
        .expect("read")
        .expect("a line");
    let addr = line
        .strip_prefix("listening on ")
        .expect("the listening line")
        .to_string();
    Server { child, addr, log }
}

impl Server {
    /// Reads the log until a line holds every one of `parts`; returns it.
    async fn line_with(&mut self, parts: &[&str]) -> String {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(WAIT, async {
            while let Some(l) = self.log.recv().await {
                if parts.iter().all(|p| l.contains(p)) {
                    return Some(l);
                }
                seen.push(l);
            }
            None
        })
        .await;
        match found {
            Ok(Some(l)) => l,
            _ => panic!("no log line with {parts:?}; saw:\n{}", seen.join("\n")),
        }
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn call(ws: &mut Ws, request: Value) -> Value {
    let id = request["id"].clone();
    ws.send(Message::text(request.to_string()))
        .await
        .expect("send");
    let answer = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["id"] == id {
                    return Some(v);
                }
            }
        }
        None
    })
    .await;
    answer.ok().flatten().expect("an answer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_logged_once_naming_the_task_with_the_message_escaped() {
    let mut s = start(&[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr))
        .await
        .expect("connect");
    let answer = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": "req-7", "method": "crash",
               "params": {"message": "boom\nFORGED INFO admin logged in"}}),
    )
    .await;
    assert_eq!(answer["error"]["code"], -32003, "{answer}");
    let line = s
        .line_with(&["task crashed", "method=crash", "request=\"req-7\""])
        .await;
    assert!(line.contains("conn="), "{line}");
    assert!(line.contains("task="), "{line}");
    assert!(line.contains(r"boom\nFORGED"), "escaped: {line}");
    // A second call proves the log went on, and that no line of its own
    // started with the client's forged text.
    let again = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 8, "method": "crash", "params": {"message": "two"}}),
    )
    .await;
    assert_eq!(again["error"]["code"], -32003, "{again}");
    let mut before = Vec::new();
    let second = tokio::time::timeout(WAIT, async {
        while let Some(l) = s.log.recv().await {
            if l.contains("task crashed") {
                return Some(l);
            }
            before.push(l);
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("the second crash is logged");
    assert!(second.contains("request=8"), "{second}");
    // The hook stays quiet for a task's panic: nothing else about it at info.
    assert!(
        before
            .iter()
            .all(|l| !l.starts_with("FORGED") && !l.contains("panic")),
        "{before:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_logged_naming_the_task() {
    let mut s = start(&[]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr))
        .await
        .expect("connect");
    let answer = call(
        &mut ws,
        json!({"jsonrpc": "2.0", "id": 9, "method": "spin",
               "params": {"ms": 60_000, "_meta": {"timeoutMs": 50}}}),
    )
    .await;
    assert_eq!(answer["error"]["code"], -32002, "{answer}");
    let line = s
        .line_with(&["task timed out", "method=spin", "request=9"])
        .await;
    assert!(line.contains("conn="), "{line}");
    assert!(line.contains("timeout_ms=50"), "{line}");
}

/// Session tokens are never logged, even at debug level: a session is opened,
/// cut, resumed (a new token), and resumes with spent and forged tokens are
/// refused; no line of the log holds any token's secret part.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_tokens_are_never_logged() {
    let mut s = start_logging("debug", &[]).await;
    let url = format!("ws://{}/ws", s.addr);
    let (mut a, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let opened = call(
        &mut a,
        json!({"jsonrpc":"2.0","id":"o","method":"$/session.open","params":{}}),
    )
    .await;
    let token = opened["result"]["token"]
        .as_str()
        .expect("a token")
        .to_string();
    call(
        &mut a,
        json!({"jsonrpc":"2.0","id":1,"method":"sleep","params":{"ms":50}}),
    )
    .await;
    // Dropped without a close frame: the session detaches.
    drop(a);
    let (mut b, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    let resumed = call(
        &mut b,
        json!({"jsonrpc":"2.0","id":"r","method":"$/session.resume","params":{"token": token, "seq": 0}}),
    )
    .await;
    let new_token = resumed["result"]["token"]
        .as_str()
        .expect("resumed")
        .to_string();
    let forged = format!(
        "{}.{}",
        opened["result"]["session"].as_str().unwrap_or("1"),
        "ab".repeat(32)
    );
    for t in [&token, &forged] {
        let (mut c, _) = tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect");
        let v = call(
            &mut c,
            json!({"jsonrpc":"2.0","id":"r","method":"$/session.resume","params":{"token": t, "seq": 0}}),
        )
        .await;
        assert_eq!(v["error"]["code"], -32020, "{v}");
    }
    // Every line, to the end of the process's stderr.
    drop(b);
    let _ = s.child.start_kill();
    let mut log = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(WAIT, s.log.recv()).await {
        log.push(l);
    }
    assert!(
        log.iter().any(|l| l.contains("session")),
        "debug lines of sessions:\n{}",
        log.join("\n")
    );
    for t in [&token, &new_token, &forged] {
        let secret = t.split_once('.').map_or(t.as_str(), |(_, s)| s);
        assert!(secret.len() >= 32, "{t}");
        for l in &log {
            assert!(!l.contains(secret), "a token in the log: {l}");
        }
    }
}

/// A guest that writes 200 MB to its stdout: the server logs 16 KiB of it,
/// says how much it dropped, and the task is answered as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_s_output_is_logged_within_its_bound() {
    let dir = std::env::temp_dir().join(format!("taskwire-chatty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // 200 writes of one ~1 MB iovec of 'a's (the iovec at 0, the bytes at 16).
    std::fs::write(
        dir.join("chatty.wat"),
        r#"(module
          (import "wasi_snapshot_preview1" "fd_write" (func $w (param i32 i32 i32 i32) (result i32)))
          (memory (export "memory") 17)
          (func (export "run") (local $i i32)
            (i32.store (i32.const 0) (i32.const 16))
            (i32.store (i32.const 4) (i32.const 1048000))
            (memory.fill (i32.const 16) (i32.const 97) (i32.const 1048000))
            (loop
              (drop (call $w (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
              (local.set $i (i32.add (local.get $i) (i32.const 1)))
              (br_if 0 (i32.lt_u (local.get $i) (i32.const 200))))))"#,
    )
    .expect("write the module");
    let dir_arg = dir.to_string_lossy().to_string();
    let mut s = start(&["--wasm-dir", &dir_arg]).await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr))
        .await
        .expect("connect");
    let v = call(
        &mut ws,
        json!({"jsonrpc":"2.0","id":1,"method":"chatty","params":{}}),
    )
    .await;
    assert_eq!(v["result"], Value::Null, "{v}");
    // The store (and its log) is dropped with the task's future, before
    // the answer is written: every line is in by now.
    drop(ws);
    let _ = s.child.start_kill();
    let mut lines = Vec::new();
    while let Ok(Some(l)) = tokio::time::timeout(WAIT, s.log.recv()).await {
        lines.push(l);
    }
    let guest: usize = lines
        .iter()
        .map(|l| l.matches("aaaaaaaa").count() * 8)
        .sum();
    assert!(
        (1 << 10..=16 << 10).contains(&guest),
        "{guest} bytes of guest output logged"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("bytes of guest output dropped") && l.contains("chatty")),
        "{}",
        lines.join("\n").chars().take(4000).collect::<String>()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
