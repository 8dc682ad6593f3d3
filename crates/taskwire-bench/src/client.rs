//! The protocol client of the load generator: connecting (loopback only),
//! matching replies to requests by id, and a small concurrent RPC client.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::BenchError;

/// A client WebSocket over plain TCP.
pub type Ws = WebSocketStream<TcpStream>;

/// How long a connect plus handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The bench only ever talks to 127.0.0.0/8.
pub fn is_allowed_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 127,
        IpAddr::V6(_) => false,
    }
}

/// A `ws://HOST:PORT/PATH` URL, checked to be loopback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WsUrl {
    /// Where to connect.
    pub addr: SocketAddr,
    /// The URL itself, for the handshake request.
    pub url: String,
}

impl WsUrl {
    /// Parses and checks a URL: scheme `ws`, an IPv4 127.x.y.z address or
    /// `localhost`, an explicit port.
    pub fn parse(url: &str) -> Result<WsUrl, BenchError> {
        let bad = |reason: &str| BenchError::InvalidUrl {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let rest = url
            .strip_prefix("ws://")
            .ok_or_else(|| bad("only ws:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("the port is missing"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let ip = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse::<IpAddr>()
                .map_err(|_| bad("the host must be an IPv4 address or localhost"))?
        };
        if !is_allowed_ip(ip) {
            return Err(BenchError::NonLoopback(authority.to_string()));
        }
        let mut url = url.to_string();
        if !rest.contains('/') {
            url.push_str("/ws");
        }
        Ok(WsUrl {
            addr: SocketAddr::new(ip, port),
            url,
        })
    }
}

/// Client-side buffer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Buffers {
    /// tungstenite's defaults (fast on busy connections).
    Default,
    /// 4 KiB read buffer, unbuffered writes: for thousands of idle connections.
    Small,
    /// Messages up to 512 MiB: to receive (and measure) the very large answers
    /// a hostile request can provoke, instead of failing on them.
    Large,
}

/// Connects and performs the WebSocket handshake, optionally from a given
/// 127.0.0.x source address (to spread ephemeral ports over several addresses).
pub async fn connect(
    url: &WsUrl,
    source: Option<Ipv4Addr>,
    buffers: Buffers,
) -> Result<Ws, BenchError> {
    let work = async {
        let socket = TcpSocket::new_v4()?;
        if let Some(ip) = source {
            if !is_allowed_ip(IpAddr::V4(ip)) {
                return Err(BenchError::NonLoopback(ip.to_string()));
            }
            socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
        }
        let stream = socket.connect(url.addr).await?;
        // Small frames in a request/response loop: never wait for Nagle.
        stream.set_nodelay(true)?;
        let config = match buffers {
            Buffers::Default => None,
            Buffers::Small => Some(
                WebSocketConfig::default()
                    .read_buffer_size(4096)
                    .write_buffer_size(0),
            ),
            Buffers::Large => Some(
                WebSocketConfig::default()
                    .max_message_size(Some(512 << 20))
                    .max_frame_size(Some(512 << 20)),
            ),
        };
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(url.url.as_str(), stream, config).await?;
        Ok(ws)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, work)
        .await
        .map_err(|_| BenchError::Timeout(format!("connecting to {}", url.url)))?
}

/// What the bench needs of a frame from the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incoming {
    /// A reply (or an echoed request, from the raw echo server) to integer id `id`;
    /// `error` holds the error code of an error reply.
    Reply {
        /// The request id.
        id: u64,
        /// `Some(code)` for an error reply.
        error: Option<i64>,
    },
    /// Anything without an integer id: notifications (`$/progress`), error
    /// replies with id `null`, string ids (the bench never sends those).
    Other,
}

#[derive(Deserialize)]
struct WireFrame<'a> {
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    error: Option<WireError>,
}

#[derive(Deserialize)]
struct WireError {
    code: i64,
}

/// Classifies one text frame. Only the id and the error code are decoded
/// (`result` and everything else are skipped), because on the throughput path
/// the client shares the server's two cores.
pub fn parse_incoming(text: &str) -> Result<Incoming, BenchError> {
    if text.trim_start().starts_with('[') {
        return Err(BenchError::Protocol(
            "batch reply to a request that was not a batch".into(),
        ));
    }
    let frame: WireFrame<'_> = serde_json::from_str(text)
        .map_err(|e| BenchError::Protocol(format!("unparseable frame ({e}): {text:.200}")))?;
    let Some(id) = frame.id.and_then(|raw| raw.get().parse::<u64>().ok()) else {
        return Ok(Incoming::Other);
    };
    Ok(Incoming::Reply {
        id,
        error: frame.error.map(|e| e.code),
    })
}

/// Requests in flight on one connection, by id, with their send time.
#[derive(Debug)]
pub struct Pending<T> {
    map: HashMap<u64, (Instant, T)>,
}

impl<T> Default for Pending<T> {
    fn default() -> Self {
        Self {
            map: HashMap::new(),
        }
    }
}

