use std::path::PathBuf;

/// Why a benchmark run (or one of its steps) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// The arguments do not describe a run this scenario can do.
    #[error("invalid arguments: {0}")]
    InvalidArgs(String),
    /// The `--url` could not be understood.
    #[error("invalid url {url:?}: {reason}")]
    InvalidUrl {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The bench only ever connects to 127.0.0.0/8.
    #[error("refusing to connect to {0}: the bench only targets loopback addresses (127.0.0.0/8)")]
    NonLoopback(String),
    /// A server binary is missing (not built yet, or another `--bin-dir` is needed).
    #[error("server binary not found: {0} (build it with `cargo build --release`)")]
    BinaryNotFound(PathBuf),
    /// A server process could not be started.
    #[error("failed to start {name}: {source}")]
    Spawn {
        /// The binary.
        name: String,
        /// The operating system's reason.
        source: std::io::Error,
    },
    /// A started server did not print its `listening on HOST:PORT` line.
    #[error("{name} did not become ready: {reason}")]
    ServerNotReady {
        /// The binary.
        name: String,
        /// What happened instead.
        reason: String,
    },
    /// A WebSocket handshake or frame failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] Box<tokio_tungstenite::tungstenite::Error>),
    /// An I/O operation failed (socket, file, /proc).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A JSON value could not be encoded or decoded.
    #[error("json: {0}")]
    Json(#[from] serde_json::Error),
    /// The connection closed while requests were still waiting for replies.
    #[error("connection closed with requests in flight")]
    ConnectionClosed,
    /// The server broke the protocol (unparseable frame, unknown id, ...).
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A step did not finish within its time bound.
    #[error("timed out: {0}")]
    Timeout(String),
}

impl From<tokio_tungstenite::tungstenite::Error> for BenchError {
    fn from(e: tokio_tungstenite::tungstenite::Error) -> Self {
        BenchError::WebSocket(Box::new(e))
    }
}
