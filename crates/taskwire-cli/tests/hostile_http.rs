//! The HTTP doors around `/ws` and `/admin`, against the `taskwire` binary run
//! as a process (so descriptors, RSS and the exit itself are the real ones):
//! half-sent request heads, the bounds on connections not yet upgraded,
//! shutdown with clients that hold things open, Host and cross-site checks,
//! framing headers, trusted proxies. Only 127.0.0.0/8 is ever contacted.

mod common;

use common::{Proc, WAIT};

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// A TCP connection from the given loopback source address.
async fn tcp_from(src: [u8; 4], to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(IpAddr::from(src), 0))?;
    s.connect(to).await
}

/// One HTTP/1.1 request with `Connection: close`; (status, head, body).
async fn http_from(src: [u8; 4], to: SocketAddr, head: &str) -> (u16, String, String) {
    let mut s = tcp_from(src, to).await.expect("connect");
    let req = format!("{head}Content-Length: 0\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("an answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_string())
}

/// `METHOD path` with the given Host, from 127.0.0.1.
async fn request(
    to: SocketAddr,
    method: &str,
    path: &str,
    host: &str,
    extra: &str,
) -> (u16, String, String) {
    http_from(
        [127, 0, 0, 1],
        to,
        &format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"),
    )
    .await
}

/// The body of a chunked answer, de-chunked well enough for JSON.
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

async fn admin_json(to: SocketAddr, src: [u8; 4], path: &str) -> Value {
    let (status, head, body) =
        http_from(src, to, &format!("GET {path} HTTP/1.1\r\nHost: {to}\r\n")).await;
    assert_eq!(status, 200, "{path}: {head}\n{body}");
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    serde_json::from_str(&body).expect("json")
}

/// A metric's value from `/metrics` (0 if absent), asked from `src`.
async fn metric(to: SocketAddr, src: [u8; 4], line_prefix: &str) -> u64 {
    let (status, head, body) =
        http_from(src, to, &format!("GET /metrics HTTP/1.1\r\nHost: {to}\r\n")).await;
    assert_eq!(status, 200, "{head}");
    let body = if head.contains("transfer-encoding: chunked") {
        dechunk(&body)
    } else {
        body
    };
    body.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

type Ws = WebSocketStream<TcpStream>;

/// A WebSocket from `src` with extra request headers; the HTTP status on refusal.
async fn ws_from(src: [u8; 4], to: SocketAddr, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{to}/ws")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(
            axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
            v.parse().expect("value"),
        );
    }
    let tcp = tcp_from(src, to).await.expect("connect");
    match tokio::time::timeout(WAIT, tokio_tungstenite::client_async(req, tcp))
        .await
        .expect("a handshake answer in time")
    {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => Err(r.status().as_u16()),
        Err(e) => panic!("handshake: {e}"),
    }
}

async fn call(ws: &mut Ws, id: u64, method: &str, params: Value) -> Value {
    let req = json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .expect("send");
    loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a reply in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["id"] == json!(id) {
                    return v;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("no reply: {other:?}"),
        }
    }
}

/// Polls `f` until it holds, up to WAIT.
async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Reads until the server closes the socket (EOF or reset); what it sent.
async fn until_closed(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the server closes the connection in time");
    buf
}

