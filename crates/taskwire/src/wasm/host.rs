//! What a guest sees: the store's data ([`Host`]: params, result, memory
//! accounting, log), the `taskwire` imports, and a deny-by-default
//! `wasi_snapshot_preview1` shim so that ordinary wasm32-wasip1 guests link.
//!
//! The guest interface is documented in docs/WASM.md; keep the two in step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde_json::value::RawValue;
use wasmtime::{Caller, Extern, Linker, Memory, ResourceLimiter};

use crate::protocol::codes;
use crate::task::{Ctx, Stopped, TaskError};

/// Bytes of guest output (log lines, stdout, stderr) kept per task; the rest
/// is counted and dropped, so a chatty guest cannot flood the server's log.
pub(super) const LOG_BYTES: usize = 16 << 10;
/// Table elements a guest may grow to (each is a pointer).
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The wasi errno values the shim answers with.
const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EINVAL: i32 = 28;
/// What every wasi function the lane does not offer answers.
pub(super) const ENOSYS: i32 = 52;

/// Why a guest was halted; carried through wasmtime's error as its root.
#[derive(Debug, thiserror::Error)]
pub(super) enum Halt {
    /// The task was told to stop.
    #[error("{0}")]
    Stopped(Stopped),
    /// A memory limit would have been passed.
    #[error(
        "memory limit exceeded: growing to {desired} bytes passes the {which} of {limit} bytes"
    )]
    Memory {
        limit: u64,
        desired: u64,
        which: &'static str,
    },
    /// The guest called `proc_exit`.
    #[error("the guest exited with code {0}")]
    Exit(i32),
    /// The guest broke the interface (a bad pointer, a result that is not JSON).
    #[error("{0}")]
    Guest(String),
}

fn guest(msg: impl Into<String>) -> wasmtime::Error {
    wasmtime::Error::new(Halt::Guest(msg.into()))
}

/// Linear memory of every wasm task of one engine, against its budget.
#[derive(Debug)]
pub(super) struct Budget {
    pub used: AtomicU64,
    pub limit: u64,
}

/// The store's data for one task.
pub(super) struct Host {
    pub ctx: Ctx,
    input: Vec<u8>,
    pub result: Option<Box<RawValue>>,
    pub error: Option<TaskError>,
    limit: u64,
    /// Bytes of linear memory this task holds (counted in the budget).
    held: u64,
    budget: Arc<Budget>,
    log_used: usize,
    log_dropped: usize,
    started: Instant,
}

impl Host {
    pub(super) fn new(ctx: Ctx, input: Vec<u8>, limit: u64, budget: Arc<Budget>) -> Host {
        Host {
            ctx,
            input,
            result: None,
            error: None,
            limit,
            held: 0,
            budget,
            log_used: 0,
            log_dropped: 0,
            started: Instant::now(),
        }
    }

    /// One piece of guest output, to the server's log while within bounds.
    fn log(&mut self, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end_matches('\n');
        if text.is_empty() {
            return;
        }
        if self.log_used + text.len() > LOG_BYTES {
            self.log_dropped += text.len();
            return;
        }
        self.log_used += text.len();
        tracing::info!(
            target: "taskwire::wasm",
            task = self.ctx.task_id(),
            method = self.ctx.method(),
            "{text}"
        );
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.held, Ordering::AcqRel);
        self.ctx.shared.stats.add_memory(-(self.held as i64));
        if self.log_dropped > 0 {
            tracing::info!(
                target: "taskwire::wasm",
                task = self.ctx.task_id(),
                method = self.ctx.method(),
                "{} bytes of guest output dropped (at most {LOG_BYTES} are kept per task)",
                self.log_dropped
            );
        }
    }
}

impl ResourceLimiter for Host {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let desired = desired as u64;
        if desired > self.limit {
            // A trap, not a failed `memory.grow`: a guest that ignores the
            // failure (or loops on it) must still be answered -32010.
            return Err(wasmtime::Error::new(Halt::Memory {
                limit: self.limit,
                desired,
                which: "task's limit",
            }));
        }
        let delta = desired.saturating_sub(self.held.max(current as u64));
        let budget = self.budget.limit;
        let took = self
            .budget
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + delta <= budget).then_some(u + delta)
            });
        if took.is_err() {
            return Err(wasmtime::Error::new(Halt::Memory {
                limit: budget,
                desired,
                which: "budget of all wasm tasks",
            }));
        }
        self.held += delta;
        self.ctx.shared.stats.add_memory(delta as i64);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }
}

fn memory(caller: &mut Caller<'_, Host>) -> wasmtime::Result<Memory> {
    caller
        .get_export("memory")
        .and_then(Extern::into_memory)
        .ok_or_else(|| guest("the module exports no memory named \"memory\""))
}

fn range(ptr: i32, len: i32) -> (usize, usize) {
    let start = ptr as u32 as usize;
    (start, start.saturating_add(len as u32 as usize))
}

