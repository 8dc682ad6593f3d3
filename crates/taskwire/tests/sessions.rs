//! Sessions against a real server: a connection cut without a close frame
//! (the socket dropped, or reset) detaches its session; a new connection
//! resumes it and gets every result exactly once; the bounds hold.

mod common;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::MaybeTlsStream;

/// A client of one session: counts the numbered frames it receives.
struct Sess {
    c: Client,
    token: String,
    /// Numbered frames received.
    seq: u64,
    /// Answers received per id.
    answers: HashMap<Value, Vec<Value>>,
}

/// Whether a frame is numbered: a response (or batch) to a request with an
/// id, other than the answers of `$/session.*` (ids starting with `$s`, by
/// this test's convention).
fn numbered(v: &Value) -> bool {
    match v {
        Value::Array(_) => true,
        Value::Object(m) => {
            !m.contains_key("method")
                && !m["id"].is_null()
                && !m["id"].as_str().is_some_and(|s| s.starts_with("$s"))
        }
        _ => false,
    }
}

async fn connect_with(addr: SocketAddr, origin: Option<&str>, from: Option<IpAddr>) -> Client {
    let mut req = format!("ws://{addr}/ws").into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    let tcp = match from {
        None => tokio::net::TcpStream::connect(addr).await.unwrap(),
        Some(ip) => {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind(SocketAddr::new(ip, 0)).unwrap();
            s.connect(addr).await.unwrap()
        }
    };
    let (ws, _) = tokio_tungstenite::client_async(req, MaybeTlsStream::Plain(tcp))
        .await
        .expect("upgrade");
    Client {
        ws,
        seen: Vec::new(),
    }
}

impl Sess {
    async fn open(addr: SocketAddr) -> Sess {
        Self::open_with(Client::connect(addr).await, json!({})).await
    }

    async fn open_with(mut c: Client, params: Value) -> Sess {
        let v = c.call("$s-open", "$/session.open", params).await;
        let token = v["result"]["token"]
            .as_str()
            .unwrap_or_else(|| panic!("open: {v}"))
            .to_string();
        assert!(v["result"]["session"].is_string(), "{v}");
        Sess {
            c,
            token,
            seq: 0,
            answers: HashMap::new(),
        }
    }

    fn note(&mut self, v: &Value) {
        if numbered(v) {
            self.seq += 1;
        }
        let items = match v {
            Value::Array(a) => a.clone(),
            v => vec![v.clone()],
        };
        for i in items {
            if i.get("method").is_none() && !i["id"].is_null() {
                self.answers.entry(i["id"].clone()).or_default().push(i);
            }
        }
    }

    /// Reads until every id has an answer.
    async fn wait_for(&mut self, ids: &[Value]) {
        while !ids.iter().all(|i| self.answers.contains_key(i)) {
            let Some(v) = self.c.recv().await else {
                let code = self.c.close_code().await;
                panic!("closed ({code:?}) with {:?}", self.answers.keys());
            };
            self.note(&v);
        }
    }

    async fn ack(&mut self) {
        let seq = self.seq;
        self.c
            .send(json!({"jsonrpc":"2.0","method":"$/session.ack","params":{"seq":seq}}))
            .await;
    }

    /// Cuts the TCP connection with a reset: no close frame, no FIN.
    fn cut(self) -> (String, u64, HashMap<Value, Vec<Value>>) {
        if let MaybeTlsStream::Plain(tcp) = self.c.ws.get_ref() {
            // A zero linger makes the drop send a reset (it cannot block,
            // which is what the deprecation warns of).
            #[allow(deprecated)]
            let _ = tcp.set_linger(Some(Duration::ZERO));
        }
        (self.token, self.seq, self.answers)
    }

    /// Resumes on a new connection: the answer, then the replayed frames are
    /// read as they come.
    async fn resume(
        mut c: Client,
        token: &str,
        seq: u64,
        answers: HashMap<Value, Vec<Value>>,
    ) -> Result<(Sess, Value), Value> {
        let v = c
            .call(
                "$s-resume",
                "$/session.resume",
                json!({"token": token, "seq": seq}),
            )
            .await;
        if v.get("error").is_some() {
            return Err(v);
        }
        let mut s = Sess {
            c,
            token: v["result"]["token"].as_str().unwrap().to_string(),
            seq,
            answers,
        };
        // What arrived while waiting for the answer came after it.
        for m in std::mem::take(&mut s.c.seen) {
            s.note(&m);
        }
        Ok((s, v))
    }
}

