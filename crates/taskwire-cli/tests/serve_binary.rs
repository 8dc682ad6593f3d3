//! `taskwire serve` as an operator meets it, the binary run as a process: the
//! demo tasks only on request, the start-up log (what is exposed, the limits,
//! no secrets, plain text when stderr is not a terminal, stdout kept to its one
//! line) and configuration errors that name what to fix. Only 127.0.0.0/8 is
//! ever contacted.

mod common;

use common::{serve_command, Proc, WAIT};

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const CLIENT_TOKEN: &str = "client-secret-0123456789";
const ADMIN_TOKEN: &str = "admin-secret-0123456789";

async fn call(url: &str, method: &str, params: Value) -> Value {
    let (mut ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connects in time")
        .expect("connects");
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .expect("sends");
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("JSON");
                if v.get("id") == Some(&json!(1)) {
                    return v;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("no reply: {other:?}"),
        }
    }
}

fn discovered(v: &Value) -> Vec<String> {
    v["result"]["methods"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|d| d["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_tasks_only_with_demo() {
    let plain = Proc::start(&[]);
    let url = plain.ws_url();
    for method in ["spin", "runaway", "crash"] {
        let v = call(&url, method, json!({"ms": 1})).await;
        assert_eq!(v["error"]["code"], -32601, "{method} without --demo: {v}");
    }
    let v = call(&url, "echo", json!({"value": 1})).await;
    assert!(v.get("result").is_some(), "the other built-ins stay: {v}");
    let names = discovered(&call(&url, "rpc.discover", json!({})).await);
    assert!(names.iter().any(|n| n == "count_primes"), "{names:?}");
    assert!(!names.iter().any(|n| n == "runaway"), "{names:?}");
    drop(plain);

    let demo = Proc::start(&["--demo"]);
    let url = demo.ws_url();
    let v = call(&url, "spin", json!({"ms": 1})).await;
    assert_eq!(v["result"]["spunMs"], 1, "{v}");
    let v = call(&url, "crash", json!({"message": "demo"})).await;
    assert_eq!(v["error"]["code"], -32003, "{v}");
    let names = discovered(&call(&url, "rpc.discover", json!({})).await);
    for m in ["spin", "runaway", "crash", "echo"] {
        assert!(names.iter().any(|n| n == m), "{m} in {names:?}");
    }
    drop(demo);

    // The variable is the setting too (what the bench and scripts use).
    let mut cmd = serve_command(&["--addr", "127.0.0.1:0"]);
    cmd.env("TASKWIRE_DEMO", "true");
    let mut child = cmd.spawn().expect("start taskwire");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("the listening line");
    let addr = line.trim().strip_prefix("listening on ").expect("address");
    let v = call(&format!("ws://{addr}/ws"), "spin", json!({"ms": 1})).await;
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(v["result"]["spunMs"], 1, "{v}");
}

#[test]
fn startup_log_of_a_local_server() {
    let server = Proc::start(&[]);
    let log = server.log_with("demo tasks");
    for needle in [
        "authentication: none",
        "admin API and /metrics: loopback peers only",
        "TLS: off",
        "limits: connections 10000 (per address no limit), in flight per connection 1024",
        "CPU tasks 10000 (per connection 256, per address 2560)",
        "frame 1.0 MiB",
        "memory budget ",
        "demo tasks (spin, runaway, crash): off",
    ] {
        assert!(log.contains(needle), "{needle:?} missing from:\n{log}");
    }
    assert!(!log.contains(" WARN "), "nothing to warn about:\n{log}");
    // stderr is a pipe here: plain text, no colour codes.
    assert!(
        !log.contains('\x1b'),
        "escape codes in a piped log:\n{log:?}"
    );
    assert_eq!(server.stop(), "", "stdout holds only `listening on`");
}

/// Listens on every address (nothing is sent beyond loopback: the test only
/// reads the log), with tokens, the demo tasks and colours asked for in vain.
#[test]
fn startup_log_warns_about_the_demo_on_a_public_address_and_keeps_secrets() {
    let mut argv = vec!["--addr", "0.0.0.0:0", "--demo"];
    argv.extend(["--token", CLIENT_TOKEN, "--admin-token", ADMIN_TOKEN]);
    argv.extend([
        "--max-connections-per-ip",
        "7",
        "--max-frame-bytes",
        "65536",
    ]);
    let server = Proc::start(&argv);
    let log = server.log_with("not loopback");
    for needle in [
        "authentication: 1 static token(s)",
        "admin API and /metrics: bearer token",
        "TLS: off",
        "(per address 7)",
        "frame 0.1 MiB",
        "demo tasks (spin, runaway, crash): on",
        "not loopback",
    ] {
        assert!(log.contains(needle), "{needle:?} missing from:\n{log}");
    }
    let warning = log
        .lines()
        .find(|l| l.contains("not loopback"))
        .unwrap_or_default();
    assert!(warning.contains("WARN"), "{warning}");
    let bound = format!("listens on 0.0.0.0:{}", server.addr.port());
    assert!(warning.contains(&bound), "the bound port: {warning}");
    assert!(
        !log.contains(CLIENT_TOKEN) && !log.contains(ADMIN_TOKEN),
        "{log}"
    );
    assert!(!log.contains('\x1b'), "{log:?}");
    assert_eq!(server.stop(), "", "stdout holds only `listening on`");
}

/// Runs `taskwire serve` that must refuse to start; its exit status and stderr.
fn refused(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut cmd = serve_command(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("start taskwire");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if start.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("taskwire started with {args:?} {env:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(!status.success(), "{args:?} {env:?}: {err}");
    err
}

#[test]
fn a_bad_value_names_the_variable_flag_or_file_key() {
    let addr = ["--addr", "127.0.0.1:0"];
    let e = refused(&addr, &[("TASKWIRE_MAX_BATCH", "abc")]);
    assert!(e.contains("TASKWIRE_MAX_BATCH"), "{e}");
    assert!(!e.contains("--max-batch"), "{e}");

    let e = refused(&["--addr", "127.0.0.1:0", "--max-batch", "abc"], &[]);
    assert!(e.contains("--max-batch"), "{e}");

    // Parses, but cannot be run with: the setting and where it was set.
    let e = refused(&addr, &[("TASKWIRE_MAX_BATCH", "0")]);
    assert!(
        e.contains("max_batch") && e.contains("TASKWIRE_MAX_BATCH"),
        "{e}"
    );
    let e = refused(&["--addr", "127.0.0.1:0", "--max-batch", "0"], &[]);
    assert!(e.contains("max_batch") && e.contains("--max-batch"), "{e}");

    let dir = std::env::temp_dir().join(format!("taskwire-serve-binary-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    let file = dir.join("taskwire.toml");
    std::fs::write(&file, "max_batch = \"abc\"\n").expect("write the file");
    let path = file.to_str().expect("a UTF-8 path");
    let e = refused(&["--addr", "127.0.0.1:0", "--config", path], &[]);
    assert!(e.contains("max_batch") && e.contains(path), "{e}");
    std::fs::write(&file, "max_batch = 0\n").expect("write the file");
    let e = refused(&addr, &[("TASKWIRE_CONFIG", path)]);
    assert!(e.contains("max_batch") && e.contains(path), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}
