//! The compute pool: a small executor of its own for CPU-bound tasks.
//!
//! CPU tasks are futures polled on dedicated worker threads, never on Tokio's
//! I/O threads. This module knows nothing of JSON or connections: a job
//! belongs to a *group* (the connection id) and reports into a [`JobStats`].
//!
//! # The life of a CPU task
//!
//! 1. **Admission** (`admission.rs`): [`ComputePool::admit_from`] takes one
//!    slot of each count that bounds the job: its connection's
//!    (`per_connection_limit`), its client address's (`address_cpu_limit`)
//!    and the pool's (`queue_limit`); none while the pool shuts down or the
//!    process is over its memory budget. A refusal names its reason and a
//!    retry hint from the rate at which jobs have been ending. The
//!    [`Permit`] holds the slots until the job's future is dropped.
//! 2. **Spawn** ([`ComputePool::spawn`]): the future, with its permit, becomes
//!    an async-task runnable whose schedule function pushes it onto the run
//!    queue under its group, with the CPU time it has attained so far.
//! 3. **Pick** (`queue.rs`): an idle worker pops the next job under the queue
//!    lock: the group with the least recently attained CPU service, then its
//!    job with the least attained service, aged by its wait, while that is
//!    below `las_threshold`; among its jobs past it, the first submitted.
//! 4. **Slice** (`worker.rs`, `epoch.rs`): the worker notes the epoch at which
//!    the slice ends and polls the job. Each [`checkpoint`](crate::Ctx::checkpoint)
//!    asks [`should_yield`] (one atomic load against the ticker's epoch, no
//!    clock read); once the slice is over, the checkpoint wakes its own task
//!    and returns `Pending`.
//! 5. **Charge and requeue** (`worker.rs`): the worker reads its thread's CPU
//!    clock once, charges the time to the job and its group, and, since the
//!    job was woken while it ran, pushes it back itself, ordered by the
//!    service it has attained as of that charge. A job waiting for something
//!    else (a Tokio timer, channel or socket: every worker enters the Tokio
//!    runtime the pool was started in) leaves the pool, counted as waiting;
//!    whoever wakes it pushes it back, under the same policy.
//! 6. **Watch** (`watchdog.rs`): meanwhile a job whose worker thread burns
//!    far more CPU than its slice without a checkpoint is flagged, and a
//!    replacement worker takes its place; the largest jobs are flagged while
//!    over the memory budget.
//! 7. **Answer**: the future completes (or the task handle is dropped, which
//!    cancels it at its next yield); dropping it releases the permit's slots,
//!    and the task handle hands the output to the connection, which answers.
//!
//! Files, each depending only on those below it: this facade; `watchdog.rs`;
//! `worker.rs`; `admission.rs` (over `limit.rs`); `epoch.rs`; `stats.rs`;
//! `queue.rs` (the policy, a pure data structure).

mod admission;
#[cfg(feature = "cluster")]
mod claim;
mod epoch;
mod queue;
mod stats;
mod watchdog;
mod worker;

use crate::limit::address_group;
pub(crate) use admission::{Permit, Refusal};
#[cfg(feature = "cluster")]
pub(crate) use claim::{Claim, Claimed};
pub use epoch::thread_cpu_time;
pub(crate) use epoch::{add_tick_hook, should_yield, TickHook};
pub use queue::RunQueue;
pub(crate) use stats::task_event;
pub use stats::{current_task, TaskLabel};
pub(crate) use stats::{JobState, JobStats, PoolStats};
pub(crate) use worker::JobMeta;

use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::thread;
use std::time::Duration;

use admission::{Admission, Permitted};
use stats::EndsJob;
use worker::Shared;