fn sleep_req(id: i64, ms: u64) -> Value {
    json!({"jsonrpc":"2.0","id":id,"method":"sleep","params":{"ms":ms}})
}

#[tokio::test]
async fn a_cut_session_resumes_and_gets_each_result_once() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    a.c.send(sleep_req(1, 300)).await;
    a.c.send(sleep_req(2, 50)).await;
    // Make sure both were read before the cut (an answer proves the reader
    // has passed them).
    a.c.call("ping", "$/ping", json!({})).await;
    let (token, seq, answers) = a.cut();
    let (mut b, answer) = Sess::resume(s.client().await, &token, seq, answers)
        .await
        .expect("resumed");
    let inflight = answer["result"]["inflight"].as_array().unwrap().len() as u64;
    let replay = answer["result"]["replay"].as_u64().unwrap();
    assert!(inflight + replay >= 1, "{answer}");
    b.wait_for(&[json!(1), json!(2)]).await;
    // Nothing more: a ping round trip lets any duplicate arrive first.
    b.c.call("ping2", "$/ping", json!({})).await;
    for m in std::mem::take(&mut b.c.seen) {
        b.note(&m);
    }
    assert_eq!(b.answers[&json!(1)].len(), 1, "{:?}", b.answers);
    assert_eq!(b.answers[&json!(2)].len(), 1, "{:?}", b.answers);
    assert_eq!(b.answers[&json!(1)][0]["result"]["sleptMs"], 300);
    assert_eq!(b.answers[&json!(2)][0]["result"]["sleptMs"], 50);
    // The old token is spent.
    let mut c = s.client().await;
    let v = c
        .call(
            "$s-r",
            "$/session.resume",
            json!({"token": token, "seq": 0}),
        )
        .await;
    assert_eq!(code(&v), -32020, "{v}");
    // The connection stays usable without a session.
    assert_eq!(
        c.call(5, "echo", json!({"value": 5})).await["result"],
        json!(5)
    );
    // The new token works once.
    let new_token = b.token.clone();
    drop(b);
    let (b2, _) = Sess::resume(s.client().await, &new_token, 0, HashMap::new())
        .await
        .expect("the new token resumes");
    drop(b2);
}

#[tokio::test]
async fn a_batch_s_elements_stay_in_flight_until_its_array_is_kept() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    a.c.send(json!([
        {"jsonrpc":"2.0","id":1,"method":"sleep","params":{"ms":400}},
        {"jsonrpc":"2.0","id":2,"method":"echo","params":{"value":2}},
    ]))
    .await;
    a.c.call("ping", "$/ping", json!({})).await;
    let (token, seq, answers) = a.cut();
    let (mut b, answer) = Sess::resume(s.client().await, &token, seq, answers)
        .await
        .expect("resumed");
    // The echo has finished, but its answer is in the array still to come:
    // it is listed as in flight, so the client does not send it again.
    let inflight = answer["result"]["inflight"].as_array().unwrap().clone();
    let replay = answer["result"]["replay"].as_u64().unwrap();
    assert!(
        replay == 1 || (inflight.contains(&json!(1)) && inflight.contains(&json!(2))),
        "{answer}"
    );
    b.wait_for(&[json!(1), json!(2)]).await;
    assert_eq!(b.answers[&json!(2)].len(), 1);
    assert_eq!(b.answers[&json!(1)][0]["result"]["sleptMs"], 400);
}

