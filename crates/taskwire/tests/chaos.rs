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

/// Live heap bytes, to see what the server keeps once its clients are gone
/// (RSS also counts what the allocator has not handed back).
#[global_allocator]
static ALLOC: taskwire::alloc::CountingAlloc = taskwire::alloc::CountingAlloc;

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
    let _alone = ALONE.lock().await;
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

/// The two chaos tests measure this process's RSS and threads: one at a time.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Connection cuts injected over all session clients.
const CUTS: usize = 10_000;
const SESSION_CLIENTS: u64 = 16;

/// What one session client knows, shared with the reader of its current connection.
#[derive(Default)]
struct SessionSide {
    /// Numbered frames received (this session's count).
    seq: u64,
    /// Answers per id, over every connection.
    answers: HashMap<i64, usize>,
    /// Every answer, for the message when one is doubled.
    log: Vec<String>,
    /// The answer to the open or resume, and the numbered frames read after it.
    handshake: Option<Value>,
    after_handshake: Vec<i64>,
}

type Side = Arc<Mutex<SessionSide>>;

fn note_session(side: &Side, v: &Value) {
    let mut s = side.lock().unwrap();
    if v.get("method").is_some() {
        return;
    }
    if v["id"] == "$s" {
        s.log.push(format!("handshake {v}"));
        s.handshake = Some(v.clone());
        s.after_handshake.clear();
        return;
    }
    if v["id"].is_null() {
        return;
    }
    s.seq += 1;
    if let Some(id) = v["id"].as_i64() {
        let n = s.seq;
        s.log.push(format!("#{n} {v}"));
        *s.answers.entry(id).or_insert(0) += 1;
        s.after_handshake.push(id);
    }
}

async fn session_connection(
    addr: SocketAddr,
    side: &Side,
    first: Value,
    reset: bool,
) -> (
    futures_util::stream::SplitSink<
        tokio_tungstenite::WebSocketStream<
            tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
        >,
        Message,
    >,
    tokio::task::JoinHandle<()>,
    Value,
    u16,
) {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    if let (true, tokio_tungstenite::MaybeTlsStream::Plain(tcp)) = (reset, ws.get_ref()) {
        // A zero linger: dropping the socket sends a reset (it cannot block,
        // which is what the deprecation warns of).
        #[allow(deprecated)]
        let _ = tcp.set_linger(Some(Duration::ZERO));
    }
    let port = match ws.get_ref() {
        tokio_tungstenite::MaybeTlsStream::Plain(tcp) => {
            tcp.local_addr().map(|a| a.port()).unwrap_or(0)
        }
        _ => 0,
    };
    let (mut tx, mut rx) = ws.split();
    side.lock().unwrap().handshake = None;
    let reader = {
        let side = side.clone();
        tokio::spawn(async move {
            while let Some(Ok(m)) = rx.next().await {
                if let Message::Text(t) = m {
                    let v: Value = serde_json::from_str(&t).expect("the server sends JSON");
                    note_session(&side, &v);
                }
            }
        })
    };
    tx.send(Message::Text(first.to_string().into()))
        .await
        .expect("send");
    let mut answer = Value::Null;
    let got = eventually(|| {
        let a = side.lock().unwrap().handshake.clone();
        if let Some(a) = a {
            answer = a;
        }
        std::future::ready(!answer.is_null())
    })
    .await;
    assert!(got, "no answer to {first}");
    (tx, reader, answer, port)
}

