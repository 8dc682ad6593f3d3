//! taskwire: a WebSocket task server with the soul of the BEAM, on Tokio.
//!
//! A client opens one WebSocket and sends JSON-RPC 2.0 requests; each request
//! runs as its own isolated task; responses come back in completion order, with
//! progress, cancellation, deadlines and crash isolation. CPU-bound tasks run on
//! a time-sliced, fair compute pool, never on the threads that serve
//! connections. Operators see every task live and can kill any of them.
//!
//! ```no_run
//! use schemars::JsonSchema;
//! use serde::Deserialize;
//! use taskwire::{Config, Ctx, Registry, Server, TaskError};
//!
//! #[derive(Deserialize, JsonSchema)]
//! struct Fib { n: u32 }
//!
//! async fn fib(ctx: Ctx, p: Fib) -> Result<u64, TaskError> {
//!     let (mut a, mut b) = (0u64, 1u64);
//!     for i in 0..p.n {
//!         (a, b) = (b, a.wrapping_add(b));
//!         if i % 1024 == 0 {
//!             ctx.checkpoint().await?; // preemption and cancellation point
//!         }
//!     }
//!     Ok(a)
//! }
//!
//! # async fn run() -> std::io::Result<()> {
//! let mut registry = Registry::new();
//! taskwire::builtin::register(&mut registry);
//! registry.cpu("fib", "The n-th Fibonacci number, wrapping", fib);
//! let server = Server::bind(Config::default(), registry).await?;
//! server.run(taskwire::shutdown_signal()).await
//! # }
//! ```

#![deny(missing_docs)]

pub mod alloc;
pub mod builtin;
pub mod compute;
pub mod config;
mod conn;
mod limit;
pub mod observe;
pub mod protocol;
mod registry;
pub mod security;
mod server;
mod sync;
mod task;
mod tls;

pub use config::Config;
pub use registry::{Registry, TaskDef};
pub use server::{shutdown_signal, Server, ShutdownHandle};
pub use task::{Checkpoint, Ctx, Stopped, TaskError, TaskKind};
