//! The protocol end to end: a real server on 127.0.0.1, a real WebSocket client.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use taskwire::{Config, Ctx, TaskError};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_of_the_table() {
    let mut reg = common::builtins();
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Nothing {}
    // A result that is not JSON (a map with non-string keys) is an internal error.
    reg.io(
        "bad_result",
        "returns a value JSON cannot hold",
        |_c: Ctx, _p: Nothing| async {
            let mut m = std::collections::HashMap::new();
            m.insert(vec![1u8], 1);
            Ok::<_, TaskError>(m)
        },
    )
    .expect("register");
    let cfg = Config {
        max_inflight_per_connection: 3,
        ..config()
    };
    let s = TestServer::with_registry(cfg, reg).await;
    let mut c = s.client().await;

    c.send_text("{not json").await;
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32700, Value::Null));

    c.send(json!({"id":1,"method":"echo"})).await;
    assert_eq!(code(&c.response(1).await), -32600);

    c.send_text("[]").await;
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32600, Value::Null));

    let m = c.call(2, "no_such_task", json!({})).await;
    assert_eq!(code(&m), -32601);
    assert_eq!(m["error"]["data"]["method"], "no_such_task");

    let m = c.call(3, "count_primes", json!({"belo": 5})).await;
    assert_eq!(code(&m), -32602);
    assert!(
        m["error"]["message"].as_str().unwrap().contains("belo"),
        "{m}"
    );
    let m = c.call(4, "count_primes", json!({})).await;
    assert!(
        m["error"]["message"].as_str().unwrap().contains("below"),
        "{m}"
    );
    let m = c.call(5, "sleep", json!({"ms": 3_600_001})).await;
    assert_eq!(code(&m), -32602);

    assert_eq!(code(&c.call(6, "bad_result", json!({})).await), -32603);

    c.request(7, "runaway", json!({})).await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":7}}))
        .await;
    assert_eq!(code(&c.response(7).await), -32800);

    let m = c
        .call(
            8,
            "sleep",
            json!({"ms": 10_000, "_meta": {"timeoutMs": 50}}),
        )
        .await;
    assert_eq!(code(&m), -32002);
    assert_eq!(m["error"]["data"]["timeoutMs"], 50);

    let m = c.call(9, "crash", json!({"message": "boom"})).await;
    assert_eq!(code(&m), -32003);
    assert!(m["error"]["message"].as_str().unwrap().contains("boom"));

    // -32001: three sleeps fill the in-flight limit of 3.
    for id in 10..13 {
        c.request(id, "sleep", json!({"ms": 300})).await;
    }
    let m = c.call(13, "echo", json!({"value": 1})).await;
    assert_eq!(code(&m), -32001);
    assert_eq!(m["error"]["data"]["reason"], "connection_inflight");
    assert!(m["error"]["data"]["retryAfterMs"].as_u64().unwrap() > 0);
    for id in 10..13 {
        assert_eq!(c.response(id).await["result"]["sleptMs"], 300);
    }

    // -32004: killed through the admin API.
    c.request(14, "runaway", json!({})).await;
    let mut task_id = 0;
    for _ in 0..500 {
        let v = admin_json(s.addr, "GET", "/admin/tasks?method=runaway").await;
        task_id = v["tasks"][0]["id"].as_u64().unwrap_or(0);
        if task_id != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let v = admin_json(s.addr, "POST", &format!("/admin/tasks/{task_id}/kill")).await;
    assert_eq!(v["killed"], true);
    assert_eq!(code(&c.response(14).await), -32004);

    // The connection lived through all of it.
    assert_eq!(
        c.call(15, "echo", json!({"value": "alive"})).await["result"],
        "alive"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_32005_and_closes_1001() {
    let cfg = Config {
        shutdown_grace: Duration::from_millis(300),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    c.request(1, "runaway", json!({})).await;
    c.request(2, "sleep", json!({"ms": 50})).await;
    c.request(3, "sleep", json!({"ms": 60_000})).await;
    // Let them start.
    assert_eq!(c.call(0, "echo", json!({"value": 0})).await["result"], 0);
    s.handle.shutdown();
    assert_eq!(
        c.response(2).await["result"]["sleptMs"],
        50,
        "finished within the grace"
    );
    assert_eq!(code(&c.response(1).await), -32005);
    assert_eq!(code(&c.response(3).await), -32005);
    assert_eq!(c.close_code().await, Some(1001));
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_come_in_completion_order() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.request(1, "sleep", json!({"ms": 300})).await;
    c.request(2, "echo", json!({"value": "fast"})).await;
    let first = c.recv().await.unwrap();
    assert_eq!(first["id"], 2);
    let second = c.recv().await.unwrap();
    assert_eq!(second["id"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_values() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    for (seed, rounds, digest) in [
        (1u64, 1u64, "10451216379200822465"),
        (0, 1_000_000, "1880736892155664098"),
        (42, 10, "8123981347576678140"),
    ] {
        let m = c
            .call(1, "hash_chain", json!({"seed": seed, "rounds": rounds}))
            .await;
        assert_eq!(m["result"]["digest"], digest);
    }
    for (below, count) in [
        (0u64, 0u64),
        (2, 0),
        (3, 1),
        (10, 4),
        (100, 25),
        (1_000_000, 78_498),
        (5_000_000, 348_513),
    ] {
        let m = c.call(2, "count_primes", json!({"below": below})).await;
        assert_eq!(m["result"]["count"], count, "below {below}");
    }
    assert_eq!(
        c.call(3, "spin", json!({"ms": 20})).await["result"]["spunMs"],
        20
    );
    assert_eq!(
        c.call(4, "sleep", json!({"ms": 1})).await["result"]["sleptMs"],
        1
    );
    let v = json!({"a": [1, "x", null, {"b": true}]});
    assert_eq!(c.call("s", "echo", json!({"value": v})).await["result"], v);
    // String ids and large integer ids come back exactly.
    c.send_text(
        r#"{"jsonrpc":"2.0","id":18446744073709551615,"method":"echo","params":{"value":1}}"#,
    )
    .await;
    let raw = match futures_util::StreamExt::next(&mut c.ws).await {
        Some(Ok(Message::Text(t))) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(raw.contains("\"id\":18446744073709551615"), "{raw}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discover_describes_every_task() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    let m = c.call(1, "rpc.discover", json!(null)).await;
    let methods = m["result"]["methods"].as_array().unwrap();
    let names: Vec<&str> = methods
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    for t in [
        "echo",
        "sleep",
        "hash_chain",
        "count_primes",
        "spin",
        "runaway",
        "crash",
    ] {
        assert!(names.contains(&t), "{t} missing from {names:?}");
    }
    let cp = methods
        .iter()
        .find(|m| m["name"] == "count_primes")
        .unwrap();
    assert_eq!(cp["kind"], "cpu");
    assert!(
        cp["paramsSchema"]["properties"]["below"].is_object(),
        "{cp}"
    );
    assert!(!cp["summary"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_and_notifications() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.send(json!([
        {"jsonrpc":"2.0","id":1,"method":"sleep","params":{"ms":50}},
        {"jsonrpc":"2.0","id":2,"method":"echo","params":{"value":"b"}},
        {"jsonrpc":"2.0","method":"echo","params":{"value":"notified"}},
        {"jsonrpc":"2.0","id":3,"method":"nope"},
        7
    ]))
    .await;
    let m = c.recv().await.unwrap();
    let arr = m.as_array().expect("one array for the batch");
    assert_eq!(arr.len(), 4, "{m}");
    let by_id = |id: Value| arr.iter().find(|r| r["id"] == id).cloned().unwrap();
    assert_eq!(by_id(json!(1))["result"]["sleptMs"], 50);
    assert_eq!(by_id(json!(2))["result"], "b");
    assert_eq!(code(&by_id(json!(3))), -32601);
    assert_eq!(code(&by_id(Value::Null)), -32600);

    // Notifications, alone or in a batch of them, are answered with nothing
    // (not even errors): the next thing received is the echo's answer.
    c.send(json!({"jsonrpc":"2.0","method":"echo","params":{"value":1}}))
        .await;
    c.send(json!({"jsonrpc":"2.0","method":"nope"})).await;
    c.send(json!([{"jsonrpc":"2.0","method":"echo","params":{"value":1}}]))
        .await;
    c.request(9, "echo", json!({"value": "after"})).await;
    assert_eq!(c.recv().await.unwrap()["id"], 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_inflight_id_leaves_the_first_alone() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.request(1, "sleep", json!({"ms": 200})).await;
    c.request(1, "echo", json!({"value": 2})).await;
    let dup = c.recv().await.unwrap();
    assert_eq!((code(&dup), dup["id"].clone()), (-32600, json!(1)));
    assert_eq!(c.recv().await.unwrap()["result"]["sleptMs"], 200);
    // Once answered, the id is free again.
    assert_eq!(c.call(1, "echo", json!({"value": 3})).await["result"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_coalesced_and_precedes_the_response() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    let started = std::time::Instant::now();
    c.request(
        1,
        "count_primes",
        json!({"below": 300_000_000u64, "_meta": {"progressToken": "p"}}),
    )
    .await;
    let mut progress = Vec::new();
    let resp = loop {
        let m = c.recv().await.unwrap();
        if m["method"] == "$/progress" {
            assert_eq!(m["params"]["token"], "p");
            progress.push(m["params"]["value"].clone());
        } else {
            break m;
        }
    };
    let elapsed = started.elapsed();
    assert_eq!(resp["result"]["count"], 16_252_325);
    assert!(!progress.is_empty());
    let last = progress.last().unwrap();
    assert_eq!(
        last["done"], last["total"],
        "the latest value arrives before the response"
    );
    let dones: Vec<u64> = progress
        .iter()
        .map(|p| p["done"].as_u64().unwrap())
        .collect();
    assert!(dones.windows(2).all(|w| w[0] < w[1]), "in order");
    // ~20 per second at most: a bound on the count, not on time.
    let cap = (elapsed.as_millis() as usize / 50) + 2;
    assert!(
        progress.len() <= cap,
        "{} notifications in {elapsed:?}",
        progress.len()
    );
    // Without a token, no notifications at all.
    c.request(2, "count_primes", json!({"below": 10_000_000}))
        .await;
    assert_eq!(c.recv().await.unwrap()["id"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_hurts_nobody_else() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    let mut other = s.client().await;
    c.request(1, "sleep", json!({"ms": 100})).await;
    c.request(2, "hash_chain", json!({"seed": 1, "rounds": 3_000_000}))
        .await;
    c.request(3, "crash", json!({"message": "kaboom"})).await;
    let m = c.response(3).await;
    assert_eq!(code(&m), -32003);
    assert!(m["error"]["message"].as_str().unwrap().contains("kaboom"));
    assert_eq!(c.response(1).await["result"]["sleptMs"], 100);
    assert!(c.response(2).await["result"]["digest"].is_string());
    assert_eq!(
        other.call(1, "echo", json!({"value": 1})).await["result"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_frames_close_1009_binary_frames_do_not() {
    let cfg = Config {
        max_frame_bytes: 1024,
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    c.ws.send(Message::Binary(vec![1u8, 2, 3].into()))
        .await
        .unwrap();
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32600, Value::Null));
    assert_eq!(
        c.call(1, "echo", json!({"value": "x".repeat(500)})).await["id"],
        1
    );
    let mut other = s.client().await;
    c.request(2, "echo", json!({"value": "x".repeat(2000)}))
        .await;
    assert_eq!(c.close_code().await, Some(1009));
    // Other connections are unaffected.
    assert_eq!(
        other.call(1, "echo", json!({"value": 1})).await["result"],
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_unknown_ids_is_ignored() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":12345}}))
        .await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{}}))
        .await;
    // A finished task is not disturbed either.
    assert_eq!(c.call(1, "echo", json!({"value": 1})).await["result"], 1);
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}))
        .await;
    c.request(2, "sleep", json!({"ms": 30})).await;
    assert_eq!(c.recv().await.unwrap()["id"], 2);
    // A task that finishes before the cancel arrives keeps its result.
    c.request(3, "echo", json!({"value": 3})).await;
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":3}}))
        .await;
    assert_eq!(c.recv().await.unwrap()["result"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_a_connection_releases_the_cpu() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    for id in 0..4 {
        c.request(id, "runaway", json!({})).await;
    }
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/stats").await;
            v["pool"]["busy"].as_u64() == Some(2)
        })
        .await,
        "the runaways occupy the pool"
    );
    drop(c);
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/stats").await;
            v["pool"]["busy"] == 0 && v["pool"]["admitted"] == 0 && v["connections"] == 0
        })
        .await,
        "the pool is idle and the tasks are gone"
    );
    assert_pool_idle(s.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_connections_and_timeouts() {
    let cfg = Config {
        max_connections: 1,
        max_task_timeout: Duration::from_millis(100),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    let err = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)).await;
    match err {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 503)
        }
        other => panic!("expected 503, got {other:?}"),
    }
    // The server's maximum caps a task with no deadline, and a longer one.
    let m = c.call(1, "sleep", json!({"ms": 5000})).await;
    assert_eq!(code(&m), -32002);
    assert_eq!(m["error"]["data"]["timeoutMs"], 100);
    let m = c
        .call(
            2,
            "sleep",
            json!({"ms": 5000, "_meta": {"timeoutMs": 60000}}),
        )
        .await;
    assert_eq!(m["error"]["data"]["timeoutMs"], 100);
    drop(c);
    // The slot frees up when the connection goes.
    assert!(
        eventually(|| async {
            tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr))
                .await
                .is_ok()
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_admission_limits() {
    let mut cfg = config();
    cfg.connection_cpu_limit = 2;
    cfg.queue_limit = 3;
    let s = TestServer::start(cfg).await;
    let mut a = s.client().await;
    let mut b = s.client().await;
    a.request(1, "runaway", json!({})).await;
    a.request(2, "runaway", json!({})).await;
    let m = a.call(3, "spin", json!({"ms": 1})).await;
    assert_eq!(m["error"]["data"]["reason"], "connection_queue");
    b.request(1, "runaway", json!({})).await;
    let m = b.call(2, "spin", json!({"ms": 1})).await;
    assert_eq!(code(&m), -32001);
    assert_eq!(m["error"]["data"]["reason"], "queue_full");
    // I/O tasks are not held back by the compute queue.
    assert_eq!(b.call(3, "echo", json!({"value": 1})).await["result"], 1);
    a.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}))
        .await;
    assert_eq!(code(&a.response(1).await), -32800);
    // The freed slot admits again.
    assert_eq!(
        b.call(4, "spin", json!({"ms": 1})).await["result"]["spunMs"],
        1
    );
}

/// I/O tasks are polled once in place before they get a task of their own: a
/// panic on that first poll, or on a later one, is still a -32003 for that
/// request alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_task_panics_are_isolated_on_every_poll() {
    #[derive(serde::Deserialize, schemars::JsonSchema)]
    struct Nothing {}
    let mut reg = common::builtins();
    reg.io(
        "panic_now",
        "panics on its first poll",
        |_c: Ctx, _p: Nothing| async {
            if true {
                panic!("at once");
            }
            Ok::<u8, TaskError>(0)
        },
    )
    .expect("register");
    reg.io(
        "panic_later",
        "panics after a timer",
        |_c: Ctx, _p: Nothing| async {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if true {
                panic!("later");
            }
            Ok::<u8, TaskError>(0)
        },
    )
    .expect("register");
    let s = TestServer::with_registry(config(), reg).await;
    let mut c = s.client().await;
    let m = c.call(1, "panic_now", json!({})).await;
    assert_eq!(code(&m), -32003);
    assert!(m["error"]["message"].as_str().unwrap().contains("at once"));
    let m = c.call(2, "panic_later", json!({})).await;
    assert_eq!(code(&m), -32003);
    assert!(m["error"]["message"].as_str().unwrap().contains("later"));
    assert_eq!(c.call(3, "echo", json!({"value": 3})).await["result"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_request_is_answered_with_id_null() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    c.send_text(r#"{"foo":"boo"}"#).await;
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32600, Value::Null), "{m}");
    c.send_text("[{}]").await;
    let m = c.recv().await.unwrap();
    let arr = m.as_array().expect("an array");
    assert_eq!(arr.len(), 1, "{m}");
    assert_eq!((code(&arr[0]), arr[0]["id"].clone()), (-32600, Value::Null));
    // `$/ping` is answered `{}` by the connection, alone or in a batch.
    assert_eq!(
        c.call("p", "$/ping", Value::Null).await["result"],
        json!({})
    );
    c.send(json!([{"jsonrpc":"2.0","id":1,"method":"$/ping"},{"jsonrpc":"2.0","method":"$/ping"}]))
        .await;
    let m = c.recv().await.unwrap();
    assert_eq!(m, json!([{"jsonrpc":"2.0","id":1,"result":{}}]));
    // Ids and tokens are short: a long id is refused with id null.
    let long = "i".repeat(257);
    c.request(long.as_str(), "echo", json!({"value": 1})).await;
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32600, Value::Null), "{m}");
    let m = c
        .call(
            2,
            "sleep",
            json!({"ms": 1, "_meta": {"progressToken": "t".repeat(257)}}),
        )
        .await;
    assert_eq!(code(&m), -32602, "{m}");
    let m = c.call(3, "echo", json!({"value": 1})).await;
    assert_eq!(m["result"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_bounded_in_length_places_and_bytes() {
    let cfg = Config {
        max_batch: 8,
        max_inflight_per_connection: 6,
        max_frame_bytes: 4096,
        outbound_bytes: 16 << 10,
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    // Longer than max_batch: one error, nothing runs.
    let long: Vec<Value> = (0..9)
        .map(|i| json!({"jsonrpc":"2.0","id":i,"method":"sleep","params":{"ms":60_000}}))
        .collect();
    c.send(Value::Array(long)).await;
    let m = c.recv().await.unwrap();
    assert_eq!((code(&m), m["id"].clone()), (-32600, Value::Null), "{m}");
    let tasks = admin_json(s.addr, "GET", "/admin/tasks").await;
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(0), "{tasks}");
    // Every element holds an in-flight place until the batch's answer is
    // sent, answered errors included: 1 sleep + 5 invalid = the limit of 6.
    c.send(json!([
        {"jsonrpc":"2.0","id":"long","method":"sleep","params":{"ms":60_000}},
        {}, 1, [], {"foo":"boo"}, {"jsonrpc":"2.0","id":"e","method":"nope"}
    ]))
    .await;
    let m = c.call("next", "echo", json!({"value": 1})).await;
    assert_eq!(code(&m), -32001, "{m}");
    assert_eq!(m["error"]["data"]["reason"], "connection_inflight");
    c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":"long"}}))
        .await;
    let m = c.recv().await.unwrap();
    assert_eq!(m.as_array().map(Vec::len), Some(6), "{m}");
    // Released with the batch's answer.
    assert_eq!(
        c.call("again", "echo", json!({"value": 1})).await["result"],
        1
    );
    // The answers kept for a batch count against the outbound budget: the
    // elements that would pass it are answered with a short -32603.
    let discover = c
        .call("d", "rpc.discover", Value::Null)
        .await
        .to_string()
        .len();
    assert!(discover > 2048, "{discover}");
    let batch: Vec<Value> = (0..8)
        .map(|i| json!({"jsonrpc":"2.0","id":i,"method":"rpc.discover"}))
        .collect();
    c.send(Value::Array(batch)).await;
    let m = c.recv().await.unwrap();
    let arr = m.as_array().unwrap();
    assert_eq!(arr.len(), 8);
    let dropped = arr.iter().filter(|a| a.get("error").is_some()).count();
    assert!((1..8).contains(&dropped), "{dropped} dropped");
    for a in arr.iter().filter(|a| a.get("error").is_some()) {
        assert_eq!(code(a), -32603);
        assert!(a["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batch too large"));
    }
    assert!(
        m.to_string().len() <= (16 << 10) + 8 * 128,
        "{}",
        m.to_string().len()
    );
    s.stop().await.unwrap();
}