/// Settings of the compute pool.
#[derive(Clone, Debug)]
pub struct ComputeConfig {
    /// Worker threads (default: the number of available cores).
    pub workers: usize,
    /// How long a task runs before it yields at a checkpoint (default 2 ms).
    pub slice: Duration,
    /// How much CPU time past its slice a task may burn without a checkpoint
    /// before it is flagged as not yielding and a replacement worker is
    /// started (default 100 ms). CPU time, not wall time: a task that
    /// checkpoints is never flagged, however contended the machine.
    pub non_yield_after: Duration,
    /// Most extra workers started to replace stuck ones (default: `workers`).
    pub max_extra_workers: usize,
    /// Most CPU tasks admitted and not yet finished, over all connections (default 10 000).
    pub queue_limit: usize,
    /// Most CPU tasks admitted and not yet finished, per connection (default 256).
    pub per_connection_limit: usize,
    /// Most CPU tasks admitted and not yet finished, per client address (IPv6
    /// grouped by /64), over all its connections (default 2 560, a quarter of
    /// the default `queue_limit`: at least four addresses are needed to fill
    /// the pool, and one flooding address leaves room for newcomers).
    pub address_cpu_limit: usize,
    /// Process memory past which new CPU tasks are refused (`-32001`, reason
    /// `memory`) and the largest tasks are flagged. Counted by
    /// [`crate::alloc::CountingAlloc`] when it is the global allocator, else the
    /// resident set size. Default: 75% of the machine's memory (or of the
    /// cgroup's limit), 4 GiB where that cannot be read: room left for the
    /// allocator's slack and the kernel before the OOM killer acts.
    pub memory_budget: u64,
    /// Time constant of the decay of a connection's recent CPU usage (default 1 s).
    pub usage_decay: Duration,
    /// CPU time below which a connection's tasks go least attained service
    /// first, and past which its oldest goes first (default 10 ms; see
    /// `docs/SCHEDULING.md`). `Duration::MAX` keeps least attained service
    /// throughout.
    pub las_threshold: Duration,
    /// OS niceness of worker threads (Linux), so that connection threads win the
    /// CPU when both want it (default 10; 0 leaves it alone).
    pub nice: i32,
}

impl Default for ComputeConfig {
    fn default() -> Self {
        let workers = thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        ComputeConfig {
            workers,
            slice: Duration::from_millis(2),
            non_yield_after: Duration::from_millis(100),
            max_extra_workers: workers,
            queue_limit: 10_000,
            per_connection_limit: 256,
            address_cpu_limit: 2_560,
            memory_budget: default_memory_budget(),
            usage_decay: Duration::from_secs(1),
            las_threshold: Duration::from_millis(10),
            nice: 10,
        }
    }
}

/// 75% of the memory this process may use, or 4 GiB if that is unknown.
pub(crate) fn default_memory_budget() -> u64 {
    crate::alloc::available_memory()
        .map(|m| m / 4 * 3)
        .unwrap_or(4 << 30)
}

/// The compute pool. Cheap to clone (an `Arc`); dropping the last clone stops
/// the workers once their current slices end.
#[derive(Clone)]
pub(crate) struct ComputePool {
    cfg: Arc<ComputeConfig>,
    inner: Arc<Shared>,
    /// Numbers jobs as they are spawned: the first submitted of a
    /// connection's long jobs runs first.
    submissions: Arc<AtomicU64>,
    _guard: Arc<ShutdownOnDrop>,
}

/// Workers hold the pool's state strongly while they run; the handles hold
/// this guard, so the last handle dropped stops them.
struct ShutdownOnDrop(Weak<Shared>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.upgrade() {
            p.shut_down();
        }
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("cfg", &self.cfg)
            .finish()
    }
}

impl ComputePool {
    /// Starts the workers.
    pub(crate) fn new(cfg: ComputeConfig) -> ComputePool {
        let cfg = ComputeConfig {
            workers: cfg.workers.max(1),
            ..cfg
        };
        let inner = Arc::new(Shared::new(
            cfg.workers,
            cfg.max_extra_workers,
            cfg.nice,
            cfg.slice,
            cfg.non_yield_after,
            cfg.usage_decay,
            cfg.las_threshold,
            cfg.memory_budget,
            Admission::new(
                cfg.per_connection_limit,
                cfg.address_cpu_limit,
                cfg.queue_limit,
            ),
            // Outside a runtime (a unit test, an embedding that builds the
            // pool first) CPU tasks still run; only Tokio resources fail.
            tokio::runtime::Handle::try_current().ok(),
        ));
        epoch::start_ticker();
        for _ in 0..cfg.workers {
            worker::start_worker(&inner);
        }
        watchdog::spawn(Arc::downgrade(&inner));
        let guard = Arc::new(ShutdownOnDrop(Arc::downgrade(&inner)));
        ComputePool {
            cfg: Arc::new(cfg),
            inner,
            submissions: Arc::new(AtomicU64::new(0)),
            _guard: guard,
        }
    }

