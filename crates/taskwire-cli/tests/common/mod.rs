//! What the tests that run `taskwire serve` as a process share: starting it
//! (and `nats-server` for a cluster) on free ports of 127.0.0.1, reading the
//! one `listening on ADDR` line from its stdout, keeping its stderr (the log)
//! readable while it runs, its admin API, and bounded waits.

// Each test file uses what it needs of this module.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

/// Generous bound for anything to happen on a shared machine.
pub const WAIT: Duration = Duration::from_secs(30);
/// Debian's `nats-server` (`scripts/test` installs it).
pub const NATS: &str = "/usr/sbin/nats-server";

/// A port of 127.0.0.1 free now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Reads the server's first line, `listening on ADDR`, and returns the
/// address with the rest of its stdout.
pub fn listening_addr(child: &mut Child) -> (SocketAddr, BufReader<ChildStdout>) {
    let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut line = String::new();
    stdout.read_line(&mut line).expect("the listening line");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    (addr, stdout)
}

/// Collects everything the server writes to stderr, on a thread of its own so
/// that the pipe never fills and blocks the server.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let mut err = child.stderr.take().expect("piped stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = err.read(&mut buf) {
            if n == 0 {
                break;
            }
            if let Ok(mut l) = sink.lock() {
                l.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    });
    log
}

/// `taskwire serve` with `args`, on 127.0.0.1:0 with one worker at nice 0
/// unless `args` say otherwise, logging at `info` (or the filter in `TASKWIRE_TEST_RUST_LOG`),
/// the demo tasks off unless asked for; stdout and stderr piped.
pub fn serve_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskwire"));
    cmd.arg("serve");
    for (flag, default) in [
        ("--addr", "127.0.0.1:0"),
        ("--nice", "0"),
        ("--workers", "1"),
    ] {
        if !args.contains(&flag) {
            cmd.args([flag, default]);
        }
    }
    cmd.args(args)
        // The log filter is a setting too (`RUST_LOG`): the start-up lines are `info`.
        .env(
            "RUST_LOG",
            std::env::var("TASKWIRE_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("TASKWIRE_DEMO")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// A `taskwire serve` process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    /// Its stdout after the `listening on` line.
    pub stdout: BufReader<ChildStdout>,
    /// Everything it wrote to stderr (its log).
    pub log: Arc<Mutex<String>>,
}

impl Proc {
    /// Starts `taskwire serve` (see [`serve_command`]) and waits until it listens.
    pub fn start(args: &[&str]) -> Proc {
        let mut child = serve_command(args).spawn().expect("start taskwire");
        let (addr, stdout) = listening_addr(&mut child);
        let log = capture_stderr(&mut child);
        Proc {
            child,
            addr,
            stdout,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// The log once it holds `needle` (bounded by [`WAIT`]).
    pub fn log_with(&self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let log = self.log();
            if log.contains(needle) || start.elapsed() > WAIT {
                return log;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process and returns what it wrote to stdout after its first line.
    pub fn stop(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let mut rest = String::new();
        let _ = self.stdout.read_to_string(&mut rest);
        rest
    }

    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.addr.port())
    }

    /// Open file descriptors of the process.
    pub fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Resident memory of the process, KiB.
    pub fn rss_kib(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// An admin GET's JSON (the admin API is open on loopback by default).
    pub fn get(&self, path: &str) -> Value {
        let url = format!("http://{}{path}", self.addr);
        let mut r = ureq::get(&url).call().expect("admin GET");
        r.body_mut().read_json().expect("JSON")
    }

    pub fn metrics(&self) -> String {
        let url = format!("http://{}/metrics", self.addr);
        let mut r = ureq::get(&url).call().expect("metrics");
        r.body_mut().read_to_string().expect("text")
    }

    /// An admin POST's status.
    pub fn post(&self, path: &str) -> u16 {
        let url = format!("http://{}{path}", self.addr);
        match ureq::post(&url).send_empty() {
            Ok(r) => r.status().as_u16(),
            Err(ureq::Error::StatusCode(c)) => c,
            Err(e) => panic!("{e}"),
        }
    }

    /// Its task table (`/admin/tasks`).
    pub fn tasks(&self) -> Vec<Value> {
        self.get("/admin/tasks")["tasks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `nats-server` on 127.0.0.1, killed on drop.
pub struct Nats {
    child: Child,
    pub port: u16,
}

impl Nats {
    /// On a free port.
    pub fn start() -> Nats {
        Nats::on(free_port())
    }

    /// On `port` (again, after one was stopped), once it accepts connections.
    pub fn on(port: u16) -> Nats {
        let child = Command::new(NATS)
            .args(["-a", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server (scripts/test installs it)");
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() && start.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(20));
        }
        Nats { child, port }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `taskwire top --once ARGS`, bounded by [`WAIT`].
pub fn top(args: &[&str]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
        .args(["top", "--once"])
        .args(args)
        .env_remove("TASKWIRE_URL")
        .env_remove("TASKWIRE_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start taskwire top");
    let start = Instant::now();
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > WAIT {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("top's output")
}

/// An output as text, for a failed assertion.
pub fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Polls `f` (blocking) until it holds; panics naming `what` after [`WAIT`].
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client of the server at `addr`.
pub async fn connect(addr: SocketAddr) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    ws
}

pub async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.expect("send");
}

/// Reads until the response with this id, counting progress on the way.
pub async fn answer(ws: &mut Ws, id: i64, progress: &mut usize) -> Value {
    tokio::time::timeout(WAIT, async {
        loop {
            let m = ws.next().await.expect("open").expect("frame");
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("JSON");
            if v["method"] == "$/progress" {
                *progress += 1;
                continue;
            }
            if v["id"] == id {
                return v;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("an answer to request {id} in time"))
}
