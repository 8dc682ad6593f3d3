//! `hostile`: clients that attack the server instead of using it, each attack
//! against its own fresh `taskwire serve` process so that memory figures never mix.
//!
//! Every attack is a measurement, not a test: a close, a refusal or an error
//! from the server is a result to report, and so is a server that gives way.
//! For each one the report gives what the attack cost the server (RSS before,
//! peak during and after in MiB, descriptors where they matter) and whether a
//! fresh client could still get an `echo` answered while it went on.
//!
//! All traffic goes to 127.0.0.0/8; every loop is bounded in count and time
//! (each attack by its own settings and by [`ATTACK_BOUND`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde::de::IgnoredAny;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;

use super::{secs, Plan};
use crate::client::{connect, is_allowed_ip, Buffers, RpcClient, Ws, WsUrl};
use crate::launch::{accepts_flag, locate, ServerProcess, StderrTo, Target};
use crate::procfs::{open_file_limit, rss_kib};
use crate::report::{Metric, Report, Status, TargetReport};
use crate::BenchError;

/// The most any one attack may take, start and stop of its server included.
const ATTACK_BOUND: Duration = Duration::from_secs(60);
/// How long the responsiveness probe (connect + one `echo`) may take.
const PROBE_BOUND: Duration = Duration::from_secs(5);
/// The largest frame the server accepts by default is 1 MiB: stay just under.
const NEAR_MAX_FRAME: usize = 1_000_000;
/// The address the attacks that need "another host" come from.
const OTHER_HOST: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// A fixed key is fine: the handshake only proves the server speaks WebSocket.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// The sizes and bounds of every attack (`--quick` shrinks them all).
#[derive(Debug, Clone)]
pub struct Settings {
    /// Batches of one long `sleep` plus invalid elements.
    pub batch_frames: usize,
    /// Bytes per such batch frame.
    pub batch_frame_bytes: usize,
    /// The `sleep` that holds each batch's answer back, in ms.
    pub batch_sleep_ms: u64,
    /// How long a memory attack is held before its connection closes.
    pub hold: Duration,
    /// How long the ping flood writes.
    pub ping_for: Duration,
    /// `sleep` requests with huge string ids.
    pub huge_ids: usize,
    /// Bytes per huge id.
    pub huge_id_bytes: usize,
    /// Bytes of the one batch of invalid elements (error amplification).
    pub amplification_bytes: usize,
    /// `--rate-limit-per-sec` of the second amplification server.
    pub rate_limit: u32,
    /// How long to collect the answer to the amplification batch.
    pub answer_wait: Duration,
    /// Half-sent HTTP requests held open.
    pub half_open: usize,
    /// How long they are held.
    pub half_open_hold: Duration,
    /// How long SIGTERM may take before SIGKILL.
    pub shutdown_bound: Duration,
    /// Connections from one address filling the CPU slots.
    pub cpu_connections: usize,
    /// `runaway` requests per such connection.
    pub cpu_per_connection: usize,
    /// Bytes of the long `crash` message.
    pub log_message_bytes: usize,
    /// Pause after an attack's connections close, before "RSS after".
    pub settle: Duration,
}

impl Settings {
    pub fn new(plan: &Plan) -> Self {
        // Each socket costs a descriptor here and one in the server (another
        // process with its own limit): keep well under ours.
        let fd_cap = (open_file_limit() / 4) as usize;
        if plan.quick {
            return Settings {
                batch_frames: 1,
                batch_frame_bytes: 50_000,
                batch_sleep_ms: 60_000,
                hold: Duration::from_millis(800),
                ping_for: Duration::from_millis(500),
                huge_ids: 8,
                huge_id_bytes: 50_000,
                amplification_bytes: 50_000,
                rate_limit: 10,
                answer_wait: Duration::from_secs(3),
                half_open: plan.connections.unwrap_or(50).min(fd_cap),
                half_open_hold: Duration::from_secs(1),
                shutdown_bound: Duration::from_secs(10),
                cpu_connections: 2,
                cpu_per_connection: 8,
                log_message_bytes: 10_000,
                settle: Duration::from_millis(300),
            };
        }
        Settings {
            batch_frames: 4,
            batch_frame_bytes: NEAR_MAX_FRAME,
            batch_sleep_ms: 60_000,
            hold: plan.duration.unwrap_or(Duration::from_secs(8)),
            ping_for: Duration::from_secs(10),
            huge_ids: 256,
            huge_id_bytes: NEAR_MAX_FRAME - 200,
            amplification_bytes: NEAR_MAX_FRAME,
            rate_limit: 10,
            answer_wait: Duration::from_secs(10),
            half_open: plan.connections.unwrap_or(2_000).min(fd_cap),
            half_open_hold: Duration::from_secs(15),
            shutdown_bound: Duration::from_secs(30),
            cpu_connections: 40,
            cpu_per_connection: 256,
            log_message_bytes: 1_000_000,
            settle: Duration::from_secs(2),
        }
    }

    pub fn to_json(&self) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert("batch_frames".into(), self.batch_frames.into());
        m.insert("batch_frame_bytes".into(), self.batch_frame_bytes.into());
        m.insert("batch_sleep_ms".into(), self.batch_sleep_ms.into());
        m.insert("hold_s".into(), secs(self.hold));
        m.insert("ping_flood_s".into(), secs(self.ping_for));
        m.insert("huge_ids".into(), self.huge_ids.into());
        m.insert("huge_id_bytes".into(), self.huge_id_bytes.into());
        m.insert(
            "amplification_bytes".into(),
            self.amplification_bytes.into(),
        );
        m.insert("rate_limit_per_sec".into(), self.rate_limit.into());
        m.insert("half_open_requests".into(), self.half_open.into());
        m.insert("half_open_hold_s".into(), secs(self.half_open_hold));
        m.insert("shutdown_bound_s".into(), secs(self.shutdown_bound));
        m.insert("cpu_connections".into(), self.cpu_connections.into());
        m.insert(
            "cpu_runaway_per_connection".into(),
            self.cpu_per_connection.into(),
        );
        m.insert("log_message_bytes".into(), self.log_message_bytes.into());
        m
    }
}

/// One attack's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Attack {
    /// Its short name, the prefix of its metrics in the report.
    pub name: String,
    /// Its figures, in display order.
    pub metrics: Vec<Metric>,
    /// What the figures alone do not say (refusal reasons, surprises).
    pub notes: Vec<String>,
    /// Why it could not be measured, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed: Option<String>,
}

impl Attack {
    fn new(name: &str) -> Self {
        Attack {
            name: name.to_string(),
            metrics: Vec::new(),
            notes: Vec::new(),
            failed: None,
        }
    }

    fn m(&mut self, name: &str, value: f64, unit: &str) {
        self.metrics.push(Metric {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
        });
    }