const HALF_HEAD: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_heads_are_bounded_per_address_and_timed_out() {
    const PER_IP: usize = 20;
    const FLOOD: usize = 100;
    let server = Proc::start(&[
        "--max-http-connections-per-ip",
        &PER_IP.to_string(),
        "--max-http-connections",
        "500",
        "--request-head-timeout-ms",
        "4000",
    ]);
    let to = server.addr;
    // Warm the server up (runtime threads, first allocations) before the baseline.
    assert_eq!(request(to, "GET", "/healthz", "localhost", "").await.0, 200);
    let fds_before = server.fds();
    let rss_before = server.rss_kib();

    // An idle keep-alive connection counts against its address too, and also
    // times out.
    let mut keep = tcp_from([127, 0, 0, 1], to).await.expect("connect");
    keep.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    // The same address opens many connections and never finishes a request head.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let mut s = tcp_from([127, 0, 0, 1], to).await.expect("connect");
        let _ = s.write_all(HALF_HEAD).await;
        flood.push(s);
    }
    // All but PER_IP of that address's connections are refused at once.
    let refused_line = "taskwire_admission_refusals_total{reason=\"http_connections_per_ip\"} ";
    assert!(
        eventually(|| async {
            metric(to, [127, 0, 0, 4], refused_line).await == (FLOOD + 1 - PER_IP) as u64
        })
        .await,
        "{} refused",
        metric(to, [127, 0, 0, 4], refused_line).await
    );

    // Another address is still admitted: as many half-sent heads of its own...
    let mut other = Vec::new();
    for _ in 0..PER_IP {
        let mut s = tcp_from([127, 0, 0, 2], to).await.expect("connect");
        let _ = s.write_all(HALF_HEAD).await;
        other.push(s);
    }
    // ...and a normal client from a third one gets its WebSocket and an answer.
    let mut ws = ws_from([127, 0, 0, 3], to, &[]).await.expect("upgrade");
    let r = call(&mut ws, 1, "echo", json!({"value": "still here"})).await;
    assert_eq!(r["result"], "still here", "{r}");
    assert_eq!(
        metric(to, [127, 0, 0, 4], refused_line).await,
        (FLOOD + 1 - PER_IP) as u64,
        "127.0.0.2 was not refused"
    );
    // Descriptors held meanwhile: one per admitted connection, not one per attempt.
    let fds_during = server.fds();
    let rss_during = server.rss_kib();
    assert!(
        fds_during <= fds_before + 2 * PER_IP + 4,
        "{fds_during} descriptors during, {fds_before} before"
    );

    // The head timeout closes every one of them, and the idle keep-alive.
    for s in flood.iter_mut().chain(other.iter_mut()) {
        until_closed(s).await;
    }
    let answered = until_closed(&mut keep).await;
    assert!(String::from_utf8_lossy(&answered).starts_with("HTTP/1.1 200"));
    drop(ws);
    assert!(
        eventually(|| async { server.fds() <= fds_before }).await,
        "descriptors back to {fds_before}: {}",
        server.fds()
    );
    let rss_after = server.rss_kib();
    eprintln!(
        "descriptors: before {fds_before}, during {fds_during}, after {}; RSS KiB: before {rss_before}, during {rss_during}, after {rss_after}",
        server.fds()
    );
    assert!(
        rss_during < rss_before + 32 * 1024,
        "RSS {rss_during} KiB during"
    );
    // The flooding address is welcome again.
    let mut ws = ws_from([127, 0, 0, 1], to, &[]).await.expect("upgrade");
    let r = call(&mut ws, 2, "echo", json!({"value": 2})).await;
    assert_eq!(r["result"], 2, "{r}");
    // The refusals were logged, but not one line each.
    let log = server.log();
    let lines = log.matches("refused a connection").count();
    assert!(
        (1..=10).contains(&lines),
        "{lines} refusal lines for {} refusals:\n{log}",
        FLOOD + 1 - PER_IP
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgraded_websockets_leave_the_http_bound() {
    // A connection counts as HTTP only until its upgrade: many WebSockets from
    // one address fit under a per-address HTTP bound of 2.
    let server = Proc::start(&[
        "--max-http-connections-per-ip",
        "2",
        "--max-http-connections",
        "2",
    ]);
    let mut open = Vec::new();
    for i in 0..8u64 {
        let mut ws = ws_from([127, 0, 0, 1], server.addr, &[])
            .await
            .unwrap_or_else(|status| panic!("upgrade {i}: {status}"));
        let r = call(&mut ws, i, "echo", json!({"value": i})).await;
        assert_eq!(r["result"], i, "{r}");
        open.push(ws);
    }
    // And HTTP still gets in beside them.
    let (status, _, _) = request(server.addr, "GET", "/healthz", "localhost", "").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_wide_bound_on_connections_not_upgraded() {
    let server = Proc::start(&[
        "--max-http-connections-per-ip",
        "8",
        "--max-http-connections",
        "12",
        "--request-head-timeout-ms",
        "60000",
    ]);
    let to = server.addr;
    let mut held = Vec::new();
    for src in [[127, 0, 0, 1], [127, 0, 0, 2]] {
        for _ in 0..8 {
            let mut s = tcp_from(src, to).await.expect("connect");
            let _ = s.write_all(HALF_HEAD).await;
            held.push(s);
        }
    }
    // 8 from the first address, 4 from the second, then the server is full:
    // a newcomer is closed with 503 (or a reset) without being served.
    let mut s = tcp_from([127, 0, 0, 3], to).await.expect("connect");
    let got = until_closed(&mut s).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 503"),
        "{text}"
    );
    // Closing some frees room for others.
    held.truncate(8);
    drop(held);
    assert!(
        eventually(|| async {
            let Ok(mut s) = tcp_from([127, 0, 0, 3], to).await else {
                return false;
            };
            let req = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
            if s.write_all(req).await.is_err() {
                return false;
            }
            String::from_utf8_lossy(&until_closed(&mut s).await).starts_with("HTTP/1.1 200")
        })
        .await
    );
    assert!(server.log().contains("http_connections"));
}

/// Many live tasks (so that every event-stream snapshot is large), and an
/// event stream whose client never reads, with a small receive buffer: the
/// server's writes to it stall.
async fn stalled_event_stream(to: SocketAddr) -> (Ws, TcpStream) {
    let mut ws = ws_from([127, 0, 0, 1], to, &[]).await.expect("upgrade");
    for id in 0..1000u64 {
        let req = json!({"jsonrpc": "2.0", "id": id, "method": "sleep", "params": {"ms": 600_000}});
        ws.send(Message::Text(req.to_string().into()))
            .await
            .expect("send");
    }
    let sock = TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("rcvbuf");
    let mut sse = sock.connect(to).await.expect("connect");
    sse.write_all(
        format!("GET /admin/events?limit=10000 HTTP/1.1\r\nHost: {to}\r\n\r\n").as_bytes(),
    )
    .await
    .expect("write");
    // The stream flows (and then stalls, as nobody reads it).
    let mut peek = vec![0u8; 2048];
    let end = tokio::time::Instant::now() + WAIT;
    while sse.peek(&mut peek).await.unwrap_or(0) < 1024 {
        assert!(tokio::time::Instant::now() < end, "the event stream flows");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (ws, sse)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_response_is_closed() {
    // HTTP responses get twice the write timeout: 1 s here.
    let server = Proc::start(&["--write-timeout-ms", "500"]);
    let to = server.addr;
    let (ws, mut sse) = stalled_event_stream(to).await;
    let with_stream = server.fds();
    // The stalled stream's connection is closed by the server while its
    // client still reads nothing; the WebSocket (which reads) stays.
    assert!(
        eventually(|| async { server.fds() < with_stream }).await,
        "{} descriptors, {with_stream} with the stream",
        server.fds()
    );
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, sse.read_to_end(&mut rest))
        .await
        .expect("the stream has ended");
    drop(ws);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_ends_the_process_whatever_clients_hold_open() {
    let mut server = Proc::start(&[
        "--shutdown-grace-ms",
        "500",
        // Longer than the test: only the shutdown deadline can end this head.
        "--request-head-timeout-ms",
        "600000",
    ]);
    let to = server.addr;
    // A request head that is never finished.
    let mut half = tcp_from([127, 0, 0, 1], to).await.expect("connect");
    half.write_all(HALF_HEAD).await.expect("write");
    let (ws, sse) = stalled_event_stream(to).await;
    // Give the server time to fill its side of the stalled stream.
    tokio::time::sleep(Duration::from_secs(2)).await;

    sigterm(server.pid());
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > WAIT {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let status = status.unwrap_or_else(|| panic!("still running; log:\n{}", server.log()));
    assert!(status.success(), "{status}; log:\n{}", server.log());
    eprintln!("exited {:?} after SIGTERM", started.elapsed());
    drop((half, sse, ws));
}

/// SIGTERM without a libc dependency in this crate: `kill(1)`.
fn sigterm(pid: u32) {
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "kill -TERM {pid}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_host_is_refused_on_loopback_and_allowed_when_listed() {
    let server = Proc::start(&[]);
    let to = server.addr;
    let port = to.port();
    for path in ["/admin/stats", "/metrics"] {
        let (status, _, body) = request(to, "GET", path, "evil.example", "").await;
        assert_eq!(status, 403, "{path}: {body}");
        let (status, _, _) = request(to, "GET", path, &format!("evil.example:{port}"), "").await;
        assert_eq!(status, 403, "{path}");
        for host in [
            format!("localhost:{port}"),
            format!("127.0.0.1:{port}"),
            "app.localhost".into(),
        ] {
            let (status, _, body) = request(to, "GET", path, &host, "").await;
            assert_eq!(status, 200, "{path} {host}: {body}");
        }
    }
    // The upgrade names its host too on a loopback listener.
    assert_eq!(
        ws_from([127, 0, 0, 1], to, &[("host", "evil.example")])
            .await
            .err(),
        Some(403)
    );
    assert!(ws_from([127, 0, 0, 1], to, &[("host", "localhost")])
        .await
        .is_ok());
    drop(server);

    let server = Proc::start(&["--allowed-host", "evil.example"]);
    let to = server.addr;
    for path in ["/admin/stats", "/metrics"] {
        let (status, _, body) = request(to, "GET", path, "evil.example", "").await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    assert!(ws_from([127, 0, 0, 1], to, &[("host", "evil.example:80")])
        .await
        .is_ok());
    assert_eq!(
        ws_from([127, 0, 0, 1], to, &[("host", "other.example")])
            .await
            .err(),
        Some(403)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_kill_is_refused_and_same_origin_allowed() {
    let server = Proc::start(&[]);
    let to = server.addr;
    let mut ws = ws_from([127, 0, 0, 1], to, &[]).await.expect("upgrade");
    let req = json!({"jsonrpc": "2.0", "id": 7, "method": "sleep", "params": {"ms": 600_000}});
    ws.send(Message::Text(req.to_string().into()))
        .await
        .expect("send");
    let end = tokio::time::Instant::now() + WAIT;
    let id = loop {
        let tasks = admin_json(to, [127, 0, 0, 1], "/admin/tasks").await;
        if let Some(id) = tasks["tasks"][0]["id"].as_u64() {
            break Some(id);
        }
        assert!(tokio::time::Instant::now() < end, "the task shows up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let path = format!("/admin/tasks/{}/kill", id.expect("a task"));
    let host = to.to_string();
    let (status, _, body) =
        request(to, "POST", &path, &host, "Origin: http://evil.example\r\n").await;
    assert_eq!(status, 403, "{body}");
    let (status, _, body) =
        request(to, "POST", &path, &host, "Sec-Fetch-Site: cross-site\r\n").await;
    assert_eq!(status, 403, "{body}");
    // Another port of the same machine is another application.
    let (status, _, body) = request(
        to,
        "POST",
        &path,
        &host,
        &format!(
            "Origin: http://127.0.0.1:{}\r\nSec-Fetch-Site: same-site\r\n",
            to.port() ^ 1
        ),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // The task lives on through all of that...
    let tasks = admin_json(to, [127, 0, 0, 1], "/admin/tasks").await;
    assert_eq!(tasks["tasks"].as_array().map(Vec::len), Some(1), "{tasks}");
    // ...and the dashboard's own request kills it.
    let (status, head, body) = request(
        to,
        "POST",
        &path,
        &host,
        &format!("Origin: http://{host}\r\nSec-Fetch-Site: same-origin\r\n"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    for h in [
        "content-security-policy: frame-ancestors 'none'",
        "x-frame-options: deny",
        "x-content-type-options: nosniff",
    ] {
        assert!(head.contains(h), "{h} in {head}");
    }
    let reply = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                if v["id"] == json!(7) {
                    break v;
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("no reply: {other:?}"),
        }
    };
    assert_eq!(reply["error"]["code"], -32004, "{reply}");
    // The dashboard page forbids framing as well.
    let (status, head, _) = request(to, "GET", "/", &host, "").await;
    assert_eq!(status, 200);
    assert!(
        head.contains("content-security-policy: frame-ancestors 'none'"),
        "{head}"
    );
    assert!(head.contains("x-frame-options: deny"), "{head}");
}

/// The admin connection table once it lists `n` connections (a connection
/// enters it just after its upgrade).
async fn connections(to: SocketAddr, n: usize) -> Value {
    let end = tokio::time::Instant::now() + WAIT;
    loop {
        let conns = admin_json(to, [127, 0, 0, 1], "/admin/connections").await;
        let len = conns["connections"].as_array().map_or(0, Vec::len);
        if len >= n {
            assert_eq!(len, n, "{conns}");
            return conns;
        }
        assert!(tokio::time::Instant::now() < end, "{conns}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_read_only_from_trusted_proxies() {
    let xff = [("x-forwarded-for", "198.51.100.23, 203.0.113.7")];
    let peers = |conns: &Value| -> Vec<String> {
        conns["connections"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|c| c["peer"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    // Untrusted peer: the header is ignored.
    let server = Proc::start(&[]);
    let _ws = ws_from([127, 0, 0, 1], server.addr, &xff)
        .await
        .expect("upgrade");
    let conns = connections(server.addr, 1).await;
    let seen = peers(&conns);
    assert!(seen[0].starts_with("127.0.0.1:"), "{conns}");
    drop(server);

    // 127.0.0.1 is the trusted proxy: its right-most forwarded hop is the client.
    let server = Proc::start(&["--trusted-proxy", "127.0.0.1"]);
    let _ws = ws_from([127, 0, 0, 1], server.addr, &xff)
        .await
        .expect("upgrade");
    // Another loopback address is no proxy: its header is still ignored.
    let _other = ws_from([127, 0, 0, 2], server.addr, &xff)
        .await
        .expect("upgrade");
    let conns = connections(server.addr, 2).await;
    let mut seen = peers(&conns);
    seen.sort();
    assert!(seen[0].starts_with("127.0.0.2:"), "{conns}");
    assert!(seen[1].starts_with("203.0.113.7"), "{conns}");
    // Behind the proxy, a forwarded stranger is not loopback: no admin.
    let (status, _, _) = request(
        server.addr,
        "GET",
        "/admin/stats",
        "localhost",
        "X-Forwarded-For: 203.0.113.7\r\n",
    )
    .await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ipv4_mapped_loopback_counts_as_loopback() {
    // A dual-stack listener sees 127.0.0.1 as ::ffff:127.0.0.1.
    let server = Proc::start(&["--addr", "[::]:0"]);
    let to = SocketAddr::from(([127, 0, 0, 1], server.addr.port()));
    let stats = admin_json(to, [127, 0, 0, 1], "/admin/stats").await;
    assert!(stats["uptimeMs"].is_number(), "{stats}");
}
