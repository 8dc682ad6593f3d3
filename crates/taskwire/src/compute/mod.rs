//! The compute pool: a small executor of its own for CPU-bound tasks.
//!
//! CPU tasks are futures polled on dedicated worker threads, never on Tokio's
//! I/O threads. A task runs until its slice is used up and then yields at its
//! next [`checkpoint`](crate::Ctx::checkpoint); the worker charges the CPU time
//! it used (read from the thread's CPU clock once per slice) and asks the
//! [`RunQueue`] policy which job runs next. A global epoch counter, advanced by
//! a ticker thread, tells a checkpoint whether the slice is over with one atomic
//! load: no clock read per checkpoint.
//!
//! Admission is bounded three ways before a job is queued: per connection
//! (`per_connection_limit`), per client address (`address_cpu_limit`, so that
//! one address flooding from many connections cannot take every slot), and
//! for the pool (`queue_limit`); and no new job is admitted while the process
//! is over its memory budget (sampled by the watchdog, see [`crate::alloc`]).
//!
//! This module knows nothing of JSON or connections: a job belongs to a
//! *group* (the connection id) and reports into a [`JobStats`].

mod queue;

pub use queue::RunQueue;

use std::cell::Cell;
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

/// Settings of the compute pool.
#[derive(Clone, Debug)]
pub struct ComputeConfig {
    /// Worker threads (default: the number of available cores).
    pub workers: usize,
    /// How long a task runs before it yields at a checkpoint (default 2 ms).
    pub slice: Duration,
    /// How long past its slice a task may run without a checkpoint before it is
    /// flagged as not yielding and a replacement worker is started (default 100 ms).
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
            nice: 10,
        }
    }
}

/// 75% of the memory this process may use, or 4 GiB if that is unknown.
pub fn default_memory_budget() -> u64 {
    crate::alloc::available_memory()
        .map(|m| m / 4 * 3)
        .unwrap_or(4 << 30)
}

/// The unit of per-address limits: an IPv4 address, or an IPv6 /64 (one
/// subscriber's prefix: a host can take any address of it). IPv4-mapped IPv6
/// addresses count as their IPv4 address.
pub fn address_group(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// Where a CPU job is in its life, as shown in the task table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    /// Admitted, never run yet.
    Queued = 0,
    /// On a worker now.
    Running = 1,
    /// Preempted at a checkpoint, waiting for its next slice.
    Yielded = 2,
    /// Waiting for something other than the CPU.
    Waiting = 3,
}

impl JobState {
    /// The name used by the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Yielded => "yielded",
            JobState::Waiting => "waiting",
        }
    }

    fn from_u8(v: u8) -> JobState {
        match v {
            1 => JobState::Running,
            2 => JobState::Yielded,
            3 => JobState::Waiting,
            _ => JobState::Queued,
        }
    }
}

/// Live figures of one job, written by the pool and read by the observer.
#[derive(Debug, Default)]
pub struct JobStats {
    cpu_ns: AtomicU64,
    state: AtomicU8,
    not_yielding: AtomicBool,
    slices: AtomicU64,
    first_run: OnceLock<Instant>,
    /// Bytes allocated minus freed while the job ran (see [`crate::alloc`]).
    memory: AtomicI64,
    /// One of the largest jobs while the process is over its memory budget.
    memory_flagged: AtomicBool,
    /// Whether the pool keeps this job among its memory-heavy candidates.
    heavy: AtomicBool,
    /// The task's id and method, for the pool's log lines.
    label: Option<(u64, Arc<str>)>,
}

impl JobStats {
    /// The figures of the task `id` running `method` (named in log lines).
    pub fn for_task(id: u64, method: Arc<str>) -> JobStats {
        JobStats {
            label: Some((id, method)),
            ..JobStats::default()
        }
    }
    /// Memory the job holds: bytes it allocated minus bytes it freed while it
    /// ran. 0 unless [`crate::alloc::CountingAlloc`] is the global allocator.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed).max(0) as u64
    }
    /// Whether the job is flagged as one of the largest while the process is
    /// over its memory budget.
    pub fn memory_flagged(&self) -> bool {
        self.memory_flagged.load(Ordering::Relaxed)
    }
    /// CPU time used so far, summed over its slices.
    pub fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }
    /// Where the job is now.
    pub fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Acquire))
    }
    /// Whether the job once ran far past its slice without a checkpoint.
    pub fn not_yielding(&self) -> bool {
        self.not_yielding.load(Ordering::Relaxed)
    }
    /// When the job first got a worker.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }
    /// Slices the job has run.
    pub fn slices(&self) -> u64 {
        self.slices.load(Ordering::Relaxed)
    }
    /// Marks the job as running or waiting outside the pool (I/O tasks).
    pub fn set_state(&self, s: JobState) {
        self.state.store(s as u8, Ordering::Release);
    }
}

