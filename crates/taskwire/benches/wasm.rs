//! The WebAssembly lane's figures (docs/BENCHMARKS.md, "WebAssembly lane"):
//!
//! 1. instantiate + call + tear down a small module through the lane's own
//!    path (pooling allocator, limiter, deadline callback), p50 and p99;
//! 2. the epoch checks' cost: the same code in an engine with and without
//!    epoch interruption (a tight loop, a hash chain, a memory sum);
//! 3. wasm `hash_chain` (the guest crate) against the native one: one long
//!    chain in-process, and the `tiny` shape (8 connections × 16 in flight,
//!    1000 rounds) against a real server;
//! 4. against a real server: `$/cancelRequest` and an admin kill of a
//!    `(loop br 0)` task, answer latency p50/p99 and the CPU used right after;
//!    a newcomer's 10 ms `spin` and a wasm hash chain of about the same
//!    length, idle and beside 64 looping wasm tasks of another connection;
//!    the RSS before and after a `memory.grow` loop answered `-32010`.
//!
//! `cargo bench -p taskwire --features wasm --bench wasm` (needs the guest:
//! `cargo build --release --target wasm32-wasip1 --manifest-path guests/hash_chain/Cargo.toml`).
//! `WASM_BENCH_QUICK=1` runs a smoke version.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskwire::bench_internals::BenchModule;
use taskwire::{Config, Registry, Server};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

const EMPTY: &str = r#"(module (memory 1) (func (export "run")))"#;
const FOREVER: &str = r#"(module (func (export "run") (loop br 0)))"#;
const GROW: &str = include_str!("../tests/modules/grow.wat");
/// Three kinds of code for the epoch checks' cost, each `(param i64) (result i64)`.
const KERNELS: &str = r#"(module
  (memory 16)
  (func (export "tight") (param $n i64) (result i64) (local $i i64)
    (loop
      (local.set $i (i64.add (local.get $i) (i64.const 1)))
      (br_if 0 (i64.lt_u (local.get $i) (local.get $n))))
    (local.get $i))
  (func (export "chain") (param $n i64) (result i64) (local $x i64) (local $z i64)
    (loop
      (local.set $x (i64.add (local.get $x) (i64.const 0x9E3779B97F4A7C15)))
      (local.set $z (local.get $x))
      (local.set $z (i64.mul (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 30))) (i64.const 0xBF58476D1CE4E5B9)))
      (local.set $z (i64.mul (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 27))) (i64.const 0x94D049BB133111EB)))
      (local.set $x (i64.xor (local.get $z) (i64.shr_u (local.get $z) (i64.const 31))))
      (local.set $n (i64.sub (local.get $n) (i64.const 1)))
      (br_if 0 (i64.gt_u (local.get $n) (i64.const 0))))
    (local.get $x))
  (func (export "memsum") (param $n i64) (result i64) (local $i i32) (local $s i64)
    (loop
      (local.set $i (i32.const 0))
      (loop
        (local.set $s (i64.add (local.get $s) (i64.load (local.get $i))))
        (i64.store (local.get $i) (local.get $s))
        (local.set $i (i32.add (local.get $i) (i32.const 8)))
        (br_if 0 (i32.lt_u (local.get $i) (i32.const 1048576))))
      (local.set $n (i64.sub (local.get $n) (i64.const 1)))
      (br_if 0 (i64.gt_u (local.get $n) (i64.const 0))))
    (local.get $s)))"#;

fn quick() -> bool {
    std::env::var_os("WASM_BENCH_QUICK").is_some()
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn guest() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../guests/hash_chain/target/wasm32-wasip1/release/hash_chain.wasm"
    );
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e} (build the guest crate first)"))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn instantiate_call_drop() {
    let m = BenchModule::new(EMPTY.as_bytes()).expect("compiles");
    let n = if quick() { 2_000 } else { 50_000 };
    for _ in 0..1_000 {
        m.call("{}").expect("runs");
    }
    let mut t = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        m.call("{}").expect("runs");
        t.push(s.elapsed());
    }
    println!(
        "instantiate + call + tear down (empty module, 1 page, {n} runs): p50 {}, p99 {}",
        us(pct(&mut t, 0.5)),
        us(pct(&mut t, 0.99))
    );
}

