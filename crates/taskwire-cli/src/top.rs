//! `taskwire top`: the busiest tasks and connections of a running server,
//! refreshed like `top` or the BEAM's observer, with a key to kill a task.
//!
//! The model (what is shown, what a key does) is kept apart from the drawing
//! and from the HTTP calls, so that each is tested on its own.

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
    f.join(" ")
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing to do outside the model.
    None,
    /// Leave.
    Quit,
    /// Kill this task.
    Kill(u64),
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
        let keep = self.selected_task().map(|t| t.id);
        match self.sort {
            Sort::Cpu => snap.tasks.sort_by(|a, b| b.cpu_ms.total_cmp(&a.cpu_ms)),
            Sort::Age => snap.tasks.sort_by_key(|t| std::cmp::Reverse(t.age_ms)),
        }
        self.selected = keep
            .and_then(|id| snap.tasks.iter().position(|t| t.id == id))
            .unwrap_or(self.selected)
            .min(snap.tasks.len().saturating_sub(1));
        self.snap = snap;
    }

    /// The task under the cursor.
    pub fn selected_task(&self) -> Option<&TaskInfo> {
        self.snap.tasks.get(self.selected)
    }

    /// Applies a key.
    pub fn on_key(&mut self, key: KeyCode) -> Action {
        match key {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Down | KeyCode::Char('j') => {
                if self.selected + 1 < self.snap.tasks.len() {
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
            KeyCode::Char('x') | KeyCode::Delete => match self.selected_task() {
                Some(t) => Action::Kill(t.id),
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
    let [head, tasks, conns, foot] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(5),
        Constraint::Length(8),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(summary(&m.snap)).style(Style::default().add_modifier(Modifier::BOLD)),
        head,
    );
    let rows = m.snap.tasks.iter().map(|t| {
        let style = if t.not_yielding || t.memory_flagged {
            Style::default().fg(Color::Red)
        } else {
            Style::default()
        };
        Row::new(vec![
            t.id.to_string(),
            t.conn.to_string(),
            t.method.clone(),
            t.kind.as_str().to_string(),
            t.state.label().to_string(),
            format!("{:.1}", t.cpu_ms / 1000.0),
            format!("{:.1}", t.age_ms as f64 / 1000.0),
            bytes_text(t.memory_bytes),
            progress_text(&t.progress),
            flags_text(t),
        ])
        .style(style)
    });
    let table = Table::new(
        rows,
        [
            Constraint::Length(7),
            Constraint::Length(5),
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
        " tasks ({}) by {} ",
        m.snap.tasks.len(),
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
        let sessions = self
            .get::<Value>("/admin/sessions")
            .map(|v| v["counts"].clone())
            .unwrap_or(Value::Null);
        Ok(Snapshot {
            tasks: tasks.tasks,
            conns: conns.connections,
            stats,
            sessions,
        })
    }

    /// Kills a task; its client gets -32004.
    pub fn kill(&self, id: u64) -> Result<(), String> {
        let path = format!("/admin/tasks/{id}/kill");
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
    out.push_str(&format!(
        "{:>7} {:>5} {:<14} {:<4} {:<9} {:>8} {:>8} {:>7} {:>5}\n",
        "TASK", "CONN", "METHOD", "KIND", "STATE", "CPU s", "AGE s", "MEM", "PROG"
    ));
    for t in &m.snap.tasks {
        out.push_str(&format!(
            "{:>7} {:>5} {:<14} {:<4} {:<9} {:>8.1} {:>8.1} {:>7} {:>5}{}\n",
            t.id,
            t.conn,
            t.method,
            t.kind.as_str(),
            t.state.label(),
            t.cpu_ms / 1000.0,
            t.age_ms as f64 / 1000.0,
            bytes_text(t.memory_bytes),
            progress_text(&t.progress),
            match flags_text(t) {
                f if f.is_empty() => f,
                f => format!("  {f}"),
            }
        ));
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
        }
    }

    #[test]
    fn the_summary_shows_sessions() {
        let mut m = Model::default();
        m.apply(snap());
        let text = render_text(&m);
        assert!(text.contains("sessions: 2 (1 detached, 2K kept)"), "{text}");
        m.snap.sessions = Value::Null;
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
        assert_eq!(m.selected_task().map(|t| t.id), Some(3));
        assert_eq!(m.snap.tasks[0].id, 1, "oldest first");
        // And across a refresh in which it is gone, it stays in range.
        m.apply(Snapshot {
            tasks: vec![row(9, 1.0, 1)],
            ..snap()
        });
        assert_eq!(m.selected_task().map(|t| t.id), Some(9));
        assert_eq!(m.on_key(KeyCode::Char('q')), Action::Quit);
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
        let mut term = Terminal::new(TestBackend::new(100, 20)).unwrap();
        term.draw(|f| draw(f, &m)).unwrap();
        let text: String = term
            .backend()
            .buffer()
            .content()
            .iter()
            .map(|c| c.symbol())
            .collect();
        assert!(text.contains("NOT YIELDING"));
        assert!(text.contains("MEM"));
        assert!(text.contains("6.0M"), "task 2's memory");
        assert!(text.contains("MEMORY"), "task 2 flagged for memory");
        assert!(text.contains("m2"));
        assert!(text.contains(" 25%"));
        assert!(text.contains("tasks (3) by CPU"));
    }

    /// Against a real server: find the runaway, kill it, its client gets -32004.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finds_and_kills_a_runaway() {
        let cfg = Config {
            addr: "127.0.0.1:0".parse().unwrap(),
            ..Config::default()
        };
        let mut registry = Registry::new();
        taskwire::builtin::register(&mut registry).unwrap();
        taskwire::builtin::register_demo(&mut registry).unwrap();
        let server = Server::bind(cfg, registry).await.unwrap();
        let addr = server.local_addr().unwrap();
        let stop = server.shutdown_handle();
        let running = tokio::spawn(server.run(std::future::pending()));
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
}
