//! What the pool shows: each job's live figures ([`JobStats`], [`JobState`]),
//! the pool's snapshot ([`PoolStats`]), and the memory figures the watchdog
//! samples, with the few memory-heavy jobs it may flag.
//!
//! Plain atomics and one small bounded list: this file depends on no other
//! part of the pool.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use crate::sync::lock;

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
pub(crate) struct JobStats {
    pub(super) cpu_ns: AtomicU64,
    state: AtomicU8,
    pub(super) not_yielding: AtomicBool,
    pub(super) slices: AtomicU64,
    pub(super) first_run: OnceLock<Instant>,
    /// Bytes allocated minus freed while the job ran (see [`crate::alloc`]).
    pub(super) memory: AtomicI64,
    /// One of the largest jobs while the process is over its memory budget.
    memory_flagged: AtomicBool,
    /// Whether the pool keeps this job among its memory-heavy candidates.
    heavy: AtomicBool,
    /// The task's id and method, for the pool's log lines.
    label: Option<(u64, Arc<str>)>,
}

impl JobStats {
    /// Counts what this thread allocates and frees to this job until the
    /// guard is dropped (wrap each poll of the job's future in it).
    pub(crate) fn attribute(&self) -> crate::alloc::Attributed<'_> {
        crate::alloc::Attributed::new(&self.memory)
    }

    /// The figures of the task `id` running `method` (named in log lines).
    pub(crate) fn for_task(id: u64, method: Arc<str>) -> JobStats {
        JobStats {
            label: Some((id, method)),
            ..JobStats::default()
        }
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
    pub(crate) fn state(&self) -> JobState {
        JobState::from_u8(self.state.load(Ordering::Acquire))
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
    /// Marks the job as running or waiting outside the pool (I/O tasks).
    pub(crate) fn set_state(&self, s: JobState) {
        self.state.store(s as u8, Ordering::Release);
    }
    /// How the job is named in a log line.
    pub(super) fn describe(&self) -> String {
        match &self.label {
            Some((id, method)) => {
                format!("task {id} ({method}): {} MiB", self.memory_bytes() >> 20)
            }
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