/// Why the pool refused a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The connection already has `per_connection_limit` CPU tasks.
    #[error("the connection has too many CPU tasks queued")]
    ConnectionQueue {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The client's address already has `address_cpu_limit` CPU tasks.
    #[error("the client address has too many CPU tasks queued")]
    AddressLimit {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The pool already has `queue_limit` CPU tasks.
    #[error("the compute queue is full")]
    QueueFull {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The process is over its memory budget.
    #[error("the server is over its memory budget")]
    Memory {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The pool is shutting down.
    #[error("the compute pool is shutting down")]
    ShuttingDown,
}

impl Refusal {
    /// The `reason` the protocol sends.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ConnectionQueue { .. } => "connection_queue",
            Refusal::AddressLimit { .. } => "address_limit",
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::Memory { .. } => "memory",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
    /// The `retryAfterMs` hint.
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Refusal::ConnectionQueue { retry_after_ms }
            | Refusal::AddressLimit { retry_after_ms }
            | Refusal::QueueFull { retry_after_ms }
            | Refusal::Memory { retry_after_ms } => *retry_after_ms,
            Refusal::ShuttingDown => 1_000,
        }
    }
}

/// An admission: the right to run one CPU job, released when dropped.
#[derive(Debug)]
pub struct Permit {
    pool: Weak<Inner>,
    group: Arc<AtomicUsize>,
    address: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.group.fetch_sub(1, Ordering::AcqRel);
        if let Some(p) = self.pool.upgrade() {
            if let Some(a) = self.address {
                p.release_address(a, true);
            }
            p.released.fetch_add(1, Ordering::Relaxed);
            p.admitted.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// One client address's admitted CPU jobs.
#[derive(Debug)]
struct AddressEntry {
    admitted: usize,
    /// When this entry was made (it lives while the address has jobs).
    since: Instant,
    /// Jobs of this address that ended since then.
    released: u64,
}

/// Bounds of the retry hints: soon enough to be worth a retry, and never
/// longer than a client can be expected to wait and come back.
const RETRY_MIN_MS: u64 = 50;
const RETRY_MAX_MS: u64 = 30_000;

/// A snapshot of the pool for the admin API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PoolStats {
    /// Configured workers.
    pub workers: usize,
    /// Worker threads alive now, including replacements for stuck ones.
    pub live_workers: usize,
    /// Workers running a job now.
    pub busy: usize,
    /// Jobs waiting in the run queue.
    pub queued: usize,
    /// Jobs admitted and not finished.
    pub admitted: usize,
    /// Fraction of the configured workers busy, averaged over the last
    /// quarter second (sampled every 10 ms by the watchdog).
    pub utilisation: f64,
    /// Jobs flagged as not yielding, ever.
    pub non_yielding_total: u64,
    /// CPU time run on the pool, ever.
    pub cpu_ns_total: u64,
    /// Client addresses (IPv6 /64s) with CPU tasks admitted now.
    pub addresses: usize,
    /// CPU tasks finished per second (recent average).
    pub completion_rate: f64,
    /// Memory in use as the budget counts it (the counting allocator's
    /// total, else the resident set size), as of the last sample (100 ms).
    pub memory_used: u64,
    /// Resident set size of the process, as of the last sample.
    pub memory_rss: u64,
    /// The memory budget.
    pub memory_budget: u64,
    /// Whether `memory_used` comes from the counting allocator.
    pub memory_counted: bool,
    /// Whether new CPU tasks are refused for memory now.
    pub over_memory_budget: bool,
    /// The largest memory held by one CPU task among the heavy ones tracked.
    pub largest_task_memory: u64,
    /// Times freed memory was handed back to the operating system.
    pub memory_trims: u64,
}

type Job = async_task::Runnable<Arc<JobMeta>>;

/// What the pool keeps with each job.
#[derive(Debug)]
pub struct JobMeta {
    group: u64,
    stats: Arc<JobStats>,
}

struct WorkerSlot {
    /// Epoch at which the current slice started; 0 when idle.
    since_epoch: AtomicU64,
    /// Whether a replacement was already started for the job running now.
    replaced: AtomicBool,
    /// The job on this worker, for flagging.
    job: Mutex<Option<Arc<JobStats>>>,
}

struct Inner {
    cfg: ComputeConfig,
    slice_ticks: u64,
    non_yield_ticks: u64,
    queue: Mutex<State>,
    cv: Condvar,
    start: Instant,
    admitted: AtomicUsize,
    busy: AtomicUsize,
    live: AtomicUsize,
    extra: AtomicUsize,
    slots: Mutex<Vec<Arc<WorkerSlot>>>,
    non_yielding_total: AtomicU64,
    cpu_ns_total: AtomicU64,
    /// `utilisation` as f64 bits: one writer (the watchdog), any readers, so
    /// that several dashboards and scrapers do not shorten each other's window.
    utilisation: AtomicU64,
    shutdown: AtomicBool,
    /// Admitted jobs per client address group; an entry is removed when its
    /// count falls to zero, so there are never more entries than admitted jobs.
    addresses: Mutex<HashMap<IpAddr, AddressEntry>>,
    /// Permits released, ever; the watchdog turns it into `completion_rate`.
    released: AtomicU64,
    /// Jobs finished per second, as f64 bits (written by the watchdog).
    completion_rate: AtomicU64,
    memory: MemoryState,
}

/// What the watchdog samples about memory, for admission and the operator.
#[derive(Default)]
struct MemoryState {
    used: AtomicU64,
    rss: AtomicU64,
    counted: AtomicBool,
    over_budget: AtomicBool,
    trims: AtomicU64,
    largest_task: AtomicU64,
    /// Jobs that held at least `HEAVY_MIN_BYTES` after a slice: the
    /// candidates for flagging. At most `HEAVY_CAP`; the smallest make room.
    heavy: Mutex<Vec<Weak<JobStats>>>,
}

/// A job holding this much after a slice is tracked as a memory-heavy candidate.
const HEAVY_MIN_BYTES: i64 = 1 << 20;
/// Most memory-heavy candidates tracked.
const HEAVY_CAP: usize = 64;
/// How many of the largest jobs are flagged when over the budget.
const FLAG_LARGEST: usize = 3;

struct State {
    rq: RunQueue<Job>,
    shutdown: bool,
}

/// The compute pool. Cheap to clone (an `Arc`); dropping the last clone stops
/// the workers once their current slices end.
#[derive(Clone)]
pub struct ComputePool {
    inner: Arc<Inner>,
    _guard: Arc<ShutdownOnDrop>,
}

/// Workers hold the pool's state strongly while they run; the handles hold
/// this guard, so the last handle dropped stops them.
struct ShutdownOnDrop(Weak<Inner>);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.upgrade() {
            ComputePool::shutdown_inner(&p);
        }
    }
}

