//! What the pool shows: each job's live figures ([`JobStats`], [`JobState`]),
//! the pool's snapshot ([`PoolStats`]), and the memory figures the watchdog
//! samples, with the few memory-heavy jobs it may flag.
//!
//! Plain atomics and one small bounded list: this file depends on no other
//! part of the pool.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::protocol::{log_text, Id};
use crate::sync::lock;

/// Who a task is, as every log line about it names it: the fields `task`,
/// `conn`, `request` and `method`. A panic hook finds the task running on its
/// thread with [`current_task`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct TaskLabel {
    /// The server's id of the task (the admin API's).
    pub task: u64,
    /// The id of its connection.
    pub conn: u64,
    /// The client's request id as a log shows it: an integer as is, a string
    /// quoted, escaped and cut (it is the client's text); `None` for a
    /// notification.
    pub request: Option<String>,
    /// The method called.
    pub method: Arc<str>,
    /// The caller's identity as the connect hook named it, escaped and cut
    /// as a log shows it; `None` for an anonymous connection.
    pub caller: Option<String>,
}

impl TaskLabel {
    /// The label of task `task` of connection `conn`, for request `request`.
    pub(crate) fn new(
        task: u64,
        conn: u64,
        request: Option<&Id>,
        method: Arc<str>,
        caller: Option<&str>,
    ) -> TaskLabel {
        let request = request.map(|id| match id {
            Id::Int(n) => n.to_string(),
            Id::Str(s) => format!("\"{}\"", log_text(s)),
        });
        TaskLabel {
            task,
            conn,
            request,
            method,
            caller: caller.map(log_text),
        }
    }

    /// The request id for a log field: `-` for a notification.
    pub fn request_text(&self) -> &str {
        self.request.as_deref().unwrap_or("-")
    }

    /// The method for a log field, escaped and cut: an unknown method is
    /// never run, but the name is the client's text all the same.
    pub fn method_text(&self) -> String {
        log_text(&self.method)
    }
}

/// Logs an event about a task at `$level`, naming it by the fields every
/// such line carries (`task`, `conn`, `request`, `method`), then the
/// event's own fields and message as in `tracing::event!`. `$label` is a
/// [`TaskLabel`]; its client texts are already escaped and cut.
macro_rules! task_event {
    ($level:expr, $label:expr, $($rest:tt)+) => {{
        let l: &$crate::compute::TaskLabel = $label;
        tracing::event!(
            $level,
            task = l.task,
            conn = l.conn,
            request = %l.request_text(),
            method = %l.method_text(),
            caller = l.caller.as_deref(),
            $($rest)+
        )
    }};
}
pub(crate) use task_event;

thread_local! {
    /// The task being polled on this thread, if any.
    static CURRENT: Cell<Option<Arc<TaskLabel>>> = const { Cell::new(None) };
}

/// The task being polled on the calling thread, if any: a compute worker's
/// job, or an I/O task on a Tokio thread.
///
/// A panic hook runs on the panicking thread before the panic unwinds, so it
/// can name the task that panicked (taskwire answers that task `-32003` and
/// logs the crash with the task's fields itself; a hook may stay quiet for
/// such panics):
///
/// ```
/// std::panic::set_hook(Box::new(|info| {
///     if taskwire::current_task().is_none() {
///         eprintln!("{info}");
///     }
/// }));
/// ```
pub fn current_task() -> Option<Arc<TaskLabel>> {
    CURRENT.with(|c| {
        let l = c.take();
        c.set(l.clone());
        l
    })
}

/// While alive, [`current_task`] on this thread returns its label; what was
/// current before comes back when it is dropped.
pub(crate) struct Entered<'a> {
    previous: Option<Arc<TaskLabel>>,
    _mem: crate::alloc::Attributed<'a>,
}

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| c.set(previous));
    }
}

/// Where a CPU job is in its life, as shown in the task table.
///
/// Every live task is in exactly one state, and these are what the operator
/// sees counted: the observer reads each task's state in the walk that lists
/// the table, so `tasks` of `/admin/stats` and of each `/admin/events`
/// snapshot, the `taskwire_tasks{state}` series and the dashboard's tiles
/// (queued, running, yielded, waiting) need nothing more from the pool than
/// that each job's state is kept current here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum JobState {
    /// Admitted, never run yet.
    Queued = 0,
    /// On a worker now.
    Running = 1,
    /// Has run and is queued again: preempted at a checkpoint, or woken
    /// after waiting.
    Yielded = 2,
    /// Off the pool, waiting for something other than the CPU (a timer, a
    /// channel, a socket); its worker runs other jobs meanwhile.
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

    fn from_u64(v: u64) -> JobState {
        match v {
            1 => JobState::Running,
            2 => JobState::Yielded,
            3 => JobState::Waiting,
            _ => JobState::Queued,
        }
    }
}

/// The bits of [`JobStats`]'s state word: the [`JobState`] code, whether
/// the job's future is gone, and above them the number of the slice that
/// last set it (so that a worker's late "it is waiting" cannot overwrite
/// what happened to the job since: a wake, another worker's slice).
const CODE_MASK: u64 = 0xf;
const ENDED: u64 = 0x10;
const SEQ_ONE: u64 = 1 << 8;