fn epoch_cost() {
    use wasmtime::{Config as WConfig, Engine, Instance, Module, Store, UpdateDeadline};
    let run = |epoch: bool, export: &str, n: i64| -> Duration {
        let mut c = WConfig::new();
        c.epoch_interruption(epoch);
        let engine = Engine::new(&c).expect("engine");
        let module = Module::new(&engine, KERNELS).expect("module");
        let mut store = Store::new(&engine, ());
        if epoch {
            store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Continue(1)));
            store.set_epoch_deadline(1);
        }
        let inst = Instance::new(&mut store, &module, &[]).expect("instance");
        let f = inst
            .get_typed_func::<i64, i64>(&mut store, export)
            .expect("export");
        // A ticker as the pool's: every 250 µs.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ticker = epoch.then(|| {
            let (e, stop) = (engine.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_micros(250));
                    e.increment_epoch();
                }
            })
        });
        let s = Instant::now();
        std::hint::black_box(f.call(&mut store, n).expect("runs"));
        let d = s.elapsed();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = ticker {
            t.join().ok();
        }
        d
    };
    let scale = if quick() { 10 } else { 1 };
    for (export, n, what) in [
        (
            "tight",
            2_000_000_000 / scale,
            "tight loop (add, compare, branch)",
        ),
        ("chain", 500_000_000 / scale, "hash chain (splitmix64)"),
        (
            "memsum",
            2_000 / scale,
            "memory sum (load, add, store over 1 MiB)",
        ),
    ] {
        // Alternate and keep the best of three of each: the machine is shared.
        let mut off = Duration::MAX;
        let mut on = Duration::MAX;
        for _ in 0..3 {
            off = off.min(run(false, export, n));
            on = on.min(run(true, export, n));
        }
        println!(
            "epoch checks, {what}: off {}, on {} ({:+.1}%)",
            ms(off),
            ms(on),
            (on.as_secs_f64() / off.as_secs_f64() - 1.0) * 100.0
        );
    }
}

fn long_chain() {
    let m = BenchModule::new(&guest()).expect("the guest compiles");
    let rounds: u64 = if quick() { 50_000_000 } else { 1_000_000_000 };
    let mut native = Duration::MAX;
    let mut wasm = Duration::MAX;
    for _ in 0..3 {
        let s = Instant::now();
        let mut x = 0u64;
        for _ in 0..rounds {
            x = splitmix64(std::hint::black_box(x));
        }
        std::hint::black_box(x);
        native = native.min(s.elapsed());
        let s = Instant::now();
        let out = m
            .call(&format!("{{\"seed\":0,\"rounds\":{rounds}}}"))
            .expect("runs");
        wasm = wasm.min(s.elapsed());
        assert!(out.contains(&x.to_string()), "{out} against {x}");
    }
    println!(
        "one long chain ({rounds} rounds, in-process, best of 3): native {}, wasm {} (wasm at {:.2}x native speed)",
        ms(native),
        ms(wasm),
        native.as_secs_f64() / wasm.as_secs_f64()
    );
}

async fn start_server() -> (SocketAddr, taskwire::ShutdownHandle) {
    let cfg = Config {
        addr: "127.0.0.1:0".parse().expect("addr"),
        ..Config::default()
    };
    let mut r = Registry::new();
    taskwire::builtin::register(&mut r).expect("built-ins register");
    // `spin`: the newcomer's native 10 ms task.
    taskwire::builtin::register_demo(&mut r).expect("demo tasks register");
    let server = Server::bind(cfg, r).await.expect("binds");
    let addr = server.local_addr().expect("addr");
    let handle = server.shutdown_handle();
    tokio::spawn(server.run(std::future::pending()));
    (addr, handle)
}

async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    common::http_with_body(addr, method, path, None, body).await
}

