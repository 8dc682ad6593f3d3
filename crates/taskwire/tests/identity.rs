//! Who is calling, and shared state: the connect hook refuses or names the
//! caller before the upgrade, and every task of the connection sees the
//! identity, the extensions and the registry's shared state; the static
//! tokens are one such hook. Real server, real WebSockets, on 127.0.0.1.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{json, Value};
use taskwire::config::AuthToken;
use taskwire::{
    Caller, Config, ConnectHook, ConnectRequest, Ctx, Error, Refusal, Registry, Server,
    ShutdownHandle, TaskError, TokenAuth,
};

/// An extension the hook attaches.
#[derive(Clone, Debug)]
struct Plan(&'static str);

/// The registry's shared state.
#[derive(Default)]
struct Hits(AtomicU64);

/// A state type nobody registers.
struct Missing;

#[derive(Deserialize, JsonSchema)]
struct Nothing {}

#[derive(Deserialize, JsonSchema)]
struct Wait {
    ms: u64,
}

/// The tasks: who am I, a shared counter, a wait (to be seen in flight), and
/// a task that asks for state nobody registered.
fn registry() -> Registry {
    let mut r = Registry::new();
    taskwire::builtin::register(&mut r).expect("registers");
    r.with_state(Hits::default());
    r.io(
        "whoami",
        "The caller and its plan",
        |ctx: Ctx, _: Nothing| async move {
            let hits = ctx.state::<Hits>()?.0.fetch_add(1, Ordering::Relaxed) + 1;
            Ok::<_, TaskError>(json!({
                "caller": ctx.caller(),
                "plan": ctx.extension::<Plan>().map(|p| p.0),
                "extensions": ctx.extensions().len(),
                "hits": hits,
            }))
        },
    )
    .expect("registers");
    r.io(
        "wait",
        "Waits, as its caller",
        |ctx: Ctx, p: Wait| async move {
            tokio::time::sleep(Duration::from_millis(p.ms)).await;
            Ok::<_, TaskError>(ctx.caller().map(str::to_owned))
        },
    )
    .expect("registers");
    r.io(
        "missing",
        "Asks for state nobody set",
        |ctx: Ctx, _: Nothing| async move {
            ctx.state::<Missing>()?;
            Ok::<_, TaskError>(())
        },
    )
    .expect("registers");
    r
}

struct Running {
    addr: SocketAddr,
    handle: ShutdownHandle,
    join: tokio::task::JoinHandle<taskwire::Result<()>>,
}

impl Running {
    async fn stop(self) {
        self.handle.shutdown();
        tokio::time::timeout(WAIT, self.join)
            .await
            .expect("the server exits")
            .expect("no panic")
            .expect("a clean exit");
    }
}

async fn start(mut cfg: Config, hook: Option<impl ConnectHook>) -> Running {
    cfg.addr = "127.0.0.1:0".parse().unwrap();
    cfg.nice = 0;
    let mut b = Server::builder(cfg, registry());
    if let Some(h) = hook {
        b = b.connect_hook(h);
    }
    let server = b.bind().await.unwrap();
    let addr = server.local_addr().unwrap();
    let handle = server.shutdown_handle();
    let join = tokio::spawn(server.run(std::future::pending()));
    Running { addr, handle, join }
}

/// The example's kind of hook: a session cookie (or, for scripts, a header)
/// names the user; without either, 401.
async fn session_hook(req: &ConnectRequest) -> Result<Caller, Refusal> {
    let user = req
        .cookie("session")
        .or(req.header("x-user"))
        .ok_or(Refusal::unauthorized("log in first"))?;
    if user == "mallory" {
        return Err(Refusal::forbidden("banned"));
    }
    let plan = if user == "alice" { "pro" } else { "free" };
    Ok(Caller::new(user).with(Plan(plan)))
}

fn metric(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no metric {line_start}")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upgrade_gets_the_hooks_status_and_message() {
    let s = start(config(), Some(session_hook)).await;
    let (status, body) = upgrade_with(s.addr, "/ws", &[]).await.err().unwrap();
    assert_eq!(status, 401);
    assert_eq!(body, "log in first [Bearer]");
    let (status, body) = upgrade_with(s.addr, "/ws", &[("Cookie", "session=mallory")])
        .await
        .err()
        .unwrap();
    assert_eq!((status, body.as_str()), (403, "banned"));
    // Counted under their own reason; the server serves the next one.
    let (_, metrics) = http(s.addr, "GET", "/metrics", None).await;
    assert_eq!(
        metric(
            &metrics,
            "taskwire_admission_refusals_total{reason=\"connect_hook\"}"
        ),
        2
    );
    let mut c = upgrade_with(s.addr, "/ws", &[("Cookie", "session=bob")])
        .await
        .unwrap();
    assert_eq!(c.call(1, "echo", json!({"value": 1})).await["result"], 1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_see_the_caller_its_extensions_and_the_shared_state() {
    let s = start(config(), Some(session_hook)).await;
    let mut alice = upgrade_with(s.addr, "/ws", &[("Cookie", "theme=dark; session=alice")])
        .await
        .unwrap();
    let mut bob = upgrade_with(s.addr, "/ws", &[("X-User", "bob")])
        .await
        .unwrap();
    let a = alice.call(1, "whoami", json!({})).await;
    assert_eq!(
        a["result"],
        json!({"caller": "alice", "plan": "pro", "extensions": 1, "hits": 1}),
        "{a}"
    );
    let b = bob.call(1, "whoami", json!({})).await;
    assert_eq!(b["result"]["caller"], "bob");
    assert_eq!(b["result"]["plan"], "free");
    // One state for the whole server, shared by both connections.
    assert_eq!(b["result"]["hits"], 2);
    // Every task of the connection, however many.
    for id in 2..6 {
        let r = alice.call(id, "whoami", json!({})).await;
        assert_eq!(r["result"]["caller"], "alice");
    }
    assert_eq!(bob.call(9, "whoami", json!({})).await["result"]["hits"], 7);

    // The admin API lists the caller with the connection and its tasks.
    alice.request(10, "wait", json!({"ms": 60_000})).await;
    let listed = eventually(|| async {
        let tasks = admin_json(s.addr, "GET", "/admin/tasks?method=wait").await;
        tasks["tasks"].as_array().is_some_and(|t| t.len() == 1)
    })
    .await;
    assert!(listed, "the waiting task is listed");
    let tasks = admin_json(s.addr, "GET", "/admin/tasks?method=wait").await;
    assert_eq!(tasks["tasks"][0]["caller"], "alice");
    let conns = admin_json(s.addr, "GET", "/admin/connections").await;
    let mut callers: Vec<String> = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["caller"].as_str().unwrap_or("-").to_string())
        .collect();
    callers.sort();
    assert_eq!(callers, ["alice", "bob"]);
    // The same JSON parses into the types `taskwire top` reads.
    let typed: taskwire::observe::api::ConnList = serde_json::from_value(conns).unwrap();
    assert!(typed
        .connections
        .iter()
        .any(|c| c.caller.as_deref() == Some("alice")));
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_state_is_an_internal_error_naming_the_type() {
    let s = start(config(), None::<TokenAuth>).await;
    let mut c = Client::connect(s.addr).await;
    let r = c.call(1, "missing", json!({})).await;
    assert_eq!(code(&r), -32603);
    let msg = r["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("Missing") && msg.contains("Registry::with_state"),
        "{msg}"
    );
    // Anonymous: no caller, no extensions; the connection lives on.
    let me = c.call(2, "whoami", json!({})).await;
    assert_eq!(
        me["result"],
        json!({"caller": null, "plan": null, "extensions": 0, "hits": 1})
    );
    let conns = admin_json(s.addr, "GET", "/admin/connections").await;
    assert_eq!(conns["connections"][0]["caller"], Value::Null);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_tokens_name_their_caller_by_position() {
    let token = |t: &str| AuthToken {
        token: t.into(),
        max_connections: None,
        max_inflight: None,
        rate_limit: None,
    };
    let cfg = Config {
        auth_tokens: vec![token("first-token-aaaaaaa"), token("second-token-bbbbbb")],
        ..config()
    };
    let s = start(cfg, None::<TokenAuth>).await;
    assert_eq!(upgrade_with(s.addr, "/ws", &[]).await.err().unwrap().0, 401);
    let mut c = upgrade_with(
        s.addr,
        "/ws",
        &[("Authorization", "Bearer second-token-bbbbbb")],
    )
    .await
    .unwrap();
    let me = c.call(1, "whoami", json!({})).await;
    assert_eq!(me["result"]["caller"], "token#1");
    s.stop().await;
}

/// A hook of the application's own type, holding the tokens: both checks.
struct TokensThenPlan {
    tokens: TokenAuth,
    opened: Arc<AtomicU64>,
}

impl ConnectHook for TokensThenPlan {
    async fn connect(&self, req: &ConnectRequest) -> Result<Caller, Refusal> {
        let caller = self.tokens.connect(req).await?;
        self.opened.fetch_add(1, Ordering::Relaxed);
        // A caller's own limit replaces the server's for its connection.
        Ok(caller.with(Plan("token")).max_inflight(1))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_can_hold_the_tokens_and_set_limits_but_not_replace_them_silently() {
    let tokens = vec![AuthToken {
        token: "the-only-token-xyz".into(),
        max_connections: Some(1),
        max_inflight: None,
        rate_limit: None,
    }];
    // Tokens in the configuration and a hook: which names the caller would
    // be a guess, so the server is not built.
    let cfg = Config {
        auth_tokens: tokens.clone(),
        addr: "127.0.0.1:0".parse().unwrap(),
        ..config()
    };
    let err = Server::builder(cfg, registry())
        .connect_hook(session_hook)
        .build()
        .expect_err("refused");
    assert!(matches!(&err, Error::Config(_)), "{err}");
    assert!(err.to_string().contains("tokens"), "{err}");

    let opened = Arc::new(AtomicU64::new(0));
    let hook = TokensThenPlan {
        tokens: TokenAuth::new(tokens),
        opened: opened.clone(),
    };
    let s = start(config(), Some(hook)).await;
    assert_eq!(upgrade_with(s.addr, "/ws", &[]).await.err().unwrap().0, 401);
    let mut c = upgrade_with(s.addr, "/ws?token=the-only-token-xyz", &[])
        .await
        .unwrap();
    // The token's own connection limit still holds, through the hook.
    let (status, _) = upgrade_with(s.addr, "/ws?token=the-only-token-xyz", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 429);
    let me = c.call(1, "whoami", json!({})).await;
    assert_eq!(me["result"]["caller"], "token#0");
    assert_eq!(me["result"]["plan"], "token");
    c.request(2, "wait", json!({"ms": 300})).await;
    let over = c.call(3, "echo", json!({"value": 3})).await;
    assert_eq!(code(&over), -32001, "max_inflight(1): {over}");
    assert_eq!(c.response(2).await["result"], "token#0");
    assert_eq!(
        opened.load(Ordering::Relaxed),
        1,
        "refused upgrades never get past the tokens"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hook_that_hangs_or_panics_refuses_and_the_server_lives_on() {
    let hook = |req: &ConnectRequest| {
        let mode = req.query("mode").map(|m| m.into_owned());
        async move {
            match mode.as_deref() {
                Some("hang") => std::future::pending().await,
                Some("panic") => panic!("a bug in the hook"),
                _ => Ok(Caller::new("ok")),
            }
        }
    };
    let cfg = Config {
        request_head_timeout: Duration::from_millis(300),
        ..config()
    };
    let s = start(cfg, Some(hook)).await;
    let (status, body) = upgrade_with(s.addr, "/ws?mode=hang", &[])
        .await
        .err()
        .unwrap();
    assert_eq!((status, body.as_str()), (503, "connect hook timed out"));
    let (status, _) = upgrade_with(s.addr, "/ws?mode=panic", &[])
        .await
        .err()
        .unwrap();
    assert_eq!(status, 500);
    let mut c = upgrade_with(s.addr, "/ws", &[]).await.unwrap();
    assert_eq!(
        c.call(1, "whoami", json!({})).await["result"]["caller"],
        "ok"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hook_sees_the_client_behind_a_trusted_proxy() {
    let hook = |req: &ConnectRequest| {
        let peer = req.peer();
        async move { Ok(Caller::new(peer.ip().to_string())) }
    };
    let cfg = Config {
        trusted_proxies: vec!["127.0.0.1".parse().unwrap()],
        ..config()
    };
    let s = start(cfg, Some(hook)).await;
    let mut c = upgrade_with(s.addr, "/ws", &[("X-Forwarded-For", "127.0.0.9")])
        .await
        .unwrap();
    assert_eq!(
        c.call(1, "whoami", json!({})).await["result"]["caller"],
        "127.0.0.9"
    );
    s.stop().await;
}

#[test]
fn detached_contexts_carry_a_caller_and_state_for_unit_tests() {
    let ctx = Ctx::detached("whoami")
        .with_caller("carol")
        .with_extension(Plan("pro"))
        .with_state(Hits::default());
    assert_eq!(ctx.caller(), Some("carol"));
    assert_eq!(ctx.extension::<Plan>().map(|p| p.0), Some("pro"));
    let hits = ctx.state::<Hits>().unwrap();
    hits.0.fetch_add(1, Ordering::Relaxed);
    assert_eq!(ctx.state::<Hits>().unwrap().0.load(Ordering::Relaxed), 1);
    assert!(ctx.state::<Missing>().is_err());
    let anonymous = Ctx::detached("x");
    assert_eq!(anonymous.caller(), None);
    assert!(anonymous.extensions().is_empty());
}