/// How many jobs of a pool are queued again after running, and how many
/// wait off the pool: kept by the transitions of [`JobStats`]'s state.
#[derive(Debug, Default)]
pub(super) struct StateCounts {
    pub yielded: AtomicUsize,
    pub waiting: AtomicUsize,
}

fn down(n: &AtomicUsize) {
    // Every decrement follows its increment on the same state word; the
    // saturation only keeps a bug from wrapping a gauge.
    let _ = n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1));
}

/// Sets a job's state word to "ended" when its future is dropped: finished,
/// failed, panicked or cancelled.
pub(super) struct EndsJob(pub(super) Arc<JobStats>);

impl Drop for EndsJob {
    fn drop(&mut self) {
        self.0.state.fetch_or(ENDED, Ordering::AcqRel);
    }
}

/// Live figures of one job, written by the pool and read by the observer.
#[derive(Debug, Default)]
pub(crate) struct JobStats {
    pub(super) cpu_ns: AtomicU64,
    /// Code, ended bit and slice number (see `CODE_MASK`).
    state: AtomicU64,
    pub(super) not_yielding: AtomicBool,
    pub(super) slices: AtomicU64,
    pub(super) first_run: OnceLock<Instant>,
    /// Bytes allocated minus freed while the job ran (see [`crate::alloc`]).
    pub(super) memory: AtomicI64,
    /// One of the largest jobs while the process is over its memory budget.
    memory_flagged: AtomicBool,
    /// Whether the pool keeps this job among its memory-heavy candidates.
    heavy: AtomicBool,
    /// Who the task is, for log lines and [`current_task`].
    label: Option<Arc<TaskLabel>>,
}

impl JobStats {
    /// Wrap each poll of the job's future in this guard: what this thread
    /// allocates and frees meanwhile counts for the job, and
    /// [`current_task`] names it.
    pub(crate) fn enter(&self) -> Entered<'_> {
        let previous = CURRENT.with(|c| c.replace(self.label.clone()));
        Entered {
            previous,
            _mem: crate::alloc::Attributed::new(&self.memory),
        }
    }

    /// The figures of the task `label` names.
    pub(crate) fn for_task(label: TaskLabel) -> JobStats {
        JobStats {
            label: Some(Arc::new(label)),
            ..JobStats::default()
        }
    }

    /// Who the task is, if the job is a task's.
    pub(crate) fn label(&self) -> Option<&TaskLabel> {
        self.label.as_deref()
    }

    /// Counts memory the job holds outside the global allocator (a
    /// WebAssembly task's linear memory, mapped by the engine), so that the
    /// task table and the memory budget's flagging see it.
    pub(crate) fn add_memory(&self, delta: i64) {
        self.memory.fetch_add(delta, Ordering::Relaxed);
    }

    /// Memory the job holds: bytes it allocated minus bytes it freed while it
    /// ran. 0 unless [`crate::alloc::CountingAlloc`] is the global allocator.
    pub(crate) fn memory_bytes(&self) -> u64 {
        self.memory.load(Ordering::Relaxed).max(0) as u64
    }
    /// Whether the job is flagged as one of the largest while the process is
    /// over its memory budget.
    pub(crate) fn memory_flagged(&self) -> bool {
        self.memory_flagged.load(Ordering::Relaxed)
    }
    /// CPU time used so far, summed over its slices.
    pub(crate) fn cpu_time(&self) -> Duration {
        Duration::from_nanos(self.cpu_ns.load(Ordering::Relaxed))
    }
    /// Where the job is now.
    ///
    /// A job whose future is gone shows as waiting, never as running: the
    /// observer keeps an abandoned task in view only while it runs.
    pub(crate) fn state(&self) -> JobState {
        let s = self.state.load(Ordering::Acquire);
        if s & ENDED != 0 {
            return JobState::Waiting;
        }
        JobState::from_u64(s & CODE_MASK)
    }
    /// Whether the job once ran far past its slice without a checkpoint.
    pub(crate) fn not_yielding(&self) -> bool {
        self.not_yielding.load(Ordering::Relaxed)
    }
    /// When the job first got a worker.
    pub(crate) fn first_run(&self) -> Option<Instant> {
        self.first_run.get().copied()
    }
    /// Slices the job has run.
    #[cfg(test)]
    pub(crate) fn slices(&self) -> u64 {
        self.slices.load(Ordering::Relaxed)
    }
    /// Marks an I/O task as running (the pool's jobs move by the
    /// transitions below, which keep the pool's counts).
    pub(crate) fn set_state(&self, s: JobState) {
        self.state.store(s as u64, Ordering::Release);
    }

    /// A worker took the job for a slice; returns that slice's number, for
    /// [`JobStats::parked`].
    pub(super) fn begin_slice(&self, counts: &StateCounts) -> u64 {
        let mut old = self.state.load(Ordering::Acquire);
        loop {
            let new = ((old & !(SEQ_ONE - 1)) + SEQ_ONE) | (old & ENDED) | JobState::Running as u64;
            match self
                .state
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if old & CODE_MASK == JobState::Yielded as u64 {
                        down(&counts.yielded);
                    }
                    return new & !(SEQ_ONE - 1);
                }
                Err(now) => old = now,
            }
        }
    }

    /// The job yielded at a checkpoint in its slice; its worker queues it again.
    pub(super) fn requeued(&self, counts: &StateCounts) {
        let _ = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |old| {
                Some((old & !CODE_MASK) | JobState::Yielded as u64)
            });
        counts.yielded.fetch_add(1, Ordering::AcqRel);
    }

    /// The job's slice `slice` ended without a yield: it waits on something
    /// else, unless it ended, or was woken (or ran again) since.
    pub(super) fn parked(&self, slice: u64, counts: &StateCounts) {
        let running = slice | JobState::Running as u64;
        let waiting = slice | JobState::Waiting as u64;
        if self
            .state
            .compare_exchange(running, waiting, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            counts.waiting.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// The job was woken from outside its slice and goes back in the queue.
    pub(super) fn woken(&self, counts: &StateCounts) {
        let mut old = self.state.load(Ordering::Acquire);
        loop {
            let code = old & CODE_MASK;
            // Queued: never ran. Ended: its future is gone, the run only
            // lets the task go.
            let again = code == JobState::Running as u64 || code == JobState::Waiting as u64;
            if old & ENDED != 0 || !again {
                return;
            }
            let new = (old & !CODE_MASK) | JobState::Yielded as u64;
            match self
                .state
                .compare_exchange_weak(old, new, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if code == JobState::Waiting as u64 {
                        down(&counts.waiting);
                    }
                    counts.yielded.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                Err(now) => old = now,
            }
        }
    }

    /// How the job is named in a log line.
    pub(super) fn describe(&self) -> String {
        match &self.label {
            Some(l) => format!(
                "task {} (conn {}, request {}, {}): {} MiB",
                l.task,
                l.conn,
                l.request_text(),
                l.method_text(),
                self.memory_bytes() >> 20
            ),
            None => format!("a task: {} MiB", self.memory_bytes() >> 20),
        }
    }
    pub(super) fn set_memory_flagged(&self, flagged: bool) {
        self.memory_flagged.store(flagged, Ordering::Relaxed);
    }
    fn drop_heavy(&self) {
        self.heavy.store(false, Ordering::Relaxed);
        self.memory_flagged.store(false, Ordering::Relaxed);
    }
}

/// A snapshot of the pool for the admin API and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct PoolStats {
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
    /// CPU tasks queued again after running: preempted at a checkpoint, or
    /// woken after waiting (the rest of `queued` has never run).
    pub yielded: usize,
    /// CPU tasks off the pool, waiting on a timer, a channel or a socket.
    pub waiting: usize,
    /// The largest memory held by one CPU task among the heavy ones tracked.
    pub largest_task_memory: u64,
    /// Times freed memory was handed back to the operating system.
    pub memory_trims: u64,
}