impl<T> Pending<T> {
    /// Registers a request sent at `sent`; `false` (and nothing changes) if the
    /// id is already in flight.
    pub fn insert(&mut self, id: u64, sent: Instant, value: T) -> bool {
        if self.map.contains_key(&id) {
            return false;
        }
        self.map.insert(id, (sent, value));
        true
    }

    /// Completes `id` at `now`: its latency and value, or `None` for an id that
    /// is not in flight (unknown, or already answered).
    pub fn complete(&mut self, id: u64, now: Instant) -> Option<(Duration, T)> {
        self.map
            .remove(&id)
            .map(|(sent, value)| (now.saturating_duration_since(sent), value))
    }

    /// How many are in flight.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether none are in flight.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets every request (their values are dropped).
    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// One JSON-RPC request frame with an integer id.
pub fn request_text(id: u64, method: &str, params: &serde_json::Value) -> String {
    serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params}).to_string()
}

/// The outcome of one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reply {
    /// From sending the request to receiving its reply.
    pub latency: Duration,
    /// When the reply arrived.
    pub at: Instant,
    /// `None` for a result, `Some(code)` for an error.
    pub error: Option<i64>,
}

type Waiters = Arc<Mutex<Pending<oneshot::Sender<Reply>>>>;

/// A JSON-RPC client over one connection that many tasks may use at once: a
/// reader task routes replies to their callers by id, a writer task owns the sink.
#[derive(Debug)]
pub struct RpcClient {
    out: mpsc::UnboundedSender<Message>,
    waiters: Waiters,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
    writer: JoinHandle<()>,
    unknown_ids: Arc<AtomicU64>,
}

/// A request sent but not yet answered; await [`PendingCall::wait`].
#[derive(Debug)]
pub struct PendingCall {
    /// The request's id.
    pub id: u64,
    rx: oneshot::Receiver<Reply>,
}

