//! `taskwire top`: the busiest tasks and connections of a running server,
//! refreshed like `top` or the BEAM's observer, with a key to kill a task.
//!
//! On a node of a cluster it adds the node's peers (spare workers, queue,
//! last beat) and the tasks running on them, by node-qualified id (`B/17`),
//! which the kill key kills there.
//!
//! The model (what is shown, what a key does) is kept apart from the drawing
//! and from the HTTP calls, so that each is tested on its own.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use ratatui::crossterm::event::{self, Event, KeyCode, KeyEventKind};
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Block, Paragraph, Row, Table, TableState};
use ratatui::Frame;
use serde::de::DeserializeOwned;
use serde_json::Value;
use taskwire::observe::api::{ConnInfo, ConnList, Stats, TaskInfo, TaskList};

/// Arguments of `taskwire top`.
#[derive(clap::Args, Debug, Clone)]
pub struct TopArgs {
    /// The server: its HTTP side (`http://HOST:PORT`, `https://…` for TLS) or
    /// its WebSocket URL (`ws://HOST:PORT/ws`, `wss://…`); top reads the admin API.
    #[arg(long, env = "TASKWIRE_URL", default_value = "http://127.0.0.1:7878")]
    pub url: String,
    /// For `https://`: trust the certificates in this PEM file (a private CA,
    /// or the server's own self-signed certificate, which must not be marked
    /// as a CA: `openssl req -x509 … -addext basicConstraints=critical,CA:FALSE`)
    /// instead of the public roots.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub ca_file: Option<PathBuf>,
    /// For `https://`: accept any certificate, as curl's `--insecure`. The
    /// traffic is encrypted but the server unauthenticated: the admin token
    /// goes to whoever answers. Prefer `--ca-file`.
    #[arg(long)]
    pub insecure: bool,
    /// Admin token, if the server requires one.
    #[arg(long, env = "TASKWIRE_ADMIN_TOKEN")]
    pub token: Option<String>,
    /// Refresh period in ms.
    #[arg(long, default_value_t = 1000)]
    pub interval_ms: u64,
    /// Print one snapshot as text and exit (for scripts).
    #[arg(long)]
    pub once: bool,
    /// Kill this task id and exit.
    #[arg(long)]
    pub kill: Option<u64>,
    /// Print the cluster's task table once (every node's tasks, with
    /// node-qualified ids such as `b/17`) and exit.
    #[arg(long)]
    pub cluster: bool,
    /// Kill task `NODE/ID` of any node of the cluster, and exit.
    #[arg(long, value_name = "NODE/ID")]
    pub kill_on: Option<String>,
}

/// The cluster's task table as text (`GET /admin/cluster/tasks`).
pub fn render_cluster(v: &Value) -> String {
    let mut out = format!(
        "node {} · NATS {}\n",
        v["node"].as_str().unwrap_or("-"),
        if v["natsConnected"].as_bool() == Some(true) {
            "connected"
        } else {
            "not connected: serving alone"
        }
    );
    if let Some(u) = v["unreachable"].as_array().filter(|u| !u.is_empty()) {
        let names: Vec<&str> = u.iter().filter_map(Value::as_str).collect();
        out.push_str(&format!("unreachable: {}\n", names.join(", ")));
    }
    out.push_str(&format!(
        "{:<12} {:<8} {:<14} {:<9} {:>8} {:<12}\n",
        "TASK", "NODE", "METHOD", "STATE", "CPU s", "RUNS ON"
    ));
    for t in v["tasks"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<12} {:<8} {:<14} {:<9} {:>8.1} {:<12}\n",
            t["qid"].as_str().unwrap_or("-"),
            t["node"].as_str().unwrap_or("-"),
            t["method"].as_str().unwrap_or("-"),
            t["state"].as_str().unwrap_or("-"),
            t["cpuMs"].as_f64().unwrap_or(0.0) / 1000.0,
            t["runsOn"].as_str().unwrap_or(""),
        ));
    }
    out
}

/// Bytes in a short human unit, for a narrow column.
pub fn bytes_text(b: u64) -> String {
    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    match b {
        0 => "-".into(),
        b if b < M => format!("{}K", b.div_ceil(K)),
        b if b < G => format!("{:.1}M", b as f64 / M as f64),
        b => format!("{:.2}G", b as f64 / G as f64),
    }
}

/// The flags shown at the end of a row.
fn flags_text(t: &TaskInfo) -> String {
    let mut f = Vec::new();
    if t.not_yielding {
        f.push("NOT YIELDING");
    }
    if t.memory_flagged {
        f.push("MEMORY");
    }
    let mut text = f.join(" ");
    if t.detached {
        // Its session waits for a resume: the task runs on, its connection
        // is gone.
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(&format!("DETACHED (session {})", t.session.unwrap_or(0)));
    }
    text
}

/// The most session rows a snapshot keeps (the task table's bound is the
/// request's `limit`; `/admin/sessions` has none, so top cuts here).
pub const MAX_SESSION_ROWS: usize = 200;

/// One session as `/admin/sessions` lists it (the fields top shows).
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionRow {
    /// The session's id.
    pub id: u64,
    /// `attached` or `detached`.
    pub state: String,
    /// The connection attached, if any.
    #[serde(default)]
    pub conn: Option<u64>,
    /// The client's address group.
    #[serde(default)]
    pub peer: String,
    /// When it was opened (ms since the Unix epoch).
    #[serde(default)]
    pub opened_at_ms: u64,
    /// When it detached (ms since the Unix epoch).
    #[serde(default)]
    pub detached_at_ms: Option<u64>,
    /// Responses kept, unacknowledged.
    #[serde(default)]
    pub buffered_responses: u64,
    /// Their bytes.
    #[serde(default)]
    pub buffered_bytes: u64,
    /// Tasks in flight.
    #[serde(default)]
    pub tasks: u64,
}

