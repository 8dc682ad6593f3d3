//! How a user adds a task of their own: a CPU task with typed params, progress
//! and checkpoints, registered beside the built-ins.
//!
//! Run it with `cargo run -p taskwire --example custom_task`: it starts a server
//! on a free port, calls the task once over a real WebSocket, prints the
//! progress and the result, and shuts the server down.

use futures_util::{SinkExt, StreamExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use taskwire::{Config, Ctx, Registry, Server, TaskError};
use tokio_tungstenite::tungstenite::Message;

/// The params: `serde` reads them, `schemars` describes them in `rpc.discover`.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct CollatzParams {
    /// Check every start value below this.
    below: u64,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct CollatzResult {
    longest_start: u64,
    steps: u32,
}

/// The longest Collatz chain below `below`. A CPU task: it calls
/// `ctx.checkpoint()` every few thousand values, which is where it is
/// preempted (so it cannot hog a core) and where it learns it was cancelled.
async fn collatz(ctx: Ctx, p: CollatzParams) -> Result<CollatzResult, TaskError> {
    if p.below > 100_000_000 {
        return Err(TaskError::invalid_params("`below` must be at most 10^8"));
    }
    let mut best = CollatzResult {
        longest_start: 1,
        steps: 0,
    };
    for start in 1..p.below {
        let (mut n, mut steps) = (start, 0u32);
        while n != 1 {
            n = if n % 2 == 0 { n / 2 } else { 3 * n + 1 };
            steps += 1;
        }
        if steps > best.steps {
            best = CollatzResult {
                longest_start: start,
                steps,
            };
        }
        if start % 4096 == 0 {
            ctx.progress(serde_json::json!({ "done": start, "total": p.below }));
            ctx.checkpoint().await?;
        }
    }
    Ok(best)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = Registry::new();
    taskwire::builtin::register(&mut registry)?;
    registry.cpu(
        "collatz",
        "The longest Collatz chain below `below`.",
        collatz,
    )?;

    let config = Config {
        addr: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let server = Server::bind(config, registry).await?;
    let addr = server.local_addr()?;
    let stop = server.shutdown_handle();
    let running = tokio::spawn(server.run(std::future::pending()));

    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await?;
    let request = r#"{"jsonrpc":"2.0","id":1,"method":"collatz","params":{"below":1000000,"_meta":{"progressToken":"c"}}}"#;
    ws.send(Message::Text(request.into())).await?;
    while let Some(msg) = ws.next().await {
        if let Message::Text(text) = msg? {
            println!("{text}");
            if text.contains("\"id\":1") {
                break;
            }
        }
    }
    stop.shutdown();
    running.await??;
    Ok(())
}