impl std::fmt::Debug for ComputePool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComputePool")
            .field("cfg", &self.inner.cfg)
            .finish()
    }
}

// ---- the epoch: one global counter, one ticker thread -------------------------

/// Ticker period. A slice ends between `slice - TICK` and `slice` after it began.
const TICK: Duration = Duration::from_micros(250);
static EPOCH: AtomicU64 = AtomicU64::new(1);
static BUSY_WORKERS: AtomicUsize = AtomicUsize::new(0);
static TICKER: OnceLock<Thread> = OnceLock::new();

thread_local! {
    /// Epoch at which this thread's current slice ends; `u64::MAX` off the pool.
    static SLICE_END: Cell<u64> = const { Cell::new(u64::MAX) };
    /// The job running on this thread, so that its own wake-up is requeued by
    /// the worker after charging it, not by the waker.
    static CURRENT: Cell<*const JobMeta> = const { Cell::new(std::ptr::null()) };
    static YIELDED: Cell<Option<Job>> = const { Cell::new(None) };
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
            });
        match spawned {
            Ok(h) => h.thread().clone(),
            // Without a ticker slices never end and tasks run to completion:
            // degraded, not broken.
            Err(_) => thread::current(),
        }
    })
}

/// Whether the task running on this thread has used up its slice. One relaxed
/// atomic load and one thread-local read: a few nanoseconds.
#[inline]
pub fn should_yield() -> bool {
    EPOCH.load(Ordering::Relaxed) >= SLICE_END.with(|c| c.get())
}

/// Whether this thread is a compute worker.
pub fn on_worker() -> bool {
    SLICE_END.with(|c| c.get()) != u64::MAX
}

fn ticks(d: Duration) -> u64 {
    (d.as_nanos() / TICK.as_nanos()).max(1) as u64
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

impl ComputePool {
    /// Starts the workers.
    pub fn new(cfg: ComputeConfig) -> ComputePool {
        let cfg = ComputeConfig {
            workers: cfg.workers.max(1),
            ..cfg
        };
        let inner = Arc::new(Inner {
            slice_ticks: ticks(cfg.slice),
            non_yield_ticks: ticks(cfg.slice + cfg.non_yield_after),
            queue: Mutex::new(State {
                rq: RunQueue::new(cfg.usage_decay.as_nanos() as u64),
                shutdown: false,
            }),
            cv: Condvar::new(),
            start: Instant::now(),
            admitted: AtomicUsize::new(0),
            busy: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            extra: AtomicUsize::new(0),
            slots: Mutex::new(Vec::new()),
            non_yielding_total: AtomicU64::new(0),
            cpu_ns_total: AtomicU64::new(0),
            utilisation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            addresses: Mutex::new(HashMap::new()),
            released: AtomicU64::new(0),
            completion_rate: AtomicU64::new(0),
            memory: MemoryState::default(),
            cfg,
        });
        ticker();
        for _ in 0..inner.cfg.workers {
            start_worker(&inner);
        }
        let weak = Arc::downgrade(&inner);
        let _ = thread::Builder::new()
            .name("taskwire-watch".into())
            .spawn(move || watchdog(weak));
        let guard = Arc::new(ShutdownOnDrop(Arc::downgrade(&inner)));
        ComputePool {
            inner,
            _guard: guard,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &ComputeConfig {
        &self.inner.cfg
    }

    /// Admits one more job for a group whose admitted count is `group_count`,
    /// with no client address: such a job counts against the connection and
    /// pool limits only. A server admits with [`ComputePool::admit_from`].
    pub fn admit(&self, group_count: &Arc<AtomicUsize>) -> Result<Permit, Refusal> {
        self.admit_inner(group_count, None)
    }

    /// Admits one more job for a group whose admitted count is `group_count`,
    /// from the client address `peer` (grouped by [`address_group`]).
    ///
    /// Checked in this order, the most specific first so that a flooder learns
    /// that the limit is its own: shutdown, memory budget, the connection's
    /// limit, the address's limit, the pool's limit.
    pub fn admit_from(
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
        if p.shutdown.load(Ordering::Relaxed) {
            return Err(Refusal::ShuttingDown);
        }
        if p.memory.over_budget.load(Ordering::Relaxed) {
            // Memory comes back when tasks end: not before the next one does,
            // nor before the next sample of the budget.
            return Err(Refusal::Memory {
                retry_after_ms: p.completion_hint().max(MEMORY_SAMPLE_MS * 10),
            });
        }
        let mine = group_count.fetch_add(1, Ordering::AcqRel);
        if mine >= p.cfg.per_connection_limit {
            group_count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::ConnectionQueue {
                retry_after_ms: p.completion_hint(),
            });
        }
        if let Some(a) = address {
            if let Err(retry_after_ms) = p.take_address(a) {
                group_count.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::AddressLimit { retry_after_ms });
            }
        }
        let all = p.admitted.fetch_add(1, Ordering::AcqRel);
        if all >= p.cfg.queue_limit {
            p.admitted.fetch_sub(1, Ordering::AcqRel);
            if let Some(a) = address {
                p.release_address(a, false);
            }
            group_count.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::QueueFull {
                retry_after_ms: p.completion_hint(),
            });
        }
        Ok(Permit {
            pool: Arc::downgrade(&self.inner),
            group: group_count.clone(),
            address,
        })
    }

    /// Client addresses holding admitted jobs now (bounded by the admitted jobs).
    pub fn addresses(&self) -> usize {
        self.inner.addresses.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Runs a future on the pool, charged to `group`. The returned task yields
    /// its output; dropping it cancels the job (at its next yield if running).
    pub fn spawn<F>(
        &self,
        group: u64,
        stats: Arc<JobStats>,
        permit: Permit,
        fut: F,
    ) -> async_task::Task<F::Output, Arc<JobMeta>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let meta = Arc::new(JobMeta { group, stats });
        let weak = Arc::downgrade(&self.inner);
        let schedule = move |job: Job| schedule(&weak, job);
        let (job, task) = async_task::Builder::new().metadata(meta).spawn(
            move |_| Permitted {
                _permit: permit,
                fut,
            },
            schedule,
        );
        job.schedule();
        task
    }

    /// A snapshot of the pool.
    pub fn stats(&self) -> PoolStats {
        let p = &self.inner;
        let queued = p.queue.lock().map(|s| s.rq.len()).unwrap_or(0);
        let cpu_total = p.cpu_ns_total.load(Ordering::Relaxed);
        let utilisation = f64::from_bits(p.utilisation.load(Ordering::Relaxed));
        PoolStats {
            workers: p.cfg.workers,
            live_workers: p.live.load(Ordering::Relaxed),
            busy: p.busy.load(Ordering::Relaxed),
            queued,
            admitted: p.admitted.load(Ordering::Relaxed),
            utilisation,
            non_yielding_total: p.non_yielding_total.load(Ordering::Relaxed),
            cpu_ns_total: cpu_total,
            addresses: self.addresses(),
            completion_rate: f64::from_bits(p.completion_rate.load(Ordering::Relaxed)),
            memory_used: p.memory.used.load(Ordering::Relaxed),
            memory_rss: p.memory.rss.load(Ordering::Relaxed),
            memory_budget: p.cfg.memory_budget,
            memory_counted: p.memory.counted.load(Ordering::Relaxed),
            over_memory_budget: p.memory.over_budget.load(Ordering::Relaxed),
            largest_task_memory: p.memory.largest_task.load(Ordering::Relaxed),
            memory_trims: p.memory.trims.load(Ordering::Relaxed),
        }
    }

    /// Stops taking jobs and lets the workers exit once idle.
    pub fn shutdown(&self) {
        Self::shutdown_inner(&self.inner);
    }

    fn shutdown_inner(p: &Inner) {
        p.shutdown.store(true, Ordering::Relaxed);
        if let Ok(mut s) = p.queue.lock() {
            s.shutdown = true;
        }
        p.cv.notify_all();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(mut s) = self.queue.lock() {
            s.shutdown = true;
        }
        self.cv.notify_all();
    }
}

