//! What the baseline servers share: the command line, the listener, the
//! WebSocket settings, a JSON-RPC dispatcher for the built-in tasks, and the
//! tasks themselves.
//!
//! The baselines exist to be compared with, so they are deliberately plain: the
//! textbook and naive servers differ from each other only in *when* they await a
//! task, and from taskwire in having no scheduler, no admission control, no
//! cancellation and no progress. They use the same WebSocket settings as
//! taskwire so that a difference in a figure is a difference in design.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::Router;
use serde::Deserialize;
use serde_json::value::RawValue;

/// The command line every server binary takes.
#[derive(Debug, Clone, clap::Parser)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub addr: SocketAddr,
}

/// Binds `addr`, prints exactly one `listening on HOST:PORT` line on stdout (the
/// bench waits for it) and serves `router` until the process is killed.
/// Accepted sockets get `TCP_NODELAY`: without it Nagle's algorithm holds a
/// small reply back until the client's next segment acknowledges the previous
/// one, adding milliseconds to every round trip that is not pipelined.
pub async fn serve(addr: SocketAddr, router: Router) -> std::io::Result<()> {
    use axum::serve::ListenerExt as _;
    use std::io::Write as _;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {local}")?;
    stdout.flush()?;
    drop(stdout);
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            eprintln!("set_nodelay: {e}");
        }
    });
    axum::serve(listener, router).await
}

/// The WebSocket settings taskwire uses too: a 4 KiB read buffer instead of
/// tungstenite's 128 KiB (~5.7 KB per idle connection instead of ~137 KB) and
/// unbuffered writes; the subprotocol `taskwire.v1` is selected when asked for.
pub fn configure(ws: WebSocketUpgrade) -> WebSocketUpgrade {
    ws.read_buffer_size(4096)
        .write_buffer_size(0)
        .protocols(["taskwire.v1"])
}

/// Largest `ms` of `sleep` and `spin` (one hour), as in PROTOCOL.md.
pub const MAX_MS: u64 = 3_600_000;
/// Largest `rounds` of `hash_chain`.
pub const MAX_ROUNDS: u64 = 1_000_000_000_000;
/// Largest `below` of `count_primes`.
pub const MAX_BELOW: u64 = 10_000_000_000;

#[derive(Deserialize)]
struct Request<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    method: Option<&'a RawValue>,
    #[serde(borrow, default)]
    params: Option<&'a RawValue>,
    #[serde(borrow, default)]
    jsonrpc: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct EchoParams<'a> {
    #[serde(borrow)]
    value: &'a RawValue,
}

#[derive(Deserialize)]
struct MsParams {
    ms: u64,
}

#[derive(Deserialize)]
struct HashParams {
    seed: u64,
    rounds: u64,
}

#[derive(Deserialize)]
struct PrimesParams {
    below: u64,
}