/// The rows of `/admin/sessions`' answer, at most [`MAX_SESSION_ROWS`].
pub fn session_rows(all: &Value) -> Vec<SessionRow> {
    match all.get("sessions").and_then(Value::as_array) {
        Some(rows) => rows
            .iter()
            .take(MAX_SESSION_ROWS)
            .filter_map(|r| serde_json::from_value(r.clone()).ok())
            .collect(),
        None => Vec::new(),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A session's row: id, state, since (seconds in that state), connection,
/// buffered responses and bytes, tasks.
fn session_line(s: &SessionRow, now_ms: u64) -> String {
    let since = s.detached_at_ms.unwrap_or(s.opened_at_ms);
    format!(
        "{:>7} {:<8} {:>8.1} {:>5} {:<18} {:>6} {:>7} {:>5}",
        s.id,
        s.state,
        now_ms.saturating_sub(since) as f64 / 1000.0,
        s.conn.map_or_else(|| "-".to_string(), |c| c.to_string()),
        s.peer,
        s.buffered_responses,
        bytes_text(s.buffered_bytes),
        s.tasks
    )
}

/// The header of the sessions' rows.
const SESSION_HEADER: &str =
    "SESSION STATE     SINCE s  CONN PEER               RESP     BUF TASKS";

/// The most rows of peers' tasks a snapshot keeps (each node lists up to
/// 500 in `/admin/cluster/tasks`; a terminal shows far fewer).
pub const MAX_REMOTE_ROWS: usize = 200;

/// A peer as `/admin/cluster` lists it.
#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerRow {
    /// Its node name.
    pub node: String,
    /// Workers it has free (as last announced, less the offers sent since).
    #[serde(default)]
    pub spare: u64,
    /// Its workers.
    #[serde(default)]
    pub workers: u64,
    /// CPU tasks waiting in its queue.
    #[serde(default)]
    pub queued: u64,
    /// Since its last beat, ms.
    #[serde(default)]
    pub last_seen_ms: u64,
}

/// A task running on a peer, from the cluster's task table.
#[derive(Clone, Debug)]
pub struct RemoteTask {
    /// Its node-qualified id, `NODE/ID`.
    pub qid: String,
    /// The node it runs on.
    pub node: String,
    /// The task as its node lists it.
    pub info: TaskInfo,
}

/// The cluster as the node top reads sees it.
#[derive(Clone, Debug, Default)]
pub struct ClusterView {
    /// This node's name.
    pub node: String,
    /// Whether its NATS connection is up.
    pub nats: bool,
    /// Its peers, by name.
    pub peers: Vec<PeerRow>,
    /// Tasks running on peers (at most [`MAX_REMOTE_ROWS`]).
    pub remote: Vec<RemoteTask>,
    /// This node's tasks sent to a peer: task id → where it runs (`B/4`).
    pub runs_on: HashMap<u64, String>,
    /// Peers that did not answer for the task table.
    pub unreachable: Vec<String>,
}

impl ClusterView {
    /// From `/admin/cluster` and `/admin/cluster/tasks`; `None` if the
    /// server is not a node of a cluster.
    pub fn from_json(summary: &Value, tasks: &Value) -> Option<ClusterView> {
        let node = summary.get("node")?.as_str()?.to_string();
        let mut peers: Vec<PeerRow> = summary["peers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| serde_json::from_value(p.clone()).ok())
            .collect();
        peers.sort_by(|a, b| a.node.cmp(&b.node));
        let mut remote = Vec::new();
        let mut runs_on = HashMap::new();
        for t in tasks["tasks"].as_array().into_iter().flatten() {
            let (Some(qid), Some(on)) = (t["qid"].as_str(), t["node"].as_str()) else {
                continue;
            };
            if on == node {
                if let (Some(id), Some(r)) = (t["id"].as_u64(), t["runsOn"].as_str()) {
                    runs_on.insert(id, r.to_string());
                }
            } else if remote.len() < MAX_REMOTE_ROWS {
                if let Ok(info) = serde_json::from_value::<TaskInfo>(t.clone()) {
                    remote.push(RemoteTask {
                        qid: qid.to_string(),
                        node: on.to_string(),
                        info,
                    });
                }
            }
        }
        let unreachable = tasks["unreachable"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|u| u.as_str().map(str::to_string))
            .collect();
        Some(ClusterView {
            node,
            nats: summary["natsConnected"].as_bool() == Some(true),
            peers,
            remote,
            runs_on,
            unreachable,
        })
    }

    /// One line: the node, NATS, and each peer's spare/workers, queue and
    /// last beat.
    pub fn line(&self) -> String {
        let mut out = format!(
            "node {} · NATS {}",
            self.node,
            if self.nats {
                "connected"
            } else {
                "not connected: serving alone"
            }
        );
        if self.peers.is_empty() {
            out.push_str(" · no peer heard");
        }
        for p in &self.peers {
            out.push_str(&format!(
                " · {} {}/{} spare, {} queued, seen {:.1}s ago",
                p.node,
                p.spare,
                p.workers,
                p.queued,
                p.last_seen_ms as f64 / 1000.0
            ));
        }
        if !self.unreachable.is_empty() {
            out.push_str(&format!(" · unreachable: {}", self.unreachable.join(", ")));
        }
        out
    }
}

/// What the server said at one refresh.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Busiest tasks first.
    pub tasks: Vec<TaskInfo>,
    /// Connections.
    pub conns: Vec<ConnInfo>,
    /// `/admin/stats`.
    pub stats: Stats,
    /// `/admin/sessions`' counts (null from a server without sessions).
    pub sessions: Value,
    /// The sessions, at most [`MAX_SESSION_ROWS`] (oldest first).
    pub session_rows: Vec<SessionRow>,
    /// The cluster, on a node of one.
    pub cluster: Option<ClusterView>,
}

/// How the task table is ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sort {
    /// Most CPU first.
    Cpu,
    /// Oldest first.
    Age,
}

