//! CPU tasks that await Tokio (timers, channels, sockets) on a real server,
//! and the watchdog measuring CPU time: tasks that checkpoint are never
//! flagged however contended the machine, one that never checkpoints is.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use taskwire::bench_internals::thread_cpu_time;
use taskwire::{Config, Ctx, Registry, TaskError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

/// More CPU tasks waiting at once than the pool has workers.
const WAITERS: usize = 16;
const WORKERS: usize = 2;

fn small_pool() -> Config {
    let mut cfg = config();
    cfg.workers = Some(WORKERS);
    cfg
}

#[derive(Deserialize, JsonSchema)]
struct Port {
    port: u16,
}

/// What the tasks registered here share: a gate that the I/O task `open`
/// opens (a channel fed by an I/O task).
fn registry(gate: watch::Receiver<bool>, opener: watch::Sender<bool>) -> Registry {
    let mut r = builtins();
    let opener = Arc::new(opener);
    r.cpu(
        "nap",
        "Sleeps 50 ms on a Tokio timer, waits for the gate, then for a spawned Tokio task.",
        move |_ctx: Ctx, _p: Value| {
            let mut gate = gate.clone();
            async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                gate.wait_for(|open| *open)
                    .await
                    .map_err(|_| TaskError::Internal("the gate was dropped".into()))?;
                let (tx, rx) = tokio::sync::oneshot::channel();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    let _ = tx.send(7u64);
                });
                rx.await
                    .map_err(|_| TaskError::Internal("the sender was dropped".into()))
            }
        },
    )
    .expect("registers")
    .io("open", "Opens the gate.", move |_ctx: Ctx, _p: Value| {
        let opener = opener.clone();
        async move {
            opener.send_replace(true);
            Ok(true)
        }
    })
    .expect("registers")
    .cpu(
        "dial",
        "Connects to 127.0.0.1:`port` and returns what it reads.",
        |_ctx: Ctx, p: Port| async move {
            let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?;
            s.write_all(b"ping")
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?;
            let mut got = String::new();
            s.read_to_string(&mut got)
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?;
            Ok(got)
        },
    )
    .expect("registers")
    .cpu(
        "hog",
        "Burns 2 s of CPU (20 s at most) without a checkpoint.",
        |_ctx: Ctx, _p: Value| async move {
            let (start, wall) = (thread_cpu_time(), Instant::now());
            let mut x = 1u64;
            while thread_cpu_time() - start < Duration::from_secs(2)
                && wall.elapsed() < Duration::from_secs(20)
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
    r
}

async fn server() -> TestServer {
    let (opener, gate) = watch::channel(false);
    TestServer::with_registry(small_pool(), registry(gate, opener)).await
}

async fn stats(addr: SocketAddr) -> Value {
    admin_json(addr, "GET", "/admin/stats").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_cpu_tasks_leave_the_pool_and_all_complete() {
    let s = server().await;
    let mut c = s.client().await;
    for i in 0..WAITERS {
        c.request(i as u64, "nap", json!({})).await;
    }
    // All of them wait at once, off the pool: the live table says so.
    let all_waiting = eventually(|| async {
        stats(s.addr).await["tasks"]["waiting"].as_u64() == Some(WAITERS as u64)
    })
    .await;
    assert!(all_waiting, "{}", stats(s.addr).await);
    // More waiters than workers, and the workers are free: a `spin` from
    // another connection runs and is answered while they wait.
    let mut other = s.client().await;
    let spun = other.call(1, "spin", json!({"ms": 20})).await;
    assert_eq!(spun["result"]["spunMs"], 20, "{spun}");
    let waiting = stats(s.addr).await["tasks"]["waiting"].as_u64();
    assert_eq!(waiting, Some(WAITERS as u64), "still waiting on the gate");
    // An I/O task feeds the channel they wait on; each then awaits a spawned
    // Tokio task, and answers.
    let opened = other.call(2, "open", json!({})).await;
    assert_eq!(opened["result"], true, "{opened}");
    for i in 0..WAITERS {
        let r = c.response(i as u64).await;
        assert_eq!(r["result"], 7, "{r}");
    }
    assert_pool_idle(s.addr).await;
    let st = stats(s.addr).await;
    assert_eq!(st["pool"]["nonYieldingTotal"], 0, "{st}");
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpu_task_connects_to_a_local_listener() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accept = tokio::spawn(async move {
        let (mut sock, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4];
        sock.read_exact(&mut buf).await.unwrap();
        sock.write_all(b"pong:").await.unwrap();
        sock.write_all(&buf).await.unwrap();
    });
    let s = server().await;
    let mut c = s.client().await;
    let r = c.call(1, "dial", json!({"port": port})).await;
    assert_eq!(r["result"], "pong:ping", "{r}");
    tokio::time::timeout(WAIT, accept).await.unwrap().unwrap();
    s.stop().await.unwrap();
}

/// Busy threads in this process, so that the server's workers get a share
/// of a core, not a core; they stop when dropped, or after 30 s.
struct Contention {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Contention {
    fn start(n: usize) -> Contention {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let end = Instant::now() + Duration::from_secs(30);
                    let mut x = 1u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
                        for i in 0..10_000u64 {
                            x = x.wrapping_mul(31).wrapping_add(i);
                        }
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        Contention { stop, threads }
    }
}

impl Drop for Contention {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_contention_only_a_task_without_checkpoints_is_flagged() {
    // Workers at the lowest priority against four busy threads of normal
    // priority: a worker gets about 1% of a core, so a 2 ms slice lasts some
    // 200 ms of wall time, past the 100 ms a task may overrun its slice.
    let mut cfg = small_pool();
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.nice = 19;
    let (opener, gate) = watch::channel(false);
    let server = taskwire::Server::bind(cfg, registry(gate, opener))
        .await
        .unwrap();
    let s = TestServer {
        addr: server.local_addr().unwrap(),
        handle: server.shutdown_handle(),
        join: Some(tokio::spawn(server.run(std::future::pending()))),
    };
    let contention = Contention::start(4);
    // Spins from two connections, more than the workers.
    let mut a = s.client().await;
    let mut b = s.client().await;
    for i in 0..2u64 {
        a.request(i, "spin", json!({"ms": 10})).await;
        b.request(i, "spin", json!({"ms": 10})).await;
    }
    let mut most_workers = 0;
    let mut answered = 0;
    let end = Instant::now() + WAIT * 3;
    while answered < 4 && Instant::now() < end {
        let st = stats(s.addr).await;
        most_workers = most_workers.max(st["pool"]["liveWorkers"].as_u64().unwrap_or(0));
        answered = st["finished"]["ok"].as_u64().unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for i in 0..2u64 {
        assert_eq!(a.response(i).await["result"]["spunMs"], 10);
        assert_eq!(b.response(i).await["result"]["spunMs"], 10);
    }
    let st = stats(s.addr).await;
    assert_eq!(st["pool"]["nonYieldingTotal"], 0, "{st}");
    assert_eq!(most_workers, WORKERS as u64, "no replacement worker: {st}");
    // A task that never reaches a checkpoint is flagged all the same, and
    // its worker replaced.
    let r = a.call(10, "hog", json!({})).await;
    assert_eq!(r["result"], true, "{r}");
    drop(contention);
    let st = stats(s.addr).await;
    assert_eq!(st["pool"]["nonYieldingTotal"], 1, "{st}");
    s.stop().await.unwrap();
}