    /// Admits one more job for a group whose admitted count is `group_count`,
    /// with no client address: such a job counts against the connection and
    /// pool limits only. A server admits with [`ComputePool::admit_from`].
    #[cfg(test)]
    pub(crate) fn admit(&self, group_count: &Arc<AtomicUsize>) -> Result<Permit, Refusal> {
        self.admit_inner(group_count, None)
    }

    /// Admits one more job for a group whose admitted count is `group_count`,
    /// from the client address `peer` (grouped by [`address_group`]).
    ///
    /// Checked in this order, the most specific first so that a flooder learns
    /// that the limit is its own: shutdown, memory budget, the connection's
    /// limit, the address's limit, the pool's limit.
    pub(crate) fn admit_from(
        &self,
        group_count: &Arc<AtomicUsize>,
        peer: IpAddr,
    ) -> Result<Permit, Refusal> {
        self.admit_inner(group_count, Some(address_group(peer)))
    }

    fn admit_inner(
        &self,
        group_count: &Arc<AtomicUsize>,
        address: Option<IpAddr>,
    ) -> Result<Permit, Refusal> {
        let p = &self.inner;
        p.admission.admit(
            group_count,
            address,
            p.shutting_down(),
            p.memory.over_budget.load(Ordering::Relaxed),
        )
    }

    #[cfg(feature = "cluster")]
    /// Admits a job that a peer node sent, counted under its origin
    /// connection's `group_count` and the pool's limit (no client address:
    /// the origin node counted that).
    pub(crate) fn admit_remote(&self, group_count: &Arc<AtomicUsize>) -> Result<Permit, Refusal> {
        self.admit_inner(group_count, None)
    }

    #[cfg(feature = "cluster")]
    /// Workers neither running a job nor spoken for by a queued one: what
    /// this node can offer its peers.
    pub(crate) fn spare(&self) -> usize {
        let p = &self.inner;
        // Read under the queue lock, where workers change `busy`.
        let q = crate::sync::lock(&p.queue);
        p.workers
            .saturating_sub(p.busy.load(Ordering::Relaxed))
            .saturating_sub(q.len())
    }

    #[cfg(feature = "cluster")]
    /// Charges CPU time that a job of `group` used on another node, so that
    /// the group's place in the fair order counts it as if it ran here.
    pub(crate) fn charge_remote(&self, group: u64, stats: &JobStats, cpu_ns: u64) {
        let p = &self.inner;
        stats.cpu_ns.fetch_add(cpu_ns, Ordering::Relaxed);
        crate::sync::lock(&p.queue).charge(group, cpu_ns, p.now_ns());
    }

