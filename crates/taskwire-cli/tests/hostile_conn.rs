//! One hostile WebSocket against the `taskwire` binary run as a process, so
//! that its resident memory is the server's own: every attack's growth stays
//! under the per-connection worst case that docs/SECURITY.md states, and every
//! bad frame gets the close code or error the protocol names.
//!
//! The client is a raw WebSocket over a `TcpStream` (handshake by hand,
//! frames built by hand), so that it can do what no client library lets it:
//! send broken frames, never read, flood pings.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A process's resident memory in KiB, from /proc (as the bench's `procfs`
/// reads it, which the bench crate keeps private).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// docs/SECURITY.md: the most one connection can make the server hold at the
/// default settings, in KiB.
const PER_CONNECTION_WORST_KIB: u64 = 24 << 10;

/// How long any wait in these tests may take before it counts as a failure:
/// generous, as the machine is shared.
const WAIT: Duration = Duration::from_secs(30);

/// A `taskwire serve` process, killed when dropped.
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(flags: &[&str]) -> Server {
        Self::start_with(flags, Stdio::null())
    }

    fn start_with(flags: &[&str], stderr: Stdio) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_taskwire"))
            // `--demo`: the attacks use `crash` (a panic message a client controls).
            .args(["serve", "--addr", "127.0.0.1:0", "--workers", "1", "--demo"])
            .args(flags)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("the taskwire binary starts");
        let (addr, _) = common::listening_addr(&mut child);
        Server { child, addr }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id()).expect("the server's VmRSS")
    }

    /// Open WebSocket connections, from the admin API (loopback needs no token).
    fn connections(&self) -> u64 {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET /admin/stats HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        // A chunked body holds the JSON object between its chunk sizes.
        let json = body
            .find('{')
            .and_then(|a| body.rfind('}').map(|b| &body[a..=b]))
            .unwrap_or("{}");
        serde_json::from_str::<Value>(json).unwrap()["connections"]
            .as_u64()
            .unwrap_or(u64::MAX)
    }

    /// Waits (bounded) until no WebSocket is open.
    fn wait_no_connections(&self) -> bool {
        let end = Instant::now() + WAIT;
        while Instant::now() < end {
            if self.connections() == 0 {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// A well-behaved client's round trip: the server still serves.
    fn alive(&self) {
        let mut c = Raw::connect(self.addr);
        c.text(r#"{"jsonrpc":"2.0","id":"alive","method":"echo","params":{"value":1}}"#);
        assert_eq!(c.json()["result"], 1);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw WebSocket client.
struct Raw {
    s: TcpStream,
    buf: Vec<u8>,
}

/// A server frame: opcode and payload.
type Frame = (u8, Vec<u8>);

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_nodelay(true).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        write!(
            s,
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            s.read_exact(&mut byte).unwrap();
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        Raw { s, buf: Vec::new() }
    }

    /// A frame as a client sends it: `first` is FIN, RSV and opcode.
    fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
        let mut f = vec![first];
        let m = if masked { 0x80 } else { 0 };
        match payload.len() {
            n if n < 126 => f.push(m | n as u8),
            n if n <= 0xffff => {
                f.push(m | 126);
                f.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                f.push(m | 127);
                f.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        if masked {
            let mask = [0x37u8, 0xfa, 0x21, 0x3d];
            f.extend_from_slice(&mask);
            f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        } else {
            f.extend_from_slice(payload);
        }
        f
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.s.write_all(bytes)
    }

    fn text(&mut self, t: &str) {
        self.write(&Self::frame(0x81, t.as_bytes(), true)).unwrap();
    }

    /// The next whole frame from the server; `None` at the end of the stream.
    fn next(&mut self) -> Option<Frame> {
        loop {
            if let Some((frame, used)) = parse(&self.buf) {
                self.buf.drain(..used);
                return Some(frame);
            }
            let mut chunk = [0u8; 64 << 10];
            match self.s.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next text frame (skipping pings and pongs), as JSON, with its size.
    fn text_frame(&mut self) -> (Value, usize) {
        loop {
            match self.next() {
                Some((0x1, p)) => return (serde_json::from_slice(&p).unwrap(), p.len()),
                Some((0x8, p)) => panic!("closed: {p:?}"),
                Some(_) => continue,
                None => panic!("the stream ended"),
            }
        }
    }

    fn json(&mut self) -> Value {
        self.text_frame().0
    }

    /// Reads to the close frame and returns its code.
    fn close_code(&mut self) -> Option<u16> {
        loop {
            match self.next()? {
                (0x8, p) if p.len() >= 2 => return Some(u16::from_be_bytes([p[0], p[1]])),
                (0x8, _) => return None,
                _ => continue,
            }
        }
    }
}

/// One unmasked server frame from the front of `buf`, and the bytes it took.
fn parse(buf: &[u8]) -> Option<(Frame, usize)> {
    let b0 = *buf.first()?;
    let b1 = *buf.get(1)?;
    let (len, start) = match b1 & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(buf.get(2..10)?);
            (u64::from_be_bytes(b) as usize, 10)
        }
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?;
    Some(((b0 & 0x0f, payload.to_vec()), start + len))
}

/// Samples the server's RSS while `attack` runs; returns the highest growth
/// over `before`, in KiB.
fn peak_growth(server: &Server, before: u64, attack: impl FnOnce() + Send) -> u64 {
    let done = std::sync::atomic::AtomicBool::new(false);
    let mut peak = before;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            attack();
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        while !done.load(std::sync::atomic::Ordering::Relaxed) {
            peak = peak.max(server.rss_kib());
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    let growth = peak.max(server.rss_kib()).saturating_sub(before);
    eprintln!("RSS {before} KiB before, peak growth {growth} KiB");
    growth
}

/// The RSS of a server that has served one ordinary connection: the baseline.
fn warm(server: &Server) -> u64 {
    server.alive();
    assert!(server.wait_no_connections());
    server.rss_kib()
}

/// Batches that each hold one long task and a batch's worth of quick answers
/// with large results (`rpc.discover`) and of invalid elements: their answers
/// are kept against the outbound budget, every element holds an in-flight
/// place, and a batch longer than `max_batch` runs nothing.
#[test]
fn batches_holding_a_long_task_pin_bounded_memory() {
    let server = Server::start(&["--max-inflight", "1024"]);
    let before = warm(&server);
    let mut c = Raw::connect(server.addr);
    let growth = peak_growth(&server, before, || {
        let mut c = Raw::connect(server.addr);
        for k in 0..40 {
            let mut elems = vec![json!({"jsonrpc":"2.0","id":format!("s{k}"),"method":"sleep","params":{"ms":20_000}}).to_string()];
            for i in 0..150 {
                elems.push(json!({"jsonrpc":"2.0","id":i,"method":"rpc.discover"}).to_string());
            }
            elems.extend(std::iter::repeat_n("{}".to_string(), 105));
            c.text(&format!("[{}]", elems.join(",")));
        }
        // Half a million elements in one frame: counted, not kept, one error.
        let huge = format!("[{}]", vec!["{}"; 300_000].join(","));
        c.write(&Raw::frame(0x81, huge.as_bytes(), true)).unwrap();
        // Hold everything for a while without reading.
        std::thread::sleep(Duration::from_secs(2));
        drop(c);
    });
    assert!(
        growth < PER_CONNECTION_WORST_KIB,
        "RSS grew {growth} KiB, documented worst case {PER_CONNECTION_WORST_KIB} KiB"
    );
    // The in-flight limit counts batch elements: a batch of 1024 places'
    // worth leaves none for the next request.
    for k in 0..4 {
        let mut elems = vec![json!({"jsonrpc":"2.0","id":format!("long{k}"),"method":"sleep","params":{"ms":20_000}}).to_string()];
        elems.extend(std::iter::repeat_n("{}".to_string(), 255));
        c.text(&format!("[{}]", elems.join(",")));
    }
    c.text(r#"{"jsonrpc":"2.0","id":"next","method":"echo","params":{"value":1}}"#);
    let m = c.json();
    assert_eq!(m["id"], "next", "{}", m.to_string().len());
    assert_eq!(m["error"]["code"], -32001);
    assert_eq!(m["error"]["data"]["reason"], "connection_inflight");
    drop(c);
    assert!(server.wait_no_connections());
    server.alive();
}

/// A client that floods WebSocket pings without reading is closed with 1008;
/// with the ping rate lifted, the capped write buffer bounds what its pongs
/// can pin, and the heartbeat's blocked write closes it as a slow consumer.
#[test]
fn a_ping_flood_is_closed_and_bounded() {
    let server = Server::start(&[]);
    let mut c = Raw::connect(server.addr);
    let flood: Vec<u8> = (0..200)
        .flat_map(|_| Raw::frame(0x89, b"ping", true))
        .collect();
    c.write(&flood).unwrap();
    assert_eq!(c.close_code(), Some(1008));
    // A client's own pings are no heartbeat answer; two missed pings close
    // with 1001 even while it keeps pinging (slower than the limit).
    drop(server);
    let server = Server::start(&["--ping-interval-ms", "200"]);
    let mut c = Raw::connect(server.addr);
    let mut code = None;
    c.s.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    // About 6 pings a second, under the limit of 10; bounded in count.
    'pinging: for _ in 0..200 {
        if c.write(&Raw::frame(0x89, b"x", true)).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(150));
        // Whatever arrived meanwhile (pongs, the server's pings, a close).
        while let Some((op, p)) = c.next() {
            if op == 0x8 {
                code = (p.len() >= 2).then(|| u16::from_be_bytes([p[0], p[1]]));
                break 'pinging;
            }
        }
    }
    assert_eq!(code, Some(1001));

    drop(server);
    let server = Server::start(&[
        "--ping-rate-per-sec",
        "100000000",
        "--ping-rate-burst",
        "100000000",
        "--ping-interval-ms",
        "300",
        "--write-timeout-ms",
        "1000",
    ]);
    let before = warm(&server);
    let growth = peak_growth(&server, before, || {
        let mut c = Raw::connect(server.addr);
        let ping = Raw::frame(0x89, &[b'p'; 125], true);
        let chunk: Vec<u8> = ping
            .iter()
            .copied()
            .cycle()
            .take(ping.len() * 512)
            .collect();
        // 512 MiB of pings at most, or until the server closes the connection.
        for _ in 0..8192 {
            if c.write(&chunk).is_err() {
                break;
            }
        }
    });
    assert!(server.wait_no_connections(), "closed as a slow consumer");
    assert!(
        growth < PER_CONNECTION_WORST_KIB,
        "RSS grew {growth} KiB under a ping flood"
    );
    server.alive();
}

/// Ids and progress tokens are short: a megabyte id is refused with id null
/// and costs nothing while a request runs.
#[test]
fn huge_ids_and_tokens_are_refused() {
    let server = Server::start(&[]);
    let before = warm(&server);
    let big = "i".repeat(1_000_000);
    let mut c = Raw::connect(server.addr);
    let growth = peak_growth(&server, before, || {
        let mut c = Raw::connect(server.addr);
        for _ in 0..64 {
            let req = json!({"jsonrpc":"2.0","id":&big,"method":"sleep","params":{"ms":10_000}});
            c.write(&Raw::frame(0x81, req.to_string().as_bytes(), true))
                .unwrap();
            let (m, len) = c.text_frame();
            assert_eq!(
                (m["id"].clone(), m["error"]["code"].clone()),
                (Value::Null, json!(-32600))
            );
            assert!(len < 256, "{len}");
        }
    });
    assert!(growth < PER_CONNECTION_WORST_KIB, "RSS grew {growth} KiB");
    let token = "t".repeat(900_000);
    let req = json!({"jsonrpc":"2.0","id":1,"method":"sleep","params":{"ms":1,"_meta":{"progressToken":token}}});
    c.write(&Raw::frame(0x81, req.to_string().as_bytes(), true))
        .unwrap();
    let (m, len) = c.text_frame();
    assert_eq!(
        (m["id"].clone(), m["error"]["code"].clone()),
        (json!(1), json!(-32602))
    );
    assert!(len < 256, "{len}");
    let long_id = "x".repeat(257);
    c.text(&json!({"jsonrpc":"2.0","id":long_id,"method":"echo","params":{"value":1}}).to_string());
    assert_eq!(c.json()["id"], Value::Null);
    let id = "x".repeat(256);
    c.text(&json!({"jsonrpc":"2.0","id":id,"method":"echo","params":{"value":1}}).to_string());
    assert_eq!(c.json()["id"], id.as_str());
}

/// Error answers stay within a constant factor of what was sent, and a
/// rate limit counts invalid elements before answering them.
#[test]
fn error_answers_are_bounded() {
    let server = Server::start(&[]);
    let mut c = Raw::connect(server.addr);
    // A megabyte of invalid elements: one error.
    let huge = format!("[{}]", vec!["1"; 500_000].join(","));
    c.write(&Raw::frame(0x81, huge.as_bytes(), true)).unwrap();
    let (m, len) = c.text_frame();
    assert_eq!(
        (m["id"].clone(), m["error"]["code"].clone()),
        (Value::Null, json!(-32600))
    );
    assert!(len < 256, "{len}");
    // The worst ratio: a full batch of the smallest invalid elements.
    for elem in ["1", "{}", "[]", r#"{"foo":"boo"}"#, r#"{"id":[1]}"#] {
        let text = format!("[{}]", vec![elem; 256].join(","));
        c.text(&text);
        let (m, len) = c.text_frame();
        let arr = m.as_array().expect("an array");
        assert_eq!(arr.len(), 256);
        assert!(arr
            .iter()
            .all(|e| e["error"]["code"] == -32600 && e["id"].is_null()));
        assert!(
            len <= 56 * text.len() && len <= 40 << 10,
            "{elem}: {len} bytes answer {} bytes",
            text.len()
        );
    }
    drop(c);

    // With a rate limit, invalid elements are counted before they are
    // answered: a flood of batches gets one error per frame once the bucket
    // is empty.
    drop(server);
    let server = Server::start(&["--rate-limit-per-sec", "10", "--rate-limit-burst", "10"]);
    let mut c = Raw::connect(server.addr);
    let batch = format!("[{}]", vec!["{}"; 256].join(","));
    let frames = 200;
    let started = Instant::now();
    let mut errors = 0usize;
    for _ in 0..frames {
        c.text(&batch);
    }
    for _ in 0..frames {
        let m = c.json();
        errors += m.as_array().map_or(1, Vec::len);
    }
    let secs = started.elapsed().as_secs() as usize + 1;
    // The burst and what refills meanwhile are answered element by element
    // (up to a batch per token); every other frame gets a single error.
    assert!(
        errors <= frames + 256 * (10 + 10 * secs),
        "{errors} error objects for {frames} frames in {secs} s"
    );
}

/// What a client sends never forges a log line nor makes a huge one.
#[test]
fn client_text_cannot_forge_log_lines() {
    let log = std::env::temp_dir().join(format!("taskwire-hostile-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let server = Server::start_with(&["--log", "info"], Stdio::from(file));
    let mut c = Raw::connect(server.addr);
    let forged = "boom\n2026-11-26T00:00:00.000000Z  INFO taskwire: FORGED admin logged in";
    c.text(
        &json!({"jsonrpc":"2.0","id":1,"method":"crash","params":{"message":forged}}).to_string(),
    );
    assert_eq!(c.json()["error"]["code"], -32003);
    let big = "m".repeat(1_000_000);
    let req = json!({"jsonrpc":"2.0","id":2,"method":"crash","params":{"message":big}});
    c.write(&Raw::frame(0x81, req.to_string().as_bytes(), true))
        .unwrap();
    assert_eq!(c.json()["error"]["code"], -32003);
    drop(c);
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("task crashed: boom"), "{text}");
    for line in text.lines() {
        assert!(!line.starts_with("2026-11-26T00:00:00"), "forged: {line}");
        assert!(line.len() < 4096, "a line of {} bytes", line.len());
    }
}

/// Each bad frame closes with the code the protocol names.
#[test]
fn bad_frames_close_with_their_codes() {
    let server = Server::start(&[]);
    // (A frame over the size limit closes with 1009: tests/protocol.rs; here
    // the server's close would race the rest of the frame being written.)
    let cases: [(&str, Vec<u8>, u16); 4] = [
        ("unmasked", Raw::frame(0x81, b"{}", false), 1002),
        ("reserved opcode", Raw::frame(0x83, b"{}", true), 1002),
        ("reserved bits", Raw::frame(0xc1, b"{}", true), 1002),
        (
            "not UTF-8",
            Raw::frame(0x81, &[b'"', 0xff, 0xfe, b'"'], true),
            1007,
        ),
    ];
    for (what, frame, code) in cases {
        let mut c = Raw::connect(server.addr);
        c.write(&frame).unwrap();
        assert_eq!(c.close_code(), Some(code), "{what}");
    }
    // A binary frame is answered, not closed.
    let mut c = Raw::connect(server.addr);
    c.write(&Raw::frame(0x82, b"\x01\x02", true)).unwrap();
    assert_eq!(c.json()["error"]["code"], -32600);
    c.text(r#"{"jsonrpc":"2.0","id":"p","method":"$/ping"}"#);
    assert_eq!(c.json()["result"], json!({}));
    c.text(r#"{"foo":"boo"}"#);
    let m = c.json();
    assert_eq!(
        (m["id"].clone(), m["error"]["code"].clone()),
        (Value::Null, json!(-32600))
    );
    server.alive();
}
