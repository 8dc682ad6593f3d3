//! Property tests over random input, with a seeded generator (no extra
//! dependency, and a failure is reproduced by its seed): random text, random
//! JSON, mutated and valid requests, binary frames and batches, thrown at the
//! parser and at live connections. The server never panics, every request with
//! an id gets exactly one response, connections live on, nothing leaks.
//! (The coverage-guided fuzzer is in `fuzz/`, see docs/SECURITY.md.)

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Map, Value};
use taskwire::protocol::{parse_frame, parse_frame_limited, Frame};
use tokio_tungstenite::tungstenite::Message;

/// Characters that matter to a JSON parser, and some that test UTF-8 handling.
const CHARS: &[char] = &[
    '{', '}', '[', ']', '"', ':', ',', '\\', '0', '1', '9', '-', '+', '.', 'e', 'E', 'a', 'n', 'u',
    'l', 't', 'r', 'f', ' ', '\n', '\t', '\u{0}', '\u{7f}', 'é', '€', '😀', '\u{feff}',
];

fn random_text(rng: &mut Rng, max: u64) -> String {
    (0..rng.below(max)).map(|_| *rng.pick(CHARS)).collect()
}

/// A string that can never be one of the tracked ids (those start with "t-").
fn random_string(rng: &mut Rng) -> String {
    format!("r{}", random_text(rng, 12))
}

const KEYS: &[&str] = &[
    "jsonrpc",
    "id",
    "method",
    "params",
    "_meta",
    "progressToken",
    "timeoutMs",
    "value",
    "result",
    "error",
];

/// Random JSON. Integers stay below 10^9 in magnitude, so they never collide
/// with the tracked integer ids (≥ 10^12).
fn random_json(rng: &mut Rng, depth: u32) -> Value {
    let kinds = if depth == 0 { 5 } else { 7 };
    match rng.below(kinds) {
        0 => Value::Null,
        1 => Value::Bool(rng.chance(50)),
        2 => json!(rng.below(2_000_000_000) as i64 - 1_000_000_000),
        3 => json!((rng.next() as f64 / u64::MAX as f64) * 1e6 - 5e5),
        4 => Value::String(random_string(rng)),
        5 => Value::Array(
            (0..rng.below(4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(5) {
                let k = if rng.chance(70) {
                    rng.pick(KEYS).to_string()
                } else {
                    random_string(rng)
                };
                m.insert(k, random_json(rng, depth - 1));
            }
            Value::Object(m)
        }
    }
}

/// Deletes, duplicates or inserts characters of a valid request.
fn mutate(rng: &mut Rng, text: &str) -> String {
    let mut chars: Vec<char> = text.chars().collect();
    for _ in 0..=rng.below(4) {
        let at = rng.below(chars.len() as u64 + 1) as usize;
        match rng.below(3) {
            0 if at < chars.len() => {
                let end = (at + 1 + rng.below(5) as usize).min(chars.len());
                chars.drain(at..end);
            }
            1 if at < chars.len() => {
                let c = chars[at];
                chars.insert(at, c);
            }
            _ => chars.insert(at, *rng.pick(CHARS)),
        }
    }
    chars.into_iter().collect()
}

/// A valid request of a bounded task (none runs for more than ~100 ms).
fn bounded_request(rng: &mut Rng, id: Option<Value>) -> Value {
    let (method, params) = match rng.below(11) {
        0 => ("echo", json!({"value": random_json(rng, 2)})),
        1 => ("sleep", json!({"ms": rng.below(50)})),
        2 => (
            "hash_chain",
            json!({"seed": rng.next(), "rounds": rng.below(100_000)}),
        ),
        3 => (
            "count_primes",
            json!({"below": rng.below(200_000), "_meta": {"progressToken": rng.below(1000)}}),
        ),
        4 => ("spin", json!({"ms": rng.below(5)})),
        5 => ("crash", json!({"message": random_string(rng)})),
        6 => (
            "runaway",
            json!({"_meta": {"timeoutMs": 1 + rng.below(100)}}),
        ),
        7 => ("rpc.discover", Value::Null),
        // Wrong params: -32602 (never for a task that would take them and run long).
        8 => ("echo", random_json(rng, 2)),
        9 => ("crash", json!([1, 2])),
        _ => ("no_such_task", random_json(rng, 1)),
    };
    let mut req = json!({"jsonrpc": "2.0", "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    if let Some(id) = id {
        req["id"] = id;
    }
    req
}

#[test]
fn the_parser_never_panics_on_random_input() {
    let mut rng = Rng(0x7a5c_0001);
    let valid = json!({"jsonrpc":"2.0","id":1,"method":"echo","params":{"value":[1,"a",{"b":null}],"_meta":{"progressToken":"p","timeoutMs":5}}}).to_string();
    let mut singles = 0;
    for i in 0..30_000 {
        let text = match i % 4 {
            0 => random_text(&mut rng, 300),
            1 => random_json(&mut rng, 4).to_string(),
            2 => mutate(&mut rng, &valid),
            _ => Value::Array(
                (0..rng.below(4))
                    .map(|_| random_json(&mut rng, 3))
                    .collect(),
            )
            .to_string(),
        };
        if let Frame::Single(Ok(_)) = parse_frame(&text) {
            singles += 1;
        }
        // Any batch limit: a batch holds at most that many elements, and the
        // params a task sees never carry `_meta`.
        let max = rng.below(4) as usize;
        match parse_frame_limited(&text, max) {
            Frame::Batch(items) => assert!(!items.is_empty() && items.len() <= max, "{text}"),
            Frame::Single(Ok(req)) => {
                if let Ok(Value::Object(m)) = req.params.deserialize::<Value>() {
                    assert!(!m.contains_key("_meta"), "{text}");
                }
            }
            _ => {}
        }
    }
    // The mutations leave some requests valid: the generator reaches the happy path.
    assert!(singles > 100, "{singles}");
    assert!(matches!(parse_frame(&valid), Frame::Single(Ok(_))));
}

/// Responses per id (the id's JSON text), batches flattened.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

fn record(seen: &Seen, v: &Value) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| record(seen, i)),
        Value::Object(m) if !m.contains_key("method") => {
            let id = m.get("id").cloned().unwrap_or(Value::Null).to_string();
            if let Ok(mut s) = seen.lock() {
                *s.entry(id).or_insert(0) += 1;
            }
        }
        _ => {}
    }
}

