//! The JavaScript side and the server agree: the client's `ErrorCode` table
//! (web/taskwire.js and web/taskwire.d.ts) has the crate's error codes, and
//! every admin JSON field the dashboard (web/dashboard.js) reads is one the
//! real server sends.
//!
//! The JavaScript files are read as text: no JavaScript runs here. Each list
//! this file keeps by hand is checked against the source it mirrors, so that
//! neither side can drift without this test failing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use common::*;
use serde_json::{json, Value};
use taskwire::protocol::codes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn repo_file(rel: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every code the crate exports, by name. Checked against the source of
/// `protocol::codes` below, so a code added there must be added here too.
const CRATE_CODES: &[(&str, i32)] = &[
    ("PARSE_ERROR", codes::PARSE_ERROR),
    ("INVALID_REQUEST", codes::INVALID_REQUEST),
    ("METHOD_NOT_FOUND", codes::METHOD_NOT_FOUND),
    ("INVALID_PARAMS", codes::INVALID_PARAMS),
    ("INTERNAL_ERROR", codes::INTERNAL_ERROR),
    ("CANCELLED", codes::CANCELLED),
    ("OVERLOADED", codes::OVERLOADED),
    ("DEADLINE_EXCEEDED", codes::DEADLINE_EXCEEDED),
    ("CRASHED", codes::CRASHED),
    ("KILLED", codes::KILLED),
    ("SHUTTING_DOWN", codes::SHUTTING_DOWN),
    ("NODE_LOST", codes::NODE_LOST),
    ("MEMORY_LIMIT", codes::MEMORY_LIMIT),
    ("TRAPPED", codes::TRAPPED),
    ("NO_SUCH_SESSION", codes::NO_SUCH_SESSION),
    ("RESULT_DROPPED", codes::RESULT_DROPPED),
];

/// The client's own codes, which a server never sends (docs/CLIENT.md).
const CLIENT_ONLY: &[(&str, i32)] = &[("CONNECTION_LOST", -32099), ("NOT_CONNECTED", -32098)];

/// The text between `start` and the first `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text
        .find(start)
        .unwrap_or_else(|| panic!("`{start}` not found"))
        + start.len();
    let len = text[from..]
        .find(end)
        .unwrap_or_else(|| panic!("`{end}` not found after `{start}`"));
    &text[from..from + len]
}

/// `NAME <sep> -NNNNN` entries, one a line, comments skipped: the shape of the
/// Rust `pub const`, the JS object literal and the TypeScript type alike.
fn code_entries(block: &str, prefix: &str, sep: char) -> BTreeMap<String, i32> {
    let mut out = BTreeMap::new();
    for line in block.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(prefix) else {
            continue;
        };
        let Some((name, value)) = rest.split_once(sep) else {
            continue;
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
            continue;
        }
        // Rust says `NAME: i32 = -32700;`, JS `NAME: -32700,`, TypeScript `NAME: -32700;`.
        let value = value.rsplit('=').next().unwrap_or(value);
        let value = value.trim().trim_end_matches([',', ';']);
        let value: i32 = value
            .parse()
            .unwrap_or_else(|e| panic!("code {name}: `{value}`: {e}"));
        assert!(
            out.insert(name.to_string(), value).is_none(),
            "{name} listed twice"
        );
    }
    out
}

fn as_map(list: &[(&str, i32)]) -> BTreeMap<String, i32> {
    list.iter().map(|(n, v)| (n.to_string(), *v)).collect()
}

#[test]
fn crate_code_list_matches_protocol_rs() {
    let src = repo_file("crates/taskwire/src/protocol.rs");
    let block = between(&src, "pub mod codes {", "\n}");
    assert_eq!(
        code_entries(block, "pub const ", ':'),
        as_map(CRATE_CODES),
        "CRATE_CODES in this test lists every constant of protocol::codes"
    );
    let values: BTreeSet<i32> = CRATE_CODES.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        values.len(),
        CRATE_CODES.len(),
        "no two codes share a value"
    );
}

