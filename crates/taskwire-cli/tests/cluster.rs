//! The cluster as operators run it: a real `nats-server` on a free port and
//! `taskwire serve --nats` nodes as processes, one worker each, clients on
//! node A (set-up in `common`). Only 127.0.0.0/8 is ever contacted. No timing is asserted: every
//! wait is bounded by [`WAIT`] and checks an outcome.

mod common;

use std::ops::Deref;
use std::time::{Duration, Instant};

use common::{answer, send, until, Nats, Proc, Ws, WAIT};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// A `taskwire serve --nats` process with the demo tasks and one worker.
struct Node {
    proc: Proc,
    name: &'static str,
}

impl Deref for Node {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

fn node(name: &'static str, nats_port: u16) -> Node {
    let nats = format!("nats://127.0.0.1:{nats_port}");
    Node {
        proc: Proc::start(&["--demo", "--nats", &nats, "--node", name]),
        name,
    }
}

impl Node {
    fn peers(&self) -> usize {
        self.get("/admin/cluster")["peers"]
            .as_array()
            .map_or(0, Vec::len)
    }
}

async fn connect(n: &Node) -> Ws {
    common::connect(n.addr).await
}

/// Two nodes that have seen each other.
fn pair(port: u16) -> (Node, Node) {
    let a = node("A", port);
    let b = node("B", port);
    until("the nodes to see each other", || {
        a.peers() == 1 && b.peers() == 1
    });
    (a, b)
}

/// The peer task id `A` sent its task `origin_id` to, once accepted.
fn remote_id(a: &Node, origin_id: u64) -> Option<String> {
    a.get("/admin/cluster")["sentTasks"]
        .as_array()?
        .iter()
        .find(|t| t["id"] == origin_id)
        .and_then(|t| t["remoteId"].as_str().map(str::to_string))
}

/// Waits until A's request `request` has started on A's own worker (not
/// queued, not sent): requests sent together may otherwise start in either
/// order, and the one meant to occupy A could be the one sent to B.
fn until_started_here(a: &Node, request: i64) {
    until("the request to start on A", || {
        a.tasks().into_iter().any(|t| {
            t["requestId"] == request
                && t["state"] != "queued"
                && t["id"]
                    .as_u64()
                    .is_some_and(|id| remote_id(a, id).is_none())
        })
    });
}

/// Occupies A's one worker with a runaway (request 1), started there.
async fn occupy(ws: &mut Ws, a: &Node) {
    send(
        ws,
        json!({"jsonrpc":"2.0","id":1,"method":"runaway","params":{}}),
    )
    .await;
    until_started_here(a, 1);
}

/// NATS, nodes A and B that have seen each other, a client on A, and A's
/// one worker occupied (request 1): A's next CPU task waits, then goes to B.
async fn busy_pair() -> (Nats, Node, Node, Ws) {
    let nats = Nats::start();
    let port = nats.port;
    let (a, b) = tokio::task::spawn_blocking(move || pair(port))
        .await
        .expect("pair");
    let mut ws = connect(&a).await;
    occupy(&mut ws, &a).await;
    (nats, a, b, ws)
}

/// Waits until `b` is idle and `a` has heard so in a beat sent since. An
/// offer made earlier could meet B's worker still finishing the last task and
/// be refused; with no peer free the task is released to A's own worker,
/// which starts it within a time slice, and a started task never leaves.
fn until_idle_seen(a: &Node, b: &Node) {
    until("B to be idle", || {
        b.tasks().is_empty() && b.metrics().contains("taskwire_pool_busy_workers 0")
    });
    let idle_since = Instant::now();
    until("A to hear that B is idle", || {
        a.get("/admin/cluster")["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| {
                p["node"] == b.name
                    && p["spare"].as_u64().unwrap_or(0) >= 1
                    && p["lastSeenMs"]
                        .as_u64()
                        .is_some_and(|ms| u128::from(ms) + 50 < idle_since.elapsed().as_millis())
            })
    });
}

