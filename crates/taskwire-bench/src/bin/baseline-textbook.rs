//! `baseline-textbook`: the design a careful reader of the Tokio docs writes
//! first, and nothing more. Every request is `tokio::spawn`ed, replies go
//! through one mpsc channel to a writer task, CPU tasks run under
//! `spawn_blocking`. There is no scheduler (the OS time-slices up to 512
//! blocking threads), no admission control, no cancellation: a closed
//! connection's tasks run to the end.

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use taskwire_bench::baseline;
use tokio::sync::mpsc;

async fn upgrade(ws: WebSocketUpgrade) -> Response {
    baseline::configure(ws).on_upgrade(connection)
}

async fn connection(socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        match msg {
            Message::Text(text) => {
                let tx = tx.clone();
                tokio::spawn(async move {
                    if let Some(reply) = baseline::handle_text(text.as_str()).await {
                        let _ = tx.send(reply).await;
                    }
                });
            }
            Message::Binary(_) => {
                let _ = tx.send(baseline::binary_frame_error()).await;
            }
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => {}
        }
    }
    // The writer ends once every spawned task has dropped its sender.
    drop(tx);
    let _ = writer.await;
}

#[tokio::main]
async fn main() {
    let args = baseline::ServerArgs::parse();
    let router = Router::new().route("/ws", get(upgrade));
    if let Err(e) = baseline::serve(args.addr, router).await {
        eprintln!("baseline-textbook: {e}");
        std::process::exit(1);
    }
}
