//! Who is calling, and shared state: a connect hook reads a session cookie
//! (or, for scripts, an `X-User` header), refuses an upgrade without one and
//! names the caller otherwise; a task greets its caller and counts greetings
//! in state shared by every task, without a closure capturing it.
//!
//! Run it with `cargo run -p taskwire --example connect_hook`: it starts a
//! server on a free port, shows a refused upgrade, greets twice over a real
//! WebSocket, and shuts the server down.

use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use taskwire::{Caller, Config, ConnectRequest, Ctx, Refusal, Registry, Server, TaskError};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

/// What the hook learned about the user, for every task of the connection.
#[derive(Clone)]
struct Profile {
    display_name: String,
}

/// Shared by every task: greetings given.
#[derive(Default)]
struct Greetings(AtomicU64);

/// Runs before each WebSocket upgrade. A real application would look the
/// session up in its store; here the cookie's value is the user id.
async fn who_is_calling(req: &ConnectRequest) -> Result<Caller, Refusal> {
    let Some(user) = req.cookie("session").or(req.header("x-user")) else {
        return Err(Refusal::unauthorized("log in first"));
    };
    if user.is_empty() || user.len() > 64 {
        return Err(Refusal::forbidden("not a session"));
    }
    let profile = Profile {
        display_name: user.to_uppercase(),
    };
    Ok(Caller::new(user).with(profile))
}

#[derive(Deserialize, JsonSchema)]
struct GreetParams {}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct Greeting {
    message: String,
    caller: String,
    total: u64,
}

/// Greets the caller by the name its connection's hook found, and counts.
async fn greet(ctx: Ctx, _: GreetParams) -> Result<Greeting, TaskError> {
    let name = ctx
        .extension::<Profile>()
        .map_or("stranger", |p| p.display_name.as_str());
    let total = ctx.state::<Greetings>()?.0.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(Greeting {
        message: format!("hello, {name}"),
        caller: ctx.caller().unwrap_or("anonymous").to_owned(),
        total,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut registry = Registry::new();
    registry.with_state(Greetings::default());
    registry.io("greet", "Greets the caller", greet)?;

    let config = Config {
        addr: "127.0.0.1:0".parse()?,
        ..Config::default()
    };
    let server = Server::builder(config, registry)
        .connect_hook(who_is_calling)
        .bind()
        .await?;
    let addr = server.local_addr()?;
    let stop = server.shutdown_handle();
    let running = tokio::spawn(server.run(std::future::pending()));

    // Without a session: the upgrade fails with the hook's status.
    match tokio_tungstenite::connect_async(format!("ws://{addr}/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            println!("no cookie: refused {}", resp.status());
        }
        other => println!("no cookie: unexpected {:?}", other.map(|_| ())),
    }

    // With one: every task of the connection knows who is calling.
    let mut req = format!("ws://{addr}/ws").into_client_request()?;
    req.headers_mut().insert("cookie", "session=ada".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(req).await?;
    for id in 1..=2 {
        let call = format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"greet","params":{{}}}}"#);
        ws.send(Message::Text(call.into())).await?;
        while let Some(msg) = ws.next().await {
            if let Message::Text(text) = msg? {
                println!("{text}");
                break;
            }
        }
    }
    stop.shutdown();
    running.await??;
    Ok(())
}