/// A's task id of the request with this JSON-RPC id.
fn task_id(n: &Node, request: i64) -> Option<u64> {
    n.tasks()
        .into_iter()
        .find(|t| t["requestId"] == request)
        .and_then(|t| t["id"].as_u64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_sends_tasks_to_its_peer_and_everything_crosses_the_wire() {
    // A's one worker is occupied until request 1 is killed at the end.
    let (_nats, a, b, mut ws) = busy_pair().await;
    // This one waits on A, and goes to B.
    for i in 0..1 {
        send(
            &mut ws,
            json!({"jsonrpc":"2.0","id":10 + i,"method":"count_primes",
            "params":{"below":2_000_000,"_meta":{"progressToken":format!("p{i}")}}}),
        )
        .await;
    }
    let mut progress = 0;
    for i in 0..1 {
        let v = tokio::time::timeout(
            WAIT - Duration::from_secs(1),
            answer(&mut ws, 10 + i, &mut progress),
        )
        .await
        .unwrap_or_else(|_| panic!("no answer; A: {}\nB: {}", a.log(), b.log()));
        assert_eq!(v["result"]["count"], 148933, "{v}");
    }
    assert!(progress > 0, "progress from B reached the client");
    let m = b.metrics();
    assert!(
        !m.contains("taskwire_cluster_tasks_received_total{peer=\"A\"} 0"),
        "{m}"
    );
    assert!(
        m.contains("taskwire_cluster_tasks_received_total{peer=\"A\"}"),
        "{m}"
    );

    // Cancel of a task running on B.
    until_idle_seen(&a, &b);
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":20,"method":"runaway","params":{}}),
    )
    .await;
    let a2 = std::sync::Arc::new(a);
    let ac = a2.clone();
    let rid = tokio::task::spawn_blocking(move || {
        let mut r = None;
        until("task 20 to run on B", || {
            r = task_id(&ac, 20).and_then(|id| remote_id(&ac, id));
            r.is_some()
        });
        r.unwrap()
    })
    .await
    .unwrap();
    assert!(rid.starts_with("B/"), "{rid}");
    // Either node's cluster table lists it where it runs, by its qualified id.
    for n in [&*a2, &b] {
        let table = n.get("/admin/cluster/tasks");
        let rows = table["tasks"].as_array().cloned().unwrap_or_default();
        assert!(
            rows.iter()
                .any(|t| t["qid"] == rid.as_str() && t["node"] == "B"),
            "{table}"
        );
        assert!(
            rows.iter()
                .any(|t| t["node"] == "A" && t["runsOn"] == rid.as_str()),
            "{table}"
        );
    }
    // `taskwire top` on A: the peers line, the task on B by its qualified
    // id, and A's own row saying where it runs.
    let url = format!("http://{}", a2.addr);
    let out = tokio::task::spawn_blocking(move || common::top(&["--url", &url]))
        .await
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", common::text(&out));
    assert!(
        printed.contains("node A · NATS connected · B "),
        "{printed}"
    );
    assert!(
        printed
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{rid} "))
                && l.contains("@B")
                && l.contains("runaway")),
        "{printed}"
    );
    assert!(printed.contains(&format!("ON {rid}")), "{printed}");
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":20}}),
    )
    .await;
    let v = answer(&mut ws, 20, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");

    // A deadline, sent as the time left, ends it on B.
    until_idle_seen(&a2, &b);
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":21,"method":"runaway","params":{"_meta":{"timeoutMs":1500}}}),
    )
    .await;
    let v = answer(&mut ws, 21, &mut progress).await;
    assert_eq!(v["error"]["code"], -32002, "{v}");

    // An operator on A kills the task on B by its node-qualified id, with
    // `taskwire top`.
    until_idle_seen(&a2, &b);
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":22,"method":"runaway","params":{}}),
    )
    .await;
    let ac = a2.clone();
    let rid = tokio::task::spawn_blocking(move || {
        let mut r = None;
        until("task 22 to run on B", || {
            r = task_id(&ac, 22).and_then(|id| remote_id(&ac, id));
            r.is_some()
        });
        r.unwrap()
    })
    .await
    .unwrap();
    // With top's kill (the one its kill key uses on a peer's row).
    let url = format!("http://{}", a2.addr);
    let out = tokio::task::spawn_blocking(move || common::top(&["--url", &url, "--kill-on", &rid]))
        .await
        .unwrap();
    assert!(out.status.success(), "{}", common::text(&out));
    let v = answer(&mut ws, 22, &mut progress).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");

    // An operator on B kills A's own task.
    let id1 = task_id(&a2, 1).expect("task 1 on A");
    assert_eq!(b.post(&format!("/admin/tasks/A/{id1}/kill")), 200);
    let v = answer(&mut ws, 1, &mut progress).await;
    assert_eq!(v["error"]["code"], -32004, "{v}");

    let ac = a2.clone();
    tokio::task::spawn_blocking(move || {
        until("every task table to be empty", || {
            ac.tasks().is_empty() && b.tasks().is_empty()
        })
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_node_is_answered_minus_32008_and_a_lost_origin_frees_its_peer() {
    let (nats, a, b, mut ws) = busy_pair().await;
    let port = nats.port;
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":2,"method":"runaway","params":{}}),
    )
    .await;
    let (a, mut b) = tokio::task::spawn_blocking(move || {
        until("task 2 to run on B", || {
            task_id(&a, 2).and_then(|id| remote_id(&a, id)).is_some()
        });
        (a, b)
    })
    .await
    .unwrap();
    let killed_at = Instant::now();
    let _ = b.proc.child.kill(); // SIGKILL
    let mut progress = 0;
    let v = answer(&mut ws, 2, &mut progress).await;
    assert_eq!(v["error"]["code"], -32008, "{v}");
    assert_eq!(v["error"]["data"]["node"], "B", "{v}");
    eprintln!("-32008 after {:?}", killed_at.elapsed());

    // Now the other way: B runs A's task, A dies, B's worker is freed.
    let b = node("B", port);
    let (a, b) = tokio::task::spawn_blocking(move || {
        until("B to rejoin", || a.peers() == 1 && b.peers() == 1);
        (a, b)
    })
    .await
    .unwrap();
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":3,"method":"runaway","params":{}}),
    )
    .await;
    let mut a = tokio::task::spawn_blocking(move || {
        until("task 3 to run on B", || {
            task_id(&a, 3).and_then(|id| remote_id(&a, id)).is_some()
        });
        a
    })
    .await
    .unwrap();
    assert_eq!(b.tasks().len(), 1);
    let _ = a.proc.child.kill();
    tokio::task::spawn_blocking(move || {
        until("B to cancel the lost origin's task", || {
            b.tasks().is_empty()
        });
        until("B's worker to be idle", || {
            b.get("/admin/stats").to_string().contains("\"busy\":0")
        });
        let _ = b.name;
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_nats_each_node_serves_alone_and_rejoins_when_it_is_back() {
    let nats1 = Nats::start();
    let port = nats1.port;
    let (a, b) = tokio::task::spawn_blocking(move || pair(port))
        .await
        .unwrap();
    drop(nats1);
    let (a, b) = tokio::task::spawn_blocking(move || {
        until("both to say they serve alone", || {
            a.metrics().contains("taskwire_cluster_nats_connected 0")
                && b.metrics().contains("taskwire_cluster_nats_connected 0")
                && a.peers() == 0
                && b.peers() == 0
        });
        assert!(a.log().contains("serving alone"));
        (a, b)
    })
    .await
    .unwrap();
    let mut ws = connect(&a).await;
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":1,"method":"count_primes","params":{"below":100000}}),
    )
    .await;
    let mut progress = 0;
    let v = answer(&mut ws, 1, &mut progress).await;
    assert_eq!(v["result"]["count"], 9592, "{v}");
    let _nats2 = Nats::on(port);
    tokio::task::spawn_blocking(move || {
        until("the nodes to rejoin", || a.peers() == 1 && b.peers() == 1);
        assert!(a.metrics().contains("taskwire_cluster_nats_connected 1"));
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_task_whose_node_was_lost_runs_again() {
    let (_nats, a, b, mut ws) = busy_pair().await;
    // `spin` is registered idempotent: a pure function of its params.
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":2,"method":"spin","params":{"ms":2000}}),
    )
    .await;
    let (_a, mut b) = tokio::task::spawn_blocking(move || {
        until("task 2 to run on B", || {
            task_id(&a, 2).and_then(|id| remote_id(&a, id)).is_some()
        });
        (a, b)
    })
    .await
    .unwrap();
    let _ = b.proc.child.kill();
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}),
    )
    .await;
    let mut progress = 0;
    // The cancel is answered at once; the lost task after the failure timeout.
    let v = answer(&mut ws, 1, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");
    let v = answer(&mut ws, 2, &mut progress).await;
    assert_eq!(v["result"]["spunMs"], 2000, "run again here: {v}");
}

/// A small generator for the chaos test (its seed is printed).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One client of the chaos test: what it asked and what it was answered.
struct Client {
    ws: Ws,
    asked: std::collections::BTreeSet<i64>,
    answered: std::collections::BTreeMap<i64, usize>,
}

impl Client {
    /// Reads whatever has arrived, for at most `wait`.
    async fn drain(&mut self, wait: Duration) {
        let end = tokio::time::Instant::now() + wait;
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(end, self.ws.next()).await {
            let Message::Text(t) = m else { continue };
            let v: Value = serde_json::from_str(&t).expect("JSON");
            if let Some(id) = v["id"].as_i64() {
                *self.answered.entry(id).or_default() += 1;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_request_is_answered_once_and_every_table_empties() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("chaos seed {seed}");
    let mut rng = Rng(seed);
    let nats = Nats::start();
    let port = nats.port;
    let (a, b, c) = tokio::task::spawn_blocking(move || {
        let a = node("A", port);
        let b = node("B", port);
        let c = node("C", port);
        until("three nodes to see each other", || {
            a.peers() == 2 && b.peers() == 2 && c.peers() == 2
        });
        (a, b, c)
    })
    .await
    .unwrap();
    let mut c = Some(c);
    let origins = [&a, &b];
    let mut clients: Vec<Client> = Vec::new();
    let mut next_id = 1i64;
    for step in 0..150 {
        if clients.len() < 2 {
            let n = origins[rng.below(2) as usize];
            clients.push(Client {
                ws: connect(n).await,
                asked: Default::default(),
                answered: Default::default(),
            });
        }
        let k = rng.below(clients.len() as u64) as usize;
        match rng.below(20) {
            // Submits: short and medium CPU tasks, runaways with deadlines.
            0..=11 => {
                let id = next_id;
                next_id += 1;
                let req = match rng.below(4) {
                    0 => {
                        json!({"jsonrpc":"2.0","id":id,"method":"spin","params":{"ms":rng.below(80)}})
                    }
                    1 => {
                        json!({"jsonrpc":"2.0","id":id,"method":"count_primes","params":{"below":rng.below(300_000),"_meta":{"progressToken":id}}})
                    }
                    2 => {
                        json!({"jsonrpc":"2.0","id":id,"method":"runaway","params":{"_meta":{"timeoutMs":100 + rng.below(900)}}})
                    }
                    _ => {
                        json!({"jsonrpc":"2.0","id":id,"method":"hash_chain","params":{"seed":id,"rounds":rng.below(2_000_000)}})
                    }
                };
                send(&mut clients[k].ws, req).await;
                clients[k].asked.insert(id);
            }
            // Cancels one of its requests (answered or not).
            12..=15 => {
                if let Some(&id) = clients[k]
                    .asked
                    .iter()
                    .nth(rng.below(clients[k].asked.len().max(1) as u64) as usize)
                {
                    send(
                        &mut clients[k].ws,
                        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":id}}),
                    )
                    .await;
                }
            }
            // Disconnects: its tasks are cancelled wherever they run.
            16..=17 => {
                let mut gone = clients.swap_remove(k);
                let _ = gone.ws.close(None).await;
            }
            // Kills node C (kill -9), or starts it again.
            _ => {
                if let Some(mut n) = c.take() {
                    let _ = n.proc.child.kill();
                } else if step < 120 {
                    c = Some(
                        tokio::task::spawn_blocking(move || node("C", port))
                            .await
                            .unwrap(),
                    );
                }
            }
        }
        let k = rng.below(clients.len().max(1) as u64) as usize;
        if let Some(cl) = clients.get_mut(k) {
            cl.drain(Duration::from_millis(rng.below(30))).await;
        }
    }
    // Every request of a connection still open is answered exactly once
    // (node loss included: -32008 within the failure timeout).
    for cl in &mut clients {
        let start = Instant::now();
        while cl.answered.len() < cl.asked.len() && start.elapsed() < WAIT {
            cl.drain(Duration::from_millis(200)).await;
        }
        cl.drain(Duration::from_millis(300)).await;
        for id in &cl.asked {
            assert_eq!(
                cl.answered.get(id),
                Some(&1),
                "request {id} answered once (seed {seed})"
            );
        }
        assert_eq!(
            cl.answered.len(),
            cl.asked.len(),
            "no answer to an unknown id"
        );
    }
    drop(clients);
    tokio::task::spawn_blocking(move || {
        until("every task table to be empty", || {
            a.tasks().is_empty()
                && b.tasks().is_empty()
                && c.as_ref().is_none_or(|c| c.tasks().is_empty())
        });
    })
    .await
    .unwrap();
}

// WebAssembly modules across the cluster: installed, replaced or removed on
// either node, they reach the other by hash; a wasm task waiting on a busy
// node runs on its peer, on the same code.

/// Never ends, and never reaches a checkpoint: only the engine can stop it.
const FOREVER: &str = r#"(module (func (export "run") (loop br 0)))"#;
/// Returns at once: answered `null`.
const QUICK: &str = r#"(module (func (export "run")))"#;

fn put(n: &Node, name: &str, body: &str) -> Value {
    let url = format!("http://{}/admin/wasm/{name}", n.addr);
    let mut r = ureq::put(&url).send(body).expect("PUT a module");
    r.body_mut().read_json().expect("JSON")
}

fn delete(n: &Node, name: &str) -> u16 {
    let url = format!("http://{}/admin/wasm/{name}", n.addr);
    match ureq::delete(&url).call() {
        Ok(r) => r.status().as_u16(),
        Err(ureq::Error::StatusCode(c)) => c,
        Err(e) => panic!("{e}"),
    }
}

/// The node's modules: (name, sha256, installed at).
fn modules(n: &Node) -> Vec<(String, String, u64)> {
    n.get("/admin/wasm")["modules"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_string(),
                m["sha256"].as_str().unwrap_or_default().to_string(),
                m["installedAtMs"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_module_installed_on_one_node_reaches_the_other_and_runs_there() {
    let nats = Nats::start();
    let port = nats.port;
    let (a, b) = tokio::task::spawn_blocking(move || pair(port))
        .await
        .expect("pair");

    // Installed on A: B gets the same bytes, hash and install time.
    let info = put(&a, "forever", FOREVER);
    let sha = info["sha256"].as_str().expect("sha256").to_string();
    until("B to install A's module", || modules(&b) == modules(&a));
    assert_eq!(modules(&b)[0].1, sha);

    // A's one worker is busy: the wasm task waits there, then runs on B,
    // where the engine stops it on cancel.
    let mut ws = connect(&a).await;
    occupy(&mut ws, &a).await;
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":2,"method":"forever","params":{}}),
    )
    .await;
    until("the wasm task to run on B", || {
        b.tasks()
            .iter()
            .any(|t| t["method"] == "forever" && t["kind"] == "wasm")
    });
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":2}}),
    )
    .await;
    let mut progress = 0;
    let v = answer(&mut ws, 2, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");
    until("B's task table to empty", || b.tasks().is_empty());

    // Replaced on B: A runs the new code, wherever it runs.
    std::thread::sleep(Duration::from_millis(5));
    let info = put(&b, "forever", QUICK);
    let new_sha = info["sha256"].as_str().expect("sha256").to_string();
    assert_ne!(new_sha, sha);
    until("A to take B's replacement", || {
        modules(&a).first().is_some_and(|m| m.1 == new_sha)
    });
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":3,"method":"forever","params":{}}),
    )
    .await;
    let v = answer(&mut ws, 3, &mut progress).await;
    assert_eq!(v["result"], Value::Null, "{v}");

    // Removed on A: gone from B too, and not brought back.
    assert_eq!(delete(&a, "forever"), 200);
    until("B to remove it", || modules(&b).is_empty());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(modules(&a).is_empty() && modules(&b).is_empty());
    send(
        &mut ws,
        json!({"jsonrpc":"2.0","id":4,"method":"forever","params":{}}),
    )
    .await;
    let v = answer(&mut ws, 4, &mut progress).await;
    assert_eq!(v["error"]["code"], -32601, "{v}");

    send(
        &mut ws,
        json!({"jsonrpc":"2.0","method":"$/cancelRequest","params":{"id":1}}),
    )
    .await;
    let v = answer(&mut ws, 1, &mut progress).await;
    assert_eq!(v["error"]["code"], -32800, "{v}");
}