    /// Runs a future on the pool, charged to `group`. The returned task yields
    /// its output; dropping it cancels the job (at its next yield if running).
    /// `permit: None` when the caller holds the job's admission itself (a job
    /// that may run on another node keeps its slots wherever it runs).
    pub(crate) fn spawn<F>(
        &self,
        group: u64,
        stats: Arc<JobStats>,
        permit: impl Into<Option<Permit>>,
        fut: F,
    ) -> async_task::Task<F::Output, Arc<JobMeta>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let permit: Option<Permit> = permit.into();
        let ends = EndsJob(stats.clone());
        let submitted = self.submissions.fetch_add(1, Ordering::Relaxed);
        let meta = Arc::new(JobMeta {
            group,
            submitted,
            stats,
        });
        let weak = Arc::downgrade(&self.inner);
        let schedule = move |job, info| worker::schedule(&weak, job, info);
        let (job, task) = async_task::Builder::new().metadata(meta).spawn(
            move |_| Permitted {
                _permit: permit,
                fut,
                _ends: ends,
            },
            async_task::WithInfo(schedule),
        );
        job.schedule();
        task
    }

    /// A snapshot of the pool.
    pub(crate) fn stats(&self) -> PoolStats {
        let p = &self.inner;
        let queued = crate::sync::lock(&p.queue).len();
        PoolStats {
            workers: p.workers,
            live_workers: p.live.load(Ordering::Relaxed),
            busy: p.busy.load(Ordering::Relaxed),
            queued,
            yielded: p.counts.yielded.load(Ordering::Relaxed),
            waiting: p.counts.waiting.load(Ordering::Relaxed),
            admitted: p.admission.admitted(),
            utilisation: f64::from_bits(p.utilisation.load(Ordering::Relaxed)),
            non_yielding_total: p.non_yielding_total.load(Ordering::Relaxed),
            cpu_ns_total: p.cpu_ns_total.load(Ordering::Relaxed),
            addresses: p.admission.addresses(),
            completion_rate: p.admission.completion_rate(),
            memory_used: p.memory.used.load(Ordering::Relaxed),
            memory_rss: p.memory.rss.load(Ordering::Relaxed),
            memory_budget: p.memory_budget,
            memory_counted: p.memory.counted.load(Ordering::Relaxed),
            over_memory_budget: p.memory.over_budget.load(Ordering::Relaxed),
            largest_task_memory: p.memory.largest_task.load(Ordering::Relaxed),
            memory_trims: p.memory.trims.load(Ordering::Relaxed),
        }
    }

    /// Stops taking jobs and lets the workers exit once idle.
    pub(crate) fn shutdown(&self) {
        self.inner.shut_down();
    }
}

/// What the pool's tests share: a pool without niceness, and a future that
/// burns CPU and yields at its slice's end like a checkpoint loop.
#[cfg(test)]
pub(super) mod testing {
    use super::*;

    pub(crate) fn pool(workers: usize) -> ComputePool {
        ComputePool::new(ComputeConfig {
            workers,
            nice: 0,
            ..ComputeConfig::default()
        })
    }

    /// A future that yields whenever its slice is over, like a checkpoint loop.
    pub(crate) async fn burn(ms: u64) -> u64 {
        let start = thread_cpu_time();
        let mut own = Duration::ZERO;
        let mut last = start;
        let mut x = 0u64;
        while own < Duration::from_millis(ms) {
            for i in 0..10_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
            let now = thread_cpu_time();
            own += now.saturating_sub(last);
            if should_yield() {
                YieldNow(false).await;
                last = thread_cpu_time();
            } else {
                last = now;
            }
        }
        std::hint::black_box(x)
    }

    /// Wakes its own task and returns `Pending` once, as a checkpoint does.
    pub(crate) struct YieldNow(pub bool);
    impl Future for YieldNow {
        type Output = ();
        fn poll(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            if self.0 {
                return std::task::Poll::Ready(());
            }
            self.0 = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::pool;
    use super::*;

    #[test]
    fn shutdown_refuses_new_jobs_and_the_workers_exit() {
        let p = pool(2);
        let g = Arc::new(AtomicUsize::new(0));
        let held = p.admit(&g).unwrap();
        p.shutdown();
        assert_eq!(p.admit(&g).unwrap_err(), Refusal::ShuttingDown);
        let exited = (0..2000).any(|_| {
            thread::sleep(Duration::from_millis(5));
            p.stats().live_workers == 0
        });
        assert!(exited, "idle workers see the one shutdown flag and exit");
        drop(held);
        assert_eq!(g.load(Ordering::Acquire), 0);
    }

    #[test]
    fn dropping_the_last_handle_stops_the_workers() {
        let p = pool(1);
        let weak = Arc::downgrade(&p.inner);
        drop(p);
        let gone = (0..2000).any(|_| {
            thread::sleep(Duration::from_millis(5));
            weak.upgrade().is_none()
        });
        assert!(gone, "workers and watchdog let go of the pool's state");
    }
}
