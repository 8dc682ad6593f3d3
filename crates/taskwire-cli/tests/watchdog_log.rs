//! The watchdog's log line names the task it flags. In process, with the
//! binary's kind of subscriber writing into a buffer: no built-in task runs
//! reliably long without a checkpoint, so the test registers one. (The
//! crash's line is checked against the binary itself in `task_logs.rs`.)

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskwire::bench_internals::thread_cpu_time;
use taskwire::{Config, Ctx, Registry, Server};
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(60);

/// Everything logged, shared with the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watchdog_names_the_task_it_flags() {
    let log = Captured::default();
    let writer = log.clone();
    // Global: the watchdog logs from a thread of its own.
    tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let mut r = Registry::new();
    r.cpu(
        "hog",
        "Burns 200 ms of CPU (20 s of wall time at most) without a checkpoint.",
        |_ctx: Ctx, _p: Value| async move {
            let (start, cpu) = (Instant::now(), thread_cpu_time());
            let mut x = 1u64;
            while thread_cpu_time() - cpu < Duration::from_millis(200)
                && start.elapsed() < Duration::from_secs(20)
            {
                for i in 0..10_000u64 {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
                }
                std::hint::black_box(x);
            }
            Ok(true)
        },
    )
    .expect("registers");
    let cfg = Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        nice: 0,
        workers: Some(1),
        non_yield_after: Duration::from_millis(20),
        ..Config::default()
    };
    let server = Server::bind(cfg, r).await.unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.shutdown_handle();
    let join = tokio::spawn(server.run(std::future::pending()));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    ws.send(Message::text(
        json!({"jsonrpc": "2.0", "id": "h\n1", "method": "hog"}).to_string(),
    ))
    .await
    .unwrap();
    let answer = tokio::time::timeout(WAIT, async {
        while let Some(Ok(m)) = ws.next().await {
            if let Message::Text(t) = m {
                return serde_json::from_str::<Value>(&t).ok();
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .expect("an answer");
    assert_eq!(answer["result"], true, "{answer}");

    let text = log.text();
    let line = text
        .lines()
        .find(|l| l.contains("without a checkpoint"))
        .unwrap_or_else(|| panic!("no watchdog line in:\n{text}"));
    for part in [
        "method=hog",
        r#"request="h\n1""#,
        "conn=",
        "task=",
        "cpu_ms=",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    handle.shutdown();
    let _ = tokio::time::timeout(WAIT, join).await;
}
