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
//! # async fn run() -> Result<(), taskwire::Error> {
//! let mut registry = Registry::new();
//! taskwire::builtin::register(&mut registry)?;
//! registry.cpu("fib", "The n-th Fibonacci number, wrapping", fib)?;
//! let server = Server::bind(Config::default(), registry).await?;
//! server.run(taskwire::shutdown_signal()).await
//! # }
//! ```

//! # Module map
//!
//! Each module depends only on modules listed before it (the lowest first);
//! a unit test (`module_order` below) reads every source file and fails if a
//! module names one listed after it, so that no circle can come back.
//!
//! | module | what it holds |
//! | --- | --- |
//! | `alloc` | the counting global allocator (per-task memory) |
//! | `sync` | lock helpers: poisoning handled once |
//! | `limit` | the counting guard (`Slot`, `Keyed`), token bucket, log limiter |
//! | `protocol` | JSON-RPC 2.0 frames, ids, error codes; pure, no I/O |
//! | `compute` | the CPU executor: epoch, worker, watchdog, admission, stats, queue |
//! | `task` | `Ctx` (cancel, deadline, progress, checkpoint), `TaskError`, outcomes |
//! | `registry` | name -> task; params schema for `rpc.discover` |
//! | `builtin` | the built-in and demo tasks, registered through the public API |
//! | `config` | `Config`: every setting declared once |
//! | `error` | [`Error`], the library's one error type |
//! | `wasm` | the WebAssembly lane: engine, module table, guest interface (feature `wasm`) |
//! | `observe` | the hooks a connection calls; the live table, metrics, `observe::api` |
//! | `caller` | who is calling: the connect hook, `Caller`, `TokenAuth` |
//! | `session` | sessions: numbered responses kept across reconnects, tokens, bounds |
//! | `cluster` | nodes over NATS: heartbeats, peers, offloading CPU tasks, remote runs |
//! | `app` | `App`: the state every connection shares |
//! | `conn` | one WebSocket: state, reader, admit, reply, writer |
//! | `http` | `Server`, router, accept loop, upgrade checks, security, TLS, admin API |

#![deny(missing_docs)]
#![warn(unreachable_pub, missing_debug_implementations)]

pub mod alloc;
mod app;
pub mod builtin;
mod caller;
#[cfg(feature = "cluster")]
mod cluster;
mod compute;
pub mod config;
mod conn;
mod error;
mod http;
mod limit;
pub mod observe;
pub mod protocol;
mod registry;
mod session;
mod sync;
mod task;
mod wasm;

/// The typed map of a [`Caller`]'s extensions (`http::Extensions`).
pub use axum::http::Extensions;
pub use caller::{
    Caller, ConnectFn, ConnectHook, ConnectRequest, Refusal, TokenAuth, MAX_CALLER_ID,
};
pub use compute::{current_task, TaskLabel};
pub use config::Config;
pub use error::{Error, Result};
pub use http::{shutdown_signal, Server, ServerBuilder, ShutdownHandle};
pub use observe::OutcomeKind;
pub use registry::{RegisterError, Registry, TaskDef};
pub use task::{Checkpoint, Ctx, Stopped, TaskError, TaskKind, TaskResultExt};

/// Internals that `benches/` measures directly (the run queue against its
/// reference, the thread CPU clock a checkpoint reads). Not part of the API:
/// a benchmark outside the crate can reach nothing else, and these cannot be
/// measured from a unit test.
#[doc(hidden)]
pub mod bench_internals {
    pub use crate::compute::{thread_cpu_time, RunQueue};
    #[cfg(feature = "wasm")]
    pub use crate::wasm::BenchModule;
}

/// The session frames' parsing, for the fuzz target. Not part of the API.
#[doc(hidden)]
pub mod fuzz_internals {
    pub use crate::session::frames;
}

#[cfg(test)]
mod module_order;