    fn flag(&mut self, name: &str, yes: bool) {
        self.m(name, if yes { 1.0 } else { 0.0 }, "1=yes");
    }

    fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    fn get(&self, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.name == name)
            .map(|m| m.value)
    }
}

/// How each attack's server is started.
struct Env<'a> {
    target: Target,
    dirs: &'a [PathBuf],
    server_logs: bool,
    /// The binary wants `--demo` for `runaway` and `crash`.
    demo: bool,
}

impl Env<'_> {
    async fn start(&self, extra: &[&str]) -> Result<ServerProcess, BenchError> {
        let stderr = if self.server_logs {
            StderrTo::Inherit
        } else {
            StderrTo::Null
        };
        self.start_to(extra, stderr).await
    }

    async fn start_to(
        &self,
        extra: &[&str],
        stderr: StderrTo,
    ) -> Result<ServerProcess, BenchError> {
        let mut args: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        if self.demo {
            args.push("--demo".into());
        }
        let server = ServerProcess::start_with(self.target, self.dirs, &args, stderr).await?;
        // Let it finish starting (threads, first allocations) before "RSS before".
        tokio::time::sleep(Duration::from_millis(300)).await;
        Ok(server)
    }
}

/// Runs every attack against `target` (taskwire only) and folds them into one report.
pub async fn measure_target(
    s: &Settings,
    target: Target,
    dirs: &[PathBuf],
    server_logs: bool,
) -> TargetReport {
    if target != Target::Taskwire {
        return TargetReport::not_run(
            target.name(),
            Status::Skipped,
            "the hostile scenario attacks taskwire's own surface (admin API, demo tasks, \
             rate limit, shutdown)"
                .into(),
        );
    }
    let path = match locate(target, dirs) {
        Ok(p) => p,
        Err(e) => return TargetReport::not_run(target.name(), Status::Skipped, e.to_string()),
    };
    let env = Env {
        target,
        dirs,
        server_logs,
        demo: accepts_flag(&path, target, "--demo").await,
    };
    let mut attacks = Vec::new();
    attacks.push(run_attack("batch", batch_holds_answers(s, &env)).await);
    attacks.push(run_attack("pongs", unread_pongs(s, &env)).await);
    attacks.push(run_attack("huge ids", huge_ids(s, &env)).await);
    attacks.push(run_attack("amplification", amplification(s, &env, None)).await);
    attacks.push(
        run_attack(
            "amplification, rate limited",
            amplification(s, &env, Some(s.rate_limit)),
        )
        .await,
    );
    attacks.push(run_attack("half-sent requests", half_sent_heads(s, &env)).await);
    attacks.push(run_attack("shutdown", shutdown(s, &env)).await);
    attacks.push(run_attack("cpu slots", cpu_slots(s, &env)).await);
    attacks.push(run_attack("cross-site", cross_site(&env)).await);
    attacks.push(run_attack("log injection", log_injection(s, &env)).await);
    attacks.push(memory_after(&attacks));

    let mut t = TargetReport::ok(target.name());
    if env.demo {
        t.metric("binary takes --demo", 1.0, "1=yes");
    }
    for a in &attacks {
        for m in &a.metrics {
            t.metric(&format!("{}: {}", a.name, m.name), m.value, &m.unit);
        }
    }
    t.series = serde_json::to_value(&attacks).unwrap_or(Value::Null);
    t
}

async fn run_attack(
    name: &str,
    attack: impl std::future::Future<Output = Result<Attack, BenchError>>,
) -> Attack {
    eprintln!("hostile: {name}");
    let started = Instant::now();
    let outcome = tokio::time::timeout(ATTACK_BOUND, attack).await;
    let mut a = match outcome {
        Ok(Ok(mut a)) => {
            a.name = name.to_string();
            a
        }
        Ok(Err(e)) => {
            let mut a = Attack::new(name);
            a.failed = Some(e.to_string());
            a
        }
        Err(_) => {
            let mut a = Attack::new(name);
            a.failed = Some(format!("did not finish within {ATTACK_BOUND:?}"));
            a
        }
    };
    if let Some(why) = &a.failed {
        eprintln!("hostile: {name}: not measured: {why}");
    }
    a.m("attack duration", started.elapsed().as_secs_f64(), "s");
    a
}

pub fn finish(report: &mut Report) {
    let mut notes = Vec::new();
    for t in &report.targets {
        let Ok(attacks) = serde_json::from_value::<Vec<Attack>>(t.series.clone()) else {
            continue;
        };
        for a in attacks {
            if let Some(why) = &a.failed {
                notes.push(format!("{}: not measured: {why}", a.name));
            }
            for n in a.notes {
                notes.push(format!("{}: {n}", a.name));
            }
        }
    }
    report.notes.extend(notes);
    report.notes.push(
        "each attack runs against its own fresh server process; closes, refusals and errors \
         are results, not failures. Targets: the server's RSS returns near its level before \
         the attack, a fresh client's `echo` is answered during every attack, a batch over \
         max_batch (256) gets one -32600, ids over 256 bytes get -32600, a ping flood that \
         never reads its pongs is closed with 1008, half-sent requests are closed by a head \
         timeout, SIGTERM ends the process within its grace period, one address cannot take \
         every CPU slot, cross-site and foreign-Host admin requests are refused, and no \
         client text starts a log line."
            .into(),
    );
}

// ---------------------------------------------------------------------------
// Memory and responsiveness.

/// Samples a process's RSS (and descriptors) until stopped, dropped, or the
/// process is gone; keeps the peaks.
struct Sampler {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(u64, u64)>>,
}

impl Sampler {
    fn start(pid: u32, fds: bool) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let (mut rss, mut fd) = (0u64, 0u64);
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // A process that has exited (or is a zombie) has no VmRSS.
                    let Ok(now) = rss_kib(pid) else { break };
                    rss = rss.max(now);
                    // Counting thousands of descriptors is slower: every 250 ms.
                    if fds && n.is_multiple_of(5) {
                        fd = fd.max(fd_count(pid).unwrap_or(0));
                    }
                    n += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                (rss, fd)
            })
        };
        Sampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling: (peak RSS KiB, peak descriptors).
    async fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        match self.handle.take() {
            Some(h) => h.await.unwrap_or((0, 0)),
            None => (0, 0),
        }
    }
}

impl Drop for Sampler {
    /// An attack that ends early (an error) must not leave its sampler running.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Open descriptors of `pid`.
fn fd_count(pid: u32) -> Option<u64> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count() as u64)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// RSS before, and a sampler for the peak.
struct Memory {
    pid: u32,
    before: u64,
    sampler: Sampler,
}

impl Memory {
    fn begin(pid: u32) -> Result<Memory, BenchError> {
        Ok(Memory {
            pid,
            before: rss_kib(pid)?,
            sampler: Sampler::start(pid, false),
        })
    }