#[test]
fn js_error_codes_match_the_crate() {
    let js = repo_file("web/taskwire.js");
    let table = code_entries(
        between(&js, "export const ErrorCode = Object.freeze({", "});"),
        "",
        ':',
    );
    let mut expected = as_map(CRATE_CODES);
    expected.extend(as_map(CLIENT_ONLY));
    assert_eq!(
        table, expected,
        "web/taskwire.js ErrorCode = protocol::codes + the client's own"
    );
    // The client's own codes must never collide with a server code.
    for (name, v) in CLIENT_ONLY {
        assert!(
            CRATE_CODES.iter().all(|(_, c)| c != v),
            "client code {name} = {v} is also a server code"
        );
    }
}

#[test]
fn ts_error_codes_match_the_crate() {
    let ts = repo_file("web/taskwire.d.ts");
    let table = code_entries(
        between(&ts, "export declare const ErrorCode: Readonly<{", "}>;"),
        "",
        ':',
    );
    let mut expected = as_map(CRATE_CODES);
    expected.extend(as_map(CLIENT_ONLY));
    assert_eq!(
        table, expected,
        "web/taskwire.d.ts ErrorCode = protocol::codes + the client's own"
    );
}

#[test]
fn every_code_in_the_protocol_doc_is_exported() {
    // docs/PROTOCOL.md's table rows start `| -32xxx |`.
    let doc = repo_file("docs/PROTOCOL.md");
    let values: BTreeSet<i32> = CRATE_CODES.iter().map(|(_, v)| *v).collect();
    let mut seen = 0;
    for line in doc.lines() {
        let Some(rest) = line.strip_prefix("| -32") else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let code: i32 = format!("-32{digits}").parse().expect("a code");
        assert!(
            values.contains(&code),
            "docs/PROTOCOL.md lists {code}, protocol::codes does not"
        );
        seen += 1;
    }
    assert!(
        seen >= 10,
        "found the codes table in docs/PROTOCOL.md ({seen} rows)"
    );
}

// ---------------------------------------------------------------- admin fields

/// The fields web/dashboard.js reads from /admin/stats (and the `stats` of an
/// /admin/events snapshot), as paths.
const STATS_FIELDS: &[&str] = &[
    "uptimeMs",
    "connections",
    "pool.workers",
    "pool.utilisation",
    "tasks.running",
    "tasks.queued",
    "finished.ok",
    "finished.crashed",
    "finished.killed",
    "finished.refused",
];

/// The fields it reads from each task of /admin/tasks and of a snapshot.
const TASK_FIELDS: &[&str] = &[
    "id",
    "method",
    "conn",
    "requestId",
    "kind",
    "state",
    "ageMs",
    "cpuMs",
    "progress",
    "notYielding",
    "memoryBytes",
    "memoryFlagged",
    "session",
    "detached",
];

/// The top-level fields: /admin/tasks is `{tasks}`, a snapshot `{stats, tasks}`.
const ENVELOPE_FIELDS: &[&str] = &["tasks", "stats"];

// The dashboard reads nothing from /admin/connections (the connection count
// comes from the stats); when it does, its fields belong in a list here.

/// The names the dashboard uses for the server's JSON in dashboard.js: `t` a
/// task (or the /admin/tasks answer), `stats`/`lastStats` the stats, `f` their
/// `finished`, `snap` a snapshot.
const JSON_VARS: &[&str] = &["t", "stats", "lastStats", "f", "snap"];