/// A copy of guest memory `[ptr, ptr + len)`.
fn read(caller: &mut Caller<'_, Host>, ptr: i32, len: i32) -> wasmtime::Result<Vec<u8>> {
    let m = memory(caller)?;
    let (start, end) = range(ptr, len);
    m.data(&*caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or_else(|| guest(format!("pointer out of bounds: {start}..{end}")))
}

fn write(caller: &mut Caller<'_, Host>, ptr: i32, bytes: &[u8]) -> wasmtime::Result<()> {
    let m = memory(caller)?;
    let start = ptr as u32 as usize;
    let end = start.saturating_add(bytes.len());
    m.data_mut(&mut *caller)
        .get_mut(start..end)
        .ok_or_else(|| guest(format!("pointer out of bounds: {start}..{end}")))?
        .copy_from_slice(bytes);
    Ok(())
}

fn json(bytes: Vec<u8>, what: &str) -> wasmtime::Result<Box<RawValue>> {
    let text = String::from_utf8(bytes).map_err(|_| guest(format!("{what} is not UTF-8")))?;
    RawValue::from_string(text).map_err(|e| guest(format!("{what} is not JSON: {e}")))
}

/// The wasi functions the shim implements; every other import of
/// `wasi_snapshot_preview1` a module has gets a stub answering `ENOSYS`.
pub(super) const WASI_OFFERED: &[&str] = &[
    "fd_write",
    "proc_exit",
    "random_get",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "clock_time_get",
    "sched_yield",
];

/// The `taskwire` imports and the wasi shim.
pub(super) fn link(linker: &mut Linker<Host>) -> wasmtime::Result<()> {
    const T: &str = "taskwire";
    linker.func_wrap(T, "params_len", |c: Caller<'_, Host>| -> i32 {
        c.data().input.len() as i32
    })?;
    linker.func_wrap(
        T,
        "params_read",
        |mut c: Caller<'_, Host>, ptr: i32| -> wasmtime::Result<i32> {
            let input = std::mem::take(&mut c.data_mut().input);
            let r = write(&mut c, ptr, &input);
            let n = input.len() as i32;
            c.data_mut().input = input;
            r.map(|()| n)
        },
    )?;
    linker.func_wrap(
        T,
        "result",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let v = json(read(&mut c, ptr, len)?, "the result")?;
            c.data_mut().result = Some(v);
            Ok(())
        },
    )?;
    linker.func_wrap(
        T,
        "error",
        |mut c: Caller<'_, Host>, code: i32, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let message = String::from_utf8_lossy(&read(&mut c, ptr, len)?).into_owned();
            c.data_mut().error = Some(if code == codes::INVALID_PARAMS {
                TaskError::InvalidParams(message)
            } else {
                TaskError::failed(code, message)
            });
            Ok(())
        },
    )?;
    linker.func_wrap(
        T,
        "progress",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let v = json(read(&mut c, ptr, len)?, "a progress value")?;
            c.data().ctx.progress(&*v);
            Ok(())
        },
    )?;
    linker.func_wrap(
        T,
        "log",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<()> {
            let bytes = read(&mut c, ptr, len)?;
            c.data_mut().log(&bytes);
            Ok(())
        },
    )?;

    const W: &str = "wasi_snapshot_preview1";
    linker.func_wrap(
        W,
        "fd_write",
        |mut c: Caller<'_, Host>,
         fd: i32,
         iovs: i32,
         n: i32,
         written: i32|
         -> wasmtime::Result<i32> {
            if fd != 1 && fd != 2 {
                return Ok(EBADF);
            }
            let mut total = 0u32;
            for i in 0..n.clamp(0, 1024) {
                let iov = read(&mut c, iovs.wrapping_add(i * 8), 8)?;
                let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]).max(0);
                // Only what the log can still take is copied out: a guest
                // writing its whole memory, in every one of its tasks, would
                // otherwise make the host hold as much again.
                let room = LOG_BYTES.saturating_sub(c.data().log_used) as i32;
                let bytes = read(&mut c, ptr, len.min(room))?;
                total = total.wrapping_add(len as u32);
                c.data_mut().log_dropped += (len - len.min(room)) as usize;
                c.data_mut().log(&bytes);
            }
            write(&mut c, written, &total.to_le_bytes())?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(
        W,
        "proc_exit",
        |_: Caller<'_, Host>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(Halt::Exit(code)))
        },
    )?;
    linker.func_wrap(
        W,
        "random_get",
        |mut c: Caller<'_, Host>, ptr: i32, len: i32| -> wasmtime::Result<i32> {
            let n = (len as u32 as usize).min(1 << 20);
            let mut buf = vec![0u8; n];
            fill_random(&mut buf);
            write(&mut c, ptr, &buf)?;
            Ok(ESUCCESS)
        },
    )?;
    // No environment and no arguments: two zero counts.
    for (sizes, get) in [
        ("environ_sizes_get", "environ_get"),
        ("args_sizes_get", "args_get"),
    ] {
        linker.func_wrap(
            W,
            sizes,
            |mut c: Caller<'_, Host>, count: i32, size: i32| -> wasmtime::Result<i32> {
                write(&mut c, count, &0u32.to_le_bytes())?;
                write(&mut c, size, &0u32.to_le_bytes())?;
                Ok(ESUCCESS)
            },
        )?;
        linker.func_wrap(W, get, |_: Caller<'_, Host>, _: i32, _: i32| -> i32 {
            ESUCCESS
        })?;
    }
    // The monotonic clock only (time since the task started): a guest may
    // measure itself; the wall clock is not offered.
    linker.func_wrap(
        W,
        "clock_time_get",
        |mut c: Caller<'_, Host>, id: i32, _precision: i64, out: i32| -> wasmtime::Result<i32> {
            if id != 1 {
                return Ok(EINVAL);
            }
            let ns = c.data().started.elapsed().as_nanos() as u64;
            write(&mut c, out, &ns.to_le_bytes())?;
            Ok(ESUCCESS)
        },
    )?;
    linker.func_wrap(W, "sched_yield", |_: Caller<'_, Host>| -> i32 { ESUCCESS })?;
    Ok(())
}

fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        // SAFETY: the pointer and length describe the unfilled rest of `buf`.
        let n = unsafe { libc::getrandom(buf[done..].as_mut_ptr().cast(), buf.len() - done, 0) };
        if n <= 0 {
            // No kernel randomness: a guest's hash seeds are not secrets;
            // leave the rest as it is rather than fail the task.
            return;
        }
        done += n as usize;
    }
}