pin_project_lite::pin_project! {
    /// A job's future with its admission: the permit is released when the
    /// future is dropped, whether it finished or was cancelled.
    struct Permitted<F> {
        _permit: Permit,
        #[pin]
        fut: F,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;
    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.project().fut.poll(cx)
    }
}

fn schedule(pool: &Weak<Inner>, job: Job) {
    let meta: *const JobMeta = Arc::as_ptr(job.metadata());
    if CURRENT.with(|c| c.get()) == meta {
        // The job woke itself while running (a checkpoint yield): the worker
        // requeues it after charging the slice, so its attained service is current.
        YIELDED.with(|y| y.set(Some(job)));
        return;
    }
    let Some(p) = pool.upgrade() else {
        // The pool is gone: dropping the runnable cancels the job.
        return;
    };
    let now = p.now_ns();
    let group = job.metadata().group;
    let attained = job.metadata().stats.cpu_ns.load(Ordering::Relaxed);
    if let Ok(mut s) = p.queue.lock() {
        s.rq.push(group, attained, job, now);
    }
    p.cv.notify_one();
}

impl Inner {
    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Takes one of the address's slots, or says how long until one of its
    /// jobs can be expected to end: the mean time between its jobs' ends
    /// since it began holding slots, or, if none has ended yet, as long again
    /// as it has held them (the longer it holds, the longer the hint).
    fn take_address(&self, a: IpAddr) -> Result<(), u64> {
        let Ok(mut m) = self.addresses.lock() else {
            return Err(RETRY_MAX_MS);
        };
        let e = m.entry(a).or_insert_with(|| AddressEntry {
            admitted: 0,
            since: Instant::now(),
            released: 0,
        });
        if e.admitted >= self.cfg.address_cpu_limit {
            let held = e.since.elapsed().as_millis() as u64;
            let hint = held / e.released.max(1);
            if e.admitted == 0 {
                // Only with a limit of 0, which `validate` refuses: keep the
                // table free of empty entries all the same.
                m.remove(&a);
            }
            return Err(hint.clamp(RETRY_MIN_MS, RETRY_MAX_MS));
        }
        e.admitted += 1;
        Ok(())
    }

    /// Gives back one of the address's slots; `ended` if a job ended (rather
    /// than an admission undone). The entry goes when its count reaches zero.
    fn release_address(&self, a: IpAddr, ended: bool) {
        let Ok(mut m) = self.addresses.lock() else {
            return;
        };
        if let Some(e) = m.get_mut(&a) {
            e.admitted = e.admitted.saturating_sub(1);
            if ended {
                e.released += 1;
            }
            if e.admitted == 0 {
                m.remove(&a);
            }
        }
    }

    /// How long until some admitted job ends, at the rate jobs have been
    /// ending lately (the watchdog's average over about a second): when
    /// nothing ends (every slot held by tasks that run on), the longest hint.
    fn completion_hint(&self) -> u64 {
        let rate = f64::from_bits(self.completion_rate.load(Ordering::Relaxed));
        if rate <= 0.0 {
            return RETRY_MAX_MS;
        }
        ((1000.0 / rate) as u64).clamp(RETRY_MIN_MS, RETRY_MAX_MS)
    }
}

fn start_worker(inner: &Arc<Inner>) {
    let slot = Arc::new(WorkerSlot {
        since_epoch: AtomicU64::new(0),
        replaced: AtomicBool::new(false),
        job: Mutex::new(None),
    });
    if let Ok(mut slots) = inner.slots.lock() {
        slots.push(slot.clone());
    }
    inner.live.fetch_add(1, Ordering::AcqRel);
    let weak = Arc::downgrade(inner);
    let spawned = thread::Builder::new()
        .name("taskwire-cpu".into())
        .spawn(move || worker(weak, slot));
    if spawned.is_err() {
        inner.live.fetch_sub(1, Ordering::AcqRel);
    }
}