/// Every `VAR.field`, `VAR?.field` and `VAR.group?.field` in the dashboard's
/// source for the variables that hold server JSON, and the fields of
/// `const { a, b = x } = snap`.
fn fields_read(js: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = js.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let word_at = |i: usize| -> &str {
        let end = (i..bytes.len())
            .find(|&j| !ident(bytes[j]))
            .unwrap_or(bytes.len());
        &js[i..end]
    };
    for var in JSON_VARS {
        let mut from = 0;
        while let Some(pos) = js[from..].find(var) {
            let at = from + pos;
            from = at + var.len();
            if at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b'.') {
                continue;
            }
            let mut i = at + var.len();
            // `?.` or `.` then a field, at most twice (stats.pool?.workers).
            for _ in 0..2 {
                if js[i..].starts_with("?.") {
                    i += 2;
                } else if js[i..].starts_with('.') {
                    i += 1;
                } else {
                    break;
                }
                let w = word_at(i);
                if w.is_empty() {
                    break;
                }
                out.insert(w.to_string());
                i += w.len();
            }
        }
    }
    for body in js.split("const {").skip(1) {
        let Some((names, rhs)) = body.split_once("} =") else {
            continue;
        };
        if JSON_VARS.contains(&word_at_str(rhs.trim_start())) {
            for n in names.split(',') {
                let n = n.split('=').next().unwrap_or("").trim();
                if !n.is_empty() {
                    out.insert(n.to_string());
                }
            }
        }
    }
    out
}

fn word_at_str(s: &str) -> &str {
    let end = s
        .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '$'))
        .unwrap_or(s.len());
    &s[..end]
}

/// The last segment of every listed path, and the groups they pass through.
fn listed_names() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for path in STATS_FIELDS
        .iter()
        .chain(TASK_FIELDS)
        .chain(ENVELOPE_FIELDS)
    {
        for seg in path.split('.') {
            out.insert(seg.to_string());
        }
    }
    out
}

#[test]
fn the_field_lists_match_dashboard_js() {
    let js = repo_file("web/dashboard.js");
    let listed = listed_names();
    // Each listed name really occurs in the dashboard, as a whole word...
    for name in &listed {
        let found = js.match_indices(name.as_str()).any(|(i, _)| {
            let before = js[..i].chars().next_back();
            let after = js[i + name.len()..].chars().next();
            let boundary =
                |c: Option<char>| c.is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
            boundary(before) && boundary(after)
        });
        assert!(
            found,
            "`{name}` is listed here but web/dashboard.js never uses it"
        );
    }
    // ...and every field the dashboard reads from server JSON is listed.
    let read = fields_read(&js);
    assert!(
        read.len() >= 10,
        "the scan found the dashboard's reads: {read:?}"
    );
    let unlisted: Vec<_> = read.difference(&listed).collect();
    assert!(
        unlisted.is_empty(),
        "web/dashboard.js reads {unlisted:?} from server JSON: add them to the lists in this test"
    );
}

/// `v` has every dotted `path`.
fn assert_has(v: &Value, path: &str, what: &str) {
    let mut cur = v;
    for seg in path.split('.') {
        cur = cur
            .get(seg)
            .unwrap_or_else(|| panic!("{what}: no `{path}` (at `{seg}`) in {v}"));
    }
}

