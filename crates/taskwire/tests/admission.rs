//! Fair CPU admission per client address, end to end: one address flooding
//! from many connections takes its share of the CPU slots and no more.

mod common;

use std::net::{IpAddr, SocketAddr};

use common::*;
use serde_json::{json, Value};
use tokio::net::TcpSocket;
use tokio_tungstenite::MaybeTlsStream;

/// A client whose connection comes from `source` (another 127.0.0.x acts as
/// another host).
async fn connect_from(addr: SocketAddr, source: &str) -> Client {
    let ip: IpAddr = source.parse().expect("source address");
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(ip, 0))
        .expect("bind the source");
    let stream = socket.connect(addr).await.expect("connect");
    let (ws, _) =
        tokio_tungstenite::client_async(format!("ws://{addr}/ws"), MaybeTlsStream::Plain(stream))
            .await
            .expect("upgrade");
    Client {
        ws,
        seen: Vec::new(),
    }
}

fn assert_address_limit(m: &Value) {
    assert_eq!(code(m), -32001, "{m}");
    assert_eq!(m["error"]["data"]["reason"], "address_limit", "{m}");
    let retry = m["error"]["data"]["retryAfterMs"].as_u64().expect("a hint");
    assert!((50..=30_000).contains(&retry), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_address_leaves_room_for_another() {
    let mut cfg = config();
    cfg.workers = Some(2);
    cfg.connection_cpu_limit = 4;
    cfg.address_cpu_limit = 12;
    cfg.queue_limit = 1_000;
    let server = TestServer::start(cfg).await;

    // Six connections from 127.0.0.1, four `runaway` each: the first twelve
    // are admitted and run on, the rest are refused for the address.
    let mut flood = Vec::new();
    let mut refused = 0;
    for _ in 0..6 {
        let mut c = server.client().await;
        for i in 0..4 {
            c.request(
                format!("r{i}"),
                "runaway",
                json!({"_meta": {"timeoutMs": 120_000}}),
            )
            .await;
        }
        // An instant task answered in order: every refusal came before it.
        let sync = c.call("sync", "echo", json!({"value": 1})).await;
        assert_eq!(sync["result"], 1);
        for m in c.seen.drain(..) {
            assert_address_limit(&m);
            refused += 1;
        }
        flood.push(c);
    }
    assert_eq!(refused, 24 - 12, "twelve admitted, the rest refused");
    let stats = admin_json(server.addr, "GET", "/admin/stats").await;
    assert_eq!(stats["pool"]["admitted"], 12, "{stats}");
    assert_eq!(stats["pool"]["addresses"], 1, "{stats}");

    // Another connection from the flooding address is refused too...
    let mut again = server.client().await;
    let r = again
        .call(1, "hash_chain", json!({"seed": 0, "rounds": 1000}))
        .await;
    assert_address_limit(&r);

    // ...while another host is admitted and answered.
    let mut newcomer = connect_from(server.addr, "127.0.0.2").await;
    let r = newcomer
        .call(1, "hash_chain", json!({"seed": 0, "rounds": 1_000_000}))
        .await;
    assert_eq!(r["result"]["digest"], "1880736892155664098", "{r}");

    // The flood ends with its connections; the address table empties.
    drop(flood);
    drop(again);
    assert!(
        eventually(|| async {
            let s = admin_json(server.addr, "GET", "/admin/stats").await;
            s["pool"]["admitted"] == 0 && s["pool"]["addresses"] == 0
        })
        .await,
        "every slot and address entry released"
    );
    drop(newcomer);
    server.stop().await.unwrap();
}
