//! Hardening end to end: origin check, client tokens and their limits, TLS,
//! rate limits, connections per IP, slow consumers, heartbeats, configuration.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use taskwire::config::{AuthToken, Settings};
use taskwire::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// Tries an upgrade with extra headers: Ok(client) or Err(HTTP status).
async fn try_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, u16> {
    upgrade_with(addr, path, headers)
        .await
        .map_err(|(status, _)| status)
}

/// Retries an upgrade until it is accepted (a released slot is seen a moment
/// after the client closed).
async fn connect_eventually(addr: SocketAddr, path: &str) -> Client {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        match try_connect(addr, path, &[]).await {
            Ok(c) => return c,
            Err(status) => assert!(tokio::time::Instant::now() < end, "still refused: {status}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn alive(c: &mut Client) {
    assert_eq!(
        c.call("alive", "echo", json!({"value": 1})).await["result"],
        1
    );
}

async fn live_tasks(addr: SocketAddr) -> usize {
    admin_json(addr, "GET", "/admin/tasks").await["tasks"]
        .as_array()
        .map(|a| a.len())
        .unwrap_or(usize::MAX)
}

async fn open_connections(addr: SocketAddr) -> u64 {
    admin_json(addr, "GET", "/admin/stats").await["connections"]
        .as_u64()
        .unwrap_or(u64::MAX)
}

/// The client side of the WebSocket handshake, by hand.
async fn raw_handshake(s: &mut tokio::net::TcpStream, addr: SocketAddr) {
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
}

/// One client text frame (masked, as RFC 6455 requires of clients).
fn masked_text_frame(text: &str) -> Vec<u8> {
    assert!(text.len() < 126);
    let mask = [0x12u8, 0x34, 0x56, 0x78];
    let mut f = vec![0x81, 0x80 | text.len() as u8];
    f.extend_from_slice(&mask);
    f.extend(text.bytes().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

/// The (opcode, payload) of each unmasked server frame in `buf`.
fn server_frames(buf: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, start) = match buf[i + 1] & 0x7f {
            126 if i + 4 <= buf.len() => {
                (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, i + 4)
            }
            127 if i + 10 <= buf.len() => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&buf[i + 2..i + 10]);
                (u64::from_be_bytes(b) as usize, i + 10)
            }
            n if n < 126 => (n as usize, i + 2),
            _ => break,
        };
        let Some(payload) = buf.get(start..start + len) else {
            break;
        };
        out.push((op, payload.to_vec()));
        i = start + len;
    }
    out
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    proc_status("VmRSS")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_is_checked_before_the_upgrade() {
    let s = TestServer::start(config()).await;
    let host = s.addr.to_string();
    // A page of another site: cross-site WebSocket hijacking, refused.
    assert_eq!(
        try_connect(s.addr, "/ws", &[("Origin", "http://evil.example")])
            .await
            .err(),
        Some(403)
    );
    // Same host and port (the dashboard), but not another port of it.
    let same = format!("http://{host}");
    alive(
        &mut try_connect(s.addr, "/ws", &[("Origin", &same)])
            .await
            .unwrap(),
    )
    .await;
    let other_port = format!("http://127.0.0.1:{}", s.addr.port().wrapping_add(1));
    assert_eq!(
        try_connect(s.addr, "/ws", &[("Origin", &other_port)])
            .await
            .err(),
        Some(403)
    );
    assert_eq!(
        try_connect(s.addr, "/ws", &[("Origin", "null")])
            .await
            .err(),
        Some(403)
    );
    // No Origin: a non-browser client, allowed by default.
    alive(&mut try_connect(s.addr, "/ws", &[]).await.unwrap()).await;
    s.stop().await.unwrap();

    let cfg = Config {
        allowed_origins: vec!["https://app.example.com".into()],
        require_origin: true,
        ..config()
    };
    let s = TestServer::start(cfg).await;
    alive(
        &mut try_connect(s.addr, "/ws", &[("Origin", "https://app.example.com")])
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        try_connect(s.addr, "/ws", &[("Origin", "https://other.example.com")])
            .await
            .err(),
        Some(403)
    );
    assert_eq!(try_connect(s.addr, "/ws", &[]).await.err(), Some(403));
    s.stop().await.unwrap();
}

const TOKEN_A: &str = "token-aaaaaaaaaaaaaaaa";
const TOKEN_B: &str = "token-bbbbbbbbbbbbbbbb";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_by_header_query_or_cookie_with_their_own_limits() {
    let cfg = Config {
        auth_tokens: vec![
            AuthToken {
                token: TOKEN_A.into(),
                max_connections: None,
                max_inflight: None,
                rate_limit: None,
            },
            AuthToken {
                token: TOKEN_B.into(),
                max_connections: Some(1),
                max_inflight: Some(2),
                rate_limit: None,
            },
        ],
        ..config()
    };
    let s = TestServer::start(cfg).await;
    assert_eq!(try_connect(s.addr, "/ws", &[]).await.err(), Some(401));
    assert_eq!(
        try_connect(
            s.addr,
            "/ws",
            &[("Authorization", "Bearer token-wrong-wrong-wrong")]
        )
        .await
        .err(),
        Some(401)
    );
    assert_eq!(
        try_connect(s.addr, "/ws?token=token-aaaaaaaaaaaaaaa", &[])
            .await
            .err(),
        Some(401),
        "a prefix of a token is not the token"
    );
    let bearer = format!("Bearer {TOKEN_A}");
    alive(
        &mut try_connect(s.addr, "/ws", &[("Authorization", &bearer)])
            .await
            .unwrap(),
    )
    .await;
    alive(
        &mut try_connect(s.addr, &format!("/ws?token={TOKEN_A}"), &[])
            .await
            .unwrap(),
    )
    .await;
    let cookie = format!("theme=dark; taskwire_token={TOKEN_A}");
    alive(
        &mut try_connect(s.addr, "/ws", &[("Cookie", &cookie)])
            .await
            .unwrap(),
    )
    .await;

    // Token B: one connection at a time, two requests in flight.
    let path_b = format!("/ws?token={TOKEN_B}");
    let mut b = try_connect(s.addr, &path_b, &[]).await.unwrap();
    assert_eq!(try_connect(s.addr, &path_b, &[]).await.err(), Some(429));
    b.request(1, "sleep", json!({"ms": 200})).await;
    b.request(2, "sleep", json!({"ms": 200})).await;
    let m = b.call(3, "echo", json!({"value": 3})).await;
    assert_eq!(code(&m), -32001);
    assert_eq!(m["error"]["data"]["reason"], "connection_inflight");
    assert_eq!(b.response(1).await["result"]["sleptMs"], 200);
    assert_eq!(b.response(2).await["result"]["sleptMs"], 200);
    drop(b);
    // Its slot is released when the connection closes.
    alive(&mut connect_eventually(s.addr, &path_b).await).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rate_is_limited_per_connection() {
    let cfg = Config {
        rate_limit_per_sec: Some(1),
        rate_limit_burst: Some(3),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    // 20 requests at once: the burst passes, the rest are refused, each is
    // answered exactly once, and a cancel is never refused.
    let batch: Vec<Value> = (0..20)
        .map(|i| json!({"jsonrpc":"2.0","id":i,"method":"echo","params":{"value":i}}))
        .collect();
    c.send(Value::Array(batch)).await;
    let answers = c.recv().await.unwrap();
    let answers = answers.as_array().unwrap();
    assert_eq!(answers.len(), 20);
    let ok = answers.iter().filter(|a| a.get("result").is_some()).count();
    let refused: Vec<&Value> = answers
        .iter()
        .filter(|a| a.get("error").is_some())
        .collect();
    assert!(ok >= 3, "the burst passes: {answers:?}");
    assert!(!refused.is_empty());
    for r in &refused {
        assert_eq!(code(r), -32001);
        assert_eq!(r["error"]["data"]["reason"], "rate_limited");
        let retry = r["error"]["data"]["retryAfterMs"].as_u64().unwrap();
        assert!((1..=1000).contains(&retry), "{r}");
    }
    let mut ids: Vec<i64> = answers.iter().map(|a| a["id"].as_i64().unwrap()).collect();
    ids.sort();
    assert_eq!(ids, (0..20).collect::<Vec<_>>());
    let m = c
        .call("cancel", "$/cancelRequest", json!({"id": "nothing"}))
        .await;
    assert_eq!(m["result"], Value::Null, "{m}");
    // Another connection has a bucket of its own.
    alive(&mut s.client().await).await;
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_per_ip_get_429() {
    let cfg = Config {
        max_connections_per_ip: Some(2),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let a = s.client().await;
    let mut b = s.client().await;
    assert_eq!(try_connect(s.addr, "/ws", &[]).await.err(), Some(429));
    drop(a);
    alive(&mut connect_eventually(s.addr, "/ws").await).await;
    alive(&mut b).await;
    s.stop().await.unwrap();
}

/// A unique scratch directory for one test.
fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("taskwire-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_self_signed_certificate() {
    use tokio_rustls::rustls::{self, pki_types::ServerName};

    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = scratch("tls");
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let cfg = Config {
        tls_cert: Some(cert.clone()),
        tls_key: Some(key.clone()),
        ..config()
    };
    let s = TestServer::start(cfg).await;

    // The client trusts exactly that certificate.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let url = format!("wss://localhost:{}/ws", s.addr.port());
    let (mut ws, _) = tokio_tungstenite::client_async(url, tls).await.unwrap();
    ws.send(Message::Text(
        json!({"jsonrpc":"2.0","id":1,"method":"hash_chain","params":{"seed":1,"rounds":1}})
            .to_string()
            .into(),
    ))
    .await
    .unwrap();
    let reply = loop {
        use futures_util::StreamExt;
        match tokio::time::timeout(WAIT, ws.next()).await.unwrap() {
            Some(Ok(Message::Text(t))) => break serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("no reply: {other:?}"),
        }
    };
    assert_eq!(reply["result"]["digest"], "10451216379200822465");

    // Plain ws:// to a TLS port does not get through.
    let plain = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)),
    )
    .await
    .unwrap();
    assert!(plain.is_err());
    s.stop().await.unwrap();

    // A key file that is not a key is refused at start, naming the setting.
    std::fs::write(&key, "not a key").unwrap();
    let cfg = Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        tls_cert: Some(cert),
        tls_key: Some(key),
        ..config()
    };
    let e = Server::bind(cfg, common::builtins()).await.unwrap_err();
    assert!(matches!(e, taskwire::Error::Tls(_)), "{e:?}");
    assert!(e.to_string().contains("tls_key"), "{e}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_configuration_is_refused_at_start() {
    let cfg = Config {
        addr: "127.0.0.1:0".parse().unwrap(),
        outbound_queue: 0,
        ..config()
    };
    let e = Server::bind(cfg, common::builtins()).await.unwrap_err();
    assert!(e.to_string().contains("outbound_queue"), "{e}");

    let dir = scratch("config");
    let path = dir.join("taskwire.toml");
    std::fs::write(
        &path,
        "addr = \"127.0.0.1:0\"\nmax_inflight = 2\nping_intervall_ms = 5\n",
    )
    .unwrap();
    let e = Settings::load(&path).unwrap_err().to_string();
    assert!(
        e.contains("ping_intervall_ms") && e.contains("taskwire.toml"),
        "{e}"
    );
    std::fs::write(&path, "addr = \"127.0.0.1:0\"\nmax_inflight = 2\n").unwrap();
    let cfg = Settings::load(&path).unwrap().into_config().unwrap();
    assert_eq!(cfg.max_inflight_per_connection, 2);
    let _ = std::fs::remove_dir_all(dir);
}

/// What non-reading clients pin is bounded in total, not only per
/// connection: with a server-wide budget of one connection's worth, several
/// flooders together hold at most that (their answers wait, then they are
/// closed as slow consumers), a reading client is still served, and the
/// count returns to zero once they are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_budget_is_bounded_over_all_connections() {
    let budget = 1usize << 20;
    let cfg = Config {
        outbound_bytes: budget,
        outbound_bytes_total: budget,
        // Long enough that a scrape on a loaded machine still finds the flood
        // pinned before the server gives up on the flooders.
        write_timeout: Duration::from_secs(2),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let big = "x".repeat(60 * 1024);
    let mut flooders = Vec::new();
    for f in 0..3 {
        let mut c = s.client().await;
        let big = big.clone();
        flooders.push(tokio::spawn(async move {
            // Never read: 200 answers of 60 KiB each, 12 MiB per flooder, more
            // than the kernel's socket buffers take.
            for i in 0..200 {
                let text = json!({"jsonrpc":"2.0","id":format!("{f}-{i}"),"method":"echo","params":{"value": big}}).to_string();
                let sent = tokio::time::timeout(
                    Duration::from_millis(500),
                    c.ws.send(Message::Text(text.into())),
                )
                .await;
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            // Hold the connection (unread) until the server gives up on it.
            tokio::time::sleep(Duration::from_secs(3)).await;
            drop(c);
        }));
    }
    let mut peak = 0u64;
    let metric = |text: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix("taskwire_outbound_bytes "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    for i in 0..40 {
        let (_, text) = http(s.addr, "GET", "/metrics", None).await;
        peak = peak.max(metric(&text));
        if peak > 0 && i >= 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The budget holds (a few short answers may overdraw it, never by much).
    assert!(peak > 0, "the flood was counted");
    assert!(
        peak <= budget as u64 + 64 * 1024,
        "{peak} bytes pinned over a budget of {budget}"
    );
    // A client that reads is still served.
    alive(&mut s.client().await).await;
    for f in flooders {
        f.await.unwrap();
    }
    assert!(eventually(|| async { open_connections(s.addr).await == 0 }).await);
    assert!(
        eventually(|| async {
            let (_, text) = http(s.addr, "GET", "/metrics", None).await;
            metric(&text) == 0
        })
        .await,
        "every counted byte is given back"
    );
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_is_closed_and_its_memory_released() {
    let cfg = Config {
        outbound_queue: 16,
        write_timeout: Duration::from_millis(500),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let rss_before = rss_kib();
    let mut c = s.client().await;
    // Work that would run for a minute: it must be cancelled with the connection.
    for i in 0..5 {
        c.request(format!("long{i}"), "sleep", json!({"ms": 60_000}))
            .await;
    }
    assert!(eventually(|| async { live_tasks(s.addr).await == 5 }).await);
    // Then flood requests whose replies are 64 KiB each, and never read.
    let big = "x".repeat(64 * 1024);
    let frame = json!({"jsonrpc":"2.0","id":0,"method":"echo","params":{"value": big}}).to_string();
    let mut sent_bytes = 0usize;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline && sent_bytes < (512 << 20) {
        // Unique ids, so that no request is refused as a duplicate.
        let text = frame.replacen("\"id\":0", &format!("\"id\":{sent_bytes}"), 1);
        match tokio::time::timeout(
            Duration::from_millis(500),
            c.ws.send(Message::Text(text.into())),
        )
        .await
        {
            Ok(Ok(())) => sent_bytes += frame.len(),
            // The server stopped reading us, or closed.
            Ok(Err(_)) => break,
            Err(_) => {
                if open_connections(s.addr).await == 0 {
                    break;
                }
            }
        }
    }
    // The server closed the connection, cancelled its work and kept nothing.
    assert!(eventually(|| async { open_connections(s.addr).await == 0 }).await);
    assert!(eventually(|| async { live_tasks(s.addr).await == 0 }).await);
    assert!(
        eventually(|| async {
            let stats = admin_json(s.addr, "GET", "/admin/stats").await;
            stats["finished"]["cancelled"].as_u64().unwrap_or(0) >= 5
        })
        .await
    );
    let grown_mib = rss_kib().saturating_sub(rss_before) / 1024;
    // Generous: other tests of this binary run alongside. Unbounded buffering
    // of the flood would be hundreds of MiB.
    assert!(
        grown_mib < 96,
        "RSS grew {grown_mib} MiB after sending {} MiB",
        sent_bytes >> 20
    );
    // Others are served as before.
    alive(&mut s.client().await).await;
    drop(c);
    s.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_answers_pings_is_dropped() {
    let cfg = Config {
        ping_interval: Duration::from_millis(100),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    // A live peer: the client library answers pings whenever it reads, and
    // this one keeps reading.
    let mut live = s.client().await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keeper = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = live.call(n, "sleep", json!({"ms": 50})).await;
                assert_eq!(m["result"]["sleptMs"], 50, "{m}");
                n += 1;
            }
            live
        })
    };
    // A dead peer: a raw socket that sends its work, then never reads, so it
    // answers no ping.
    let mut dead = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    raw_handshake(&mut dead, s.addr).await;
    for req in [
        r#"{"jsonrpc":"2.0","id":"d","method":"sleep","params":{"ms":60000}}"#,
        r#"{"jsonrpc":"2.0","id":"r","method":"runaway"}"#,
    ] {
        dead.write_all(&masked_text_frame(req)).await.unwrap();
    }
    // Its tasks are cancelled with the connection; the live peer stays.
    assert!(eventually(|| async { open_connections(s.addr).await == 1 }).await);
    assert!(eventually(|| async { live_tasks(s.addr).await <= 1 }).await);
    let tasks = admin_json(s.addr, "GET", "/admin/tasks").await;
    assert!(
        tasks["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["method"] == "sleep" && t["requestId"] != "d"),
        "{tasks}"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut live = keeper.await.unwrap();
    alive(&mut live).await;
    // (The live peer now stops reading too, and will be dropped in turn.)
    assert_pool_idle(s.addr).await;
    // What the dead peer finds when it reads at last: pings, then close 1001.
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, dead.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let frames = server_frames(&buf);
    assert!(
        frames.iter().filter(|(op, _)| *op == 0x9).count() >= 2,
        "{frames:?}"
    );
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 1001);
    s.stop().await.unwrap();
}

/// The outbound queue is bounded in bytes, not only in messages: with a
/// 256 KiB budget, no more than four 64 KiB replies (plus one let through when
/// the queue is empty) ever wait for a client that does not read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_queue_is_bounded_in_bytes() {
    let cfg = Config {
        outbound_queue: 1024,
        outbound_bytes: 256 << 10,
        max_frame_bytes: 128 << 10,
        write_timeout: Duration::from_millis(1500),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    let big = "x".repeat(64 * 1024);
    let mut deepest = 0.0f64;
    for i in 0..400u32 {
        let text =
            json!({"jsonrpc":"2.0","id":i,"method":"echo","params":{"value": &big}}).to_string();
        let sent = tokio::time::timeout(
            Duration::from_millis(200),
            c.ws.send(Message::Text(text.into())),
        )
        .await;
        if i % 20 == 0 || !matches!(sent, Ok(Ok(()))) {
            let (_, body) = http(s.addr, "GET", "/metrics", None).await;
            let depth = body
                .lines()
                .find_map(|l| l.strip_prefix("taskwire_outbound_queue_depth "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0);
            deepest = deepest.max(depth);
        }
        if !matches!(sent, Ok(Ok(()))) && open_connections(s.addr).await == 0 {
            break;
        }
    }
    assert!(deepest <= 5.0, "{deepest} replies queued");
    assert!(
        eventually(|| async { open_connections(s.addr).await == 0 }).await,
        "closed as a slow consumer"
    );
    alive(&mut s.client().await).await;
    s.stop().await.unwrap();
}

/// The rate limit counts invalid elements and frames before answering them:
/// a batch meeting an empty bucket gets one error for the whole frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rate_limit_counts_invalid_elements_first() {
    let cfg = Config {
        rate_limit_per_sec: Some(1),
        rate_limit_burst: Some(3),
        ..config()
    };
    let s = TestServer::start(cfg).await;
    let mut c = s.client().await;
    c.send_text(&format!("[{}]", ["{}"; 10].join(","))).await;
    let m = c.recv().await.unwrap();
    let arr = m.as_array().expect("an array");
    assert_eq!(arr.len(), 10);
    let invalid = arr.iter().filter(|a| code(a) == -32600).count();
    let limited = arr.iter().filter(|a| code(a) == -32001).count();
    assert_eq!((invalid, limited), (3, 7), "{m}");
    // The bucket is empty (a token a second): one error per frame now. (A
    // batch that finds a refilled token is answered element by element and
    // empties the bucket again, so one of a few frames in a row meets it empty.)
    let mut single = None;
    for _ in 0..10 {
        c.send_text(&format!("[{}]", ["{}"; 10].join(","))).await;
        let m = c.recv().await.unwrap();
        if !m.is_array() {
            single = Some(m);
            break;
        }
    }
    let m = single.expect("a frame meets the empty bucket");
    assert_eq!((code(&m), m["id"].clone()), (-32001, Value::Null), "{m}");
    assert_eq!(m["error"]["data"]["reason"], "rate_limited");
    c.send_text("not json").await;
    let m = c.recv().await.unwrap();
    assert!([-32001, -32700].contains(&code(&m)), "{m}");
    // A cancel is never limited.
    let m = c
        .call("cancel", "$/cancelRequest", json!({"id": "nothing"}))
        .await;
    assert_eq!(m["result"], Value::Null, "{m}");
    s.stop().await.unwrap();
}