#[tokio::test]
async fn the_replay_is_what_the_client_did_not_count() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    for i in 1..=3 {
        a.c.request(i, "echo", json!({"value": i})).await;
    }
    a.wait_for(&[json!(1), json!(2), json!(3)]).await;
    assert_eq!(a.seq, 3);
    // Pretend only the first arrived: the other two are replayed, in order.
    let (token, _, _) = a.cut();
    let mut answers = HashMap::new();
    answers.insert(json!(1), vec![json!({})]);
    let (mut b, answer) = Sess::resume(s.client().await, &token, 1, answers)
        .await
        .expect("resumed");
    assert_eq!(answer["result"]["replay"], 2, "{answer}");
    assert_eq!(answer["result"]["inflight"], json!([]), "{answer}");
    b.wait_for(&[json!(2), json!(3)]).await;
    assert_eq!(b.seq, 3);
    // The numbering goes on: the next response is number 4, and an ack of
    // everything frees the buffer.
    b.c.request(4, "echo", json!({"value": 4})).await;
    b.wait_for(&[json!(4)]).await;
    assert_eq!(b.seq, 4);
    b.ack().await;
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/sessions").await;
            v["sessions"][0]["bufferedResponses"] == 0
        })
        .await
    );
}

#[tokio::test]
async fn a_client_close_1000_ends_the_session_and_its_tasks() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    a.c.send(sleep_req(1, 60_000)).await;
    a.c.call("ping", "$/ping", json!({})).await;
    let token = a.token.clone();
    a.c.ws
        .close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        }))
        .await
        .unwrap();
    drop(a);
    assert!(
        eventually(|| async {
            let t = admin_json(s.addr, "GET", "/admin/tasks").await;
            let v = admin_json(s.addr, "GET", "/admin/sessions").await;
            t["tasks"].as_array().is_some_and(|t| t.is_empty())
                && v["sessions"].as_array().is_some_and(|t| t.is_empty())
        })
        .await
    );
    let Err(v) = Sess::resume(s.client().await, &token, 0, HashMap::new()).await else {
        panic!("an ended session resumed");
    };
    assert_eq!(code(&v), -32020);
}

#[tokio::test]
async fn a_resume_with_other_credentials_is_refused_and_spends_nothing() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["http://a.example".into(), "http://b.example".into()];
    let s = TestServer::start(cfg).await;
    let a = Sess::open_with(
        connect_with(s.addr, Some("http://a.example"), None).await,
        json!({}),
    )
    .await;
    let (token, seq, answers) = a.cut();
    let other = connect_with(s.addr, Some("http://b.example"), None).await;
    let v = Sess::resume(other, &token, seq, HashMap::new())
        .await
        .err()
        .expect("refused");
    assert_eq!(code(&v), -32020);
    // Guessed and malformed tokens: the same answer.
    for bad in [
        json!("1.00"),
        json!(format!("1.{}", "0".repeat(64))),
        json!("x"),
    ] {
        let mut c = connect_with(s.addr, Some("http://a.example"), None).await;
        let v = c
            .call("$s-r", "$/session.resume", json!({"token": bad, "seq": 0}))
            .await;
        assert_eq!(code(&v), -32020, "{v}");
    }
    let mut c = s.client().await;
    let v = c.call("$s-r", "$/session.resume", json!({"seq": 0})).await;
    assert_eq!(code(&v), -32602, "{v}");
    // The owner still can.
    let same = connect_with(s.addr, Some("http://a.example"), None).await;
    Sess::resume(same, &token, seq, answers)
        .await
        .expect("the owner resumes");
}

/// A connection presenting this access token (`?token=`).
async fn connect_token(addr: SocketAddr, token: &str) -> Client {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?token={token}"))
        .await
        .expect("connect");
    Client {
        ws,
        seen: Vec::new(),
    }
}

#[tokio::test]
async fn a_resume_with_another_access_token_is_refused() {
    let token = |t: &str| taskwire::config::AuthToken {
        token: t.into(),
        max_connections: None,
        max_inflight: None,
        rate_limit: None,
    };
    let mut cfg = config();
    cfg.auth_tokens = vec![token("first-token-aaaaaaa"), token("second-token-bbbbbb")];
    let s = TestServer::start(cfg).await;
    let a = Sess::open_with(
        connect_token(s.addr, "first-token-aaaaaaa").await,
        json!({}),
    )
    .await;
    let (session_token, seq, answers) = a.cut();
    // Another caller (token#1) with the session's token: refused, nothing spent.
    let other = connect_token(s.addr, "second-token-bbbbbb").await;
    let v = Sess::resume(other, &session_token, seq, HashMap::new())
        .await
        .err()
        .expect("refused");
    assert_eq!(code(&v), -32020);
    let same = connect_token(s.addr, "first-token-aaaaaaa").await;
    Sess::resume(same, &session_token, seq, answers)
        .await
        .expect("the same caller resumes");
}

