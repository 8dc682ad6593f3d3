//! taskwire mounted in an application's own axum router (`Server::build`,
//! `router`, `shutdown`), served by `axum::serve` on 127.0.0.1:0: the app's
//! routes and taskwire's side by side, taskwire's checks still applied, and
//! graceful shutdown driven by the app. The real example binary is run by the
//! browser test (web/e2e/embed.test.mjs).

mod common;

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::time::Duration;

use axum::routing::get;
use axum::Router;
use common::{builtins, code, config, Client, WAIT};
use serde_json::json;
use taskwire::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

/// An app with its own `/hello` and taskwire under `/tasks`.
struct App {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<std::io::Result<()>>,
}

impl App {
    /// `connect_info: false` serves the app as a careless one would, without
    /// the client address.
    async fn start(mut cfg: Config, connect_info: bool) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        cfg.addr = addr;
        cfg.nice = 0;
        let tw = Server::build(cfg, builtins()).expect("build");
        assert!(tw.local_addr().is_err(), "a built server has no listener");
        let app = Router::new()
            .route("/hello", get(|| async { "hello" }))
            .nest_service("/tasks", tw.router());
        let (stop, stopped) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stopped.await;
            tw.shutdown().await;
        };
        let join = if connect_info {
            tokio::spawn(
                axum::serve(
                    listener,
                    app.into_make_service_with_connect_info::<SocketAddr>(),
                )
                .with_graceful_shutdown(shutdown)
                .into_future(),
            )
        } else {
            tokio::spawn(
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown)
                    .into_future(),
            )
        };
        App {
            addr,
            stop: Some(stop),
            join,
        }
    }

    async fn client(&self, path: &str) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{path}", self.addr))
            .await
            .expect("connect");
        Client {
            ws,
            seen: Vec::new(),
        }
    }

    /// Starts the app's graceful shutdown and waits for `axum::serve` to return.
    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(WAIT * 2, self.join)
            .await
            .expect("the app stops")
            .expect("no panic")
            .expect("serve ok");
    }
}

