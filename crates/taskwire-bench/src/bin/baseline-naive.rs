//! `baseline-naive`: the handler awaits each task before it reads the next
//! message. Simple and correct, and every request on a connection waits behind
//! the one before it (head-of-line blocking): a 2 s task delays an `echo` sent
//! after it by 2 s. CPU tasks still run under `spawn_blocking`, so other
//! connections are not blocked.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use taskwire_bench::baseline;

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    baseline::configure(ws).on_upgrade(connection)
}

async fn connection(mut socket: WebSocket) {
    while let Some(Ok(msg)) = socket.recv().await {
        let reply = match msg {
            Message::Text(text) => baseline::handle_text(text.as_str()).await,
            Message::Binary(_) => Some(baseline::binary_frame_error()),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => None,
        };
        if let Some(reply) = reply {
            if socket.send(Message::Text(reply.into())).await.is_err() {
                break;
            }
        }
    }
}

#[tokio::main]
async fn main() {
    let args = baseline::ServerArgs::parse();
    let router = Router::new().route("/ws", get(upgrade));
    if let Err(e) = baseline::serve(args.addr, router).await {
        eprintln!("baseline-naive: {e}");
        std::process::exit(1);
    }
}