/// What a key asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do outside the model.
    None,
    /// Leave.
    Quit,
    /// Kill this task.
    Kill(u64),
    /// Kill task `NODE/ID` (one running on a peer).
    KillOn(String),
}

/// A row of the task table: this node's task, or one running on a peer
/// (listed after this node's).
#[derive(Clone, Copy, Debug)]
pub enum Selected<'a> {
    /// This node's task.
    Local(&'a TaskInfo),
    /// A task on a peer.
    Remote(&'a RemoteTask),
}

/// What keeps the selection on the same row across refreshes.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RowKey {
    Local(u64),
    Remote(String),
}

/// The state of the view.
#[derive(Debug)]
pub struct Model {
    /// The last snapshot.
    pub snap: Snapshot,
    /// The selected row of the task table.
    pub selected: usize,
    /// The order of the task table.
    pub sort: Sort,
    /// A one-line message (errors, kill results).
    pub status: String,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            snap: Snapshot::default(),
            selected: 0,
            sort: Sort::Cpu,
            status: "q quit · ↑↓ select · x kill · c/a sort by CPU/age".into(),
        }
    }
}

impl Model {
    /// Takes a new snapshot, keeping the selection on the same task if it lives.
    pub fn apply(&mut self, mut snap: Snapshot) {
        let keep = self.selected_row().map(|r| match r {
            Selected::Local(t) => RowKey::Local(t.id),
            Selected::Remote(r) => RowKey::Remote(r.qid.clone()),
        });
        let sort = self.sort;
        let order = |a: &TaskInfo, b: &TaskInfo| match sort {
            Sort::Cpu => b.cpu_ms.total_cmp(&a.cpu_ms),
            Sort::Age => b.age_ms.cmp(&a.age_ms),
        };
        snap.tasks.sort_by(order);
        if let Some(c) = snap.cluster.as_mut() {
            c.remote.sort_by(|a, b| order(&a.info, &b.info));
        }
        self.snap = snap;
        let found = keep.and_then(|k| match k {
            RowKey::Local(id) => self.snap.tasks.iter().position(|t| t.id == id),
            RowKey::Remote(q) => self
                .remote()
                .iter()
                .position(|r| r.qid == q)
                .map(|i| self.snap.tasks.len() + i),
        });
        self.selected = found
            .unwrap_or(self.selected)
            .min(self.rows().saturating_sub(1));
    }

    /// Tasks running on peers.
    pub fn remote(&self) -> &[RemoteTask] {
        self.snap.cluster.as_ref().map_or(&[], |c| &c.remote)
    }

    /// Rows of the task table: this node's tasks, then those on peers.
    pub fn rows(&self) -> usize {
        self.snap.tasks.len() + self.remote().len()
    }

    /// The row under the cursor.
    pub fn selected_row(&self) -> Option<Selected<'_>> {
        match self.snap.tasks.get(self.selected) {
            Some(t) => Some(Selected::Local(t)),
            None => self
                .remote()
                .get(self.selected - self.snap.tasks.len())
                .map(Selected::Remote),
        }
    }

    /// Applies a key.
    pub fn on_key(&mut self, key: KeyCode) -> Action {
        match key {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Down | KeyCode::Char('j') => {
                if self.selected + 1 < self.rows() {
                    self.selected += 1;
                }
                Action::None
            }
            KeyCode::Up | KeyCode::Char('k') => {
                self.selected = self.selected.saturating_sub(1);
                Action::None
            }
            KeyCode::Char('c') => {
                self.sort = Sort::Cpu;
                self.apply(self.snap.clone());
                Action::None
            }
            KeyCode::Char('a') => {
                self.sort = Sort::Age;
                self.apply(self.snap.clone());
                Action::None
            }
            KeyCode::Char('x') | KeyCode::Delete => match self.selected_row() {
                Some(Selected::Local(t)) => Action::Kill(t.id),
                Some(Selected::Remote(r)) => Action::KillOn(r.qid.clone()),
                None => Action::None,
            },
            _ => Action::None,
        }
    }
}

fn progress_text(v: &Value) -> String {
    match (
        v.get("done").and_then(Value::as_f64),
        v.get("total").and_then(Value::as_f64),
    ) {
        (Some(d), Some(t)) if t > 0.0 => format!("{:>3.0}%", 100.0 * d / t),
        _ if v.is_null() => String::new(),
        _ => v.to_string().chars().take(12).collect(),
    }
}

/// The sessions' part of the summary line: open, detached, bytes kept.
fn sessions_text(counts: &Value) -> String {
    let n = |k: &str| counts.get(k).and_then(Value::as_u64).unwrap_or(0);
    if counts.is_null() {
        return String::new();
    }
    format!(
        "  sessions: {} ({} detached, {} kept)",
        n("open"),
        n("detachedNow"),
        bytes_text(n("detachedBytes"))
    )
}

/// One row of the task table: its cells (task, connection, method, kind,
/// state, CPU s, age s, memory, progress, flags) and whether it is flagged.
struct TaskRow {
    cells: [String; 10],
    flagged: bool,
}

impl TaskRow {
    fn new(id: String, conn: String, t: &TaskInfo, extra: Option<String>) -> TaskRow {
        let mut flags = flags_text(t);
        if let Some(e) = extra {
            if !flags.is_empty() {
                flags.push(' ');
            }
            flags.push_str(&e);
        }
        TaskRow {
            cells: [
                id,
                conn,
                t.method.clone(),
                t.kind.as_str().to_string(),
                t.state.label().to_string(),
                format!("{:.1}", t.cpu_ms / 1000.0),
                format!("{:.1}", t.age_ms as f64 / 1000.0),
                bytes_text(t.memory_bytes),
                progress_text(&t.progress),
                flags,
            ],
            flagged: t.not_yielding || t.memory_flagged,
        }
    }
}