/// The first snapshot of /admin/events that holds at least one task.
async fn snapshot_with_tasks(addr: std::net::SocketAddr) -> Value {
    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // HTTP/1.0: the body is the stream itself, not chunked.
    let req =
        format!("GET /admin/events HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    sock.write_all(req.as_bytes()).await.expect("write");
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the event stream ended");
            buf.extend_from_slice(&chunk[..n]);
            let text = String::from_utf8_lossy(&buf).to_string();
            // Complete events end with a blank line.
            let mut consumed = 0;
            for event in text.split_inclusive("\n\n") {
                if !event.ends_with("\n\n") {
                    break;
                }
                consumed += event.len();
                let Some(data) = event.lines().find_map(|l| l.strip_prefix("data: ")) else {
                    continue;
                };
                if !event.contains("event: snapshot") {
                    continue;
                }
                let v: Value = serde_json::from_str(data).expect("snapshot json");
                if v["tasks"].as_array().is_some_and(|t| !t.is_empty()) {
                    return v;
                }
            }
            buf.drain(..consumed.min(buf.len()));
        }
    };
    tokio::time::timeout(WAIT, read)
        .await
        .expect("a snapshot with tasks")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_fields_exist_in_what_the_server_sends() {
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    // A CPU task with progress (so `progress` is filled), a runaway (the Top
    // view's case) and an I/O task: every field the dashboard shows has a value.
    c.request(
        1,
        "count_primes",
        json!({"below": 10_000_000_000u64, "_meta": {"progressToken": "p1"}}),
    )
    .await;
    c.request(2, "runaway", json!({})).await;
    c.request(3, "sleep", json!({"ms": 60_000})).await;
    assert!(
        eventually(|| async {
            let t = admin_json(s.addr, "GET", "/admin/tasks").await;
            t["tasks"].as_array().is_some_and(|t| t.len() >= 3)
        })
        .await,
        "the three tasks are listed"
    );

    let stats = admin_json(s.addr, "GET", "/admin/stats").await;
    for f in STATS_FIELDS {
        assert_has(&stats, f, "/admin/stats");
    }

    // The exact query the dashboard's polling fallback makes.
    let tasks = admin_json(s.addr, "GET", "/admin/tasks?sort=cpu&limit=500").await;
    assert_has(&tasks, "tasks", "/admin/tasks");
    let list = tasks["tasks"].as_array().expect("tasks is an array");
    assert!(list.len() >= 3);
    for t in list {
        for f in TASK_FIELDS {
            assert_has(t, f, "/admin/tasks task");
        }
    }

    let conns = admin_json(s.addr, "GET", "/admin/connections").await;
    assert!(conns["connections"]
        .as_array()
        .is_some_and(|c| !c.is_empty()));

    let snap = snapshot_with_tasks(s.addr).await;
    for f in ENVELOPE_FIELDS {
        assert_has(&snap, f, "/admin/events snapshot");
    }
    for f in STATS_FIELDS {
        assert_has(&snap["stats"], f, "/admin/events snapshot stats");
    }
    for t in snap["tasks"].as_array().expect("tasks") {
        for f in TASK_FIELDS {
            assert_has(t, f, "/admin/events snapshot task");
        }
    }

    // Closing the client cancels its tasks; the server then stops cleanly.
    drop(c);
    s.stop().await.expect("server stops");
}

/// The fields web/sessions-card.js reads from a session (`s.field`).
fn session_card_fields() -> BTreeSet<String> {
    let js = repo_file("web/sessions-card.js");
    let bytes = js.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut out = BTreeSet::new();
    for (at, _) in js.match_indices("s.") {
        if at > 0 && (ident(bytes[at - 1]) || bytes[at - 1] == b'.') {
            continue;
        }
        let start = at + 2;
        let end = (start..bytes.len())
            .find(|&j| !ident(bytes[j]))
            .unwrap_or(bytes.len());
        if end > start {
            out.insert(js[start..end].to_string());
        }
    }
    out
}

#[tokio::test]
async fn sessions_card_fields_exist_in_what_the_server_sends() {
    let read = session_card_fields();
    assert!(read.len() >= 8, "the scan found the card's reads: {read:?}");
    let s = TestServer::start(config()).await;
    let mut c = s.client().await;
    let v = c.call("o", "$/session.open", json!({})).await;
    assert!(v["result"]["token"].is_string(), "{v}");
    let list = admin_json(s.addr, "GET", "/admin/sessions").await;
    let session = list["sessions"][0].as_object().cloned().expect("a session");
    let missing: Vec<_> = read.iter().filter(|f| !session.contains_key(*f)).collect();
    assert!(
        missing.is_empty(),
        "web/sessions-card.js reads {missing:?}, which /admin/sessions does not send: {list}"
    );
}