/// A job holding this much after a slice is tracked as a memory-heavy candidate.
pub(super) const HEAVY_MIN_BYTES: i64 = 1 << 20;
/// Most memory-heavy candidates tracked.
const HEAVY_CAP: usize = 64;

/// What the watchdog samples about memory, for admission and the operator.
#[derive(Debug, Default)]
pub(super) struct MemoryFigures {
    pub used: AtomicU64,
    pub rss: AtomicU64,
    pub counted: AtomicBool,
    pub over_budget: AtomicBool,
    pub trims: AtomicU64,
    pub largest_task: AtomicU64,
    /// Jobs that held at least `HEAVY_MIN_BYTES` after a slice: the
    /// candidates for flagging. At most `HEAVY_CAP`; the smallest make room.
    heavy: Mutex<Vec<Weak<JobStats>>>,
}

impl MemoryFigures {
    /// Keeps `s` among the heavy candidates if it held at least
    /// `HEAVY_MIN_BYTES` after its slice. Takes the lock only when a job first
    /// crosses the line, or while it finds no room.
    pub(super) fn after_slice(&self, s: &Arc<JobStats>) {
        if s.memory.load(Ordering::Relaxed) < HEAVY_MIN_BYTES {
            return;
        }
        if s.heavy.swap(true, Ordering::Relaxed) {
            return;
        }
        let mut h = lock(&self.heavy);
        h.retain(|w| match w.upgrade() {
            Some(j) if j.memory.load(Ordering::Relaxed) >= HEAVY_MIN_BYTES => true,
            Some(j) => {
                j.drop_heavy();
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
                        j.drop_heavy();
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
    pub(super) fn largest(&self) -> Vec<Arc<JobStats>> {
        let mut v: Vec<Arc<JobStats>> =
            lock(&self.heavy).iter().filter_map(Weak::upgrade).collect();
        v.sort_by_key(|j| std::cmp::Reverse(j.memory.load(Ordering::Relaxed)));
        v
    }
}