/// One client's run: `frames` random frames, then the exactly-once check of
/// the tracked ids.
async fn fuzz_client(addr: std::net::SocketAddr, seed: u64, frames: usize) {
    let mut rng = Rng(seed);
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    let (mut tx, mut rx) = ws.split();
    let seen: Seen = Arc::default();
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            while let Some(m) = rx.next().await {
                match m {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(&t).expect("the server sends JSON");
                        record(&seen, &v);
                    }
                    Ok(Message::Close(f)) => panic!("seed {seed}: the server closed: {f:?}"),
                    Ok(_) => {}
                    Err(e) => panic!("seed {seed}: {e}"),
                }
            }
        })
    };
    let mut expected: HashMap<String, usize> = HashMap::new();
    let mut sent_ids: Vec<Value> = Vec::new();
    let mut next = 0u64;
    let mut tracked = |rng: &mut Rng, expected: &mut HashMap<String, usize>| -> Value {
        next += 1;
        let id = if rng.chance(50) {
            json!(format!("t-{seed}-{next}"))
        } else {
            json!(1_000_000_000_000u64 + seed * 1_000_000 + next)
        };
        *expected.entry(id.to_string()).or_insert(0) += 1;
        id
    };
    for _ in 0..frames {
        let msg = match rng.below(10) {
            0 => Message::Text(random_text(&mut rng, 200).into()),
            1 => Message::Text(random_json(&mut rng, 4).to_string().into()),
            2 => Message::Binary(
                (0..rng.below(64))
                    .map(|_| rng.next() as u8)
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            3 => {
                // A mutated request under an untracked id.
                let base = bounded_request(&mut rng, Some(json!("r-mut"))).to_string();
                Message::Text(mutate(&mut rng, &base).into())
            }
            4 => {
                // A batch of tracked requests, notifications among them.
                let n = rng.below(6);
                let items: Vec<Value> = (0..n)
                    .map(|_| {
                        let id = (!rng.chance(20)).then(|| tracked(&mut rng, &mut expected));
                        bounded_request(&mut rng, id)
                    })
                    .collect();
                Message::Text(Value::Array(items).to_string().into())
            }
            5 => {
                // A duplicate id (refused if the first is still in flight,
                // served if not: one answer each way), or a cancel.
                match sent_ids.get(rng.below(sent_ids.len() as u64 + 1) as usize) {
                    Some(old) if rng.chance(50) => {
                        *expected.entry(old.to_string()).or_insert(0) += 1;
                        Message::Text(
                            bounded_request(&mut rng, Some(old.clone()))
                                .to_string()
                                .into(),
                        )
                    }
                    Some(old) => {
                        let mut c = json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id": old}});
                        if rng.chance(30) {
                            c["id"] = tracked(&mut rng, &mut expected);
                        }
                        Message::Text(c.to_string().into())
                    }
                    None => Message::Text("[]".into()),
                }
            }
            6 => {
                // Not JSON-RPC 2.0, but with a tracked id: answered -32600 with it.
                let id = tracked(&mut rng, &mut expected);
                let bad = match rng.below(3) {
                    0 => json!({"jsonrpc":"1.0","id":id,"method":"echo"}),
                    1 => json!({"jsonrpc":"2.0","id":id,"method":random_json(&mut rng, 1)}),
                    _ => json!({"jsonrpc":"2.0","id":id,"method":"echo","params":"scalar"}),
                };
                Message::Text(bad.to_string().into())
            }
            7 => Message::Text(bounded_request(&mut rng, None).to_string().into()),
            _ => {
                let id = tracked(&mut rng, &mut expected);
                sent_ids.push(id.clone());
                Message::Text(bounded_request(&mut rng, Some(id)).to_string().into())
            }
        };
        tx.send(msg).await.expect("send");
    }
    assert!(expected.len() > frames / 5, "the generator tracks requests");
    // Every tracked id is answered exactly as often as it was sent.
    let done = eventually(|| async {
        let s = seen.lock().unwrap();
        expected
            .iter()
            .all(|(id, n)| s.get(id).copied().unwrap_or(0) >= *n)
    })
    .await;
    // A moment longer, to catch a second answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let s = seen.lock().unwrap().clone();
    for (id, n) in &expected {
        assert_eq!(
            s.get(id).copied().unwrap_or(0),
            *n,
            "seed {seed}: id {id} (all answered: {done})"
        );
    }
    for (id, n) in &s {
        let ours = id.contains("\"t-") || id.parse::<u64>().is_ok_and(|i| i >= 1_000_000_000_000);
        assert!(
            !ours || expected.contains_key(id),
            "seed {seed}: {n} answers to an id never sent: {id}"
        );
    }
    // The connection lives on.
    tx.send(Message::Text(
        r#"{"jsonrpc":"2.0","id":"t-final","method":"echo","params":{"value":1}}"#.into(),
    ))
    .await
    .expect("send");
    assert!(
        eventually(|| async { seen.lock().unwrap().contains_key("\"t-final\"") }).await,
        "seed {seed}: the connection stopped answering"
    );
    let _ = tx.close().await;
    reader.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_frames_at_live_connections() {
    quiet_crash_tasks();
    let s = TestServer::start(config()).await;
    let mut bystander = s.client().await;
    let base = std::env::var("TASKWIRE_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_261_101u64);
    let clients: Vec<_> = (0..4)
        .map(|i| tokio::spawn(fuzz_client(s.addr, base + i, 400)))
        .collect();
    for c in clients {
        c.await
            .expect("a fuzz client failed (its seed is in the message)");
    }
    // The others live on, the server too, and nothing is left behind.
    assert_eq!(
        bystander
            .call(1, "echo", json!({"value": "still here"}))
            .await["result"],
        "still here"
    );
    drop(bystander);
    assert!(
        eventually(|| async {
            let st = admin_json(s.addr, "GET", "/admin/stats").await;
            let t = &st["tasks"];
            st["connections"] == 0
                && t["queued"] == 0
                && t["running"] == 0
                && t["yielded"] == 0
                && t["waiting"] == 0
                && st["pool"]["admitted"] == 0
        })
        .await
    );
    assert_pool_idle(s.addr).await;
    assert!(!s.join.as_ref().unwrap().is_finished(), "the server exited");
    s.stop().await.unwrap();
}