    /// Call once the attack's connections are closed: waits `settle`, then
    /// records before / peak / after.
    async fn end(self, a: &mut Attack, settle: Duration) {
        tokio::time::sleep(settle).await;
        let after = rss_kib(self.pid).ok();
        let (peak, _) = self.sampler.finish().await;
        let peak = peak.max(after.unwrap_or(0)).max(self.before);
        a.m("RSS before", mib(self.before), "MiB");
        a.m("RSS peak", mib(peak), "MiB");
        match after {
            Some(after) => {
                a.m("RSS after", mib(after), "MiB");
                a.m(
                    "RSS retained (after - before)",
                    mib(after) - mib(self.before),
                    "MiB",
                );
            }
            None => a.note("the server process was gone when RSS after was read"),
        }
    }
}

/// Connects a fresh client and has one `echo` answered: the total time in ms,
/// or `None` when that failed or took longer than [`PROBE_BOUND`].
async fn probe(url: &WsUrl, source: Option<Ipv4Addr>) -> Option<f64> {
    let start = Instant::now();
    let work = async {
        let client = RpcClient::from_ws(connect(url, source, Buffers::Small).await?);
        let reply = client
            .start("echo", &json!({"value": "probe"}))?
            .wait()
            .await?;
        client.close().await;
        Ok::<_, BenchError>(reply)
    };
    match tokio::time::timeout(PROBE_BOUND, work).await {
        Ok(Ok(reply)) if reply.error.is_none() => Some(start.elapsed().as_secs_f64() * 1e3),
        _ => None,
    }
}

fn probe_metrics(a: &mut Attack, result: Option<f64>) {
    a.flag(
        "fresh client's echo answered during the attack",
        result.is_some(),
    );
    if let Some(ms) = result {
        a.m("its connect + echo time", ms, "ms");
    }
}

fn alive_metric(a: &mut Attack, server: &mut ServerProcess) {
    a.flag("server still running after the attack", server.is_running());
}

// ---------------------------------------------------------------------------
// What comes back on a WebSocket.

/// Frames and error objects received on one connection.
#[derive(Debug, Default, Clone)]
struct Tally {
    frames: u64,
    bytes: u64,
    /// Array frames (batch answers).
    arrays: u64,
    results: u64,
    errors: BTreeMap<i64, u64>,
    unparsed: u64,
    /// The server's close code, when it sent a close frame.
    close_code: Option<u16>,
    /// The connection ended (close frame, reset or EOF).
    ended: bool,
}

impl Tally {
    fn error_objects(&self) -> u64 {
        self.errors.values().sum()
    }

    #[cfg(test)]
    fn errors_with(&self, code: i64) -> u64 {
        self.errors.get(&code).copied().unwrap_or(0)
    }

    fn add_text(&mut self, text: &str) {
        self.frames += 1;
        self.bytes += text.len() as u64;
        let trimmed = text.trim_start();
        if trimmed.starts_with('[') {
            self.arrays += 1;
            match serde_json::from_str::<Vec<Lite>>(trimmed) {
                Ok(items) => items.into_iter().for_each(|l| self.add(l)),
                Err(_) => self.unparsed += 1,
            }
        } else {
            match serde_json::from_str::<Lite>(trimmed) {
                Ok(l) => self.add(l),
                Err(_) => self.unparsed += 1,
            }
        }
    }

    fn add(&mut self, l: Lite) {
        match l.error {
            Some(e) => *self.errors.entry(e.code).or_default() += 1,
            None if l.method.is_none() => self.results += 1,
            None => {}
        }
    }

    fn record(&self, a: &mut Attack) {
        a.m("frames received", self.frames as f64, "");
        a.m("bytes received", self.bytes as f64, "B");
        a.m("error objects received", self.error_objects() as f64, "");
        for (code, n) in &self.errors {
            a.m(&format!("{code} errors"), *n as f64, "");
        }
        a.flag("closed by the server", self.ended);
        if let Some(code) = self.close_code {
            a.m("close code", f64::from(code), "");
        }
    }
}

