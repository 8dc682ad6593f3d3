//! The global epoch: one counter, advanced by one ticker thread, that tells a
//! checkpoint whether its slice is over with one atomic load, no clock read.
//!
//! A worker starting a slice notes the epoch at which the slice ends in a
//! thread-local ([`begin_slice`]); [`should_yield`] compares the two. The
//! ticker sleeps while no worker runs a slice, so an idle server does not wake
//! 4 000 times a second. The thread's CPU clock ([`thread_cpu_time`]) is the
//! other clock of the pool, read once per slice by the worker to charge it,
//! and by the watchdog, through [`cpu_time_of`], for workers inside a slice.
//!
//! This file depends on no other part of the pool.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::Duration;

/// Ticker period. A slice ends between `slice - TICK` and `slice` after it began.
const TICK: Duration = Duration::from_micros(250);
static EPOCH: AtomicU64 = AtomicU64::new(1);
/// Workers in a slice now, over all pools: the ticker sleeps at zero.
static BUSY_WORKERS: AtomicUsize = AtomicUsize::new(0);
static TICKER: OnceLock<Thread> = OnceLock::new();

/// Something else that keeps time by the pool's epoch: the WebAssembly lane's
/// engines, whose own epoch must advance with this one so that a guest that
/// never checkpoints still reaches a deadline check at every tick.
pub(crate) trait TickHook: Send + Sync {
    /// Called by the ticker at every tick, on its thread: must be a few
    /// atomic operations at most.
    fn tick(&self);
}

/// Hooks held weakly: a server that goes away drops its engine, and the
/// ticker forgets it at its next tick.
static HOOKS: Mutex<Vec<Weak<dyn TickHook>>> = Mutex::new(Vec::new());

thread_local! {
    /// Epoch at which this thread's current slice ends; `u64::MAX` off the pool.
    static SLICE_END: Cell<u64> = const { Cell::new(u64::MAX) };
}

/// Starts the ticker thread if it is not running yet (one per process).
pub(super) fn start_ticker() {
    ticker();
}

fn ticker() -> &'static Thread {
    TICKER.get_or_init(|| {
        let spawned = thread::Builder::new()
            .name("taskwire-tick".into())
            .spawn(|| loop {
                if BUSY_WORKERS.load(Ordering::Relaxed) == 0 {
                    // Nothing to preempt: sleep until a worker starts a slice.
                    thread::park_timeout(Duration::from_millis(100));
                } else {
                    thread::sleep(TICK);
                }
                EPOCH.fetch_add(1, Ordering::Relaxed);
                run_hooks();
            });
        match spawned {
            Ok(h) => h.thread().clone(),
            // Without a ticker slices never end and tasks run to completion:
            // degraded, not broken.
            Err(_) => thread::current(),
        }
    })
}

/// Calls every live hook; forgets the dead ones.
fn run_hooks() {
    let mut hooks = crate::sync::lock(&HOOKS);
    if hooks.is_empty() {
        return;
    }
    hooks.retain(|h| match h.upgrade() {
        Some(h) => {
            h.tick();
            true
        }
        None => false,
    });
}

/// Adds a hook the ticker calls at every tick while it holds.
pub(crate) fn add_tick_hook(hook: Weak<dyn TickHook>) {
    crate::sync::lock(&HOOKS).push(hook);
    ticker();
}

/// The epoch now.
pub(super) fn now() -> u64 {
    EPOCH.load(Ordering::Relaxed)
}

/// Ticks in `d`, at least one.
pub(super) fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
}

/// Starts a slice of `slice_ticks` on this thread: from now on
/// [`should_yield`] turns true once the epoch reaches its end. Returns the
/// epoch at which it began (the watchdog's measure of a stuck worker).
pub(super) fn begin_slice(slice_ticks: u64) -> u64 {
    if BUSY_WORKERS.fetch_add(1, Ordering::Relaxed) == 0 {
        ticker().unpark();
    }
    let epoch = now();
    SLICE_END.with(|c| c.set(epoch + slice_ticks));
    epoch
}

/// Ends this thread's slice: off the pool, [`should_yield`] is false again.
pub(super) fn end_slice() {
    SLICE_END.with(|c| c.set(u64::MAX));
    BUSY_WORKERS.fetch_sub(1, Ordering::Relaxed);
}

/// Whether the task running on this thread has used up its slice. One relaxed
/// atomic load and one thread-local read: a few nanoseconds.
#[inline]
pub(crate) fn should_yield() -> bool {
    EPOCH.load(Ordering::Relaxed) >= SLICE_END.with(|c| c.get())
}

/// Whether this thread is a compute worker in a slice.
pub(crate) fn on_worker() -> bool {
    SLICE_END.with(|c| c.get()) != u64::MAX
}

/// The calling thread's CPU time. A system call (~170 ns here): read it once per
/// slice, not per poll.
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer and the clock id is a constant the
    // kernel always supports for the calling thread.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The calling thread's CPU clock, for another thread to read with
/// [`cpu_time_of`]; `None` if the system does not give one.
pub(super) fn this_thread_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `pthread_self` is always a valid handle for the calling thread
    // and `clock` a valid out-pointer.
    let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) };
    (rc == 0).then_some(clock)
}

/// The CPU time of the thread whose clock is `clock` (~220 ns here); `None`
/// once that thread has exited.
pub(super) fn cpu_time_of(clock: libc::clockid_t) -> Option<Duration> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; a clock id of a thread that has
    // exited makes the call fail with EINVAL, nothing worse.
    let rc = unsafe { libc::clock_gettime(clock, &mut ts) };
    (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
}