fn set_nice(nice: i32) {
    if nice == 0 {
        return;
    }
    // SAFETY: gettid has no preconditions; setpriority on our own thread id
    // only changes this thread's scheduling weight.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice);
    }
}

/// Charges a worker's last slice to its group and requeues the job if it
/// yielded (with its attained service as of that charge).
fn put_back(s: &mut State, finished: Option<(u64, u64)>, requeue: Option<Job>, now: u64) {
    if let Some((group, used)) = finished {
        s.rq.descheduled(group, used, now);
    }
    if let Some(job) = requeue {
        let m = job.metadata().clone();
        s.rq.push(m.group, m.stats.cpu_ns.load(Ordering::Relaxed), job, now);
    }
}

fn worker(pool: Weak<Inner>, slot: Arc<WorkerSlot>) {
    let Some(p) = pool.upgrade() else { return };
    set_nice(p.cfg.nice);
    let mut cpu_mark = thread_cpu_time();
    let mut finished: Option<(u64, u64)> = None; // (group, cpu ns) of the last slice
    let mut requeue: Option<Job> = None;
    let mut retired = false;
    loop {
        let next = {
            let Ok(mut s) = p.queue.lock() else { break };
            put_back(&mut s, finished.take(), requeue.take(), p.now_ns());
            loop {
                if s.shutdown {
                    break None;
                }
                // A replacement made surplus by a stuck worker's return
                // retires; deciding under the queue lock retires exactly one.
                if p.live.load(Ordering::Acquire) > p.cfg.workers + p.extra.load(Ordering::Acquire)
                {
                    p.live.fetch_sub(1, Ordering::AcqRel);
                    retired = true;
                    break None;
                }
                if let Some(j) = s.rq.pop(p.now_ns()) {
                    break Some(j);
                }
                s = match p.cv.wait_timeout(s, Duration::from_millis(200)) {
                    Ok((g, _)) => g,
                    Err(_) => return,
                };
            }
        };
        let Some((group, job)) = next else { break };
        let meta = job.metadata().clone();
        meta.stats.set_state(JobState::Running);
        meta.stats.slices.fetch_add(1, Ordering::Relaxed);
        meta.stats.first_run.get_or_init(Instant::now);
        if let Ok(mut j) = slot.job.lock() {
            *j = Some(meta.stats.clone());
        }
        p.busy.fetch_add(1, Ordering::Relaxed);
        if BUSY_WORKERS.fetch_add(1, Ordering::Relaxed) == 0 {
            ticker().unpark();
        }
        let epoch = EPOCH.load(Ordering::Relaxed);
        slot.since_epoch.store(epoch, Ordering::Relaxed);
        SLICE_END.with(|c| c.set(epoch + p.slice_ticks));
        CURRENT.with(|c| c.set(Arc::as_ptr(&meta)));

        // Panics are caught inside the task wrapper; this guard keeps the
        // worker alive should a future's drop glue panic all the same. What the
        // job allocates or frees meanwhile is its own.
        {
            let _mem = crate::alloc::Attributed::new(&meta.stats.memory);
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()));
        }
        if meta.stats.memory.load(Ordering::Relaxed) >= HEAVY_MIN_BYTES {
            p.memory.track_heavy(&meta.stats);
        }

        CURRENT.with(|c| c.set(std::ptr::null()));
        SLICE_END.with(|c| c.set(u64::MAX));
        slot.since_epoch.store(0, Ordering::Relaxed);
        BUSY_WORKERS.fetch_sub(1, Ordering::Relaxed);
        p.busy.fetch_sub(1, Ordering::Relaxed);
        let now_cpu = thread_cpu_time();
        let used = now_cpu.saturating_sub(cpu_mark).as_nanos() as u64;
        cpu_mark = now_cpu;
        meta.stats.cpu_ns.fetch_add(used, Ordering::Relaxed);
        p.cpu_ns_total.fetch_add(used, Ordering::Relaxed);
        if let Ok(mut j) = slot.job.lock() {
            *j = None;
        }
        finished = Some((group, used));
        requeue = YIELDED.with(|y| y.take());
        meta.stats.set_state(if requeue.is_some() {
            JobState::Yielded
        } else {
            JobState::Waiting
        });
        if slot.replaced.swap(false, Ordering::AcqRel) {
            // This worker was stuck and has been replaced: the pool is now one
            // over strength, and the next worker to look for a job retires.
            p.extra.fetch_sub(1, Ordering::AcqRel);
        }
    }
    if let Ok(mut s) = p.queue.lock() {
        let handed_back = requeue.is_some();
        put_back(&mut s, finished.take(), requeue.take(), p.now_ns());
        if handed_back {
            // Another worker takes over the job this one leaves behind.
            p.cv.notify_one();
        }
    }
    if let Ok(mut slots) = p.slots.lock() {
        slots.retain(|s| !Arc::ptr_eq(s, &slot));
    }
    if !retired {
        p.live.fetch_sub(1, Ordering::AcqRel);
    }
}