/// The part of an answer the bench counts (everything else is skipped unread).
#[derive(Deserialize)]
struct Lite {
    #[serde(default)]
    error: Option<LiteError>,
    #[serde(default)]
    method: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct LiteError {
    code: i64,
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads a connection to its end, tallying what arrives.
fn spawn_tally(mut stream: SplitStream<Ws>) -> (Shared<Tally>, JoinHandle<()>) {
    let tally: Shared<Tally> = Arc::default();
    let handle = {
        let tally = Arc::clone(&tally);
        tokio::spawn(async move {
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(Message::Text(t)) => lock(&tally).add_text(t.as_str()),
                    Ok(Message::Close(frame)) => {
                        lock(&tally).close_code = frame.map(|f| u16::from(f.code));
                        break;
                    }
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            lock(&tally).ended = true;
        })
    };
    (tally, handle)
}

/// A batch of `0` elements of about `bytes` bytes, after `head` (a real
/// request, or nothing). A `0` is not a request object, so each one earns an
/// error object of its own (`{}` would not do: having no id, it reads as a
/// notification, which is never answered).
fn invalid_batch(head: Option<&str>, bytes: usize) -> (String, usize) {
    let mut s = String::with_capacity(bytes + 8);
    s.push('[');
    let mut elements = 0;
    if let Some(h) = head {
        s.push_str(h);
        elements += 1;
    }
    while s.len() + 3 <= bytes {
        if elements > 0 {
            s.push(',');
        }
        s.push('0');
        elements += 1;
    }
    s.push(']');
    (s, elements)
}

// ---------------------------------------------------------------------------
// The attacks.

/// Batches whose answer waits for one long `sleep` while it keeps an error
/// object for every invalid element.
async fn batch_holds_answers(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("batch");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let memory = Memory::begin(server.pid)?;
    let (mut sink, stream) = connect(&url, None, Buffers::Large).await?.split();
    let (tally, reader) = spawn_tally(stream);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + s.hold);
    let mut sent = 0u64;
    let mut elements = 0usize;
    for i in 0..s.batch_frames {
        let head = format!(
            r#"{{"jsonrpc":"2.0","id":{i},"method":"sleep","params":{{"ms":{}}}}}"#,
            s.batch_sleep_ms
        );
        let (frame, n) = invalid_batch(Some(&head), s.batch_frame_bytes);
        elements = n;
        match tokio::time::timeout_at(deadline, sink.send(Message::text(frame))).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let send_time = start.elapsed();
    // Halfway through the hold the server has parsed what it was sent.
    tokio::time::sleep_until(tokio::time::Instant::from_std(start + s.hold / 2)).await;
    let probed = probe(&url, None).await;
    tokio::time::sleep_until(deadline).await;
    let seen = lock(&tally).clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    drop(sink);
    reader.abort();
    memory.end(&mut a, s.settle).await;
    a.m("batch frames sent", sent as f64, "");
    a.m("elements per batch", elements as f64, "");
    a.m("send time", send_time.as_secs_f64(), "s");
    seen.record(&mut a);
    probe_metrics(&mut a, probed);
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// A raw WebSocket client that floods pings and never reads the pongs.
async fn unread_pongs(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("pongs");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let memory = Memory::begin(server.pid)?;
    let (mut stream, status, mut leftover) =
        raw_upgrade(server.addr, None, &server.addr.to_string(), "").await?;
    if status != 101 {
        return Err(BenchError::Protocol(format!(
            "the upgrade was answered {status}"
        )));
    }
    // 512 pings of 125 bytes (the largest control payload) per write.
    let mut chunk = Vec::with_capacity(512 * 131);
    for i in 0..512u32 {
        chunk.extend(masked_frame(0x9, &[b'p'; 125], i.to_be_bytes()));
    }
    let start = Instant::now();
    let stop_at = start + s.ping_for;
    let mut pings = 0u64;
    let mut blocked_writes = 0u64;
    let mut write_error = None;
    let mut probed = None;
    let mut probed_yet = false;
    while Instant::now() < stop_at {
        if !probed_yet && start.elapsed() >= s.ping_for / 2 {
            probed_yet = true;
            probed = Some(probe(&url, None).await);
        }
        let bound = stop_at
            .saturating_duration_since(Instant::now())
            .min(Duration::from_millis(500));
        match tokio::time::timeout(bound, stream.write_all(&chunk)).await {
            Ok(Ok(())) => pings += 512,
            Ok(Err(e)) => {
                write_error = Some((start.elapsed(), e));
                break;
            }
            // The server stopped reading (its socket buffer is full): a result.
            Err(_) => blocked_writes += 1,
        }
    }
    let probed = match probed {
        Some(p) => p,
        None => probe(&url, None).await,
    };
    // Now read what the server sent: its pongs, and maybe a close frame.
    let (pongs, close_code, bytes_read) = read_server_frames(
        &mut stream,
        &mut leftover,
        Duration::from_secs(3),
        256 << 20,
    )
    .await;
    drop(stream);
    memory.end(&mut a, s.settle).await;
    a.m("pings sent", pings as f64, "");
    a.m(
        "ping bytes written",
        (pings * 131) as f64 / 1024.0 / 1024.0,
        "MiB",
    );
    a.m("writes blocked for 500 ms", blocked_writes as f64, "");
    match &write_error {
        Some((at, e)) => {
            a.flag("closed by the server", true);
            a.m("closed after", at.as_secs_f64(), "s");
            a.note(format!("writing failed: {e}"));
        }
        None => a.flag("closed by the server", false),
    }
    a.m("pongs read afterwards (3 s)", pongs as f64, "");
    a.m("bytes read afterwards", bytes_read as f64, "B");
    a.m("close code", close_code.map_or(0.0, f64::from), "0=none");
    probe_metrics(&mut a, probed);
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// 256 `sleep` requests whose ids are 1 MB strings, on one connection.
async fn huge_ids(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("huge ids");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let memory = Memory::begin(server.pid)?;
    let (mut sink, stream) = connect(&url, None, Buffers::Large).await?.split();
    let (tally, reader) = spawn_tally(stream);
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + s.hold + Duration::from_secs(2));
    let filler = "i".repeat(s.huge_id_bytes.saturating_sub(8));
    let mut sent = 0u64;
    for i in 0..s.huge_ids {
        let frame = format!(
            r#"{{"jsonrpc":"2.0","id":"{i:08}{filler}","method":"sleep","params":{{"ms":20000}}}}"#
        );
        match tokio::time::timeout_at(deadline, sink.send(Message::text(frame))).await {
            Ok(Ok(())) => sent += 1,
            _ => break,
        }
    }
    let send_time = start.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let probed = probe(&url, None).await;
    tokio::time::sleep_until(deadline.max(tokio::time::Instant::now())).await;
    let seen = lock(&tally).clone();
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    drop(sink);
    reader.abort();
    memory.end(&mut a, s.settle).await;
    a.m("requests sent", sent as f64, "");
    a.m("id bytes each", s.huge_id_bytes as f64, "B");
    a.m("send time", send_time.as_secs_f64(), "s");
    seen.record(&mut a);
    probe_metrics(&mut a, probed);
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// One batch of invalid elements: how many bytes of errors come back per byte
/// sent; with `rate_limit`, against a server started with that limit.
async fn amplification(
    s: &Settings,
    env: &Env<'_>,
    rate_limit: Option<u32>,
) -> Result<Attack, BenchError> {
    let mut a = Attack::new("amplification");
    let limit = rate_limit.map(|r| r.to_string());
    let extra: Vec<&str> = match &limit {
        Some(r) => vec!["--rate-limit-per-sec", r.as_str()],
        None => Vec::new(),
    };
    let mut server = env.start(&extra).await?;
    let url = WsUrl::parse(&server.url())?;
    let memory = Memory::begin(server.pid)?;
    let (mut sink, stream) = connect(&url, None, Buffers::Large).await?.split();
    let (tally, reader) = spawn_tally(stream);
    let (batch, elements) = invalid_batch(None, s.amplification_bytes);
    let input = batch.len();
    let start = Instant::now();
    sink.send(Message::text(batch)).await?;
    // The answer is one frame (or none, or a close): wait for it, bounded.
    let mut first_answer = None;
    while start.elapsed() < s.answer_wait {
        {
            let t = lock(&tally);
            if t.frames > 0 || t.ended {
                first_answer.get_or_insert(start.elapsed());
            }
        }
        if first_answer.is_some_and(|at| start.elapsed() > at + Duration::from_millis(300)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = lock(&tally).clone();
    let probed = probe(&url, None).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.close()).await;
    drop(sink);
    reader.abort();
    memory.end(&mut a, s.settle).await;
    a.m("input bytes", input as f64, "B");
    a.m("elements", elements as f64, "");
    seen.record(&mut a);
    a.m(
        "answer bytes / input bytes",
        seen.bytes as f64 / input.max(1) as f64,
        "x",
    );
    match first_answer {
        Some(at) => a.m("first answer after", at.as_secs_f64() * 1e3, "ms"),
        None => a.note(format!("no answer within {:?}", s.answer_wait)),
    }
    if let Some(r) = rate_limit {
        a.note(format!(
            "server started with --rate-limit-per-sec {r}; error objects counted over {:?} at most",
            s.answer_wait
        ));
    }
    probe_metrics(&mut a, probed);
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// Many connections that send part of an HTTP request head and never finish it.
async fn half_sent_heads(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("half-sent requests");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let fds_before = fd_count(server.pid).unwrap_or(0);
    let memory = Memory::begin(server.pid)?;
    let fd_sampler = Sampler::start(server.pid, true);
    let addr = server.addr;
    let start = Instant::now();
    let partial = format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: webso");
    let opened: Vec<Result<std::net::TcpStream, BenchError>> =
        futures_util::stream::iter(0..s.half_open)
            .map(|_| {
                let partial = partial.clone();
                async move {
                    let mut stream = raw_connect(addr, Some(OTHER_HOST)).await?;
                    stream.write_all(partial.as_bytes()).await?;
                    // A plain socket from here on: it is only ever peeked at.
                    Ok(stream.into_std()?)
                }
            })
            .buffer_unordered(64)
            .collect()
            .await;
    let open_time = start.elapsed();
    let mut sockets = Vec::new();
    let mut failed = 0u64;
    let mut first_error = None;
    for r in opened {
        match r {
            Ok(sock) => sockets.push(sock),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e.to_string());
            }
        }
    }
    let hold_start = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fds_during = fd_count(server.pid).unwrap_or(0);
    let probed = probe(&url, None).await;
    let mut closed = vec![false; sockets.len()];
    let mut first_close = None;
    let mut closed_at_half = None;
    while hold_start.elapsed() < s.half_open_hold {
        tokio::time::sleep(Duration::from_millis(500)).await;
        for (sock, done) in sockets.iter().zip(closed.iter_mut()) {
            if !*done && closed_by_peer(sock) {
                *done = true;
                first_close.get_or_insert(hold_start.elapsed());
            }
        }
        if closed_at_half.is_none() && hold_start.elapsed() >= s.half_open_hold / 2 {
            closed_at_half = Some(closed.iter().filter(|c| **c).count());
        }
    }
    let closed_count = closed.iter().filter(|c| **c).count();
    let fds_end = fd_count(server.pid).unwrap_or(0);
    drop(sockets);
    let (_, fds_peak) = fd_sampler.finish().await;
    memory.end(&mut a, s.settle).await;
    a.m("requests opened", closed.len() as f64, "");
    a.m("failed to open", failed as f64, "");
    a.m("open time", open_time.as_secs_f64(), "s");
    a.m("server descriptors before", fds_before as f64, "");
    a.m("server descriptors while held", fds_during as f64, "");
    a.m(
        "server descriptors peak",
        fds_peak.max(fds_during) as f64,
        "",
    );
    a.m(
        "server descriptors at the end of the hold",
        fds_end as f64,
        "",
    );
    a.m("held for", s.half_open_hold.as_secs_f64(), "s");
    if let Some(n) = closed_at_half {
        a.m(
            &format!(
                "closed by the server after {:.1} s",
                (s.half_open_hold / 2).as_secs_f64()
            ),
            n as f64,
            "",
        );
    }
    a.m(
        &format!(
            "closed by the server after {:.1} s",
            s.half_open_hold.as_secs_f64()
        ),
        closed_count as f64,
        "",
    );
    if let Some(at) = first_close {
        a.m("first close after", at.as_secs_f64(), "s");
    }
    a.note(format!(
        "from {OTHER_HOST}; the responsiveness probe comes from 127.0.0.1"
    ));
    if let Some(e) = first_error {
        a.note(format!("first failure to open: {e}"));
    }
    probe_metrics(&mut a, probed);
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// SIGTERM while a half-sent request and a non-reading event stream are open.
async fn shutdown(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("shutdown");
    let mut server = env.start(&[]).await?;
    let addr = server.addr;
    let mut half = raw_connect(addr, None).await?;
    half.write_all(format!("GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgr").as_bytes())
        .await?;
    let mut events = raw_connect(addr, None).await?;
    events
        .write_all(format!("GET /admin/events HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    // Long enough for the event stream to start and send a few snapshots.
    tokio::time::sleep(Duration::from_secs(1)).await;
    match server.terminate(s.shutdown_bound).await {
        Some((took, code)) => {
            a.flag("exited after SIGTERM", true);
            a.m("time to exit", took.as_secs_f64(), "s");
            a.m("exit code", code.map_or(-1.0, f64::from), "-1=signal");
        }
        None => {
            a.flag("exited after SIGTERM", false);
            a.note(format!(
                "still running {:?} after SIGTERM: killed with SIGKILL",
                s.shutdown_bound
            ));
        }
    }
    drop((half, events));
    Ok(a)
}

/// Many connections from one address fill every CPU slot with `runaway`; then
/// a newcomer from another address asks for a small `hash_chain`.
async fn cpu_slots(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("cpu slots");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let mut clients = Vec::with_capacity(s.cpu_connections);
    for _ in 0..s.cpu_connections {
        clients.push(RpcClient::connect(&url).await?);
    }
    // A deadline of its own keeps every runaway bounded even if a close is lost.
    let params = json!({"_meta": {"timeoutMs": 60_000}});
    let start = Instant::now();
    let mut pending = FuturesUnordered::new();
    for c in &clients {
        for _ in 0..s.cpu_per_connection {
            pending.push(c.start("runaway", &params)?.wait());
        }
    }
    let sent = pending.len();
    let send_time = start.elapsed();
    // Refusals come back at once; admitted runaways never answer on their own.
    let collect_until = tokio::time::Instant::from_std(start + Duration::from_secs(3));
    let mut first_refusal = None;
    let mut refused = 0u64;
    let mut other_answers = 0u64;
    while let Ok(Some(reply)) = tokio::time::timeout_at(collect_until, pending.next()).await {
        match reply {
            Ok(r) if r.error == Some(-32001) => {
                refused += 1;
                let at = r.at.saturating_duration_since(start);
                first_refusal = Some(first_refusal.map_or(at, |f: Duration| f.min(at)));
            }
            Ok(_) => other_answers += 1,
            Err(_) => break,
        }
    }
    let newcomer = newcomer_hash_chain(&url).await;
    drop(pending);
    for c in clients {
        c.close().await;
    }
    a.m("runaway requests sent", sent as f64, "");
    a.m("send time", send_time.as_secs_f64() * 1e3, "ms");
    a.m("refused (-32001)", refused as f64, "");
    a.m("other answers within 3 s", other_answers as f64, "");
    if let Some(at) = first_refusal {
        a.m("first refusal after", at.as_secs_f64() * 1e3, "ms");
    }
    match newcomer {
        Ok(n) => {
            a.flag("newcomer's hash_chain admitted", n.admitted);
            if let Some(code) = n.code {
                a.m("newcomer's error code", code as f64, "");
            }
            if let Some(ms) = n.retry_after_ms {
                a.m("newcomer's retryAfterMs", ms as f64, "ms");
            }
            a.m(
                "newcomer's answer after",
                n.latency.as_secs_f64() * 1e3,
                "ms",
            );
            if let Some(reason) = n.reason {
                a.note(format!(
                    "the newcomer from {OTHER_HOST} was refused: {reason}"
                ));
            }
        }
        Err(e) => {
            a.flag("newcomer's hash_chain admitted", false);
            a.note(format!("the newcomer from {OTHER_HOST} got no answer: {e}"));
        }
    }
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

struct Newcomer {
    admitted: bool,
    code: Option<i64>,
    reason: Option<String>,
    retry_after_ms: Option<u64>,
    latency: Duration,
}

async fn newcomer_hash_chain(url: &WsUrl) -> Result<Newcomer, BenchError> {
    let mut ws = connect(url, Some(OTHER_HOST), Buffers::Small).await?;
    let start = Instant::now();
    ws.send(Message::text(
        r#"{"jsonrpc":"2.0","id":1,"method":"hash_chain","params":{"seed":1,"rounds":1000}}"#,
    ))
    .await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(msg) = ws.next().await {
            if let Message::Text(t) = msg? {
                let v: Value = serde_json::from_str(t.as_str())?;
                if v.get("id") == Some(&json!(1)) {
                    return Ok(v);
                }
            }
        }
        Err(BenchError::ConnectionClosed)
    })
    .await
    .map_err(|_| BenchError::Timeout("the newcomer's hash_chain (10 s)".into()))??;
    let latency = start.elapsed();
    let _ = ws.close(None).await;
    let error = answer.get("error");
    Ok(Newcomer {
        admitted: error.is_none(),
        code: error.and_then(|e| e.get("code")).and_then(Value::as_i64),
        reason: error.map(|e| {
            let data = e.get("data").cloned().unwrap_or(Value::Null);
            let reason = data.get("reason").and_then(Value::as_str).unwrap_or("?");
            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
            format!("{reason} ({message})")
        }),
        retry_after_ms: error
            .and_then(|e| e.pointer("/data/retryAfterMs"))
            .and_then(Value::as_u64),
        latency,
    })
}

/// Admin requests as a cross-site page or a DNS-rebound host would send them.
async fn cross_site(env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("cross-site");
    let mut server = env.start(&[]).await?;
    let url = WsUrl::parse(&server.url())?;
    let addr = server.addr;
    let port = addr.port();
    let host = addr.to_string();
    // A real task to kill, found the way the dashboard finds it.
    let client = RpcClient::connect(&url).await?;
    let victim = client.start("sleep", &json!({"ms": 30_000}))?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (_, _, body) = http(
        addr,
        &format!("GET /admin/tasks HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap_or_default();
    let task_id = serde_json::from_slice::<Value>(&body).ok().and_then(|v| {
        v.get("tasks")?
            .as_array()?
            .iter()
            .find(|t| t.get("method") == Some(&json!("sleep")))?
            .get("id")?
            .as_u64()
    });
    let task_id = match task_id {
        Some(id) => id,
        None => {
            a.note("the sleep task was not listed by GET /admin/tasks: killing id 1");
            1
        }
    };
    let (kill, _, _) = http(
        addr,
        &format!(
            "POST /admin/tasks/{task_id}/kill HTTP/1.1\r\nHost: {host}\r\n\
             Origin: http://evil.example\r\nSec-Fetch-Site: cross-site\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        ),
    )
    .await
    .unwrap_or_default();
    let killed = matches!(
        tokio::time::timeout(Duration::from_secs(2), victim.wait()).await,
        Ok(Ok(r)) if r.error == Some(-32004)
    );
    client.close().await;
    let evil = format!("evil.example:{port}");
    let (tasks, _, _) = http(
        addr,
        &format!("GET /admin/tasks HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap_or_default();
    let (metrics, _, _) = http(
        addr,
        &format!("GET /metrics HTTP/1.1\r\nHost: {evil}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap_or_default();
    let upgrade = raw_upgrade(addr, None, &evil, &format!("Origin: http://{evil}\r\n"))
        .await
        .map_or(0, |(_, status, _)| status);
    let (_, headers, _) = http(
        addr,
        &format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"),
    )
    .await
    .unwrap_or_default();
    let header = |name: &str| {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    let frame_ancestors = header("content-security-policy")
        .iter()
        .any(|v| v.to_ascii_lowercase().contains("frame-ancestors"));
    // A status of 0: the server closed without answering (a refusal too).
    a.m("cross-site POST kill: status", f64::from(kill), "HTTP");
    a.flag("cross-site POST kill: the task was killed", killed);
    a.m(
        "GET /admin/tasks, Host evil.example: status",
        f64::from(tasks),
        "HTTP",
    );
    a.m(
        "GET /metrics, Host evil.example: status",
        f64::from(metrics),
        "HTTP",
    );
    a.m(
        "/ws upgrade, Host evil.example: status",
        f64::from(upgrade),
        "HTTP",
    );
    a.flag("frame-ancestors on /", frame_ancestors);
    a.flag(
        "X-Frame-Options on /",
        !header("x-frame-options").is_empty(),
    );
    alive_metric(&mut a, &mut server);
    server.stop().await;
    Ok(a)
}

/// Crash messages with a newline and with 1 MB of text, against the log.
async fn log_injection(s: &Settings, env: &Env<'_>) -> Result<Attack, BenchError> {
    let mut a = Attack::new("log injection");
    let log = std::env::temp_dir().join(format!(
        "taskwire-bench-hostile-{}-stderr.log",
        std::process::id()
    ));
    let mut server = env
        .start_to(&["--log", "info"], StderrTo::File(log.clone()))
        .await?;
    let url = WsUrl::parse(&server.url())?;
    let client = RpcClient::connect(&url).await?;
    let forged = client.start("crash", &json!({"message": "x\nFORGED"}))?;
    let long = client.start(
        "crash",
        &json!({"message": "L".repeat(s.log_message_bytes)}),
    )?;
    let bound = Duration::from_secs(10);
    let forged = tokio::time::timeout(bound, forged.wait()).await;
    let long = tokio::time::timeout(bound, long.wait()).await;
    client.close().await;
    // Give the log writer a moment, then end the server so the file is complete.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alive_metric(&mut a, &mut server);
    server.stop().await;
    let text = std::fs::read(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let scan = scan_log(&text);
    for (label, reply) in [("newline crash", forged), ("1 MB crash", long)] {
        match reply {
            Ok(Ok(r)) => a.m(
                &format!("{label}: error code"),
                r.error.map_or(0.0, |c| c as f64),
                "0=result",
            ),
            _ => a.note(format!("{label}: no answer within {bound:?}")),
        }
    }
    a.flag("forged line in the log", scan.forged);
    a.m("longest log line", scan.longest as f64, "B");
    a.m("log bytes", text.len() as f64, "B");
    a.m("log lines", scan.lines as f64, "");
    Ok(a)
}

/// "RSS after" of every memory attack, side by side.
fn memory_after(attacks: &[Attack]) -> Attack {
    let mut a = Attack::new("memory after");
    for src in attacks {
        if let (Some(before), Some(after)) = (src.get("RSS before"), src.get("RSS after")) {
            a.m(&format!("{}: retained", src.name), after - before, "MiB");
        }
    }
    a
}

// ---------------------------------------------------------------------------
// Raw sockets: HTTP by hand and WebSocket frames by hand.

async fn raw_connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Result<TcpStream, BenchError> {
    if !is_allowed_ip(addr.ip()) {
        return Err(BenchError::NonLoopback(addr.to_string()));
    }
    let socket = TcpSocket::new_v4()?;
    if let Some(ip) = source {
        if !is_allowed_ip(IpAddr::V4(ip)) {
            return Err(BenchError::NonLoopback(ip.to_string()));
        }
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    tokio::time::timeout(Duration::from_secs(10), socket.connect(addr))
        .await
        .map_err(|_| BenchError::Timeout(format!("connecting to {addr}")))?
        .map_err(BenchError::from)
}

/// Whether the server closed (or reset) this socket, or answered on it (a
/// server answers a request it will not finish only to end it: 408 and the like).
fn closed_by_peer(sock: &std::net::TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match sock.peek(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// An HTTP head's headers, in order, as sent.
type Headers = Vec<(String, String)>;

/// One HTTP request (the caller writes `Connection: close`): status, headers
/// and body (read to the end, at most 4 MiB, within 5 s).
async fn http(addr: SocketAddr, request: &str) -> Result<(u16, Headers, Vec<u8>), BenchError> {
    let mut stream = raw_connect(addr, None).await?;
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let read = async {
        let mut chunk = [0u8; 16 << 10];
        while buf.len() < 4 << 20 {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), read).await;
    let (status, headers, body_at) = parse_head(&buf)
        .ok_or_else(|| BenchError::Protocol(format!("no HTTP answer to {request:.40?}")))?;
    Ok((status, headers, buf[body_at..].to_vec()))
}

/// A WebSocket upgrade by hand: the stream, the status, and any bytes read past the head.
async fn raw_upgrade(
    addr: SocketAddr,
    source: Option<Ipv4Addr>,
    host: &str,
    extra_headers: &str,
) -> Result<(TcpStream, u16, Vec<u8>), BenchError> {
    let mut stream = raw_connect(addr, source).await?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n{extra_headers}\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut buf = Vec::new();
    let head = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(parsed) = parse_head(&buf) {
                return Ok(parsed);
            }
            if buf.len() > 64 << 10 {
                return Err(BenchError::Protocol("an HTTP head over 64 KiB".into()));
            }
            match stream.read(&mut chunk).await? {
                0 => return Err(BenchError::ConnectionClosed),
                n => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .map_err(|_| BenchError::Timeout("the upgrade's answer (5 s)".into()))??;
    let (status, _, body_at) = head;
    let leftover = buf[body_at..].to_vec();
    Ok((stream, status, leftover))
}

/// Parses an HTTP response head: status, headers, and where the body starts.
fn parse_head(buf: &[u8]) -> Option<(u16, Headers, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Some((status, headers, end + 4))
}

/// A client-to-server frame (always masked, as the protocol requires of clients).
fn masked_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push(0x80 | (opcode & 0x0f));
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= usize::from(u16::MAX) => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// One server-to-client frame at the start of `buf`: (opcode, payload, length
/// of the whole frame), or `None` when `buf` does not hold a whole frame yet.
fn parse_frame(buf: &[u8]) -> Option<(u8, &[u8], usize)> {
    let opcode = buf.first()? & 0x0f;
    let second = *buf.get(1)?;
    let masked = second & 0x80 != 0;
    let (len, mut at): (u64, usize) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => {
            let bytes: [u8; 8] = buf.get(2..10)?.try_into().ok()?;
            (u64::from_be_bytes(bytes), 10)
        }
        n => (u64::from(n), 2),
    };
    if masked {
        at += 4;
    }
    let len = usize::try_from(len).ok()?;
    let end = at.checked_add(len)?;
    let payload = buf.get(at..end)?;
    Some((opcode, payload, end))
}

/// Reads server frames for up to `bound` (or `max_bytes`): (pongs, close code, bytes read).
async fn read_server_frames(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    bound: Duration,
    max_bytes: usize,
) -> (u64, Option<u16>, usize) {
    let mut pongs = 0u64;
    let mut close = None;
    let mut total = buf.len();
    let deadline = tokio::time::Instant::now() + bound;
    let mut chunk = vec![0u8; 64 << 10];
    'reading: loop {
        let mut consumed = 0;
        while let Some((opcode, payload, len)) = parse_frame(&buf[consumed..]) {
            match opcode {
                0xA => pongs += 1,
                0x8 => {
                    close = Some(match payload {
                        [hi, lo, ..] => u16::from_be_bytes([*hi, *lo]),
                        _ => 1005,
                    });
                    break 'reading;
                }
                _ => {}
            }
            consumed += len;
        }
        buf.drain(..consumed);
        if total >= max_bytes {
            break;
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => {
                total += n;
                buf.extend_from_slice(&chunk[..n]);
            }
            _ => break,
        }
    }
    (pongs, close, total)
}

/// What the server's log shows after the crashes.
#[derive(Debug, PartialEq, Eq)]
struct LogScan {
    /// A line begins with the text the client put after its newline.
    forged: bool,
    longest: usize,
    lines: usize,
}

fn scan_log(text: &[u8]) -> LogScan {
    let mut scan = LogScan {
        forged: false,
        longest: 0,
        lines: 0,
    };
    for line in text.split(|b| *b == b'\n') {
        if line.is_empty() {
            continue;
        }
        scan.lines += 1;
        scan.longest = scan.longest.max(line.len());
        if strip_ansi(line).starts_with(b"FORGED") {
            scan.forged = true;
        }
    }
    scan
}

/// Drops ANSI escape sequences (`ESC [ ... letter`), which a coloured log puts
/// in front of a line.
fn strip_ansi(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len());
    let mut i = 0;
    while i < line.len() {
        if line[i] == 0x1b && line.get(i + 1) == Some(&b'[') {
            i += 2;
            while i < line.len() && !line[i].is_ascii_alphabetic() {
                i += 1;
            }
            i += 1;
        } else {
            out.push(line[i]);
            i += 1;
        }
    }
    out
}

/// The table of `docs/BENCHMARKS.md`'s "Hostile clients" section: one row per
/// figure, a column for `before` and one for `after` (empty until rerun).
pub fn before_after_table(before: &Report, after: Option<&Report>) -> String {
    use std::fmt::Write as _;
    let attacks = |r: &Report| -> Vec<Attack> {
        r.targets
            .iter()
            .find(|t| t.status == Status::Ok)
            .and_then(|t| serde_json::from_value(t.series.clone()).ok())
            .unwrap_or_default()
    };
    let (b, a) = (attacks(before), after.map(attacks).unwrap_or_default());
    let mut out = String::new();
    let after_date = after.map_or("(rerun after the fix)".to_string(), |r| r.date_utc.clone());
    let _ = writeln!(
        out,
        "| attack | figure | before ({}) | after {} |",
        before.date_utc, after_date
    );
    out.push_str("|---|---|---:|---:|\n");
    let cell = |v: Option<f64>| v.map_or("–".to_string(), crate::report::fmt_num);
    for attack in &b {
        let other = a.iter().find(|x| x.name == attack.name);
        if let Some(why) = &attack.failed {
            let _ = writeln!(out, "| {} | not measured: {why} | | |", attack.name);
        }
        for m in &attack.metrics {
            let label = label(m);
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} |",
                attack.name,
                label,
                cell(Some(m.value)),
                cell(other.and_then(|o| o.get(&m.name)))
            );
        }
    }
    // Figures only the rerun has (a new close code, a refusal count).
    for attack in &a {
        let known = b.iter().find(|x| x.name == attack.name);
        for m in &attack.metrics {
            if known.and_then(|k| k.get(&m.name)).is_none() {
                let _ = writeln!(
                    out,
                    "| {} | {} | – | {} |",
                    attack.name,
                    label(m),
                    crate::report::fmt_num(m.value)
                );
            }
        }
    }
    out
}

fn label(m: &Metric) -> String {
    if m.unit.is_empty() {
        m.name.clone()
    } else {
        format!("{} ({})", m.name, m.unit)
    }
}

/// Reads a hostile report from `path`.
pub fn read_report(path: &Path) -> Result<Report, BenchError> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_batches_stay_under_their_size() {
        let (b, n) = invalid_batch(None, 100);
        assert!(b.len() <= 100, "{}", b.len());
        assert_eq!(n, 49);
        let v: Value = serde_json::from_str(&b).unwrap_or_default();
        assert_eq!(v.as_array().map(Vec::len), Some(n));
        let (b, n) = invalid_batch(Some(r#"{"jsonrpc":"2.0","id":1,"method":"sleep"}"#), 1000);
        assert!(b.len() <= 1000);
        let v: Value = serde_json::from_str(&b).unwrap_or_default();
        assert_eq!(v[0]["method"], "sleep");
        assert_eq!(v.as_array().map(Vec::len), Some(n));
        let (b, n) = invalid_batch(None, NEAR_MAX_FRAME);
        assert!(b.len() <= NEAR_MAX_FRAME && n > 450_000);
    }

    #[test]
    fn frames_round_trip() {
        let frame = masked_frame(0x9, b"hello", [1, 2, 3, 4]);
        assert_eq!(frame[0], 0x89);
        assert_eq!(frame[1], 0x80 | 5);
        let (op, payload, len) = parse_frame(&frame).unwrap_or((0, &[], 0));
        assert_eq!((op, len), (0x9, frame.len()));
        let unmasked: Vec<u8> = payload
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
            .collect();
        assert_eq!(unmasked, b"hello");
        // Server frames are unmasked; 16- and 64-bit lengths; partial frames wait.
        let mut long = vec![0x8a, 126, 0x01, 0x00];
        long.extend(vec![b'x'; 256]);
        assert_eq!(
            parse_frame(&long).map(|(o, p, l)| (o, p.len(), l)),
            Some((0xA, 256, 260))
        );
        assert!(parse_frame(&long[..100]).is_none());
        assert!(parse_frame(&[0x88]).is_none());
        let close = [0x88, 2, 0x03, 0xf0];
        assert_eq!(
            parse_frame(&close).map(|(o, p, _)| (o, p.to_vec())),
            Some((0x8, vec![0x03, 0xf0]))
        );
        let big = masked_frame(0x1, &[0u8; 70_000], [0; 4]);
        assert_eq!(big[1], 0x80 | 127);
        assert_eq!(
            parse_frame(&big).map(|(_, p, l)| (p.len(), l)),
            Some((70_000, big.len()))
        );
    }

    #[test]
    fn heads_parse() {
        let raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX: a:b\r\n\r\nrest";
        let (status, headers, at) = parse_head(raw).unwrap_or((0, vec![], 0));
        assert_eq!(status, 101);
        assert_eq!(headers[1], ("X".to_string(), "a:b".to_string()));
        assert_eq!(&raw[at..], b"rest");
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n").is_none());
        assert!(parse_head(b"garbage\r\n\r\n").is_none());
    }

    #[test]
    fn tallies_count_error_objects() {
        let mut t = Tally::default();
        t.add_text(r#"[{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"x"}},{"jsonrpc":"2.0","id":1,"result":{}}]"#);
        t.add_text(
            r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32600,"message":"batch too large"}}"#,
        );
        t.add_text(r#"{"jsonrpc":"2.0","method":"$/progress","params":{}}"#);
        t.add_text("not json");
        assert_eq!(t.frames, 4);
        assert_eq!(t.arrays, 1);
        assert_eq!(t.errors_with(-32600), 2);
        assert_eq!(t.error_objects(), 2);
        assert_eq!(t.results, 1);
        assert_eq!(t.unparsed, 1);
    }

    #[test]
    fn log_scans_find_forged_lines() {
        let log = b"\x1b[2m2026\x1b[0m  WARN panic: x\nFORGED\nshort\n";
        assert_eq!(
            scan_log(log),
            LogScan {
                forged: true,
                longest: log
                    .split(|b| *b == b'\n')
                    .map(<[u8]>::len)
                    .max()
                    .unwrap_or(0),
                lines: 3
            }
        );
        let escaped = b"WARN panic: x\\nFORGED\n";
        assert!(!scan_log(escaped).forged);
        assert!(scan_log(b"\x1b[32mFORGED at the start\n").forged);
    }

    #[test]
    fn the_table_has_an_after_column() {
        let mut a = Attack::new("batch");
        a.m("RSS peak", 300.0, "MiB");
        let mut t = TargetReport::ok("taskwire");
        t.series = serde_json::to_value(vec![a.clone()]).unwrap_or_default();
        let report = Report {
            scenario: "hostile".into(),
            command: "x".into(),
            date_utc: "2026-11-26T00:00:00Z".into(),
            unix_time: 0,
            machine: crate::procfs::machine(),
            settings: serde_json::Map::new(),
            targets: vec![t],
            comparisons: vec![],
            notes: vec![],
        };
        let table = before_after_table(&report, None);
        assert!(
            table.contains("| batch | RSS peak (MiB) | 300 | – |"),
            "{table}"
        );
        let mut later = report.clone();
        let mut b = a;
        b.metrics[0].value = 20.0;
        b.m("close code", 1008.0, "");
        later.targets[0].series = serde_json::to_value(vec![b]).unwrap_or_default();
        let table = before_after_table(&report, Some(&later));
        assert!(
            table.contains("| batch | RSS peak (MiB) | 300 | 20 |"),
            "{table}"
        );
        assert!(
            table.contains("| batch | close code | – | 1008 |"),
            "{table}"
        );
    }
}
