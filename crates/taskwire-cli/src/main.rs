//! The `taskwire` binary: `serve` runs the server, `bench` measures it,
//! `top` watches and kills tasks on a running server.

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use taskwire::config::ConfigError;
use taskwire::{Config, Registry, Server};

mod top;

// Every allocation is counted, for the process and for the task that made it:
// the task table's memory column and the memory budget read these counts.
#[global_allocator]
static ALLOC: taskwire::alloc::CountingAlloc = taskwire::alloc::CountingAlloc;

#[derive(Parser, Debug)]
#[command(
    name = "taskwire",
    version,
    about = "A WebSocket task server with the soul of the BEAM"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the largest variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Run a benchmark scenario (see docs/BENCHMARKS.md).
    Bench(taskwire_bench::BenchArgs),
    /// Watch the busiest tasks of a running server and kill them.
    Top(top::TopArgs),
}

/// Every setting has a working default. Precedence: flags, then `TASKWIRE_*`
/// variables, then the `--config` file, then the defaults (README,
/// "Configuration"). The flags come from the library's one declaration of
/// every setting.
#[derive(Args, Debug)]
struct ServeArgs {
    #[command(flatten)]
    settings: taskwire::config::Flags,
}

impl ServeArgs {
    /// Flags and environment over the file over the defaults, validated.
    fn load(&self) -> Result<Config, ConfigError> {
        self.settings.load()
    }
}