#[tokio::test]
async fn session_methods_in_the_wrong_place_get_32600() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    let v = a.c.call("$s-open2", "$/session.open", json!({})).await;
    assert_eq!(code(&v), -32600, "{v}");
    let v =
        a.c.call(
            "$s-r",
            "$/session.resume",
            json!({"token": a.token.clone(), "seq": 0}),
        )
        .await;
    assert_eq!(code(&v), -32600, "{v}");
    // Not the first request of a connection.
    let mut c = s.client().await;
    c.call(1, "echo", json!({"value": 1})).await;
    let v = c
        .call(
            "$s-r",
            "$/session.resume",
            json!({"token": a.token.clone(), "seq": 0}),
        )
        .await;
    assert_eq!(code(&v), -32600, "{v}");
    // In a batch.
    let mut c = s.client().await;
    c.send(json!([{"jsonrpc":"2.0","id":"$s-o","method":"$/session.open","params":{}}]))
        .await;
    let v = c.recv().await.unwrap();
    assert_eq!(v[0]["error"]["code"], -32600, "{v}");
    // A bad window.
    let v = c
        .call("$s-o", "$/session.open", json!({"windowMs": 0}))
        .await;
    assert_eq!(code(&v), -32602, "{v}");
}

#[tokio::test]
async fn a_shutdown_ends_detached_sessions_and_their_tasks() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    a.c.send(sleep_req(1, 600_000)).await;
    a.c.call("ping", "$/ping", json!({})).await;
    a.cut();
    assert!(
        eventually(|| async {
            admin_json(s.addr, "GET", "/admin/sessions").await["counts"]["detachedNow"] == 1
        })
        .await
    );
    // The server stops within its grace period although a detached task runs.
    s.stop().await.unwrap();
}

#[tokio::test]
async fn a_resume_closes_an_old_connection_still_open_with_4001() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    let token = a.token.clone();
    let (_b, _) = Sess::resume(s.client().await, &token, 0, HashMap::new())
        .await
        .expect("resumed");
    assert_eq!(a.c.close_code().await, Some(4001));
}

#[tokio::test]
async fn cancel_and_ids_work_across_connections_and_progress_resumes() {
    let s = TestServer::start(config()).await;
    let mut a = Sess::open(s.addr).await;
    a.c.send(sleep_req(1, 60_000)).await;
    a.c.send(json!({"jsonrpc":"2.0","id":2,"method":"count_primes",
        "params":{"below": 30_000_000u64, "_meta":{"progressToken":"p2"}}}))
        .await;
    a.c.call("ping", "$/ping", json!({})).await;
    let (token, seq, answers) = a.cut();
    let (mut b, answer) = Sess::resume(s.client().await, &token, seq, answers)
        .await
        .expect("resumed");
    let inflight = answer["result"]["inflight"].as_array().unwrap().clone();
    assert!(inflight.contains(&json!(1)), "{answer}");
    // Id 1 is still in flight in the session: a new request with it is a duplicate.
    let v = b.c.call(1, "echo", json!({"value": 1})).await;
    assert_eq!(code(&v), -32600, "{v}");
    b.seq += 1;
    // A cancel on the new connection reaches the task started on the old one.
    b.c.send(json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}))
        .await;
    b.wait_for(&[json!(1)]).await;
    assert_eq!(b.answers[&json!(1)][0]["error"]["code"], -32800);
    // Progress of the CPU task comes to the new connection (unless it had
    // already finished by the time of the resume).
    b.wait_for(&[json!(2)]).await;
    assert!(
        b.answers[&json!(2)][0]["result"]["count"].is_u64(),
        "{:?}",
        b.answers
    );
}