/// The task table's rows: this node's tasks (a task sent to a peer says
/// where it runs), then the tasks running on peers, by node-qualified id.
fn task_rows(m: &Model) -> Vec<TaskRow> {
    let cluster = m.snap.cluster.as_ref();
    let local = m.snap.tasks.iter().map(|t| {
        let on = cluster
            .and_then(|c| c.runs_on.get(&t.id))
            .map(|r| format!("ON {r}"));
        TaskRow::new(t.id.to_string(), t.conn.to_string(), t, on)
    });
    let remote = m
        .remote()
        .iter()
        .map(|r| TaskRow::new(r.qid.clone(), format!("@{}", r.node), &r.info, None));
    local.chain(remote).collect()
}

fn summary(snap: &Snapshot) -> String {
    let stats = &snap.stats;
    let p = &stats.pool;
    let t = &stats.tasks;
    format!(
        "connections {}  tasks: {} running, {} queued, {} yielded  pool: {}/{} busy, {:.0}% used, {} not yielding (ever){}",
        stats.connections,
        t.running,
        t.queued,
        t.yielded,
        p.busy,
        p.workers,
        p.utilisation * 100.0,
        p.non_yielding_total,
        sessions_text(&snap.sessions),
    )
}

/// Draws the model.
pub fn draw(frame: &mut Frame<'_>, m: &Model) {
    let [head, cluster, tasks, conns, sessions, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(u16::from(m.snap.cluster.is_some())),
        Constraint::Min(5),
        Constraint::Length(8),
        Constraint::Length(8),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(summary(&m.snap)).style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );
    if let Some(c) = &m.snap.cluster {
        let style = if c.nats {
            Style::default()
        } else {
            Style::default().fg(Color::Red)
        };
        frame.render_widget(Paragraph::new(c.line()).style(style), cluster);
    }
    let rows = task_rows(m).into_iter().map(|r| {
        let style = if r.flagged {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        Row::new(r.cells).style(style)
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(9),
            Constraint::Length(6),
            Constraint::Length(14),
            Constraint::Length(4),
            Constraint::Length(9),
            Constraint::Length(8),
            Constraint::Length(8),
            Constraint::Length(7),
            Constraint::Length(6),
            Constraint::Min(12),
        ],
    )
    .header(
        Row::new([
            "TASK", "CONN", "METHOD", "KIND", "STATE", "CPU s", "AGE s", "MEM", "PROG", "",
        ])
        .style(Style::default().add_modifier(Modifier::REVERSED)),
    )
    .row_highlight_style(
        Style::default()
            .add_modifier(Modifier::REVERSED)
            .fg(Color::Yellow),
    )
    .block(Block::bordered().title(format!(
        " tasks ({}{}) by {} ",
        m.snap.tasks.len(),
        match m.remote().len() {
            0 => String::new(),
            n => format!(" + {n} on peers"),
        },
        if m.sort == Sort::Cpu { "CPU" } else { "age" }
    )));
    let mut state = TableState::default().with_selected(Some(m.selected));
    frame.render_stateful_widget(table, tasks, &mut state);
    let conn_lines: Vec<Line<'_>> = m
        .snap
        .conns
        .iter()
        .map(|c| {
            Line::from(format!(
                "#{:<5} {:<22} in flight {:<5} age {:>7.1}s  in {:>9} B  out {:>9} B",
                c.id,
                c.peer,
                c.inflight,
                c.age_ms as f64 / 1000.0,
                c.bytes_in,
                c.bytes_out
            ))
        })
        .collect();
    frame.render_widget(
        Paragraph::new(conn_lines)
            .block(Block::bordered().title(format!(" connections ({}) ", m.snap.conns.len()))),
        conns,
    );
    let now = now_ms();
    let session_lines: Vec<Line<'_>> = std::iter::once(
        Line::from(SESSION_HEADER).style(Style::default().add_modifier(Modifier::REVERSED)),
    )
    .chain(m.snap.session_rows.iter().map(|s| {
        let line = Line::from(session_line(s, now));
        if s.state == "detached" {
            line.style(Style::default().fg(Color::Yellow))
        } else {
            line
        }
    }))
    .collect();
    frame.render_widget(
        Paragraph::new(session_lines)
            .block(Block::bordered().title(format!(" sessions ({}) ", m.snap.session_rows.len()))),
        sessions,
    );
    frame.render_widget(Paragraph::new(m.status.as_str()), foot);
}

/// Which certificates an `https://` server may present.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trust {
    /// One signed by a public root (Mozilla's list, built in).
    PublicRoots,
    /// One that chains to a certificate in this PEM file.
    CaFile(PathBuf),
    /// Any: no verification.
    Insecure,
}

impl Trust {
    /// From `--ca-file` and `--insecure` (clap keeps them exclusive).
    pub fn from_args(args: &TopArgs) -> Trust {
        match (&args.ca_file, args.insecure) {
            (_, true) => Trust::Insecure,
            (Some(file), false) => Trust::CaFile(file.clone()),
            (None, false) => Trust::PublicRoots,
        }
    }

    fn tls_config(&self) -> Result<ureq::tls::TlsConfig, String> {
        use ureq::tls::{PemItem, RootCerts, TlsConfig};
        let builder = TlsConfig::builder();
        Ok(match self {
            Trust::PublicRoots => builder.build(),
            Trust::Insecure => builder.disable_verification(true).build(),
            Trust::CaFile(path) => {
                let read_err =
                    |e: &dyn std::fmt::Display| format!("--ca-file {}: {e}", path.display());
                let pem = std::fs::read(path).map_err(|e| read_err(&e))?;
                let mut certs = Vec::new();
                for item in ureq::tls::parse_pem(&pem) {
                    if let PemItem::Certificate(c) = item.map_err(|e| read_err(&e))? {
                        certs.push(c);
                    }
                }
                if certs.is_empty() {
                    return Err(read_err(&"no PEM certificate in the file"));
                }
                builder
                    .root_certs(RootCerts::new_with_certs(&certs))
                    .build()
            }
        })
    }
}

