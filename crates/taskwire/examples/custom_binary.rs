//! Your own server binary with the `taskwire` binary's configuration: every
//! setting from a TOML file (`--config`, `TASKWIRE_CONFIG`), `TASKWIRE_*`
//! variables and flags, layered the same way (flag > variable > file >
//! default), next to flags of your own. Needs the `cli` feature.
//!
//! ```text
//! cargo run -p taskwire --features cli --example custom_binary -- --help
//! TASKWIRE_MAX_INFLIGHT=64 cargo run -p taskwire --features cli --example custom_binary -- \
//!     --addr 127.0.0.1:0 --greeting hi --check
//! ```
//!
//! Without clap, `taskwire::config::load(None)` gives the same layers less the
//! flags (variables over the file over the defaults).

use clap::Parser;
use schemars::JsonSchema;
use serde::Deserialize;
use taskwire::{Ctx, Registry, Server, TaskError};

/// my-tasks: a task server of my own.
#[derive(Parser)]
#[command(name = "my-tasks")]
struct Cli {
    /// What the `greet` task says (a flag of this binary, not a taskwire setting).
    #[arg(long, default_value = "hello")]
    greeting: String,
    /// Check the configuration, print what the server would expose, and exit.
    #[arg(long)]
    check: bool,
    /// Every taskwire setting as a flag, plus `--config FILE`.
    #[command(flatten)]
    taskwire: taskwire::config::Flags,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct GreetParams {
    /// Who to greet.
    name: String,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Display, not Debug: the message names the setting to fix.
            eprintln!("my-tasks: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    // Every error names what to fix: the flag, the variable, the file and key.
    let config = cli.taskwire.load()?;

    let mut registry = Registry::new();
    taskwire::builtin::register(&mut registry)?;
    if config.demo {
        taskwire::builtin::register_demo(&mut registry)?;
    }
    let greeting = cli.greeting;
    registry.io(
        "greet",
        "Greets `name` with this server's greeting.",
        move |_ctx: Ctx, p: GreetParams| {
            let text = format!("{greeting}, {}", p.name);
            async move { Ok::<_, TaskError>(text) }
        },
    )?;

    let summary = config.startup_summary();
    if cli.check {
        for line in summary.lines().iter().chain(&summary.warnings()) {
            println!("{line}");
        }
        return Ok(());
    }
    let server = Server::bind(config, registry).await?;
    println!("listening on {}", server.local_addr()?);
    for warning in summary.warnings() {
        eprintln!("warning: {warning}");
    }
    server.run(taskwire::shutdown_signal()).await?;
    Ok(())
}