async fn install(addr: SocketAddr, name: &str, module: &[u8]) {
    let (s, b) = http(addr, "PUT", &format!("/admin/wasm/{name}"), module).await;
    assert_eq!(s, 200, "{b}");
}

async fn connect(addr: SocketAddr) -> Ws {
    // TCP_NODELAY: a `$/cancelRequest` sent right after its request must
    // not wait behind it for the server's delayed ACK (Nagle's algorithm),
    // which is what a 40 ms cancel latency measured.
    tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/ws"), None, true)
        .await
        .expect("connects")
        .0
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// The next response (skipping notifications).
async fn response(ws: &mut Ws) -> Value {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v.get("id").is_some() {
                    return v;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("connection ended: {other:?}"),
        }
    }
}

async fn call(ws: &mut Ws, id: u64, method: &str, params: Value) -> Value {
    send(
        ws,
        json!({"jsonrpc":"2.0","id":id,"method":method,"params":params}),
    )
    .await;
    response(ws).await
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

async fn task_id(addr: SocketAddr, method: &str) -> Option<u64> {
    let (_, body) = http(addr, "GET", "/admin/tasks", b"").await;
    let v: Value = serde_json::from_str(&body).ok()?;
    v["tasks"]
        .as_array()?
        .iter()
        .find(|t| {
            t["method"] == method
                && t["cpuMs"].as_f64().unwrap_or(0.0) > 0.0
                && t["stopping"].is_null()
        })
        .and_then(|t| t["id"].as_u64())
}

async fn stops(addr: SocketAddr) {
    let n = if quick() { 20 } else { 200 };
    let mut ws = connect(addr).await;
    let mut cancel = Vec::new();
    let mut kill = Vec::new();
    for i in 0..n {
        send(
            &mut ws,
            json!({"jsonrpc":"2.0","id":i,"method":"forever","params":{}}),
        )
        .await;
        while task_id(addr, "forever").await.is_none() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let s = Instant::now();
        send(
            &mut ws,
            json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":i}}),
        )
        .await;
        let r = response(&mut ws).await;
        cancel.push(s.elapsed());
        assert_eq!(r["error"]["code"], -32800, "{r}");
    }
    for i in 0..n {
        send(
            &mut ws,
            json!({"jsonrpc":"2.0","id":1000 + i,"method":"forever","params":{}}),
        )
        .await;
        let id = loop {
            if let Some(id) = task_id(addr, "forever").await {
                break id;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let s = Instant::now();
        http(addr, "POST", &format!("/admin/tasks/{id}/kill"), b"").await;
        let r = response(&mut ws).await;
        kill.push(s.elapsed());
        assert_eq!(r["error"]["code"], -32004, "{r}");
    }
    let cpu = common::process_cpu();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let idle = common::process_cpu().saturating_sub(cpu);
    println!(
        "(loop br 0) stopped, {n} each: $/cancelRequest -> -32800 p50 {}, p99 {}; admin kill -> -32004 (from the POST) p50 {}, p99 {}; process CPU in the second after: {}",
        ms(pct(&mut cancel, 0.5)),
        ms(pct(&mut cancel, 0.99)),
        ms(pct(&mut kill, 0.5)),
        ms(pct(&mut kill, 0.99)),
        ms(idle)
    );
}

async fn newcomer(addr: SocketAddr, method: &str, params: Value, n: u64) -> Duration {
    let mut ws = connect(addr).await;
    let mut t = Vec::new();
    for i in 0..n {
        let s = Instant::now();
        let r = call(&mut ws, i, method, params.clone()).await;
        t.push(s.elapsed());
        assert!(r.get("result").is_some(), "{r}");
    }
    pct(&mut t, 0.99)
}

async fn fairness(addr: SocketAddr) {
    let n = if quick() { 10 } else { 50 };
    // About 10 ms of wasm work on this machine (1 ns a round).
    let chain = json!({"seed": 1, "rounds": 10_000_000});
    let spin = json!({"ms": 10});
    let idle_spin = newcomer(addr, "spin", spin.clone(), n).await;
    let idle_wasm = newcomer(addr, "wasm_hash_chain", chain.clone(), n).await;
    let mut flood = connect(addr).await;
    for i in 0..64 {
        send(
            &mut flood,
            json!({"jsonrpc":"2.0","id":i,"method":"forever","params":{}}),
        )
        .await;
    }
    while task_id(addr, "forever").await.is_none() {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let busy_spin = newcomer(addr, "spin", spin, n).await;
    let busy_wasm = newcomer(addr, "wasm_hash_chain", chain, n).await;
    drop(flood);
    println!(
        "a newcomer beside 64 (loop br 0) tasks of one connection, p99 of {n}: native spin 10 ms idle {}, busy {} ({:.2}x); wasm hash_chain 10^7 rounds idle {}, busy {} ({:.2}x)",
        ms(idle_spin),
        ms(busy_spin),
        busy_spin.as_secs_f64() / idle_spin.as_secs_f64(),
        ms(idle_wasm),
        ms(busy_wasm),
        busy_wasm.as_secs_f64() / idle_wasm.as_secs_f64()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn rss_returns(addr: SocketAddr) {
    let mut ws = connect(addr).await;
    // Warm: the first run maps the pool's slot and the code.
    call(&mut ws, 1, "grow", json!({})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_kib();
    let r = call(&mut ws, 2, "grow", json!({})).await;
    assert_eq!(r["error"]["code"], -32010, "{r}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = rss_kib();
    println!(
        "memory.grow loop to the 64 MiB limit: answered -32010; RSS before {} KiB, after {} KiB ({:+} KiB)",
        before,
        after,
        after as i64 - before as i64
    );
}

async fn tiny(addr: SocketAddr, method: &str) -> (f64, Duration, Duration) {
    let secs = if quick() { 1 } else { 5 };
    let end = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..8)
        .map(|c| {
            let method = method.to_string();
            tokio::spawn(async move {
                let ws = connect(addr).await;
                let (mut sink, mut stream) = ws.split();
                let mut sent = std::collections::HashMap::new();
                let mut lat = Vec::new();
                let mut next = 0u64;
                let req = |id: u64| {
                    Message::text(format!(
                        r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{{"seed":{c},"rounds":1000}}}}"#
                    ))
                };
                for _ in 0..16 {
                    sent.insert(next, Instant::now());
                    sink.send(req(next)).await.expect("send");
                    next += 1;
                }
                while let Some(Ok(m)) = stream.next().await {
                    let Message::Text(t) = m else { continue };
                    let v: Value = serde_json::from_str(&t).expect("json");
                    let Some(id) = v["id"].as_u64() else { continue };
                    if let Some(s) = sent.remove(&id) {
                        lat.push(s.elapsed());
                    }
                    if Instant::now() >= end {
                        if sent.is_empty() {
                            break;
                        }
                        continue;
                    }
                    sent.insert(next, Instant::now());
                    sink.send(req(next)).await.expect("send");
                    next += 1;
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("joined"));
    }
    let rate = all.len() as f64 / secs as f64;
    (rate, pct(&mut all, 0.5), pct(&mut all, 0.99))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let started = Instant::now();
    println!(
        "# WebAssembly lane figures ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    instantiate_call_drop();
    epoch_cost();
    long_chain();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let (addr, handle) = start_server().await;
        install(addr, "forever", FOREVER.as_bytes()).await;
        install(addr, "grow", GROW.as_bytes()).await;
        install(addr, "wasm_hash_chain", &guest()).await;
        for method in ["hash_chain", "wasm_hash_chain"] {
            let (rate, p50, p99) = tiny(addr, method).await;
            println!(
                "tiny shape (8 connections x 16 in flight, 1000 rounds), {method}: {rate:.0} tasks/s, p50 {}, p99 {}",
                ms(p50),
                ms(p99)
            );
        }
        stops(addr).await;
        fairness(addr).await;
        rss_returns(addr).await;
        handle.shutdown();
    });
    println!("(took {:.0} s)", started.elapsed().as_secs_f64());
}
