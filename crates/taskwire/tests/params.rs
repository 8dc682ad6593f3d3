//! Params by position (as jsonrpsee's client sends them), `?` in tasks, and
//! an `echo` that returns exactly what it was sent: against a real server,
//! with a third-party client and with a raw WebSocket.

mod common;

use std::time::{Duration, Instant};

use common::{code, config, TestServer, WAIT};
use futures_util::StreamExt;
use jsonrpsee_core::client::{ClientT, Error as ClientError};
use jsonrpsee_core::params::ObjectParams;
use jsonrpsee_core::rpc_params;
use jsonrpsee_ws_client::{WsClient, WsClientBuilder};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use taskwire::{Ctx, Registry, TaskError, TaskResultExt};
use tokio_tungstenite::tungstenite::Message;

/// Fields on purpose not in alphabetical order: position follows declaration.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Sub {
    minuend: i64,
    subtrahend: i64,
    #[serde(default)]
    scale: Option<i64>,
}

#[derive(Serialize, JsonSchema)]
struct Difference {
    difference: i64,
}

async fn sub(_ctx: Ctx, p: Sub) -> Result<Difference, TaskError> {
    Ok(Difference {
        difference: (p.minuend - p.subtrahend) * p.scale.unwrap_or(1),
    })
}

#[derive(Deserialize, JsonSchema)]
struct Path {
    path: String,
}