/// One HTTP/1.1 request with extra header lines; the whole response as text
/// (status line, headers, body).
async fn raw(addr: SocketAddr, path: &str, extra: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let host = if extra.to_ascii_lowercase().contains("host:") {
        String::new()
    } else {
        format!("Host: {addr}\r\n")
    };
    let req = format!("GET {path} HTTP/1.1\r\n{host}{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut buf))
        .await
        .expect("http timeout")
        .expect("read");
    String::from_utf8_lossy(&buf).into_owned()
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_next_to_the_apps_own_routes() {
    let app = App::start(config(), true).await;
    let a = app.addr;

    let hello = raw(a, "/hello", "").await;
    assert_eq!(status(&hello), 200, "{hello}");
    assert!(hello.ends_with("hello"), "{hello}");

    // The dashboard lives at /tasks/ (its URLs are relative to it).
    let bare = raw(a, "/tasks?token=t", "").await;
    assert_eq!(status(&bare), 307, "{bare}");
    assert!(
        bare.to_ascii_lowercase()
            .contains("location: tasks/?token=t"),
        "{bare}"
    );
    let page = raw(a, "/tasks/", "").await;
    assert_eq!(status(&page), 200, "{page}");
    assert!(page.contains("<title>taskwire"), "{page}");
    assert!(
        page.contains("src=\"dashboard.js\""),
        "relative URLs: {page}"
    );
    // The framing headers apply to the mounted routes too.
    let lower = page.to_ascii_lowercase();
    assert!(lower.contains("x-frame-options: deny"), "{page}");
    assert!(
        lower.contains("content-security-policy: frame-ancestors 'none'"),
        "{page}"
    );
    for file in ["dashboard.js", "taskwire.js", "dashboard.css", "chart.js"] {
        let r = raw(a, &format!("/tasks/{file}"), "").await;
        assert_eq!(status(&r), 200, "{file}: {r}");
    }
    assert_eq!(status(&raw(a, "/tasks/healthz", "").await), 200);
    assert_eq!(status(&raw(a, "/tasks/metrics", "").await), 200);
    assert_eq!(status(&raw(a, "/tasks/admin/stats", "").await), 200);
    // Not taskwire's: the app's own 404.
    assert_eq!(status(&raw(a, "/nothing", "").await), 404);

    // The WebSocket under the prefix runs tasks.
    let mut c = app.client("/tasks/ws").await;
    let r = c.call(1, "echo", json!({"value": "mounted"})).await;
    assert_eq!(r["result"], "mounted", "{r}");
    let r = c.call(2, "sleep", json!({"ms": 10})).await;
    assert_eq!(r["result"]["sleptMs"], 10, "{r}");
    drop(c);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_origin_and_admin_rules_still_apply_when_mounted() {
    let app = App::start(config(), true).await;
    let a = app.addr;
    // DNS rebinding: a foreign name pointed at loopback gets neither admin nor
    // an upgrade.
    let admin = raw(a, "/tasks/admin/stats", "Host: evil.example\r\n").await;
    assert_eq!(status(&admin), 403, "{admin}");
    let upgrade = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                   Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let foreign = raw(a, "/tasks/ws", &format!("{upgrade}Host: evil.example\r\n")).await;
    assert_eq!(status(&foreign), 403, "{foreign}");
    // A page on another site may not open the WebSocket.
    let mut req = format!("ws://{a}/tasks/ws")
        .into_client_request()
        .expect("request");
    req.headers_mut()
        .insert("origin", "http://evil.example".parse().expect("header"));
    let refused = tokio_tungstenite::connect_async(req).await;
    assert!(refused.is_err(), "a foreign origin was let in");
    // Nor POST to the admin API.
    let mut s = TcpStream::connect(a).await.expect("connect");
    s.write_all(
        format!(
            "POST /tasks/admin/tasks/1/kill HTTP/1.1\r\nHost: {a}\r\nOrigin: http://evil.example\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("write");
    let mut buf = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut buf))
        .await
        .expect("timeout")
        .expect("read");
    assert_eq!(status(&buf), 403, "{buf}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_proxies_apply_to_the_mounted_router() {
    let cfg = Config {
        trusted_proxies: vec!["127.0.0.1".parse().expect("range")],
        ..config()
    };
    let app = App::start(cfg, true).await;
    // From loopback itself: admin answers.
    assert_eq!(status(&raw(app.addr, "/tasks/admin/stats", "").await), 200);
    // Through the trusted proxy for a remote client: admin is loopback only.
    let remote = raw(
        app.addr,
        "/tasks/admin/stats",
        "X-Forwarded-For: 203.0.113.5\r\n",
    )
    .await;
    assert_eq!(status(&remote), 401, "{remote}");
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_connect_info_every_route_says_what_is_missing() {
    let app = App::start(config(), false).await;
    for path in ["/tasks/healthz", "/tasks/admin/stats", "/tasks/ws"] {
        let r = raw(app.addr, path, "").await;
        assert_eq!(status(&r), 500, "{path}: {r}");
        assert!(
            r.contains("into_make_service_with_connect_info"),
            "{path}: {r}"
        );
    }
    // The app's own routes are not affected.
    assert_eq!(status(&raw(app.addr, "/hello", "").await), 200);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apps_shutdown_answers_32005_and_closes_1001() {
    let cfg = Config {
        shutdown_grace: Duration::from_millis(300),
        ..config()
    };
    let app = App::start(cfg, true).await;
    let mut c = app.client("/tasks/ws").await;
    c.request(1, "runaway", json!({})).await;
    c.request(2, "sleep", json!({"ms": 60_000})).await;
    // Let them start.
    assert_eq!(c.call(0, "echo", json!({"value": 0})).await["result"], 0);
    // An admin event stream open too: the app's shutdown must not wait on it.
    let mut events = TcpStream::connect(app.addr).await.expect("connect");
    events
        .write_all(
            format!(
                "GET /tasks/admin/events HTTP/1.1\r\nHost: {}\r\n\r\n",
                app.addr
            )
            .as_bytes(),
        )
        .await
        .expect("write");
    let mut first = [0u8; 64];
    let n = tokio::time::timeout(WAIT, events.read(&mut first))
        .await
        .expect("events timeout")
        .expect("read");
    assert!(
        String::from_utf8_lossy(&first[..n]).starts_with("HTTP/1.1 200"),
        "the stream opened"
    );

    let addr = app.addr;
    let stopping = tokio::spawn(app.stop());
    assert_eq!(code(&c.response(1).await), -32005);
    assert_eq!(code(&c.response(2).await), -32005);
    assert_eq!(c.close_code().await, Some(1001));
    tokio::time::timeout(WAIT * 2, stopping)
        .await
        .expect("the app stops")
        .expect("no panic");
    // The app's listener is closed.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn build_refuses_tls_settings() {
    let cfg = Config {
        tls_cert: Some("cert.pem".into()),
        tls_key: Some("key.pem".into()),
        ..config()
    };
    let err = Server::build(cfg, builtins()).expect_err("TLS refused");
    assert!(matches!(err, taskwire::Error::Config(_)), "{err:?}");
    assert!(err.to_string().contains("tls_cert"), "{err}");
}