/// The admin API's base URL from what the user gave: the HTTP side as it is,
/// a WebSocket URL turned into it (`ws` → `http`, `wss` → `https`, without
/// `/ws`), a bare `host:port` as `http://`.
pub fn base_url(url: &str) -> Result<String, String> {
    let url = url.trim().trim_end_matches('/');
    let (scheme, rest) = url.split_once("://").unwrap_or(("http", url));
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" | "ws" => "http",
        "https" | "wss" => "https",
        other => {
            return Err(format!(
                "--url: unsupported scheme {other:?} (http, https, ws, wss)"
            ))
        }
    };
    let rest = rest.strip_suffix("/ws").unwrap_or(rest);
    if rest.is_empty() {
        return Err("--url: no host".to_string());
    }
    Ok(format!("{scheme}://{rest}"))
}

/// A transport error as a line for the operator, with the fix when it is a
/// known one.
fn call_error(what: &str, e: ureq::Error) -> String {
    let text = e.to_string();
    let hint = if text.contains("CaUsedAsEndEntity") {
        " (the server's certificate is marked as a CA: make it with \
         basicConstraints CA:FALSE, or trust the CA that signed it)"
    } else if text.contains("UnknownIssuer") {
        " (not signed by a trusted root: --ca-file FILE trusts a private CA \
         or a self-signed certificate)"
    } else {
        ""
    };
    format!("{what}: {text}{hint}")
}

