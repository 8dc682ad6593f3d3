//! The `taskwire` binary: `serve` runs the server, `bench` measures it,
//! `top` watches and kills tasks on a running server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use taskwire::config::{ConfigError, Settings, TokenSettings};
use taskwire::{Config, Registry, Server};

mod top;

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
/// "Configuration"). No flag has a clap default, so that an unset flag lets the
/// lower layers speak.
#[derive(Args, Debug)]
struct ServeArgs {
    /// A TOML file with any of the settings below (same names, snake_case).
    #[arg(long, env = "TASKWIRE_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7878] (port 0 picks a free port).
    #[arg(long, env = "TASKWIRE_ADDR")]
    addr: Option<SocketAddr>,
    /// Largest WebSocket message in bytes; larger ones close the connection with 1009 [default: 1048576].
    #[arg(long, env = "TASKWIRE_MAX_FRAME_BYTES")]
    max_frame_bytes: Option<usize>,
    /// Requests in flight per connection before -32001 connection_inflight [default: 1024].
    #[arg(long, env = "TASKWIRE_MAX_INFLIGHT")]
    max_inflight: Option<usize>,
    /// Most elements of one batch; a longer batch gets one -32600 and nothing runs [default: 256].
    #[arg(long, env = "TASKWIRE_MAX_BATCH")]
    max_batch: Option<usize>,
    /// Open connections before new upgrades get HTTP 503 [default: 10000].
    #[arg(long, env = "TASKWIRE_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Open connections per client IP before new upgrades get HTTP 429 [default: no limit].
    #[arg(long, env = "TASKWIRE_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Cap on any task's deadline, in ms [default: 3600000].
    #[arg(long, env = "TASKWIRE_MAX_TIMEOUT_MS")]
    max_timeout_ms: Option<u64>,
    /// Grace period for in-flight tasks on shutdown, in ms [default: 5000].
    #[arg(long, env = "TASKWIRE_SHUTDOWN_GRACE_MS")]
    shutdown_grace_ms: Option<u64>,
    /// WebSocket ping period in ms; two unanswered pings close the connection [default: 20000].
    #[arg(long, env = "TASKWIRE_PING_INTERVAL_MS")]
    ping_interval_ms: Option<u64>,
    /// WebSocket pings per second a client may send; one beyond closes it with 1008 [default: 10].
    #[arg(long, env = "TASKWIRE_PING_RATE_PER_SEC")]
    ping_rate_per_sec: Option<u32>,
    /// Burst of WebSocket pings a client may send [default: 20].
    #[arg(long, env = "TASKWIRE_PING_RATE_BURST")]
    ping_rate_burst: Option<u32>,
    /// Capacity of each connection's outbound queue, in messages [default: 1024].
    #[arg(long, env = "TASKWIRE_OUTBOUND_QUEUE")]
    outbound_queue: Option<usize>,
    /// Bytes each connection's outbound queue may hold [default: 4194304].
    #[arg(long, env = "TASKWIRE_OUTBOUND_BYTES")]
    outbound_bytes: Option<usize>,
    /// Keep the live task table and per-task metrics [default: true]; off only
    /// to measure what they cost.
    #[arg(long, env = "TASKWIRE_OBSERVE", hide = true)]
    observe: Option<bool>,
    /// How long a reply may wait on a client that does not read before it is
    /// closed as a slow consumer, in ms [default: 10000].
    #[arg(long, env = "TASKWIRE_WRITE_TIMEOUT_MS")]
    write_timeout_ms: Option<u64>,
    /// Bearer token for /admin and /metrics; without one they answer loopback only.
    #[arg(long, env = "TASKWIRE_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Page origins allowed to open /ws besides the server's own host ("*": any); repeat or comma-separate.
    #[arg(
        long = "allowed-origin",
        env = "TASKWIRE_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    allowed_origins: Option<Vec<String>>,
    /// Refuse WebSocket upgrades without an Origin header (non-browser clients) [default: false].
    #[arg(long, env = "TASKWIRE_REQUIRE_ORIGIN")]
    require_origin: Option<bool>,
    /// Client token for /ws (turns authentication on); repeat or comma-separate.
    /// Per-token limits are set in the file's [[tokens]].
    #[arg(long = "token", env = "TASKWIRE_TOKENS", value_delimiter = ',')]
    tokens: Option<Vec<String>>,
    /// TLS certificate chain (PEM); with --tls-key, serves wss:// and https://.
    #[arg(long, env = "TASKWIRE_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "TASKWIRE_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// Requests per second per connection; excess gets -32001 rate_limited [default: no limit].
    #[arg(long, env = "TASKWIRE_RATE_LIMIT_PER_SEC")]
    rate_limit_per_sec: Option<u32>,
    /// Burst of requests per connection [default: rate_limit_per_sec].
    #[arg(long, env = "TASKWIRE_RATE_LIMIT_BURST")]
    rate_limit_burst: Option<u32>,
    /// Compute worker threads [default: available cores].
    #[arg(long, env = "TASKWIRE_WORKERS")]
    workers: Option<usize>,
    /// Time slice of CPU tasks, in µs [default: 2000].
    #[arg(long, env = "TASKWIRE_SLICE_US")]
    slice_us: Option<u64>,
    /// A CPU task running this long past its slice without a checkpoint is
    /// flagged and its worker replaced, in ms [default: 100].
    #[arg(long, env = "TASKWIRE_NON_YIELD_MS")]
    non_yield_ms: Option<u64>,
    /// Most CPU tasks admitted and unfinished, over all connections [default: 10000].
    #[arg(long, env = "TASKWIRE_QUEUE_LIMIT")]
    queue_limit: Option<usize>,
    /// Most CPU tasks admitted and unfinished, per connection [default: 256].
    #[arg(long, env = "TASKWIRE_CONNECTION_CPU_LIMIT")]
    connection_cpu_limit: Option<usize>,
    /// Niceness of compute workers (0 leaves it alone) [default: 10].
    #[arg(long, env = "TASKWIRE_NICE", allow_negative_numbers = true)]
    nice: Option<i32>,
    /// Log filter, RUST_LOG syntax (e.g. `info,taskwire=debug`) [default: info].
    #[arg(long, env = "RUST_LOG")]
    log: Option<String>,
}