/// Colour only for a person at a terminal: a log file or a collector keeps
/// escape codes as garbage. `NO_COLOR` (any non-empty value) turns it off
/// everywhere, as <https://no-color.org> asks.
fn log_in_colour(stderr_is_terminal: bool, no_color: Option<std::ffi::OsString>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn init_logging(filter: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(log_in_colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR"),
        ))
        .init();
    // A crashing task is an expected event with its own error code: the
    // library logs it where it answers `-32003`, naming the task, so the hook
    // only notes where it panicked (at debug). Any other panic is logged as
    // one line instead of the default hook's backtrace banner.
    std::panic::set_hook(Box::new(|info| {
        if let Some(task) = taskwire::current_task() {
            tracing::debug!(
                task = task.task,
                conn = task.conn,
                request = %task.request_text(),
                method = %task.method_text(),
                at = %info.location().map(|l| l.to_string()).unwrap_or_default(),
                "task panicked"
            );
            return;
        }
        let thread = std::thread::current();
        // The message may be a client's (the `crash` task panics with it):
        // escaped and cut, so it cannot forge a line or flood the log.
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or_default();
        tracing::warn!(
            thread = thread.name().unwrap_or("?"),
            "panic: {}",
            taskwire::protocol::log_text(msg)
        );
    }));
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    // Every configuration error stops the start, naming the setting.
    let config = args.load().map_err(|e| e.to_string())?;
    init_logging(&config.log);
    let (ws, http) = if config.tls().is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let mut registry = Registry::new();
    taskwire::builtin::register(&mut registry).map_err(|e| e.to_string())?;
    if config.demo {
        taskwire::builtin::register_demo(&mut registry).map_err(|e| e.to_string())?;
    }
    let mut summary = config.startup_summary();
    // The error names the setting or the address.
    let server = Server::bind(config, registry)
        .await
        .map_err(|e| e.to_string())?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    // The one line on stdout: scripts and tests read the port from it.
    println!("listening on {addr}");
    tracing::info!(%addr, "taskwire serving: {ws}://{addr}/ws, dashboard {http}://{addr}/");
    // The bound address, not the configured one: port 0 names the port picked.
    summary.addr = addr;
    // What the server exposes, before any client arrives: an operator reads
    // the log, not the configuration layers, to learn what is open.
    for line in summary.lines() {
        tracing::info!("{line}");
    }
    for warning in summary.warnings() {
        tracing::warn!("{warning}");
    }
    server
        .run(taskwire::shutdown_signal())
        .await
        .map_err(|e| e.to_string())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("taskwire: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args).await,
            Command::Bench(args) => taskwire_bench::run(args).await.map_err(|e| e.to_string()),
            Command::Top(args) => top::run(args).await,
        }
    });
    // `Server::run` has returned (its shutdown deadline passed at the latest);
    // whatever task is left must not keep the process alive.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("taskwire: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let mut full = vec!["taskwire", "serve"];
        full.extend_from_slice(argv);
        match Cli::try_parse_from(full).expect("parses").command {
            Command::Serve(a) => a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn flags_env_file_defaults_in_that_order() {
        let dir = std::env::temp_dir().join(format!("taskwire-cli-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("taskwire.toml");
        std::fs::write(
            &file,
            "max_inflight = 11\nmax_connections = 22\nqueue_limit = 33\nallowed_origins = [\"https://a.example\"]\n",
        )
        .unwrap();
        // The only test that sets a TASKWIRE_ variable, and one nothing else reads.
        std::env::set_var("TASKWIRE_QUEUE_LIMIT", "44");
        let args = serve_args(&["--config", file.to_str().unwrap(), "--max-inflight", "5"]);
        let cfg = args.load().unwrap();
        std::env::remove_var("TASKWIRE_QUEUE_LIMIT");
        assert_eq!(cfg.max_inflight_per_connection, 5, "flag over file");
        assert_eq!(cfg.queue_limit, 44, "env over file");
        assert_eq!(cfg.max_connections, 22, "file over default");
        assert_eq!(cfg.allowed_origins, vec!["https://a.example".to_string()]);
        assert_eq!(
            cfg.ping_interval,
            Config::default().ping_interval,
            "default"
        );
        assert_eq!(cfg.log, "info");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn colour_only_at_a_terminal_without_no_color() {
        assert!(log_in_colour(true, None));
        assert!(log_in_colour(true, Some("".into())));
        assert!(!log_in_colour(true, Some("1".into())));
        assert!(!log_in_colour(false, None));
    }

    #[test]
    fn demo_is_a_setting() {
        assert!(!serve_args(&[]).load().unwrap().demo);
        assert!(serve_args(&["--demo"]).load().unwrap().demo);
        assert!(!serve_args(&["--demo", "false"]).load().unwrap().demo);
    }

    #[test]
    fn http_door_flags() {
        let cfg = serve_args(&[
            "--trusted-proxy",
            "10.0.0.0/8,127.0.0.1",
            "--allowed-host",
            "tasks.example.com",
            "--request-head-timeout-ms",
            "500",
            "--max-http-connections",
            "100",
            "--max-http-connections-per-ip",
            "5",
        ])
        .load()
        .unwrap();
        let proxies: Vec<String> = cfg.trusted_proxies.iter().map(|p| p.to_string()).collect();
        assert_eq!(proxies, vec!["10.0.0.0/8", "127.0.0.1/32"]);
        assert_eq!(cfg.allowed_hosts, vec!["tasks.example.com".to_string()]);
        assert_eq!(
            cfg.request_head_timeout,
            std::time::Duration::from_millis(500)
        );
        assert_eq!(
            (cfg.max_http_connections, cfg.max_http_connections_per_ip),
            (100, 5)
        );
        let e = serve_args(&["--trusted-proxy", "proxy.example"])
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("trusted_proxies"), "{e}");
    }

    #[test]
    fn invalid_settings_name_themselves() {
        let e = serve_args(&["--outbound-queue", "0"]).load().unwrap_err();
        assert!(e.to_string().contains("outbound_queue"), "{e}");
        let e = serve_args(&["--token", "short"]).load().unwrap_err();
        assert!(e.to_string().contains("tokens"), "{e}");
        let e = serve_args(&["--config", "/nonexistent/taskwire.toml"])
            .load()
            .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/taskwire.toml"), "{e}");
        let e = serve_args(&["--max-inflight", "many"]).load().unwrap_err();
        assert!(e.to_string().contains("--max-inflight"), "{e}");
    }
}