impl MemoryState {
    /// Keeps `s` among the heavy candidates (called after a slice in which it
    /// held at least `HEAVY_MIN_BYTES`). Takes the lock only when a job first
    /// crosses the line, or while it finds no room.
    fn track_heavy(&self, s: &Arc<JobStats>) {
        if s.heavy.swap(true, Ordering::Relaxed) {
            return;
        }
        let Ok(mut h) = self.heavy.lock() else { return };
        h.retain(|w| match w.upgrade() {
            Some(j) if j.memory.load(Ordering::Relaxed) >= HEAVY_MIN_BYTES => true,
            Some(j) => {
                j.heavy.store(false, Ordering::Relaxed);
                j.memory_flagged.store(false, Ordering::Relaxed);
                false
            }
            None => false,
        });
        if h.len() >= HEAVY_CAP {
            let mine = s.memory.load(Ordering::Relaxed);
            let smallest = h
                .iter()
                .enumerate()
                .filter_map(|(i, w)| Some((i, w.upgrade()?.memory.load(Ordering::Relaxed))))
                .min_by_key(|&(_, m)| m);
            match smallest {
                Some((i, m)) if m < mine => {
                    if let Some(j) = h.swap_remove(i).upgrade() {
                        j.heavy.store(false, Ordering::Relaxed);
                        j.memory_flagged.store(false, Ordering::Relaxed);
                    }
                }
                _ => {
                    s.heavy.store(false, Ordering::Relaxed);
                    return;
                }
            }
        }
        h.push(Arc::downgrade(s));
    }

    /// The live heavy candidates, largest first.
    fn largest(&self) -> Vec<Arc<JobStats>> {
        let mut v: Vec<Arc<JobStats>> = match self.heavy.lock() {
            Ok(h) => h.iter().filter_map(Weak::upgrade).collect(),
            Err(_) => Vec::new(),
        };
        v.sort_by_key(|j| std::cmp::Reverse(j.memory.load(Ordering::Relaxed)));
        v
    }
}

/// How often the watchdog samples the process's memory.
const MEMORY_SAMPLE_MS: u64 = 100;
/// Freed memory worth handing back to the operating system: below this, a
/// trim is not worth the allocator lock it takes.
const TRIM_MIN_BYTES: u64 = 32 << 20;
/// Most one over-budget warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The watchdog's own memory bookkeeping between samples.
struct MemoryWatch {
    /// Highest counted bytes since the last trim.
    peak: u64,
    last_trim: Instant,
    last_warn: Option<Instant>,
    samples: u64,
}

/// Samples memory, sets the budget flag, flags the largest jobs while over
/// it, and hands freed memory back to the operating system after a drop.
fn sample_memory(p: &Inner, w: &mut MemoryWatch) {
    use crate::alloc;
    let m = &p.memory;
    w.samples += 1;
    let counted = alloc::installed();
    let rss = alloc::rss_bytes();
    let used = if counted {
        alloc::allocated_bytes()
    } else {
        rss
    };
    m.counted.store(counted, Ordering::Relaxed);
    m.rss.store(rss, Ordering::Relaxed);
    m.used.store(used, Ordering::Relaxed);
    let budget = p.cfg.memory_budget;
    let over = used > budget;
    let was_over = m.over_budget.swap(over, Ordering::Relaxed);
    let largest = m.largest();
    m.largest_task.store(
        largest.first().map(|j| j.memory_bytes()).unwrap_or(0),
        Ordering::Relaxed,
    );
    for (i, j) in largest.iter().enumerate() {
        j.memory_flagged
            .store(over && i < FLAG_LARGEST, Ordering::Relaxed);
    }
    if over && w.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
        w.last_warn = Some(Instant::now());
        let names: Vec<String> = largest
            .iter()
            .take(FLAG_LARGEST)
            .map(|j| match &j.label {
                Some((id, method)) => {
                    format!("task {id} ({method}): {} MiB", j.memory_bytes() >> 20)
                }
                None => format!("a task: {} MiB", j.memory_bytes() >> 20),
            })
            .collect();
        let largest = if names.is_empty() && !counted {
            "unknown (install taskwire::alloc::CountingAlloc to attribute memory to tasks)"
                .to_string()
        } else if names.is_empty() {
            "none holds more than 1 MiB".to_string()
        } else {
            names.join(", ")
        };
        tracing::warn!(
            used_mib = used >> 20,
            budget_mib = budget >> 20,
            "over the memory budget: new CPU tasks are refused; largest tasks: {largest}"
        );
    } else if was_over && !over {
        tracing::info!(used_mib = used >> 20, "back under the memory budget");
    }
    // Give freed memory back: with the counting allocator, once live bytes
    // fell well below their peak while the heap holds much more than is live;
    // without it, when the C allocator reports much free memory (checked
    // once a second: that call walks the free lists).
    w.peak = w.peak.max(used);
    if w.last_trim.elapsed() < Duration::from_secs(1) {
        return;
    }
    let worth = if counted {
        let retained = rss.saturating_sub(used);
        w.peak.saturating_sub(used) >= TRIM_MIN_BYTES / 4
            && retained >= TRIM_MIN_BYTES.max(used / 4)
    } else {
        w.samples % 10 == 0 && alloc::allocator_free_bytes().is_some_and(|f| f >= TRIM_MIN_BYTES)
    };
    if worth {
        alloc::trim();
        m.trims.fetch_add(1, Ordering::Relaxed);
        w.last_trim = Instant::now();
        w.peak = used;
    }
}

