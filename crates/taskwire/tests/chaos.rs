//! Chaos: many clients for a few seconds, each doing random submits, cancels,
//! batches, crashes, admin kills, graceful disconnects and abrupt ones. At the
//! end every request on a surviving connection got exactly one response, the
//! live task table is empty, and threads and memory are back within a bound.
//! Alone in its binary, so that /proc/self measures this test only.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const CLIENTS: u64 = 12;
const CHAOS_FOR: Duration = Duration::from_secs(6);

/// Answers per request id on one connection.
type Answers = Arc<Mutex<HashMap<i64, usize>>>;

fn record(answers: &Answers, v: &Value) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| record(answers, i)),
        Value::Object(m) if !m.contains_key("method") => {
            if let (Some(id), Ok(mut a)) = (m.get("id").and_then(Value::as_i64), answers.lock()) {
                *a.entry(id).or_insert(0) += 1;
            }
        }
        _ => {}
    }
}

fn request(rng: &mut Rng, id: i64) -> Value {
    let (method, params) = match rng.below(9) {
        0 => ("echo", json!({"value": id})),
        1 => ("sleep", json!({"ms": rng.below(300)})),
        2 => ("sleep", json!({"ms": 60_000})),
        3 => (
            "hash_chain",
            json!({"seed": id, "rounds": rng.below(2_000_000)}),
        ),
        4 => (
            "count_primes",
            json!({"below": rng.below(20_000_000), "_meta": {"progressToken": id}}),
        ),
        5 => ("spin", json!({"ms": rng.below(30)})),
        6 => ("runaway", json!({})),
        7 => ("crash", json!({"message": "chaos"})),
        _ => (
            "runaway",
            json!({"_meta": {"timeoutMs": 1 + rng.below(200)}}),
        ),
    };
    json!({"jsonrpc":"2.0","id":id,"method":method,"params":params})
}

/// How a connection of a chaos client ends.
enum End {
    TimeUp,
    Leave,
    Crash,
}