/// One session client: connections cut one after another (a reset, a FIN or
/// an operator's close) while requests run, each followed by a resume; at the
/// end every request has exactly one answer. Returns the requests checked.
async fn session_client(
    addr: SocketAddr,
    seed: u64,
    cuts: Arc<std::sync::atomic::AtomicUsize>,
) -> usize {
    use std::sync::atomic::Ordering;
    let mut rng = Rng(seed);
    let side: Side = Arc::default();
    let mut sent: Vec<i64> = Vec::new();
    let mut texts: HashMap<i64, Value> = HashMap::new();
    let mut next_id = 0i64;
    let open = json!({"jsonrpc":"2.0","id":"$s","method":"$/session.open","params":{}});
    let (mut tx, mut reader, answer, mut port) = session_connection(addr, &side, open, false).await;
    let mut token = answer["result"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    loop {
        let last = cuts.fetch_add(1, Ordering::Relaxed) >= CUTS;
        // A few actions on this connection.
        for _ in 0..rng.below(6) {
            let pending = {
                let s = side.lock().unwrap();
                sent.iter().filter(|id| !s.answers.contains_key(id)).count()
            };
            let msg = match rng.below(10) {
                0..=5 if pending < 64 => {
                    next_id += 1;
                    let (m, p) = match rng.below(4) {
                        0 => ("echo", json!({"value": next_id})),
                        1 => ("sleep", json!({"ms": rng.below(50)})),
                        2 => ("sleep", json!({"ms": 200 + rng.below(2_000)})),
                        _ => (
                            "hash_chain",
                            json!({"seed": next_id, "rounds": rng.below(200_000)}),
                        ),
                    };
                    let r = json!({"jsonrpc":"2.0","id":next_id,"method":m,"params":p});
                    sent.push(next_id);
                    texts.insert(next_id, r.clone());
                    r
                }
                6..=7 if !sent.is_empty() => {
                    let id = *rng.pick(&sent);
                    json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":id}})
                }
                _ => {
                    let seq = side.lock().unwrap().seq;
                    json!({"jsonrpc":"2.0","method":"$/session.ack","params":{"seq":seq}})
                }
            };
            if tx
                .send(Message::Text(msg.to_string().into()))
                .await
                .is_err()
            {
                break;
            }
            if rng.chance(30) {
                tokio::time::sleep(Duration::from_millis(rng.below(5))).await;
            }
        }
        if last {
            break;
        }
        // The cut: the socket goes (with a reset or a FIN, as the connection
        // was made), never a close frame; or now and then the server cuts it
        // (an operator closes it: 1001).
        if rng.chance(3) {
            let v = admin_json(addr, "GET", "/admin/connections").await;
            let mine = v["connections"].as_array().and_then(|cs| {
                cs.iter().find(|c| {
                    c["peer"]
                        .as_str()
                        .is_some_and(|p| p.ends_with(&format!(":{port}")))
                })
            });
            if let Some(id) = mine.and_then(|c| c["id"].as_u64()) {
                let _ = http(
                    addr,
                    "POST",
                    &format!("/admin/connections/{id}/close"),
                    None,
                )
                .await;
            }
        }
        reader.abort();
        let _ = (&mut reader).await;
        drop(tx);
        let seq = side.lock().unwrap().seq;
        let resume = json!({"jsonrpc":"2.0","id":"$s","method":"$/session.resume",
            "params":{"token": token, "seq": seq}});
        let (t2, r2, answer, p2) = session_connection(addr, &side, resume, rng.chance(50)).await;
        (tx, reader, port) = (t2, r2, p2);
        assert!(
            answer.get("result").is_some(),
            "seed {seed}: resume refused: {answer}"
        );
        token = answer["result"]["token"]
            .as_str()
            .expect("token")
            .to_string();
        let inflight: Vec<i64> = answer["result"]["inflight"]
            .as_array()
            .expect("inflight")
            .iter()
            .filter_map(Value::as_i64)
            .collect();
        let replay = answer["result"]["replay"].as_u64().expect("replay") as usize;
        // The replay follows the answer at once: wait for it, then re-send
        // what the server never received.
        let replayed =
            eventually(|| std::future::ready(side.lock().unwrap().after_handshake.len() >= replay))
                .await;
        assert!(replayed, "seed {seed}: replay incomplete");
        let resend: Vec<i64> = {
            let s = side.lock().unwrap();
            sent.iter()
                .copied()
                .filter(|id| !s.answers.contains_key(id) && !inflight.contains(id))
                .collect()
        };
        side.lock()
            .unwrap()
            .log
            .push(format!("sent resume seq {seq}; resend {resend:?}"));
        for id in resend {
            let r = texts[&id].to_string();
            // Closed by an operator meanwhile: the next resume re-sends it.
            if tx.send(Message::Text(r.into())).await.is_err() {
                break;
            }
        }
    }
    // The end: everything answered, exactly once.
    let all = eventually(|| {
        let s = side.lock().unwrap();
        std::future::ready(sent.iter().all(|id| s.answers.contains_key(id)))
    })
    .await;
    {
        let s = side.lock().unwrap();
        let missing: Vec<_> = sent
            .iter()
            .filter(|id| !s.answers.contains_key(id))
            .collect();
        assert!(all, "seed {seed}: unanswered {missing:?}");
        for id in &sent {
            if s.answers.get(id) != Some(&1) {
                let idt = format!("\"id\":{id},");
                let related: Vec<_> = s
                    .log
                    .iter()
                    .filter(|l| {
                        l.contains(&idt) || l.starts_with("handshake") || l.starts_with("sent")
                    })
                    .collect();
                panic!(
                    "seed {seed}: id {id}: {:?}\n{}",
                    s.answers.get(id),
                    related
                        .iter()
                        .map(|x| x.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
        }
        assert_eq!(
            s.answers.len(),
            sent.len(),
            "seed {seed}: answers to ids never sent"
        );
    }
    // A client's close 1000 ends the session.
    let bye = tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
        reason: "done".into(),
    };
    let _ = tx.send(Message::Close(Some(bye))).await;
    let _ = tx.close().await;
    reader.abort();
    sent.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_sessions() {
    let _alone = ALONE.lock().await;
    let s = TestServer::start(config()).await;
    let addr = s.addr;
    // A warm-up round, then the baseline.
    session_client(
        addr,
        1,
        Arc::new(std::sync::atomic::AtomicUsize::new(CUTS - 20)),
    )
    .await;
    let rss_before = proc_status("VmRSS");
    let heap_before = taskwire::alloc::allocated_bytes();
    let cuts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let base = std::env::var("TASKWIRE_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5E55u64);
    let clients: Vec<_> = (0..SESSION_CLIENTS)
        .map(|i| tokio::spawn(session_client(addr, base + i, cuts.clone())))
        .collect();
    let mut checked = 0;
    for c in clients {
        checked += c
            .await
            .expect("a session chaos client failed (its seed is in the message)");
    }
    // Every session ended with its client's close: no session, no buffer, no task.
    assert!(
        eventually(|| async {
            let v = admin_json(addr, "GET", "/admin/sessions").await;
            let st = admin_json(addr, "GET", "/admin/stats").await;
            v["sessions"].as_array().is_some_and(|s| s.is_empty())
                && v["counts"]["detachedBytes"] == 0
                && st["connections"] == 0
                && st["pool"]["admitted"] == 0
        })
        .await,
        "{}",
        admin_json(addr, "GET", "/admin/sessions").await
    );
    let counts = admin_json(addr, "GET", "/admin/sessions").await["counts"].clone();
    assert!(
        counts["resumed"].as_u64().unwrap() >= CUTS as u64,
        "{counts}"
    );
    assert_eq!(counts["refused"], 0, "{counts}");
    let grown_kib = proc_status("VmRSS").saturating_sub(rss_before);
    let heap_grown = taskwire::alloc::allocated_bytes() as i64 - heap_before as i64;
    eprintln!(
        "chaos with sessions: {checked} requests checked over {} cuts; {counts}; RSS +{grown_kib} KiB, live heap {heap_grown:+} B",
        cuts.load(std::sync::atomic::Ordering::Relaxed)
    );
    // What the server holds once every session has ended is back within a
    // MiB of where it was (the clients' own state is dropped by now).
    assert!(heap_grown < 1 << 20, "live heap grew {heap_grown} B");
    s.stop().await.unwrap();
}