/// Flags jobs that run far past their slice without a checkpoint, and starts a
/// replacement worker for each (up to `max_extra_workers`), so that one
/// non-cooperative task does not take a core away from everybody else. Also
/// keeps the completion rate (for retry hints) and samples memory.
fn watchdog(pool: Weak<Inner>) {
    const WINDOW: u32 = 25; // samples of 10 ms
    let (mut busy_sum, mut samples) = (0usize, 0u32);
    let mut released_mark = 0u64;
    let mut mem = MemoryWatch {
        peak: 0,
        last_trim: Instant::now(),
        last_warn: None,
        samples: 0,
    };
    let mut since_memory = 0u64;
    loop {
        thread::sleep(Duration::from_millis(10));
        let Some(p) = pool.upgrade() else { return };
        if p.shutdown.load(Ordering::Relaxed) {
            return;
        }
        busy_sum += p.busy.load(Ordering::Relaxed).min(p.cfg.workers);
        samples += 1;
        if samples == WINDOW {
            let u = busy_sum as f64 / (WINDOW as f64 * p.cfg.workers as f64);
            p.utilisation.store(u.to_bits(), Ordering::Relaxed);
            (busy_sum, samples) = (0, 0);
            // Jobs ended per second over this quarter second, averaged with
            // the past so that the rate spans about a second.
            let released = p.released.load(Ordering::Relaxed);
            let now_rate = released.saturating_sub(released_mark) as f64 * 4.0;
            released_mark = released;
            let old = f64::from_bits(p.completion_rate.load(Ordering::Relaxed));
            let rate = 0.75 * old + 0.25 * now_rate;
            let rate = if rate < 0.01 { 0.0 } else { rate };
            p.completion_rate.store(rate.to_bits(), Ordering::Relaxed);
        }
        since_memory += 10;
        if since_memory >= MEMORY_SAMPLE_MS {
            since_memory = 0;
            sample_memory(&p, &mut mem);
        }
        let epoch = EPOCH.load(Ordering::Relaxed);
        let slots: Vec<Arc<WorkerSlot>> = match p.slots.lock() {
            Ok(s) => s.clone(),
            Err(_) => return,
        };
        for slot in slots {
            let since = slot.since_epoch.load(Ordering::Relaxed);
            if since == 0 || epoch.saturating_sub(since) < p.non_yield_ticks {
                continue;
            }
            if let Ok(job) = slot.job.lock() {
                if let Some(stats) = job.as_ref() {
                    if !stats.not_yielding.swap(true, Ordering::Relaxed) {
                        p.non_yielding_total.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!("a CPU task has run past its slice without a checkpoint");
                    }
                }
            }
            if slot.replaced.load(Ordering::Acquire) {
                continue;
            }
            if p.extra.load(Ordering::Acquire) < p.cfg.max_extra_workers {
                slot.replaced.store(true, Ordering::Release);
                p.extra.fetch_add(1, Ordering::AcqRel);
                start_worker(&p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    fn pool(workers: usize) -> ComputePool {
        ComputePool::new(ComputeConfig {
            workers,
            nice: 0,
            ..ComputeConfig::default()
        })
    }

    /// A future that yields whenever its slice is over, like a checkpoint loop.
    async fn burn(ms: u64) -> u64 {
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

    struct YieldNow(bool);
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

    #[test]
    fn runs_jobs_and_accounts_cpu() {
        let p = pool(2);
        let group = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(JobStats::default());
        let (tx, rx) = mpsc::channel();
        let permit = p.admit(&group).unwrap();
        let t = p.spawn(1, stats.clone(), permit, async move {
            let r = burn(20).await;
            let _ = tx.send(());
            r
        });
        rx.recv_timeout(Duration::from_secs(20)).unwrap();
        // The future (and its permit) is dropped inside the last slice; the
        // worker charges that slice after it, then leaves the Running state.
        for _ in 0..2000 {
            if stats.state() != JobState::Running {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        assert_ne!(stats.state(), JobState::Running);
        assert!(
            stats.cpu_time() >= Duration::from_millis(20),
            "{:?}",
            stats.cpu_time()
        );
        assert!(stats.slices() > 1, "a 20 ms job on 2 ms slices yields");
        drop(t);
        assert_eq!(group.load(Ordering::Acquire), 0, "permit released");
    }

    #[test]
    fn admission_limits() {
        let p = ComputePool::new(ComputeConfig {
            workers: 1,
            per_connection_limit: 2,
            queue_limit: 3,
            nice: 0,
            ..ComputeConfig::default()
        });
        let a = Arc::new(AtomicUsize::new(0));
        let b = Arc::new(AtomicUsize::new(0));
        let p1 = p.admit(&a).unwrap();
        let _p2 = p.admit(&a).unwrap();
        assert!(matches!(p.admit(&a), Err(Refusal::ConnectionQueue { .. })));
        let _p3 = p.admit(&b).unwrap();
        let e = p.admit(&b).unwrap_err();
        assert_eq!(e.reason(), "queue_full");
        assert!(e.retry_after_ms() >= 50);
        drop(p1);
        assert!(p.admit(&b).is_ok());
    }

    #[test]
    fn one_address_takes_at_most_its_share() {
        let p = ComputePool::new(ComputeConfig {
            workers: 1,
            per_connection_limit: 2,
            address_cpu_limit: 5,
            queue_limit: 100,
            nice: 0,
            ..ComputeConfig::default()
        });
        let flooder: IpAddr = "192.0.2.7".parse().unwrap();
        // Many connections from one address: 5 admitted in all, then refused.
        let conns: Vec<_> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for c in &conns {
            for _ in 0..2 {
                match p.admit_from(c, flooder) {
                    Ok(permit) => held.push(permit),
                    Err(e) => refused.push(e),
                }
            }
        }
        assert_eq!(held.len(), 5);
        assert_eq!(refused.len(), 3);
        for e in &refused {
            assert_eq!(e.reason(), "address_limit");
            assert!((RETRY_MIN_MS..=RETRY_MAX_MS).contains(&e.retry_after_ms()));
        }
        // A refusal gives back what it took: the connection's own count.
        let counted: usize = conns.iter().map(|c| c.load(Ordering::Acquire)).sum();
        assert_eq!(counted, 5);
        // A newcomer from another address is admitted; so is the same /64's
        // neighbour only up to the /64's share.
        let other = Arc::new(AtomicUsize::new(0));
        let newcomer = p
            .admit_from(&other, "198.51.100.1".parse().unwrap())
            .unwrap();
        let v6 = Arc::new(AtomicUsize::new(0));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6_permits: Vec<_> = (0..5)
            .map(|i| {
                let c = Arc::new(AtomicUsize::new(0));
                p.admit_from(&c, if i % 2 == 0 { a } else { b }).unwrap()
            })
            .collect();
        assert_eq!(
            p.admit_from(&v6, b).unwrap_err().reason(),
            "address_limit",
            "one /64 is one address"
        );
        assert!(p
            .admit_from(&v6, "2001:db8:1:3::1".parse().unwrap())
            .is_ok());
        assert_eq!(p.addresses(), 3, "an entry per address with jobs");
        // The table forgets an address when its last job ends.
        drop(held);
        drop(v6_permits);
        assert_eq!(p.addresses(), 1);
        drop(newcomer);
        assert_eq!(p.addresses(), 0, "bounded: no entry without a job");
        assert_eq!(p.stats().admitted, 0);
        // Once its jobs ended, the flooder is admitted again.
        assert!(p.admit_from(&conns[0], flooder).is_ok());
    }

    #[test]
    fn the_pool_limit_undoes_the_address_count() {
        let p = ComputePool::new(ComputeConfig {
            workers: 1,
            address_cpu_limit: 10,
            queue_limit: 2,
            nice: 0,
            ..ComputeConfig::default()
        });
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let g = Arc::new(AtomicUsize::new(0));
        let _a = p.admit_from(&g, ip).unwrap();
        let _b = p.admit_from(&g, "192.0.2.2".parse().unwrap()).unwrap();
        let e = p.admit_from(&g, ip).unwrap_err();
        assert_eq!(e.reason(), "queue_full");
        // Nothing ends: the hint says so with its longest value.
        assert_eq!(e.retry_after_ms(), RETRY_MAX_MS);
        assert_eq!(p.addresses(), 2);
        assert_eq!(g.load(Ordering::Acquire), 2);
    }

    #[test]
    fn address_groups() {
        let g = |s: &str| address_group(s.parse().unwrap()).to_string();
        assert_eq!(g("203.0.113.9"), "203.0.113.9");
        assert_eq!(g("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(g("2001:db8:a:b:c:d:e:f"), "2001:db8:a:b::");
        assert_eq!(g("::1"), "::");
    }

    #[test]
    fn a_non_yielding_job_does_not_take_capacity() {
        let p = ComputePool::new(ComputeConfig {
            workers: 1,
            non_yield_after: Duration::from_millis(20),
            nice: 0,
            ..ComputeConfig::default()
        });
        let g = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let stuck_stats = Arc::new(JobStats::default());
        let s2 = stop.clone();
        let _stuck = p.spawn(1, stuck_stats.clone(), p.admit(&g).unwrap(), async move {
            // Never reaches a checkpoint until told to stop.
            while !s2.load(Ordering::Relaxed) {
                std::hint::spin_loop();
            }
        });
        for _ in 0..2000 {
            if stuck_stats.state() == JobState::Running {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        let (tx, rx) = mpsc::channel();
        let _other = p.spawn(
            2,
            Arc::new(JobStats::default()),
            p.admit(&g).unwrap(),
            async move {
                let _ = tx.send(());
            },
        );
        // With one worker stuck, the other job only runs on a replacement.
        let ran = rx.recv_timeout(Duration::from_secs(20)).is_ok();
        stop.store(true, Ordering::Relaxed);
        assert!(ran, "a replacement worker ran the other job");
        assert!(stuck_stats.not_yielding());
        assert!(p.stats().non_yielding_total >= 1);
    }

    #[test]
    fn dropping_the_task_cancels_a_yielding_job() {
        let p = pool(1);
        let g = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(JobStats::default());
        let t = p.spawn(1, stats.clone(), p.admit(&g).unwrap(), async {
            loop {
                burn(1).await;
            }
        });
        thread::sleep(Duration::from_millis(30));
        drop(t);
        for _ in 0..200 {
            if g.load(Ordering::Acquire) == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(g.load(Ordering::Acquire), 0, "the job's future was dropped");
    }

    #[test]
    fn a_stop_reaches_a_running_task_within_one_slice() {
        let p = pool(1);
        let g = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(JobStats::default());
        let ctx = crate::Ctx::detached("t");
        let c2 = ctx.clone();
        let (tx, rx) = mpsc::channel();
        let _t = p.spawn(1, stats.clone(), p.admit(&g).unwrap(), async move {
            let mut x = 0u64;
            loop {
                for i in 0..5_000u64 {
                    x = x.wrapping_mul(31).wrapping_add(i);
                }
                std::hint::black_box(x);
                if let Err(why) = c2.checkpoint().await {
                    let _ = tx.send(why);
                    return;
                }
            }
        });
        while stats.slices() < 3 {
            thread::sleep(Duration::from_millis(1));
        }
        ctx.stop(crate::Stopped::Cancelled);
        let at = stats.slices();
        let why = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(why, crate::Stopped::Cancelled);
        // The slice running at the stop ends at its next checkpoint; at most one
        // more slice starts if the stop landed between two.
        assert!(
            stats.slices() <= at + 1,
            "{} slices after {at}",
            stats.slices()
        );
    }

    #[test]
    fn utilisation_follows_busy_workers() {
        let p = pool(1);
        let g = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let _t = p.spawn(
            1,
            Arc::new(JobStats::default()),
            p.admit(&g).unwrap(),
            async move {
                while !s2.load(Ordering::Relaxed) {
                    burn(1).await;
                }
            },
        );
        let busy = (0..200).any(|_| {
            thread::sleep(Duration::from_millis(20));
            p.stats().utilisation > 0.5
        });
        stop.store(true, Ordering::Relaxed);
        assert!(busy, "one of one workers busy shows as utilised");
        let idle = (0..200).any(|_| {
            thread::sleep(Duration::from_millis(20));
            p.stats().utilisation == 0.0
        });
        assert!(idle, "and idle again once the job ends");
    }
}