/// One client: connections one after another until the time is up. Returns
/// how many requests its surviving connection checked.
async fn client(addr: SocketAddr, seed: u64, until: tokio::time::Instant) -> usize {
    let mut rng = Rng(seed);
    let mut next_id = 0i64;
    loop {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("connect");
        let (mut tx, mut rx) = ws.split();
        let answers: Answers = Arc::default();
        let reader = {
            let answers = answers.clone();
            tokio::spawn(async move {
                while let Some(Ok(m)) = rx.next().await {
                    if let Message::Text(t) = m {
                        let v: Value = serde_json::from_str(&t).expect("the server sends JSON");
                        record(&answers, &v);
                    }
                }
            })
        };
        let mut sent: Vec<i64> = Vec::new();
        let end = loop {
            if tokio::time::Instant::now() >= until {
                break End::TimeUp;
            }
            let roll = rng.below(100);
            let msg = match roll {
                // Submit one.
                0..=54 => {
                    next_id += 1;
                    sent.push(next_id);
                    Some(request(&mut rng, next_id))
                }
                // A batch.
                55..=62 => {
                    let n = 1 + rng.below(4);
                    let items: Vec<Value> = (0..n)
                        .map(|_| {
                            next_id += 1;
                            sent.push(next_id);
                            request(&mut rng, next_id)
                        })
                        .collect();
                    Some(Value::Array(items))
                }
                // Cancel something sent earlier (in flight or not).
                63..=79 if !sent.is_empty() => {
                    let id = sent[rng.below(sent.len() as u64) as usize];
                    Some(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":id}}))
                }
                // An operator kills someone's task, maybe another client's.
                80..=95 => {
                    let v = admin_json(addr, "GET", "/admin/tasks?limit=50").await;
                    if let Some(tasks) = v["tasks"].as_array().filter(|t| !t.is_empty()) {
                        let t = &tasks[rng.below(tasks.len() as u64) as usize];
                        let id = t["id"].as_u64().unwrap_or(0);
                        let (status, _) =
                            http(addr, "POST", &format!("/admin/tasks/{id}/kill"), None).await;
                        // 404: it ended in the meantime.
                        assert!(status == 200 || status == 404, "kill: {status}");
                    }
                    None
                }
                // Leave politely.
                96..=97 => break End::Leave,
                // Crash: the socket just goes away, no close frame.
                98..=99 => break End::Crash,
                _ => None,
            };
            if let Some(m) = msg {
                if tx.send(Message::Text(m.to_string().into())).await.is_err() {
                    panic!("seed {seed}: the server dropped a connection");
                }
            }
            tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
        };
        match end {
            End::Leave => {
                let _ = tx.close().await;
                reader.abort();
                continue;
            }
            End::Crash => {
                // Both halves dropped: the socket closes with no close frame.
                reader.abort();
                drop(tx);
                continue;
            }
            End::TimeUp => {}
        }
        // Time is up: cancel whatever still runs, then every request must have
        // exactly one answer.
        let open: Vec<i64> = {
            let a = answers.lock().unwrap();
            sent.iter()
                .copied()
                .filter(|id| !a.contains_key(id))
                .collect()
        };
        for id in open {
            let c = json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":id}});
            tx.send(Message::Text(c.to_string().into()))
                .await
                .expect("send");
        }
        let all = eventually(|| async {
            let a = answers.lock().unwrap();
            sent.iter().all(|id| a.contains_key(id))
        })
        .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let a = answers.lock().unwrap().clone();
        assert!(all, "seed {seed}: unanswered requests");
        for id in &sent {
            assert_eq!(a.get(id), Some(&1), "seed {seed}: id {id}");
        }
        assert_eq!(
            a.len(),
            sent.len(),
            "seed {seed}: answers to ids never sent"
        );
        let _ = tx.close().await;
        reader.abort();
        return sent.len();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    quiet_crash_tasks();
    let s = TestServer::start(config()).await;
    // Warm up every path once, then take the baseline.
    let mut warm = s.client().await;
    for (i, m) in [
        "echo",
        "sleep",
        "hash_chain",
        "count_primes",
        "spin",
        "crash",
    ]
    .iter()
    .enumerate()
    {
        let params = match *m {
            "echo" => json!({"value": 1}),
            "hash_chain" => json!({"seed": 1, "rounds": 10}),
            "count_primes" => json!({"below": 100}),
            "crash" => json!({"message": "warm"}),
            _ => json!({"ms": 1}),
        };
        warm.call(i as i64, m, params).await;
    }
    drop(warm);
    assert!(
        eventually(|| async {
            admin_json(s.addr, "GET", "/admin/stats").await["connections"] == 0
        })
        .await
    );
    let threads_before = proc_status("Threads");
    let rss_before = proc_status("VmRSS");

    let base = std::env::var("TASKWIRE_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0xC4A05u64);
    let until = tokio::time::Instant::now() + CHAOS_FOR;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client(s.addr, base + i, until)))
        .collect();
    let mut checked = 0;
    for c in clients {
        checked += c
            .await
            .expect("a chaos client failed (its seed is in the message)");
    }
    assert!(checked > 0);

    // Nothing is left: no connection, no task, an idle pool.
    assert!(
        eventually(|| async {
            let st = admin_json(s.addr, "GET", "/admin/stats").await;
            let tasks = admin_json(s.addr, "GET", "/admin/tasks").await;
            st["connections"] == 0
                && tasks["tasks"].as_array().is_some_and(|t| t.is_empty())
                && st["pool"]["admitted"] == 0
        })
        .await,
        "{}",
        admin_json(s.addr, "GET", "/admin/tasks").await
    );
    assert_pool_idle(s.addr).await;
    let st = admin_json(s.addr, "GET", "/admin/stats").await;
    // The chaos really happened.
    for outcome in ["ok", "cancelled", "crashed", "killed"] {
        assert!(
            st["finished"][outcome].as_u64().unwrap_or(0) > 0,
            "no {outcome}: {st}"
        );
    }
    // Threads: replacement workers and Tokio's idle threads wind down; allow some slack.
    let threads_ok = eventually(|| async { proc_status("Threads") <= threads_before + 8 }).await;
    assert!(
        threads_ok,
        "threads {} -> {}",
        threads_before,
        proc_status("Threads")
    );
    let grown_mib = proc_status("VmRSS").saturating_sub(rss_before) / 1024;
    assert!(grown_mib < 64, "RSS grew {grown_mib} MiB");
    eprintln!(
        "chaos: {checked} requests checked on surviving connections; {st}; threads {threads_before} -> {}; RSS +{grown_mib} MiB",
        proc_status("Threads")
    );
    s.stop().await.unwrap();
}