fn error_frame(id: &str, code: i64, message: &str) -> String {
    let message = serde_json::Value::from(message);
    format!(r#"{{"jsonrpc":"2.0","id":{id},"error":{{"code":{code},"message":{message}}}}}"#)
}

fn result_frame(id: &str, result: &str) -> String {
    format!(r#"{{"jsonrpc":"2.0","id":{id},"result":{result}}}"#)
}

/// The reply to a binary frame (PROTOCOL.md: `-32600`, id `null`).
pub fn binary_frame_error() -> String {
    error_frame(
        "null",
        -32600,
        "invalid request: binary frames are not accepted",
    )
}

/// Parses `params` into `T`, or the `-32602` message.
fn params<'a, T: Deserialize<'a>>(raw: Option<&'a RawValue>) -> Result<T, String> {
    let text = raw.map_or("{}", RawValue::get);
    serde_json::from_str(text).map_err(|e| format!("invalid params: {e}"))
}

/// Handles one text frame: the reply to send, or `None` for a notification.
/// CPU tasks run under `spawn_blocking`, I/O tasks on the runtime; the caller
/// decides whether to await this before reading the next frame (naive) or to
/// spawn it (textbook).
pub async fn handle_text(text: &str) -> Option<String> {
    let req: Request<'_> = match serde_json::from_str(text) {
        Ok(r) => r,
        Err(_) if text.trim_start().starts_with('[') => {
            return Some(error_frame(
                "null",
                -32600,
                "invalid request: this baseline does not do batches",
            ))
        }
        Err(e) if e.is_syntax() || e.is_eof() => {
            return Some(error_frame("null", -32700, "parse error"))
        }
        Err(_) => return Some(error_frame("null", -32600, "invalid request")),
    };
    let id = req.id.map(RawValue::get);
    let method: Option<String> = req.method.and_then(|m| serde_json::from_str(m.get()).ok());
    let version_ok = req.jsonrpc.is_some_and(|v| v.get() == r#""2.0""#);
    let id_ok = id.is_none_or(|i| i.starts_with('"') || i.parse::<i64>().is_ok() || i == "null");
    let (Some(method), true, true) = (method, version_ok, id_ok) else {
        return Some(error_frame(id.unwrap_or("null"), -32600, "invalid request"));
    };
    let outcome = dispatch(&method, req.params).await;
    let id = id?; // A notification gets nothing back, not even an error.
    Some(match outcome {
        Ok(result) => result_frame(id, &result),
        Err((code, message)) => error_frame(id, code, &message),
    })
}

async fn dispatch(method: &str, raw: Option<&RawValue>) -> Result<String, (i64, String)> {
    let invalid = |m: String| (-32602, m);
    match method {
        "echo" => {
            let p: EchoParams<'_> = params(raw).map_err(invalid)?;
            Ok(p.value.get().to_string())
        }
        "sleep" => {
            let p: MsParams = params(raw).map_err(invalid)?;
            if p.ms > MAX_MS {
                return Err(invalid("invalid params: `ms` is at most 3600000".into()));
            }
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok(format!(r#"{{"sleptMs":{}}}"#, p.ms))
        }
        "spin" => {
            let p: MsParams = params(raw).map_err(invalid)?;
            if p.ms > MAX_MS {
                return Err(invalid("invalid params: `ms` is at most 3600000".into()));
            }
            let spun = blocking(move || spin(p.ms)).await?;
            Ok(format!(r#"{{"spunMs":{spun}}}"#))
        }
        "hash_chain" => {
            let p: HashParams = params(raw).map_err(invalid)?;
            if p.rounds > MAX_ROUNDS {
                return Err(invalid("invalid params: `rounds` is at most 10^12".into()));
            }
            let digest = blocking(move || hash_chain(p.seed, p.rounds)).await?;
            Ok(format!(r#"{{"digest":"{digest}"}}"#))
        }
        "count_primes" => {
            let p: PrimesParams = params(raw).map_err(invalid)?;
            if p.below > MAX_BELOW {
                return Err(invalid("invalid params: `below` is at most 10^10".into()));
            }
            let count = blocking(move || count_primes(p.below)).await?;
            Ok(format!(r#"{{"count":{count}}}"#))
        }
        _ => Err((-32601, format!("method not found: {method}"))),
    }
}

/// The textbook way to run CPU work off the runtime: `spawn_blocking`.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, (i64, String)> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| (-32603, format!("internal error: {e}")))
}

/// CPU time consumed by the calling thread.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_THREAD_CPUTIME_ID always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Burns `ms` milliseconds of this thread's own CPU time (not wall time: a
/// thread that is descheduled does not progress) and returns the milliseconds
/// actually burnt. The CPU clock is a ~170 ns syscall here, so it is read about
/// every 100 µs of wall time rather than in the inner loop.
pub fn spin(ms: u64) -> u64 {
    let start = thread_cpu_time();
    let target = Duration::from_millis(ms);
    let mut x = start.subsec_nanos() as u64;
    loop {
        let used = thread_cpu_time().saturating_sub(start);
        if used >= target {
            std::hint::black_box(x);
            return used.as_millis() as u64;
        }
        let chunk = Instant::now();
        while chunk.elapsed() < Duration::from_micros(100) {
            for _ in 0..64 {
                x = splitmix64(x);
            }
            x = std::hint::black_box(x);
        }
    }
}

/// One step of splitmix64 (wrapping arithmetic), as PROTOCOL.md defines it.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `hash_chain`: `rounds` applications of [`splitmix64`] starting from `seed`.
pub fn hash_chain(seed: u64, rounds: u64) -> u64 {
    let mut x = seed;
    for _ in 0..rounds {
        x = splitmix64(x);
    }
    x
}

/// `count_primes`: the number of primes `p < below`, by a segmented sieve (so
/// memory stays at a few hundred KiB even for `below` = 10^10).
pub fn count_primes(below: u64) -> u64 {
    if below <= 2 {
        return 0;
    }
    let limit = below - 1; // largest candidate
    let root = isqrt(limit);
    // Base primes up to sqrt(limit) by a plain sieve.
    let mut small = vec![true; root as usize + 1];
    let mut base = Vec::new();
    for i in 2..=root as usize {
        if small[i] {
            base.push(i as u64);
            let mut j = i * i;
            while j <= root as usize {
                small[j] = false;
                j += i;
            }
        }
    }
    const SEGMENT: u64 = 1 << 18;
    let mut seg = vec![true; SEGMENT as usize];
    let mut count = 0u64;
    let mut low = 2u64;
    while low <= limit {
        let high = (low + SEGMENT - 1).min(limit);
        let len = (high - low + 1) as usize;
        seg[..len].fill(true);
        for &p in &base {
            if p * p > high {
                break;
            }
            let mut m = (p * p).max(low.div_ceil(p) * p);
            while m <= high {
                seg[(m - low) as usize] = false;
                m += p;
            }
        }
        count += seg[..len].iter().filter(|&&b| b).count() as u64;
        low = high + 1;
    }
    count
}

fn isqrt(n: u64) -> u64 {
    let mut r = (n as f64).sqrt() as u64;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_chain_vectors() {
        assert_eq!(hash_chain(1, 1), 10451216379200822465);
        assert_eq!(hash_chain(0, 1_000_000), 1880736892155664098);
        assert_eq!(hash_chain(42, 10), 8123981347576678140);
        assert_eq!(hash_chain(5, 0), 5);
    }

    #[test]
    fn primes() {
        assert_eq!(count_primes(0), 0);
        assert_eq!(count_primes(2), 0);
        assert_eq!(count_primes(3), 1);
        assert_eq!(count_primes(10), 4);
        assert_eq!(count_primes(11), 4);
        assert_eq!(count_primes(12), 5);
        assert_eq!(count_primes(1_000_000), 78498);
        assert_eq!(count_primes(5_000_000), 348513);
    }

    #[test]
    fn spin_burns_cpu_time() {
        let before = thread_cpu_time();
        let spun = spin(20);
        let used = thread_cpu_time() - before;
        assert!(spun >= 20);
        assert!(used >= Duration::from_millis(20));
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("runtime: {e}"))
            .block_on(f)
    }

    fn reply(text: &str) -> serde_json::Value {
        let out = run(handle_text(text)).unwrap_or_else(|| panic!("no reply to {text}"));
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    #[test]
    fn framing() {
        let r = reply(r#"{"jsonrpc":"2.0","id":1,"method":"echo","params":{"value":{"a":[1,2]}}}"#);
        assert_eq!(r["id"], 1);
        assert_eq!(r["result"], serde_json::json!({"a":[1,2]}));
        let r = reply(
            r#"{"jsonrpc":"2.0","id":"s","method":"hash_chain","params":{"seed":1,"rounds":1}}"#,
        );
        assert_eq!(r["id"], "s");
        assert_eq!(r["result"]["digest"], "10451216379200822465");
        let r = reply(r#"{"jsonrpc":"2.0","id":2,"method":"count_primes","params":{"below":10}}"#);
        assert_eq!(r["result"]["count"], 4);
        let r = reply(r#"{"jsonrpc":"2.0","id":3,"method":"sleep","params":{"ms":1}}"#);
        assert_eq!(r["result"]["sleptMs"], 1);
        let r = reply(r#"{"jsonrpc":"2.0","id":4,"method":"spin","params":{"ms":1}}"#);
        assert!(r["result"]["spunMs"].as_u64().is_some_and(|v| v >= 1));
        let r = reply(r#"{"jsonrpc":"2.0","id":5,"method":"nope"}"#);
        assert_eq!(r["error"]["code"], -32601);
        let r = reply(r#"{"jsonrpc":"2.0","id":6,"method":"spin","params":{}}"#);
        assert_eq!(r["error"]["code"], -32602);
        assert!(r["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("ms")));
        let r = reply("{not json");
        assert_eq!(r["error"]["code"], -32700);
        assert!(r["id"].is_null());
        let r = reply(r#"{"id":7,"method":"echo"}"#);
        assert_eq!(r["error"]["code"], -32600);
        let r = reply(r#"[]"#);
        assert_eq!(r["error"]["code"], -32600);
        // Notifications (including $/cancelRequest, which baselines ignore) get nothing.
        assert!(run(handle_text(
            r#"{"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}"#
        ))
        .is_none());
    }
}
