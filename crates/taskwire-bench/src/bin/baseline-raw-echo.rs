//! `baseline-raw-echo`: an axum WebSocket server that echoes every text (and
//! binary) frame back unchanged. No JSON, no tasks: the round-trip ceiling of
//! this WebSocket stack on this machine, which taskwire's throughput is
//! measured against.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use taskwire_bench::baseline;

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    baseline::configure(ws).on_upgrade(echo)
}

async fn echo(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        match msg {
            Message::Text(_) | Message::Binary(_) => {
                if socket.send(msg).await.is_err() {
                    break;
                }
            }
            Message::Close(_) => break,
            // Pings are answered by the library.
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
}

#[tokio::main]
async fn main() {
    let args = baseline::ServerArgs::parse();
    let router = Router::new().route("/ws", get(upgrade));
    if let Err(e) = baseline::serve(args.addr, router).await {
        eprintln!("baseline-raw-echo: {e}");
        std::process::exit(1);
    }
}