/// An error with a source, as a library's error would be.
#[derive(Debug, thiserror::Error)]
#[error("cannot load the settings")]
struct LoadError(#[source] std::io::Error);

async fn read(_ctx: Ctx, p: Path) -> Result<usize, TaskError> {
    Ok(std::fs::read(&p.path)?.len())
}

async fn load(_ctx: Ctx, p: Path) -> Result<usize, TaskError> {
    let bytes = std::fs::read(&p.path).map_err(LoadError)?;
    Ok(bytes.len())
}

async fn read_coded(_ctx: Ctx, p: Path) -> Result<usize, TaskError> {
    Ok(std::fs::read(&p.path).code(-32050)?.len())
}

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

/// Loops on checkpoints until stopped (or 30 s pass): `?` on the checkpoint
/// must give the stop its own code.
async fn until_stopped(ctx: Ctx, _p: Nothing) -> Result<u64, TaskError> {
    let end = Instant::now() + Duration::from_secs(30);
    let mut n = 0u64;
    while Instant::now() < end {
        n = std::hint::black_box(n.wrapping_add(1));
        ctx.checkpoint().await?;
    }
    Ok(n)
}

fn registry() -> Registry {
    let mut r = common::builtins();
    r.io("sub", "Subtracts, then scales.", sub)
        .and_then(|r| r.io("read", "Reads a file.", read))
        .and_then(|r| r.io("load", "Loads a file.", load))
        .and_then(|r| r.io("read_coded", "Reads a file, code -32050.", read_coded))
        .and_then(|r| r.cpu("until_stopped", "Runs until stopped.", until_stopped))
        .expect("register");
    r
}

async fn jsonrpsee_client(s: &TestServer) -> WsClient {
    WsClientBuilder::default()
        .request_timeout(WAIT)
        .build(format!("ws://{}/ws", s.addr))
        .await
        .expect("jsonrpsee connects")
}

fn call_error(e: ClientError) -> (i32, String) {
    match e {
        ClientError::Call(e) => (e.code(), e.message().to_string()),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonrpsee_calls_builtins_by_position_and_by_name() {
    let s = TestServer::with_registry(config(), registry()).await;
    let c = jsonrpsee_client(&s).await;

    // By position, as `rpc_params!` sends them.
    let v: Value = c
        .request("hash_chain", rpc_params![1, 1])
        .await
        .expect("hash_chain by position");
    assert_eq!(v, json!({"digest": "10451216379200822465"}));
    let v: Value = c
        .request("count_primes", rpc_params![100])
        .await
        .expect("count_primes by position");
    assert_eq!(v, json!({"count": 25}));
    let v: Value = c
        .request("echo", rpc_params![json!({"a": [1, "b"]})])
        .await
        .expect("echo by position");
    assert_eq!(v, json!({"a": [1, "b"]}));
    let v: Value = c
        .request("sleep", rpc_params![1])
        .await
        .expect("sleep by position");
    assert_eq!(v, json!({"sleptMs": 1}));

    // By name.
    let mut p = ObjectParams::new();
    p.insert("seed", 42).expect("serializable");
    p.insert("rounds", 10).expect("serializable");
    let v: Value = c
        .request("hash_chain", p)
        .await
        .expect("hash_chain by name");
    assert_eq!(v, json!({"digest": "8123981347576678140"}));

    // A task of our own whose fields are not in alphabetical order.
    let v: Value = c.request("sub", rpc_params![10, 3]).await.expect("sub");
    assert_eq!(v, json!({"difference": 7}));
    let v: Value = c
        .request("sub", rpc_params![10, 3, 2])
        .await
        .expect("sub scaled");
    assert_eq!(v, json!({"difference": 14}));
    // `null` for a field that is not required leaves it to its default.
    let v: Value = c
        .request("sub", rpc_params![10, 3, Value::Null])
        .await
        .expect("sub with a null scale");
    assert_eq!(v, json!({"difference": 7}));

    // Too many, too few: -32602 naming the fields.
    let (code, msg) = call_error(
        c.request::<Value, _>("hash_chain", rpc_params![1, 2, 3])
            .await
            .unwrap_err(),
    );
    assert_eq!(code, -32602);
    assert!(msg.contains("seed, rounds"), "{msg}");
    let (code, msg) = call_error(
        c.request::<Value, _>("hash_chain", rpc_params![1])
            .await
            .unwrap_err(),
    );
    assert_eq!(code, -32602);
    assert!(msg.contains("`rounds`"), "{msg}");
    let (code, msg) = call_error(
        c.request::<Value, _>("sub", rpc_params![1, "two"])
            .await
            .unwrap_err(),
    );
    assert_eq!(code, -32602);
    assert!(msg.contains("invalid type"), "{msg}");

    // Discovery lists the params in declaration order, with the results' schemas.
    let d: Value = c
        .request("rpc.discover", rpc_params![])
        .await
        .expect("rpc.discover");
    let method = |name: &str| {
        d["methods"]
            .as_array()
            .and_then(|m| m.iter().find(|m| m["name"] == name))
            .cloned()
            .unwrap_or_else(|| panic!("{name} in {d}"))
    };
    let sub = method("sub");
    assert_eq!(sub["paramStructure"], "either");
    let names: Vec<&str> = sub["params"]
        .as_array()
        .expect("params")
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    assert_eq!(names, ["minuend", "subtrahend", "scale"]);
    assert_eq!(sub["params"][2]["required"], false);
    assert_eq!(
        sub["result"]["schema"]["properties"]["difference"]["type"],
        "integer"
    );
    let hc = method("hash_chain");
    assert_eq!(hc["params"][0]["name"], "seed");
    assert_eq!(hc["params"][1]["name"], "rounds");
    assert_eq!(
        hc["result"]["schema"]["properties"]["digest"]["type"],
        "string"
    );
    assert_eq!(
        method("count_primes")["result"]["schema"]["required"],
        json!(["count"])
    );
    // A task that never returns: a schema no value matches.
    assert_eq!(method("runaway")["result"]["schema"]["not"], json!({}));

    // The connection and the server live on.
    let v: Value = c.request("$/ping", rpc_params![]).await.expect("ping");
    assert_eq!(v, json!({}));
    drop(c);
    s.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn question_mark_answers_with_the_errors_message_or_the_chosen_code() {
    let s = TestServer::with_registry(config(), registry()).await;
    let mut c = s.client().await;
    let missing = "/nonexistent/taskwire/settings.toml";

    let m = c.call(1, "read", json!({ "path": missing })).await;
    assert_eq!(code(&m), -32603, "{m}");
    let msg = m["error"]["message"].as_str().unwrap_or_default();
    assert!(msg.contains("No such file"), "{m}");

    // The sources follow the error, joined with ": ".
    let m = c.call(2, "load", json!({ "path": missing })).await;
    assert_eq!(code(&m), -32603, "{m}");
    let msg = m["error"]["message"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with("cannot load the settings: No such file"),
        "{m}"
    );

    let m = c.call(3, "read_coded", json!({ "path": missing })).await;
    assert_eq!(code(&m), -32050, "{m}");

    // A stop through `?` keeps its own code.
    let m = c
        .call(4, "until_stopped", json!({"_meta": {"timeoutMs": 50}}))
        .await;
    assert_eq!(code(&m), -32002, "{m}");
    assert_eq!(m["error"]["data"]["timeoutMs"], 50);

    let m = c.call(5, "echo", json!({ "value": "still here" })).await;
    assert_eq!(m["result"], "still here");
    drop(c);
    s.stop().await.expect("clean stop");
}

/// The raw text of the answer to `request`.
async fn raw_answer(c: &mut common::Client, request: &str) -> String {
    c.send_text(request).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no answer to {request}: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_returns_exactly_the_value_it_was_sent() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    let values = [
        "123456789012345678901234567890",
        "1.0000000000000000001",
        "-0.0",
        "1e400",
        "18446744073709551617",
        r#"{"n":9007199254740993,"f":[0.1000000000000000055511151231257827]}"#,
    ];
    for (i, v) in values.iter().enumerate() {
        let forms = [
            format!(r#"{{"value":{v}}}"#),
            format!(r#"{{"value":{v},"_meta":{{"timeoutMs":60000}}}}"#),
            format!(r#"{{"_meta":{{"progressToken":"p"}},"value":{v}}}"#),
            format!("[{v}]"),
        ];
        for (j, params) in forms.iter().enumerate() {
            let id = i * 10 + j;
            let text = raw_answer(
                &mut c,
                &format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"echo","params":{params}}}"#),
            )
            .await;
            assert_eq!(
                text,
                format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{v}}}"#),
                "params {params}"
            );
        }
    }
    s.stop().await.expect("clean stop");
}
