//! taskwire mounted in an application's own axum router, next to its own
//! routes, on its own listener, with graceful shutdown driven by the app.
//!
//! ```text
//! TASKWIRE_EXAMPLE_ADDR=127.0.0.1:3000 cargo run -p taskwire --example embed_axum
//! curl http://127.0.0.1:3000/hello        # the app's own route
//! open http://127.0.0.1:3000/tasks/       # taskwire's dashboard
//! ws://127.0.0.1:3000/tasks/ws            # taskwire's WebSocket
//! ```
//!
//! It prints `listening on ADDR` once it accepts connections (with port 0, the
//! port picked) and stops gracefully on SIGINT or SIGTERM.

use std::net::SocketAddr;

use axum::routing::get;
use axum::Router;
use taskwire::{Config, Registry, Server};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::var("TASKWIRE_EXAMPLE_ADDR").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    let local = listener.local_addr()?;

    let config = Config {
        // taskwire binds nothing here; the address tells it whether it is
        // served on loopback, where it checks `Host` against DNS rebinding.
        addr: local,
        ..Config::default()
    };
    let mut registry = Registry::new();
    taskwire::builtin::register(&mut registry)?;
    let tw = Server::build(config, registry)?;

    let app = Router::new()
        .route("/hello", get(|| async { "hello from the host app\n" }))
        // `nest_service` routes `/tasks`, `/tasks/` (the dashboard) and below.
        .nest_service("/tasks", tw.router());

    println!("listening on {local}");
    axum::serve(
        listener,
        // taskwire's routes need the client address (admin access, limits).
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        taskwire::shutdown_signal().await;
        // In-flight tasks get the grace period, then -32005; WebSockets close
        // with 1001; the compute pool stops. axum then finishes its HTTP
        // connections.
        tw.shutdown().await;
    })
    .await?;
    Ok(())
}