impl ServeArgs {
    /// The flags-and-environment layer (clap has already merged those two).
    fn settings(&self) -> Settings {
        Settings {
            addr: self.addr,
            max_frame_bytes: self.max_frame_bytes,
            max_inflight: self.max_inflight,
            max_batch: self.max_batch,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_timeout_ms: self.max_timeout_ms,
            shutdown_grace_ms: self.shutdown_grace_ms,
            ping_interval_ms: self.ping_interval_ms,
            ping_rate_per_sec: self.ping_rate_per_sec,
            ping_rate_burst: self.ping_rate_burst,
            outbound_queue: self.outbound_queue,
            outbound_bytes: self.outbound_bytes,
            observe: self.observe,
            write_timeout_ms: self.write_timeout_ms,
            // An empty variable means "unset", as a shell user expects.
            admin_token: self.admin_token.clone().filter(|t| !t.is_empty()),
            allowed_origins: self.allowed_origins.clone(),
            require_origin: self.require_origin,
            tokens: self.tokens.as_ref().map(|ts| {
                ts.iter()
                    .filter(|t| !t.is_empty())
                    .map(|t| TokenSettings {
                        token: t.clone(),
                        ..TokenSettings::default()
                    })
                    .collect()
            }),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            rate_limit_per_sec: self.rate_limit_per_sec,
            rate_limit_burst: self.rate_limit_burst,
            workers: self.workers,
            slice_us: self.slice_us,
            non_yield_ms: self.non_yield_ms,
            queue_limit: self.queue_limit,
            connection_cpu_limit: self.connection_cpu_limit,
            nice: self.nice,
            log: self.log.clone(),
        }
    }

    /// Flags and environment over the file over the defaults, validated.
    fn load(&self) -> Result<(Config, String), ConfigError> {
        let file = match &self.config {
            Some(path) => Settings::load(path)?,
            None => Settings::default(),
        };
        let settings = self.settings().or(file);
        let log = settings.log.clone().unwrap_or_else(|| "info".to_string());
        Ok((settings.into_config()?, log))
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // A crashing task is an expected event with its own error code: log it as
    // one line instead of the default hook's backtrace banner.
    std::panic::set_hook(Box::new(|info| {
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
    let (config, log) = args.load().map_err(|e| e.to_string())?;
    init_logging(&log);
    let wanted = config.addr;
    let (ws, http) = if config.tls.is_some() {
        ("wss", "https")
    } else {
        ("ws", "http")
    };
    let server = Server::bind(config, Registry::with_builtins())
        .await
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidInput => e.to_string(),
            _ => format!("cannot listen on {wanted}: {e}"),
        })?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    // The one line on stdout: scripts and tests read the port from it.
    println!("listening on {addr}");
    tracing::info!(%addr, "taskwire serving: {ws}://{addr}/ws, dashboard {http}://{addr}/");
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
        std::env::remove_var("TASKWIRE_QUEUE_LIMIT");
        let (cfg, log) = args.load().unwrap();
        assert_eq!(cfg.max_inflight_per_connection, 5, "flag over file");
        assert_eq!(cfg.compute.queue_limit, 44, "env over file");
        assert_eq!(cfg.max_connections, 22, "file over default");
        assert_eq!(cfg.allowed_origins, vec!["https://a.example".to_string()]);
        assert_eq!(
            cfg.ping_interval,
            Config::default().ping_interval,
            "default"
        );
        assert_eq!(log, "info");
        let _ = std::fs::remove_dir_all(dir);
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
        let e = Cli::try_parse_from(["taskwire", "serve", "--max-inflight", "many"]).unwrap_err();
        assert!(e.to_string().contains("--max-inflight"), "{e}");
    }
}