impl PendingCall {
    /// The reply, or [`BenchError::ConnectionClosed`] when the connection ended first.
    pub async fn wait(self) -> Result<Reply, BenchError> {
        self.rx.await.map_err(|_| BenchError::ConnectionClosed)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned map only means another task panicked mid-insert; the map itself
    // is still consistent, so keep using it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl RpcClient {
    /// Connects to `url` (see [`connect`]).
    pub async fn connect(url: &WsUrl) -> Result<RpcClient, BenchError> {
        let ws = connect(url, None, Buffers::Default).await?;
        Ok(Self::from_ws(ws))
    }

    /// Wraps an open connection.
    pub fn from_ws(ws: Ws) -> RpcClient {
        let (mut sink, mut stream) = ws.split();
        let (out, mut out_rx) = mpsc::unbounded_channel::<Message>();
        let writer = tokio::spawn(async move {
            while let Some(msg) = out_rx.recv().await {
                let closing = matches!(msg, Message::Close(_));
                if sink.send(msg).await.is_err() || closing {
                    break;
                }
            }
        });
        let waiters: Waiters = Arc::default();
        let unknown_ids = Arc::new(AtomicU64::new(0));
        let reader = {
            let waiters = Arc::clone(&waiters);
            let unknown_ids = Arc::clone(&unknown_ids);
            tokio::spawn(async move {
                while let Some(Ok(msg)) = stream.next().await {
                    let now = Instant::now();
                    let text = match &msg {
                        Message::Text(t) => t.as_str(),
                        Message::Close(_) => break,
                        _ => continue,
                    };
                    match parse_incoming(text) {
                        Ok(Incoming::Reply { id, error }) => {
                            let done = lock(&waiters).complete(id, now);
                            match done {
                                Some((latency, tx)) => {
                                    let _ = tx.send(Reply {
                                        latency,
                                        at: now,
                                        error,
                                    });
                                }
                                None => {
                                    unknown_ids.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                        Ok(Incoming::Other) => {}
                        Err(_) => {
                            unknown_ids.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                // Dropping the senders fails every waiting call with ConnectionClosed.
                lock(&waiters).clear();
            })
        };
        RpcClient {
            out,
            waiters,
            next_id: AtomicU64::new(1),
            reader,
            writer,
            unknown_ids,
        }
    }

    /// Sends a request without waiting for its reply.
    pub fn start(
        &self,
        method: &str,
        params: &serde_json::Value,
    ) -> Result<PendingCall, BenchError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let text = request_text(id, method, params);
        // Register before sending, or a fast reply could arrive before its waiter.
        if !lock(&self.waiters).insert(id, Instant::now(), tx) {
            return Err(BenchError::Protocol(format!("id {id} reused")));
        }
        if self.out.send(Message::text(text)).is_err() {
            let _ = lock(&self.waiters).complete(id, Instant::now());
            return Err(BenchError::ConnectionClosed);
        }
        Ok(PendingCall { id, rx })
    }

    /// Sends a notification (no id, no reply).
    pub fn notify(&self, method: &str, params: &serde_json::Value) -> Result<(), BenchError> {
        let text = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params});
        self.out
            .send(Message::text(text.to_string()))
            .map_err(|_| BenchError::ConnectionClosed)
    }

    /// Asks the server to cancel request `id` (`$/cancelRequest`).
    pub fn cancel(&self, id: u64) -> Result<(), BenchError> {
        self.notify("$/cancelRequest", &serde_json::json!({ "id": id }))
    }

    /// Requests still waiting for their reply.
    pub fn in_flight(&self) -> usize {
        lock(&self.waiters).len()
    }

    /// Replies whose id matched no request in flight (should stay 0).
    pub fn unknown_replies(&self) -> u64 {
        self.unknown_ids.load(Ordering::Relaxed)
    }

    /// Sends a Close frame, waits (bounded) until it is written, and drops the
    /// connection without waiting for the server's answer.
    pub async fn close(mut self) {
        let _ = self.out.send(Message::Close(None));
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.writer).await;
        self.reader.abort();
    }
}

impl Drop for RpcClient {
    fn drop(&mut self) {
        self.reader.abort();
        self.writer.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_loopback_only() {
        let u = WsUrl::parse("ws://127.0.0.1:8080/ws").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
        let u = WsUrl::parse("ws://localhost:9").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(u.url, "ws://localhost:9/ws");
        assert!(WsUrl::parse("ws://127.3.2.1:1/x").is_ok());
        assert!(matches!(
            WsUrl::parse("ws://10.0.0.1:80/ws"),
            Err(BenchError::NonLoopback(_))
        ));
        assert!(matches!(
            WsUrl::parse("ws://192.168.1.2:80/ws"),
            Err(BenchError::NonLoopback(_))
        ));
        assert!(WsUrl::parse("wss://127.0.0.1:80/ws").is_err());
        assert!(WsUrl::parse("ws://127.0.0.1/ws").is_err());
        assert!(WsUrl::parse("ws://example.com:80/ws").is_err());
        assert!(WsUrl::parse("ws://[::1]:80/ws").is_err());
    }

    #[test]
    fn incoming_frames() {
        let ok = r#"{"jsonrpc":"2.0","id":7,"result":{"count":1}}"#;
        assert_eq!(
            parse_incoming(ok).ok(),
            Some(Incoming::Reply { id: 7, error: None })
        );
        let err = r#"{"jsonrpc":"2.0","id":8,"error":{"code":-32001,"message":"overloaded","data":{"retryAfterMs":5}}}"#;
        assert_eq!(
            parse_incoming(err).ok(),
            Some(Incoming::Reply {
                id: 8,
                error: Some(-32001)
            })
        );
        // The raw echo server sends the request itself back: still a reply to id 9.
        let echoed = r#"{"jsonrpc":"2.0","id":9,"method":"echo","params":{"value":"x"}}"#;
        assert_eq!(
            parse_incoming(echoed).ok(),
            Some(Incoming::Reply { id: 9, error: None })
        );
        let progress =
            r#"{"jsonrpc":"2.0","method":"$/progress","params":{"token":"p","value":1}}"#;
        assert_eq!(parse_incoming(progress).ok(), Some(Incoming::Other));
        let null_id = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"parse"}}"#;
        assert_eq!(parse_incoming(null_id).ok(), Some(Incoming::Other));
        let string_id = r#"{"jsonrpc":"2.0","id":"a","result":1}"#;
        assert_eq!(parse_incoming(string_id).ok(), Some(Incoming::Other));
        assert!(parse_incoming("not json").is_err());
        assert!(parse_incoming("[]").is_err());
    }

    #[test]
    fn pending_matches_ids_once() {
        let mut p = Pending::default();
        let t0 = Instant::now();
        assert!(p.insert(1, t0, "a"));
        assert!(p.insert(2, t0, "b"));
        assert!(!p.insert(1, t0, "dup"), "duplicate id must be refused");
        assert_eq!(p.len(), 2);
        let later = t0 + Duration::from_millis(5);
        let (lat, v) = p.complete(2, later).unwrap_or_else(|| unreachable!());
        assert_eq!((lat, v), (Duration::from_millis(5), "b"));
        assert!(p.complete(2, later).is_none(), "answered twice");
        assert!(p.complete(99, later).is_none(), "unknown id");
        // A clock that went backwards never yields a negative latency.
        assert_eq!(p.complete(1, t0).map(|(l, _)| l), Some(Duration::ZERO));
        assert!(p.is_empty());
    }

    #[test]
    fn request_frames_round_trip() {
        let text = request_text(42, "spin", &serde_json::json!({"ms": 10}));
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        assert_eq!(v["jsonrpc"], "2.0");
        assert_eq!(v["id"], 42);
        assert_eq!(v["method"], "spin");
        assert_eq!(v["params"]["ms"], 10);
    }
}
