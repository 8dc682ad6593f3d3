//! A real server on 127.0.0.1:0 and a real WebSocket client, for the tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use taskwire::{Config, Registry, Server, ShutdownHandle};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const WAIT: Duration = Duration::from_secs(20);

pub struct TestServer {
    pub addr: SocketAddr,
    pub handle: ShutdownHandle,
    pub join: Option<tokio::task::JoinHandle<taskwire::Result<()>>>,
}

impl TestServer {
    pub async fn start(cfg: Config) -> TestServer {
        Self::with_registry(cfg, builtins()).await
    }

    pub async fn with_registry(mut cfg: Config, registry: Registry) -> TestServer {
        cfg.addr = "127.0.0.1:0".parse().unwrap();
        cfg.nice = 0;
        let server = Server::bind(cfg, registry).await.unwrap();
        let addr = server.local_addr().unwrap();
        let handle = server.shutdown_handle();
        let join = tokio::spawn(server.run(std::future::pending()));
        TestServer {
            addr,
            handle,
            join: Some(join),
        }
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }

    /// Shuts down and waits for the server to exit; returns what `run` returned.
    pub async fn stop(mut self) -> taskwire::Result<()> {
        self.handle.shutdown();
        let join = self.join.take().expect("joined once");
        tokio::time::timeout(WAIT, join)
            .await
            .expect("the server exits")
            .expect("the server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.handle.shutdown();
    }
}

/// A registry with every built-in task, the demo ones included.
pub fn builtins() -> Registry {
    let mut r = Registry::new();
    taskwire::builtin::register(&mut r).expect("the built-ins register");
    taskwire::builtin::register_demo(&mut r).expect("the demo tasks register");
    r
}

pub fn config() -> Config {
    Config::default()
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Messages read while waiting for something else.
    pub seen: Vec<Value>,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .expect("connect");
        Client {
            ws,
            seen: Vec::new(),
        }
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(&v.to_string()).await;
    }

    pub async fn send_text(&mut self, t: &str) {
        self.ws.send(Message::Text(t.into())).await.expect("send");
    }

    pub async fn request(&mut self, id: impl Into<Value>, method: &str, params: Value) {
        self.send(json!({"jsonrpc":"2.0","id":id.into(),"method":method,"params":params}))
            .await;
    }

    /// The next JSON message, or None if the connection closed.
    pub async fn recv(&mut self) -> Option<Value> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a message")?;
            match m {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).expect("json")),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => continue,
            }
        }
    }

    /// Waits for the close frame; returns its code.
    pub async fn close_code(&mut self) -> Option<u16> {
        loop {
            let m = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for close")?;
            match m {
                Ok(Message::Close(f)) => return f.map(|f| u16::from(f.code)),
                Ok(Message::Text(t)) => self.seen.push(serde_json::from_str(&t).expect("json")),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits for the response with this id, keeping other messages in `seen`.
    pub async fn response(&mut self, id: impl Into<Value>) -> Value {
        let id = id.into();
        if let Some(i) = self
            .seen
            .iter()
            .position(|m| m.get("id") == Some(&id) && m.get("method").is_none())
        {
            return self.seen.remove(i);
        }
        loop {
            let m = self.recv().await.expect("connection closed");
            if m.get("id") == Some(&id) && m.get("method").is_none() {
                return m;
            }
            self.seen.push(m);
        }
    }

    pub async fn call(&mut self, id: impl Into<Value>, method: &str, params: Value) -> Value {
        let id = id.into();
        self.request(id.clone(), method, params).await;
        self.response(id).await
    }
}

pub fn code(v: &Value) -> i64 {
    v["error"]["code"]
        .as_i64()
        .unwrap_or_else(|| panic!("not an error: {v}"))
}

/// A minimal HTTP/1.1 request (the admin API), returning (status, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    http_with_body(addr, method, path, token, b"").await
}

/// [`http`] with a request body (the admin API's PUT).
pub async fn http_with_body(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    // Sent at once (one write, no Nagle): latency benches time these calls.
    s.set_nodelay(true).expect("nodelay");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http timeout")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    let body = if text
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(&body)
    } else {
        body
    };
    (status, body)
}

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

pub async fn admin_json(addr: SocketAddr, method: &str, path: &str) -> Value {
    let (status, body) = http(addr, method, path, None).await;
    assert!(status == 200, "{method} {path}: {status} {body}");
    serde_json::from_str(&body).expect("admin json")
}

/// Polls until `f` holds, up to WAIT.
pub async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < end {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// The server's compute pool really is idle: no worker busy, and no CPU time
/// charged over half a second. (Per server, unlike the process's CPU clock,
/// which the other tests running in parallel share.)
pub async fn assert_pool_idle(addr: SocketAddr) {
    let before = admin_json(addr, "GET", "/admin/stats").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = admin_json(addr, "GET", "/admin/stats").await;
    assert_eq!(after["pool"]["busy"], 0, "{after}");
    assert_eq!(
        before["pool"]["cpuMsTotal"], after["pool"]["cpuMsTotal"],
        "the pool still burns CPU"
    );
}

/// This process's CPU time (user + system), from /proc.
pub fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse().ok()).unwrap_or(0);
    // USER_HZ is 100 on every Linux the project supports.
    Duration::from_millis(ticks * 10)
}

/// The `crash` task panics by design, hundreds of times in some tests: keep
/// those off the output (any other panic still prints).
pub fn quiet_crash_tasks() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() != Some("taskwire-cpu") {
            default(info);
        }
    }));
}

/// A field of /proc/self/status, in its own unit (kB for memory).
pub fn proc_status(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A seeded generator for the randomised tests (splitmix64, the same as the
/// `hash_chain` task's): a failing run is replayed from its seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let out = taskwire::builtin::splitmix64(self.0);
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        out
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A WebSocket upgrade of `path` with these extra headers: the client, or the refusal's status and body.
pub async fn upgrade_with(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Client, (u16, String)> {
    let mut req = format!("ws://{addr}{path}").into_client_request().unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        req.headers_mut()
            .append(name, HeaderValue::from_str(v).unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Client {
            ws,
            seen: Vec::new(),
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp
                .body()
                .as_ref()
                .map(|b| String::from_utf8_lossy(b).to_string())
                .unwrap_or_default();
            let challenge = resp
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .map(|v| format!(" [{v}]"))
                .unwrap_or_default();
            Err((resp.status().as_u16(), format!("{body}{challenge}")))
        }
        Err(e) => panic!("unexpected handshake error: {e}"),
    }
}