#[tokio::test]
async fn a_window_that_ends_cancels_the_tasks_and_the_session() {
    let s = TestServer::start(config()).await;
    let a = Sess::open_with(s.client().await, json!({"windowMs": 200})).await;
    let mut a = a;
    a.c.send(sleep_req(1, 60_000)).await;
    a.c.call("ping", "$/ping", json!({})).await;
    let (token, seq, _) = a.cut();
    assert!(
        eventually(|| async {
            let t = admin_json(s.addr, "GET", "/admin/tasks").await;
            let v = admin_json(s.addr, "GET", "/admin/sessions").await;
            t["tasks"].as_array().is_some_and(|t| t.is_empty())
                && v["sessions"].as_array().is_some_and(|t| t.is_empty())
                && v["counts"]["expired"] == 1
        })
        .await
    );
    let v = Sess::resume(s.client().await, &token, seq, HashMap::new())
        .await
        .err()
        .expect("expired");
    assert_eq!(code(&v), -32020);
    // The metrics count what happened.
    let (status, text) = http(s.addr, "GET", "/metrics", None).await;
    assert_eq!(status, 200);
    for line in [
        "taskwire_sessions_opened_total 1",
        "taskwire_sessions_detached_total 1",
        "taskwire_sessions_expired_total 1",
        "taskwire_sessions_refused_total 1",
        "taskwire_sessions_open 0",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    assert!(text.trim_end().ends_with("# EOF"), "{text}");
}

/// Cuts a session with `n` sleeps of 300 ms in flight, waits for them to end
/// while detached, resumes: every request is answered once; returns how many
/// were replaced by -32021 and the bytes the detached session held.
async fn fill_detached(s: &TestServer, n: i64) -> (usize, u64) {
    let mut a = Sess::open(s.addr).await;
    for i in 1..=n {
        a.c.send(sleep_req(i, 300)).await;
    }
    a.c.call("ping", "$/ping", json!({})).await;
    let (token, seq, answers) = a.cut();
    assert!(
        eventually(|| async {
            let v = admin_json(s.addr, "GET", "/admin/sessions").await;
            v["sessions"][0]["state"] == "detached" && v["sessions"][0]["tasks"] == 0
        })
        .await
    );
    let sessions = admin_json(s.addr, "GET", "/admin/sessions").await;
    let held = sessions["sessions"][0]["bufferedBytes"].as_u64().unwrap();
    let (mut b, _) = Sess::resume(s.client().await, &token, seq, answers)
        .await
        .expect("resumed");
    let ids: Vec<Value> = (1..=n).map(|i| json!(i)).collect();
    b.wait_for(&ids).await;
    // Acknowledged, the replay leaves room for the ping's answer.
    b.ack().await;
    b.c.call("ping2", "$/ping", json!({})).await;
    for m in std::mem::take(&mut b.c.seen) {
        b.note(&m);
    }
    let mut dropped = 0;
    for id in &ids {
        let got = &b.answers[id];
        assert_eq!(got.len(), 1, "{id}: {got:?}");
        if got[0]["error"]["code"] == -32021 {
            dropped += 1;
            assert!(got[0]["error"]["data"]["bytes"].as_u64().unwrap() > 0);
        } else {
            assert_eq!(got[0]["result"]["sleptMs"], 300, "{got:?}");
        }
    }
    (dropped, held)
}

#[tokio::test]
async fn a_detached_session_s_buffer_is_bounded_by_count() {
    let mut cfg = config();
    cfg.session_buffer_responses = 4;
    let s = TestServer::start(cfg).await;
    let (dropped, _) = fill_detached(&s, 6).await;
    // The ping's answer holds one of the four places (received, not yet
    // acknowledged), three sleeps the others.
    assert_eq!(dropped, 3);
    let counts = admin_json(s.addr, "GET", "/admin/sessions").await["counts"].clone();
    assert_eq!(counts["dropped"], 3, "{counts}");
}

#[tokio::test]
async fn a_detached_session_s_buffer_is_bounded_by_bytes() {
    let mut cfg = config();
    cfg.session_buffer_bytes = 1024;
    let s = TestServer::start(cfg).await;
    // About 50 bytes each: some twenty fit.
    let (dropped, held) = fill_detached(&s, 40).await;
    assert!((10..=30).contains(&dropped), "{dropped}");
    // The bound, plus one short error per request that was in flight.
    assert!(held <= 1024 + 40 * 200, "{held}");
}

#[tokio::test]
async fn an_attached_client_that_never_acks_is_closed_and_detached() {
    let mut cfg = config();
    cfg.session_buffer_responses = 8;
    let s = TestServer::start(cfg).await;
    let mut a = Sess::open(s.addr).await;
    for i in 1..=20 {
        a.c.request(i, "echo", json!({"value": i})).await;
    }
    assert_eq!(a.c.close_code().await, Some(1008));
    for m in std::mem::take(&mut a.c.seen) {
        a.note(&m);
    }
    let (token, seq, answers) = a.cut();
    let (mut b, _) = Sess::resume(s.client().await, &token, seq, answers)
        .await
        .expect("the session detached, not ended");
    // Every request was read before the close, or not at all: those read
    // are answered once (some with -32021), those not read are not answered.
    b.c.call("ping", "$/ping", json!({})).await;
    for m in std::mem::take(&mut b.c.seen) {
        b.note(&m);
    }
    for (id, got) in &b.answers {
        assert_eq!(got.len(), 1, "{id}: {got:?}");
    }
}

/// Opens a session from `from`, detaches it, returns its token.
async fn detached_session(addr: SocketAddr, from: IpAddr) -> String {
    let a = Sess::open_with(connect_with(addr, None, Some(from)).await, json!({})).await;
    a.cut().0
}

#[tokio::test]
async fn at_an_address_s_bound_its_oldest_detached_session_ends() {
    let mut cfg = config();
    cfg.sessions_detached_per_ip = 3;
    let s = TestServer::start(cfg).await;
    let from: IpAddr = "127.0.0.1".parse().unwrap();
    let mut tokens = Vec::new();
    for _ in 0..5 {
        tokens.push(detached_session(s.addr, from).await);
        // Detached in this order (the cut is seen before the next opens).
        assert!(
            eventually(|| async {
                let v = admin_json(s.addr, "GET", "/admin/sessions").await;
                v["sessions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|s| s["state"] == "detached")
            })
            .await
        );
    }
    let v = admin_json(s.addr, "GET", "/admin/sessions").await;
    assert_eq!(v["counts"]["detachedNow"], 3, "{v}");
    assert_eq!(v["counts"]["evicted"], 2, "{v}");
    for (i, t) in tokens.iter().enumerate() {
        let r = Sess::resume(s.client().await, t, 0, HashMap::new()).await;
        assert_eq!(r.is_ok(), i >= 2, "session {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_detached_sessions_stay_within_the_total_bound() {
    const SESSIONS: usize = 10_000;
    const BOUND: usize = 2_000;
    let mut cfg = config();
    cfg.sessions_detached = BOUND;
    cfg.sessions_detached_per_ip = SESSIONS;
    cfg.max_connections = 20_000;
    let s = TestServer::start(cfg).await;
    let rss_before = proc_status("VmRSS");
    let addr = s.addr;
    // Eight clients, each from its own address, so that ports are plenty.
    let workers: Vec<_> = (0..8u8)
        .map(|w| {
            tokio::spawn(async move {
                let from: IpAddr = format!("127.0.0.{}", 10 + w).parse().unwrap();
                let mut first = None;
                for _ in 0..SESSIONS / 8 {
                    let t = detached_session(addr, from).await;
                    first.get_or_insert(t);
                }
                first
            })
        })
        .collect();
    let mut firsts = Vec::new();
    for w in workers {
        firsts.push(w.await.unwrap().unwrap());
    }
    let done = eventually(|| async {
        let v = admin_json(addr, "GET", "/admin/sessions").await;
        v["counts"]["detached"] == SESSIONS as u64
    })
    .await;
    let v = admin_json(addr, "GET", "/admin/sessions").await;
    assert!(done, "{}", v["counts"]);
    let c = &v["counts"];
    assert!(c["detachedNow"].as_u64().unwrap() <= BOUND as u64, "{c}");
    assert_eq!(
        c["evicted"].as_u64().unwrap(),
        (SESSIONS - BOUND) as u64,
        "{c}"
    );
    // The oldest went first.
    for t in firsts {
        let r = Sess::resume(s.client().await, &t, 0, HashMap::new()).await;
        assert!(r.is_err());
    }
    let grown_kib = proc_status("VmRSS").saturating_sub(rss_before);
    eprintln!(
        "{BOUND} detached sessions kept of {SESSIONS}: RSS +{grown_kib} KiB ({} B per kept session, upper bound)",
        grown_kib * 1024 / BOUND as u64
    );
}

/// Live heap bytes, for the memory figure of a detached session.
#[global_allocator]
static ALLOC: taskwire::alloc::CountingAlloc = taskwire::alloc::CountingAlloc;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Echo requests answered per second on one connection, 64 in flight; with a
/// session, acknowledged every 64 responses as the JavaScript client does.
async fn echo_rate(addr: SocketAddr, session: bool, n: u64) -> f64 {
    let mut s = if session {
        Sess::open(addr).await
    } else {
        Sess {
            c: Client::connect(addr).await,
            token: String::new(),
            seq: 0,
            answers: HashMap::new(),
        }
    };
    // As browsers do: without it, the small ack frame waits behind Nagle's
    // algorithm for the server's delayed ACK (40 ms every 64 responses).
    if let MaybeTlsStream::Plain(tcp) = s.c.ws.get_ref() {
        tcp.set_nodelay(true).unwrap();
    }
    let start = std::time::Instant::now();
    let (mut sent, mut got) = (0u64, 0u64);
    while got < n {
        while sent < n && sent - got < 64 {
            sent += 1;
            s.c.request(sent as i64, "echo", json!({"value": sent}))
                .await;
        }
        s.c.recv().await.expect("an answer");
        got += 1;
        if session && got % 64 == 0 {
            s.c.send(json!({"jsonrpc":"2.0","method":"$/session.ack","params":{"seq":got}}))
                .await;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}

/// The figures in docs/BENCHMARKS.md (not a test: run it with
/// `cargo test -p taskwire --test sessions --config 'profile.dev.package.taskwire.opt-level=3' figures -- --ignored --nocapture`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a test"]
async fn figures() {
    let mut cfg = config();
    cfg.sessions_detached_per_ip = 10_000;
    let s = TestServer::start(cfg).await;
    // Resume and replay of 1 000 small kept responses.
    let mut times = Vec::new();
    for _ in 0..30 {
        let mut a = Sess::open(s.addr).await;
        for i in 1..=1000 {
            a.c.request(i, "echo", json!({"value": i})).await;
        }
        for _ in 0..1000 {
            a.c.recv().await.expect("an echo");
        }
        let (token, _, _) = a.cut();
        // Detached before the resume is timed.
        assert!(
            eventually(|| async {
                admin_json(s.addr, "GET", "/admin/sessions").await["counts"]["detachedNow"] == 1
            })
            .await
        );
        let mut c = s.client().await;
        let start = std::time::Instant::now();
        c.request("$s", "$/session.resume", json!({"token": token, "seq": 0}))
            .await;
        for _ in 0..1001 {
            c.recv().await.expect("the replay");
        }
        times.push(start.elapsed());
        // End it (close 1000) so that the next round starts clean.
        c.ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "".into(),
        }))
        .await
        .unwrap();
    }
    let p50 = percentile(&mut times, 0.5);
    let p99 = percentile(&mut times, 0.99);
    eprintln!("resume + replay of 1000 kept echo responses: p50 {p50:?}, p99 {p99:?} (30 runs)");

    // Memory per detached session, its buffer empty.
    const N: usize = 2000;
    assert!(
        eventually(|| async {
            admin_json(s.addr, "GET", "/admin/sessions").await["counts"]["open"] == 0
        })
        .await,
        "{}",
        admin_json(s.addr, "GET", "/admin/sessions").await
    );
    let before = taskwire::alloc::allocated_bytes();
    for _ in 0..N {
        let a = Sess::open(s.addr).await;
        a.cut();
    }
    assert!(
        eventually(|| async {
            admin_json(s.addr, "GET", "/admin/sessions").await["counts"]["detachedNow"] == N as u64
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = taskwire::alloc::allocated_bytes();
    eprintln!(
        "memory per detached session (empty buffer): {} B (live heap over {N})",
        (after as i64 - before as i64) / N as i64
    );

    // Echo throughput with a session against without, alternating.
    let mut ratios = Vec::new();
    for _ in 0..11 {
        let without = echo_rate(s.addr, false, 20_000).await;
        let with = echo_rate(s.addr, true, 20_000).await;
        eprintln!("echo: {without:.0}/s without a session, {with:.0}/s with");
        ratios.push(with / without);
    }
    ratios.sort_by(f64::total_cmp);
    eprintln!(
        "echo throughput with a session / without: median {:.3} (ratios {ratios:.3?})",
        ratios[ratios.len() / 2]
    );
}
