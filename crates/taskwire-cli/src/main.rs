//! The `taskwire` binary: `serve` runs the server, `bench` measures it,
//! `top` watches and kills tasks on a running server.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use taskwire::compute::ComputeConfig;
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

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Run a benchmark scenario (see docs/BENCHMARKS.md).
    Bench(taskwire_bench::BenchArgs),
    /// Watch the busiest tasks of a running server and kill them.
    Top(top::TopArgs),
}

/// Every setting has a working default; flags override `TASKWIRE_*` variables.
#[derive(Args, Debug)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, env = "TASKWIRE_ADDR", default_value = "127.0.0.1:7878")]
    addr: SocketAddr,
    /// Largest WebSocket message in bytes; larger ones close the connection with 1009.
    #[arg(long, env = "TASKWIRE_MAX_FRAME_BYTES", default_value_t = 1 << 20)]
    max_frame_bytes: usize,
    /// Requests in flight per connection before -32001 connection_inflight.
    #[arg(long, env = "TASKWIRE_MAX_INFLIGHT", default_value_t = 1024)]
    max_inflight: usize,
    /// Open connections before new upgrades get HTTP 503.
    #[arg(long, env = "TASKWIRE_MAX_CONNECTIONS", default_value_t = 10_000)]
    max_connections: usize,
    /// Cap on any task's deadline, in ms.
    #[arg(long, env = "TASKWIRE_MAX_TIMEOUT_MS", default_value_t = 3_600_000)]
    max_timeout_ms: u64,
    /// Grace period for in-flight tasks on shutdown, in ms.
    #[arg(long, env = "TASKWIRE_SHUTDOWN_GRACE_MS", default_value_t = 5_000)]
    shutdown_grace_ms: u64,
    /// WebSocket ping period in ms; two unanswered pings close the connection.
    #[arg(long, env = "TASKWIRE_PING_INTERVAL_MS", default_value_t = 20_000)]
    ping_interval_ms: u64,
    /// Capacity of each connection's outbound queue, in messages.
    #[arg(long, env = "TASKWIRE_OUTBOUND_QUEUE", default_value_t = 1024)]
    outbound_queue: usize,
    /// How long a reply may wait on a client that does not read before it is
    /// closed as a slow consumer, in ms.
    #[arg(long, env = "TASKWIRE_WRITE_TIMEOUT_MS", default_value_t = 10_000)]
    write_timeout_ms: u64,
    /// Bearer token for /admin and /metrics; without one they answer loopback only.
    #[arg(long, env = "TASKWIRE_ADMIN_TOKEN")]
    admin_token: Option<String>,
    /// Compute worker threads (default: available cores).
    #[arg(long, env = "TASKWIRE_WORKERS")]
    workers: Option<usize>,
    /// Time slice of CPU tasks, in µs.
    #[arg(long, env = "TASKWIRE_SLICE_US", default_value_t = 2_000)]
    slice_us: u64,
    /// A CPU task running this long past its slice without a checkpoint is
    /// flagged and its worker replaced, in ms.
    #[arg(long, env = "TASKWIRE_NON_YIELD_MS", default_value_t = 100)]
    non_yield_ms: u64,
    /// Most CPU tasks admitted and unfinished, over all connections.
    #[arg(long, env = "TASKWIRE_QUEUE_LIMIT", default_value_t = 10_000)]
    queue_limit: usize,
    /// Most CPU tasks admitted and unfinished, per connection.
    #[arg(long, env = "TASKWIRE_CONNECTION_CPU_LIMIT", default_value_t = 256)]
    connection_cpu_limit: usize,
    /// Niceness of compute workers (0 leaves it alone).
    #[arg(long, env = "TASKWIRE_NICE", default_value_t = 10)]
    nice: i32,
    /// Keep the live task table and per-task metrics (turn off only to
    /// measure what they cost).
    #[arg(long, env = "TASKWIRE_OBSERVE", default_value_t = true, action = clap::ArgAction::Set, hide = true)]
    observe: bool,
    /// Log filter, RUST_LOG syntax (e.g. `info,taskwire=debug`).
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log: String,
}

impl ServeArgs {
    fn config(&self) -> Config {
        let defaults = ComputeConfig::default();
        let workers = self.workers.unwrap_or(defaults.workers);
        Config {
            addr: self.addr,
            max_frame_bytes: self.max_frame_bytes,
            max_inflight_per_connection: self.max_inflight,
            max_connections: self.max_connections,
            max_task_timeout: Duration::from_millis(self.max_timeout_ms),
            shutdown_grace: Duration::from_millis(self.shutdown_grace_ms),
            ping_interval: Duration::from_millis(self.ping_interval_ms.max(1)),
            outbound_queue: self.outbound_queue.max(1),
            write_timeout: Duration::from_millis(self.write_timeout_ms),
            admin_token: self.admin_token.clone().filter(|t| !t.is_empty()),
            observe: self.observe,
            compute: ComputeConfig {
                workers,
                slice: Duration::from_micros(self.slice_us.max(100)),
                non_yield_after: Duration::from_millis(self.non_yield_ms),
                max_extra_workers: workers,
                queue_limit: self.queue_limit,
                per_connection_limit: self.connection_cpu_limit,
                nice: self.nice,
                ..defaults
            },
        }
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
        tracing::warn!(
            thread = thread.name().unwrap_or("?"),
            "panic: {}",
            info.payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default()
        );
    }));
}

async fn serve(args: ServeArgs) -> Result<(), String> {
    init_logging(&args.log);
    let config = args.config();
    let server = Server::bind(config, Registry::with_builtins())
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.addr))?;
    let addr = server.local_addr().map_err(|e| e.to_string())?;
    // The one line on stdout: scripts and tests read the port from it.
    println!("listening on {addr}");
    tracing::info!(%addr, "taskwire serving: ws://{addr}/ws, dashboard http://{addr}/");
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