/// The admin API, over HTTP or HTTPS.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl AdminClient {
    /// A client for the server at `url` (see [`base_url`]), trusting `trust`
    /// for `https://`.
    pub fn new(url: &str, token: Option<String>, trust: &Trust) -> Result<AdminClient, String> {
        let base = base_url(url)?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(5)))
            .http_status_as_error(false)
            .tls_config(trust.tls_config()?)
            .build()
            .into();
        Ok(AdminClient { base, token, agent })
    }

    fn auth(&self) -> Option<String> {
        self.token.as_ref().map(|t| format!("Bearer {t}"))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, String> {
        let mut req = self.agent.get(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let mut resp = req
            .call()
            .map_err(|e| call_error(&format!("GET {path}"), e))?;
        let status = resp.status();
        if !status.is_success() {
            let body = resp.body_mut().read_to_string().unwrap_or_default();
            return Err(format!("GET {path}: {status} {body}"));
        }
        resp.body_mut()
            .read_json::<T>()
            .map_err(|e| format!("GET {path}: {e}"))
    }

    /// Everything one refresh shows.
    pub fn snapshot(&self) -> Result<Snapshot, String> {
        let tasks: TaskList = self.get("/admin/tasks?sort=cpu&limit=200")?;
        let conns: ConnList = self.get("/admin/connections")?;
        let stats: Stats = self.get("/admin/stats")?;
        // A server without sessions answers 404: the line just leaves them out.
        let all = self.get::<Value>("/admin/sessions").unwrap_or(Value::Null);
        let sessions = all["counts"].clone();
        let session_rows = session_rows(&all);
        Ok(Snapshot {
            tasks: tasks.tasks,
            conns: conns.connections,
            stats,
            sessions,
            session_rows,
            cluster: self.cluster(),
        })
    }

    /// The cluster, if the server is a node of one (a server without the
    /// cluster answers `node: null`, and one without the admin route 404).
    fn cluster(&self) -> Option<ClusterView> {
        let summary = self.get::<Value>("/admin/cluster").ok()?;
        summary["node"].as_str()?;
        // Without the table (a peer slow to answer) the peers still show.
        let tasks = self
            .get::<Value>("/admin/cluster/tasks")
            .unwrap_or(Value::Null);
        ClusterView::from_json(&summary, &tasks)
    }

    /// Kills task `NODE/ID` of any node of the cluster.
    pub fn kill_on(&self, qid: &str) -> Result<(), String> {
        let Some((node, id)) = qid.split_once('/') else {
            return Err(format!("{qid:?} is not NODE/ID"));
        };
        let id: u64 = id.parse().map_err(|_| format!("{qid:?} is not NODE/ID"))?;
        self.kill_path(&format!("/admin/tasks/{node}/{id}/kill"), qid)
    }

    /// Kills a task; its client gets -32004.
    pub fn kill(&self, id: u64) -> Result<(), String> {
        self.kill_path(&format!("/admin/tasks/{id}/kill"), &id.to_string())
    }

    fn kill_path(&self, path: &str, id: &str) -> Result<(), String> {
        let mut req = self.agent.post(format!("{}{path}", self.base));
        if let Some(a) = self.auth() {
            req = req.header("Authorization", a);
        }
        let resp = req
            .send_empty()
            .map_err(|e| call_error(&format!("POST {path}"), e))?;
        match resp.status().as_u16() {
            200 => Ok(()),
            404 => Err(format!("task {id} is gone")),
            s => Err(format!("POST {path}: {s}")),
        }
    }
}

/// Renders a snapshot as plain text (for `--once`).
pub fn render_text(m: &Model) -> String {
    let mut out = summary(&m.snap);
    out.push('\n');
    if let Some(c) = &m.snap.cluster {
        out.push_str(&c.line());
        out.push('\n');
    }
    out.push_str(&format!(
        "{:>7} {:>5} {:<14} {:<4} {:<9} {:>8} {:>8} {:>7} {:>5}\n",
        "TASK", "CONN", "METHOD", "KIND", "STATE", "CPU s", "AGE s", "MEM", "PROG"
    ));
    for r in task_rows(m) {
        let [id, conn, method, kind, state, cpu, age, mem, prog, flags] = r.cells;
        let flags = match flags {
            f if f.is_empty() => f,
            f => format!("  {f}"),
        };
        out.push_str(&format!(
            "{id:>7} {conn:>5} {method:<14} {kind:<4} {state:<9} {cpu:>8} {age:>8} {mem:>7} {prog:>5}{flags}\n"
        ));
    }
    if !m.snap.session_rows.is_empty() {
        let now = now_ms();
        out.push_str(&format!(
            "sessions ({})\n{SESSION_HEADER}\n",
            m.snap.session_rows.len()
        ));
        for s in &m.snap.session_rows {
            out.push_str(&session_line(s, now));
            out.push('\n');
        }
    }
    out
}

fn run_blocking(args: TopArgs) -> Result<(), String> {
    let client = AdminClient::new(&args.url, args.token.clone(), &Trust::from_args(&args))?;
    if let Some(id) = args.kill {
        client.kill(id)?;
        println!("killed task {id}");
        return Ok(());
    }
    if let Some(q) = &args.kill_on {
        client.kill_on(q)?;
        println!("killed task {q}");
        return Ok(());
    }
    if args.cluster {
        print!(
            "{}",
            render_cluster(&client.get::<Value>("/admin/cluster/tasks")?)
        );
        return Ok(());
    }
    let mut model = Model::default();
    if args.once {
        model.apply(client.snapshot()?);
        print!("{}", render_text(&model));
        return Ok(());
    }
    let mut terminal = ratatui::init();
    let result = (|| -> Result<(), String> {
        let period = Duration::from_millis(args.interval_ms.max(100));
        let mut next = std::time::Instant::now();
        loop {
            if std::time::Instant::now() >= next {
                match client.snapshot() {
                    Ok(s) => model.apply(s),
                    Err(e) => model.status = e,
                }
                next = std::time::Instant::now() + period;
            }
            terminal
                .draw(|f| draw(f, &model))
                .map_err(|e| e.to_string())?;
            let wait = next.saturating_duration_since(std::time::Instant::now());
            if event::poll(wait).map_err(|e| e.to_string())? {
                if let Event::Key(k) = event::read().map_err(|e| e.to_string())? {
                    if k.kind != KeyEventKind::Press {
                        continue;
                    }
                    match model.on_key(k.code) {
                        Action::Quit => return Ok(()),
                        Action::Kill(id) => {
                            model.status = match client.kill(id) {
                                Ok(()) => format!("killed task {id}"),
                                Err(e) => e,
                            };
                            next = std::time::Instant::now();
                        }
                        Action::KillOn(q) => {
                            model.status = match client.kill_on(&q) {
                                Ok(()) => format!("killed task {q}"),
                                Err(e) => e,
                            };
                            next = std::time::Instant::now();
                        }
                        Action::None => {}
                    }
                }
            }
        }
    })();
    ratatui::restore();
    result
}

/// Runs `taskwire top`.
pub async fn run(args: TopArgs) -> Result<(), String> {
    tokio::task::spawn_blocking(move || run_blocking(args))
        .await
        .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;
    use taskwire::{Config, Registry, Server};
    use tokio_tungstenite::tungstenite::Message;

    use taskwire::observe::api::{PoolInfo, TaskState};
    use taskwire::TaskKind;

    fn row(id: u64, cpu: f64, age: u64) -> TaskInfo {
        TaskInfo {
            session: None,
            detached: false,
            id,
            conn: 1,
            caller: None,
            request_id: Value::from(id),
            method: format!("m{id}"),
            kind: TaskKind::Cpu,
            state: TaskState::Running,
            age_ms: age,
            cpu_ms: cpu,
            progress: serde_json::json!({"done": 1, "total": 4}),
            not_yielding: id == 3,
            stopping: None,
            memory_bytes: (id * 3) << 20,
            memory_flagged: id == 2,
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            tasks: vec![row(1, 5.0, 300), row(2, 50.0, 100), row(3, 20.0, 200)],
            conns: vec![],
            stats: Stats {
                connections: 1,
                pool: PoolInfo {
                    workers: 2,
                    ..PoolInfo::default()
                },
                ..Stats::default()
            },
            sessions: serde_json::json!({"open": 2, "detachedNow": 1, "detachedBytes": 2048}),
            session_rows: vec![
                SessionRow {
                    id: 7,
                    state: "attached".into(),
                    conn: Some(3),
                    peer: "127.0.0.1".into(),
                    opened_at_ms: now_ms() - 5_000,
                    ..SessionRow::default()
                },
                SessionRow {
                    id: 8,
                    state: "detached".into(),
                    peer: "127.0.0.2".into(),
                    detached_at_ms: Some(now_ms() - 2_000),
                    buffered_responses: 4,
                    buffered_bytes: 3_000,
                    tasks: 2,
                    ..SessionRow::default()
                },
            ],
            cluster: None,
        }
    }

    /// The id of this node's task under the cursor.
    fn local_id(m: &Model) -> Option<u64> {
        match m.selected_row() {
            Some(Selected::Local(t)) => Some(t.id),
            _ => None,
        }
    }

    #[test]
    fn sessions_are_listed_with_their_state_buffer_and_tasks() {
        let mut m = Model::default();
        let mut s = snap();
        s.tasks[0].session = Some(8);
        s.tasks[0].detached = true;
        m.apply(s);
        let text = render_text(&m);
        assert!(text.contains("sessions (2)"), "{text}");
        assert!(text.contains(SESSION_HEADER), "{text}");
        let row = |id: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(id) && l.contains("tached"))
                .unwrap_or_else(|| panic!("session {id} in {text}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        // id, state, since, conn, peer, responses, bytes, tasks
        assert_eq!(row("7")[1], "attached");
        assert_eq!(row("7")[3], "3");
        assert_eq!(row("8")[1], "detached");
        assert_eq!(row("8")[3], "-");
        assert_eq!(row("8")[5..], ["4", "3K", "2"]);
        assert!(text.contains("DETACHED (session 8)"), "{text}");
    }

    #[test]
    fn session_rows_are_bounded() {
        let rows: Vec<Value> = (0..(MAX_SESSION_ROWS as u64 + 50))
            .map(|id| serde_json::json!({"id": id, "state": "detached"}))
            .collect();
        let kept = session_rows(&serde_json::json!({ "sessions": rows }));
        assert_eq!(kept.len(), MAX_SESSION_ROWS);
        assert_eq!(kept[0].id, 0);
        assert!(session_rows(&Value::Null).is_empty());
    }

    #[test]
    fn the_summary_shows_sessions() {
        let mut m = Model::default();
        m.apply(snap());
        let text = render_text(&m);
        assert!(text.contains("sessions: 2 (1 detached, 2K kept)"), "{text}");
        m.snap.sessions = Value::Null;
        m.snap.session_rows.clear();
        assert!(!render_text(&m).contains("sessions"));
    }

    #[test]
    fn model_sorts_selects_and_kills() {
        let mut m = Model::default();
        m.apply(snap());
        let ids: Vec<u64> = m.snap.tasks.iter().map(|t| t.id).collect();
        assert_eq!(ids, vec![2, 3, 1], "busiest first");
        assert_eq!(m.on_key(KeyCode::Down), Action::None);
        assert_eq!(m.on_key(KeyCode::Char('x')), Action::Kill(3));
        // The selection follows the task across a re-sort.
        m.on_key(KeyCode::Char('a'));
        assert_eq!(local_id(&m), Some(3));
        assert_eq!(m.snap.tasks[0].id, 1, "oldest first");
        // And across a refresh in which it is gone, it stays in range.
        m.apply(Snapshot {
            tasks: vec![row(9, 1.0, 1)],
            ..snap()
        });
        assert_eq!(local_id(&m), Some(9));
        assert_eq!(m.on_key(KeyCode::Char('q')), Action::Quit);
    }

    /// What `draw` puts on a terminal this wide, as one string.
    fn drawn(m: &Model, width: u16) -> String {
        let mut term = Terminal::new(TestBackend::new(width, 30)).unwrap();
        term.draw(|f| draw(f, m)).unwrap();
        term.backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect()
    }

    /// A node's view: its task 1 runs on B as B/7; B also runs B/8.
    fn cluster_json() -> (Value, Value) {
        let on_b = |id: u64, cpu: f64| {
            let mut v = serde_json::to_value(row(id, cpu, 100)).unwrap();
            v["node"] = "B".into();
            v["qid"] = format!("B/{id}").into();
            v
        };
        let mut own = serde_json::to_value(row(1, 5.0, 300)).unwrap();
        own["node"] = "A".into();
        own["qid"] = "A/1".into();
        own["runsOn"] = "B/7".into();
        let summary = serde_json::json!({
            "node": "A", "natsConnected": true,
            "peers": [{"node": "B", "spare": 0, "workers": 1, "queued": 2, "lastSeenMs": 300}],
        });
        let tasks = serde_json::json!({
            "node": "A", "natsConnected": true, "unreachable": [],
            "tasks": [own, on_b(7, 40.0), on_b(8, 90.0)],
        });
        (summary, tasks)
    }

    #[test]
    fn a_node_lists_its_peers_and_their_tasks_and_kills_there() {
        let (summary, tasks) = cluster_json();
        let mut m = Model::default();
        m.apply(Snapshot {
            tasks: vec![row(1, 5.0, 300)],
            cluster: ClusterView::from_json(&summary, &tasks),
            ..snap()
        });
        let text = render_text(&m);
        assert!(
            text.contains("node A · NATS connected · B 0/1 spare, 2 queued, seen 0.3s ago"),
            "{text}"
        );
        let line = |id: &str| {
            text.lines()
                .find(|l| l.split_whitespace().next() == Some(id))
                .unwrap_or_else(|| panic!("row {id} in {text}"))
                .to_string()
        };
        assert!(line("1").ends_with("ON B/7"), "{text}");
        assert!(line("B/7").contains("@B"), "{text}");
        // This node's tasks first, then the peers', busiest first.
        let order: Vec<&str> = text
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|w| ["1", "B/7", "B/8"].contains(w))
            .collect();
        assert_eq!(order, ["1", "B/8", "B/7"]);
        assert_eq!(m.on_key(KeyCode::Char('x')), Action::Kill(1));
        m.on_key(KeyCode::Down);
        m.on_key(KeyCode::Down);
        assert_eq!(m.on_key(KeyCode::Char('x')), Action::KillOn("B/7".into()));
        m.on_key(KeyCode::Down);
        assert_eq!(m.selected, 2, "the last row is the last");
        // The selection follows a peer's task across a refresh that re-sorts.
        m.on_key(KeyCode::Char('a'));
        assert!(matches!(m.selected_row(), Some(Selected::Remote(r)) if r.qid == "B/7"));
        let drawn = drawn(&m, 120);
        assert!(drawn.contains("tasks (1 + 2 on peers) by age"), "{drawn}");
        assert!(drawn.contains("B 0/1 spare"), "{drawn}");
        assert!(drawn.contains("B/8"), "{drawn}");
    }

    #[test]
    fn peers_tasks_are_bounded_and_a_lone_server_has_no_cluster_line() {
        let (summary, _) = cluster_json();
        let many: Vec<Value> = (0..MAX_REMOTE_ROWS as u64 + 50)
            .map(|id| {
                let mut v = serde_json::to_value(row(id, 1.0, 1)).unwrap();
                v["node"] = "B".into();
                v["qid"] = format!("B/{id}").into();
                v
            })
            .collect();
        let c = ClusterView::from_json(&summary, &serde_json::json!({ "tasks": many }))
            .expect("a node");
        assert_eq!(c.remote.len(), MAX_REMOTE_ROWS);
        let lone = serde_json::json!({"node": null, "natsConnected": false, "peers": []});
        assert!(ClusterView::from_json(&lone, &Value::Null).is_none());
        let cut_off = serde_json::json!({"node": "A", "natsConnected": false, "peers": []});
        let c = ClusterView::from_json(&cut_off, &Value::Null).expect("a node");
        assert_eq!(
            c.line(),
            "node A · NATS not connected: serving alone · no peer heard"
        );
        let mut m = Model::default();
        m.apply(snap());
        assert!(!render_text(&m).contains("NATS"));
    }

    #[test]
    fn urls_of_either_side_lead_to_the_admin_api() {
        let ok = |u: &str| base_url(u).unwrap();
        assert_eq!(ok("http://127.0.0.1:7878/"), "http://127.0.0.1:7878");
        assert_eq!(ok("ws://127.0.0.1:7878/ws"), "http://127.0.0.1:7878");
        assert_eq!(
            ok("wss://tasks.example:443/ws"),
            "https://tasks.example:443"
        );
        assert_eq!(ok("HTTPS://h:1"), "https://h:1");
        assert_eq!(ok("127.0.0.1:7878"), "http://127.0.0.1:7878");
        assert!(base_url("ftp://h").is_err());
        assert!(base_url("ws:///ws").is_err());
    }

    #[test]
    fn bytes_in_a_narrow_column() {
        assert_eq!(bytes_text(0), "-");
        assert_eq!(bytes_text(1), "1K");
        assert_eq!(bytes_text(3 << 20), "3.0M");
        assert_eq!(bytes_text(5 << 30), "5.00G");
    }

    #[test]
    fn draws_the_table() {
        let mut m = Model::default();
        m.apply(snap());
        let text = drawn(&m, 100);
        assert!(text.contains("NOT YIELDING"));
        assert!(text.contains("MEM"));
        assert!(text.contains("6.0M"), "task 2's memory");
        assert!(text.contains("MEMORY"), "task 2 flagged for memory");
        assert!(text.contains("m2"));
        assert!(text.contains(" 25%"));
        assert!(text.contains("tasks (3) by CPU"));
        assert!(text.contains("sessions (2)"), "{text}");
        assert!(text.contains("detached"), "{text}");
    }

    /// A real server on 127.0.0.1:0 with the built-in tasks (and the demo
    /// ones), running until `stop`.
    async fn serve(
        demo: bool,
    ) -> (
        std::net::SocketAddr,
        taskwire::ShutdownHandle,
        tokio::task::JoinHandle<Result<(), taskwire::Error>>,
    ) {
        let cfg = Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        let mut registry = Registry::new();
        taskwire::builtin::register(&mut registry).unwrap();
        if demo {
            taskwire::builtin::register_demo(&mut registry).unwrap();
        }
        let server = Server::bind(cfg, registry).await.unwrap();
        let addr = server.local_addr().unwrap();
        let stop = server.shutdown_handle();
        (addr, stop, tokio::spawn(server.run(std::future::pending())))
    }

    /// Against a real server: find the runaway, kill it, its client gets -32004.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finds_and_kills_a_runaway() {
        let (addr, stop, running) = serve(true).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        ws.send(Message::Text(
            r#"{"jsonrpc":"2.0","id":1,"method":"runaway","params":{}}"#.into(),
        ))
        .await
        .unwrap();
        let base = format!("http://{addr}");
        let found = tokio::task::spawn_blocking(move || {
            let client = AdminClient::new(&base, None, &Trust::PublicRoots).unwrap();
            let mut m = Model::default();
            for _ in 0..200 {
                m.apply(client.snapshot().unwrap());
                if m.snap.tasks.iter().any(|t| t.method == "runaway") {
                    let text = render_text(&m);
                    assert!(text.contains("runaway"), "{text}");
                    let Action::Kill(id) = m.on_key(KeyCode::Char('x')) else {
                        panic!("no task selected");
                    };
                    client.kill(id).unwrap();
                    return true;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            false
        })
        .await
        .unwrap();
        assert!(found);
        let reply = tokio::time::timeout(Duration::from_secs(20), ws.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let v: Value = serde_json::from_str(reply.to_text().unwrap()).unwrap();
        assert_eq!(v["error"]["code"], -32004);
        stop.shutdown();
        let _ = running.await;
    }

    /// Against a real server: a session cut without a close frame is listed
    /// as detached with its task, and the task stays in the task table.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lists_a_detached_session_and_its_task() {
        let (addr, stop, running) = serve(false).await;
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
            .await
            .unwrap();
        for frame in [
            r#"{"jsonrpc":"2.0","id":"open","method":"$/session.open","params":{}}"#,
            r#"{"jsonrpc":"2.0","id":1,"method":"sleep","params":{"ms":600000}}"#,
            r#"{"jsonrpc":"2.0","id":2,"method":"$/ping","params":{}}"#,
        ] {
            ws.send(Message::Text(frame.into())).await.unwrap();
        }
        // The ping's answer proves the sleep was read.
        loop {
            let m = tokio::time::timeout(Duration::from_secs(20), ws.next())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            let v: Value = serde_json::from_str(m.to_text().unwrap()).unwrap();
            if v["id"] == 2 {
                break;
            }
        }
        // Dropped without a close frame: the session detaches.
        drop(ws);
        let base = format!("http://{addr}");
        let text = tokio::task::spawn_blocking(move || {
            let client = AdminClient::new(&base, None, &Trust::PublicRoots).unwrap();
            let mut m = Model::default();
            for _ in 0..500 {
                m.apply(client.snapshot().unwrap());
                let detached = m.snap.session_rows.iter().any(|s| s.state == "detached");
                if detached && m.snap.tasks.iter().any(|t| t.detached) {
                    return Some(render_text(&m));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            None
        })
        .await
        .unwrap()
        .expect("a detached session and its task listed");
        assert!(text.contains("sessions (1)"), "{text}");
        assert!(text.contains("DETACHED (session 1)"), "{text}");
        assert!(text.contains("sleep"), "{text}");
        stop.shutdown();
        let _ = running.await;
    }
}
