//! The workers: threads that take the next job from the run queue, run it for
//! one slice, charge the CPU time it used and put it back if it yielded.
//!
//! [`Shared`] is the pool's state that workers and the watchdog share; the
//! facade ([`super::ComputePool`]) holds it too. A job is an async-task
//! [`Runnable`](async_task::Runnable) whose schedule function ([`schedule`])
//! pushes it onto the run queue, except when it was woken while running: that
//! is a job yielding at a checkpoint, which the worker itself requeues once
//! the slice is charged, so that the queue orders it by its attained service
//! as of that charge.
//!
//! Depends on the epoch, the stats, admission and the queue policy.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread;
use std::time::{Duration, Instant};

use async_task::ScheduleInfo;

use super::admission::Admission;
use super::epoch;
use super::queue::RunQueue;
use super::stats::{JobStats, MemoryFigures, StateCounts};
use crate::sync::{lock, wait_timeout};

pub(super) type Job = async_task::Runnable<Arc<JobMeta>>;

/// What the pool keeps with each job.
#[derive(Debug)]
pub(crate) struct JobMeta {
    pub(super) group: u64,
    /// Increases with submission: the order of the group's long jobs.
    pub(super) submitted: u64,
    pub(super) stats: Arc<JobStats>,
}

thread_local! {
    /// A job that woke itself during its slice on this worker, handed from
    /// [`schedule`] (called inside `Runnable::run`) back to the worker loop.
    static YIELDED: Cell<Option<Job>> = const { Cell::new(None) };
    /// Set when the job of this worker's current slice returned its output
    /// ([`job_finished`]): the worker no longer counts as busy.
    static FINISHED: Cell<bool> = const { Cell::new(false) };
    /// The pool of this worker thread.
    static POOL: std::cell::RefCell<Weak<Shared>> = const { std::cell::RefCell::new(Weak::new()) };
}

/// The job running on this worker returned its output: the worker counts as
/// free from here, not after the loop's bookkeeping. Whoever awaits the
/// output may ask the pool for spare workers at once (the cluster answers a
/// peer with it), and must not see this worker busy with a finished job.
pub(super) fn job_finished() {
    if !epoch::on_worker() || FINISHED.with(|f| f.replace(true)) {
        return;
    }
    POOL.with(|w| {
        if let Some(p) = w.borrow().upgrade() {
            p.busy.fetch_sub(1, Ordering::Relaxed);
        }
    });
}

/// One worker as the watchdog sees it.
pub(super) struct WorkerSlot {
    /// Epoch at which the current slice started; 0 when idle.
    pub since_epoch: AtomicU64,
    /// The worker thread's CPU clock, which the watchdog reads (set by the
    /// thread when it starts; unset if the system would not give it).
    pub clock: OnceLock<libc::clockid_t>,
    /// The thread's CPU time, in ns, when the current slice began (written
    /// before `since_epoch`).
    pub cpu_start_ns: AtomicU64,
    /// Whether a replacement was already started for the job running now.
    pub replaced: AtomicBool,
    /// The job on this worker, for flagging.
    pub job: Mutex<Option<Arc<JobStats>>>,
}

/// The pool's shared state.
pub(super) struct Shared {
    /// Configured workers (at least 1).
    pub workers: usize,
    /// Most replacements for stuck workers at once.
    pub max_extra_workers: usize,
    /// OS niceness of worker threads (0: left alone).
    pub nice: i32,
    pub slice_ticks: u64,
    /// CPU time a job may burn in one slice without reaching a checkpoint
    /// (the slice plus `non_yield_after`) before it is flagged as stuck.
    pub non_yield_cpu_ns: u64,
    /// The Tokio runtime the pool was started in: every worker enters it, so
    /// that a CPU task can await Tokio timers, channels and sockets. `None`
    /// when the pool was started outside a runtime (a Tokio resource then
    /// panics, and the task is answered as crashed).
    pub runtime: Option<tokio::runtime::Handle>,
    /// Jobs queued again after running, and jobs waiting off the pool.
    pub counts: StateCounts,
    pub memory_budget: u64,
    pub queue: Mutex<RunQueue<Job>>,
    /// Signalled when a job is queued and at shutdown.
    pub cv: Condvar,
    start: Instant,
    pub admission: Admission,
    pub busy: AtomicUsize,
    pub live: AtomicUsize,
    /// Replacement workers wanted now (one per stuck worker not yet back).
    pub extra: AtomicUsize,
    pub slots: Mutex<Vec<Arc<WorkerSlot>>>,
    pub non_yielding_total: AtomicU64,
    pub cpu_ns_total: AtomicU64,
    /// `utilisation` as f64 bits: one writer (the watchdog), any readers, so
    /// that several dashboards and scrapers do not shorten each other's window.
    pub utilisation: AtomicU64,
    /// The one shutdown fact: read by admission without a lock, and by the
    /// workers under the queue lock (see [`Shared::shut_down`]).
    shutdown: AtomicBool,
    pub memory: MemoryFigures,
}

impl Shared {
    /// The pool's state; the `ComputePool` facade fills in the settings.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        workers: usize,
        max_extra_workers: usize,
        nice: i32,
        slice: Duration,
        non_yield_after: Duration,
        usage_decay: Duration,
        las_threshold: Duration,
        memory_budget: u64,
        admission: Admission,
        runtime: Option<tokio::runtime::Handle>,
    ) -> Shared {
        Shared {
            workers,
            max_extra_workers,
            nice,
            slice_ticks: epoch::ticks(slice),
            non_yield_cpu_ns: (slice + non_yield_after).as_nanos() as u64,
            runtime,
            counts: StateCounts::default(),
            memory_budget,
            queue: Mutex::new(RunQueue::new(
                usage_decay.as_nanos() as u64,
                u64::try_from(las_threshold.as_nanos()).unwrap_or(u64::MAX),
            )),
            cv: Condvar::new(),
            start: Instant::now(),
            admission,
            busy: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            extra: AtomicUsize::new(0),
            slots: Mutex::new(Vec::new()),
            non_yielding_total: AtomicU64::new(0),
            cpu_ns_total: AtomicU64::new(0),
            utilisation: AtomicU64::new(0),
            shutdown: AtomicBool::new(false),
            memory: MemoryFigures::default(),
        }
    }

    pub(super) fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    pub(super) fn shutting_down(&self) -> bool {
        self.shutdown.load(Ordering::Acquire)
    }

    /// Stops taking jobs and wakes every idle worker to exit.
    pub(super) fn shut_down(&self) {
        self.shutdown.store(true, Ordering::Release);
        // A worker checks the flag under the queue lock and then waits,
        // releasing it; taking the lock once here means every worker either
        // saw the flag or is already waiting, so the notification is not lost.
        drop(lock(&self.queue));
        self.cv.notify_all();
    }
}

/// The schedule function of every job.
pub(super) fn schedule(pool: &Weak<Shared>, job: Job, info: ScheduleInfo) {
    // async-task reports a wake during `run` only when `run` returns, on the
    // thread that ran the job: a worker, whose loop requeues it after
    // charging the slice. `on_worker` guards against any other caller.
    if info.woken_while_running && epoch::on_worker() {
        YIELDED.with(|y| y.set(Some(job)));
        return;
    }
    let Some(p) = pool.upgrade() else {
        // The pool is gone: dropping the runnable cancels the job.
        return;
    };
    let now = p.now_ns();
    let (group, submitted) = (job.metadata().group, job.metadata().submitted);
    let stats = &job.metadata().stats;
    let attained = stats.cpu_ns.load(Ordering::Relaxed);
    // Woken after it waited (or cancelled while waiting): queued again under
    // the same policy, its attained service as charged so far.
    stats.woken(&p.counts);
    lock(&p.queue).push(group, attained, submitted, job, now);
    p.cv.notify_one();
}

/// Starts one worker thread (a first one, or a replacement for a stuck one).
pub(super) fn start_worker(inner: &Arc<Shared>) {
    let slot = Arc::new(WorkerSlot {
        since_epoch: AtomicU64::new(0),
        clock: OnceLock::new(),
        cpu_start_ns: AtomicU64::new(0),
        replaced: AtomicBool::new(false),
        job: Mutex::new(None),
    });
    lock(&inner.slots).push(slot.clone());
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
fn put_back(rq: &mut RunQueue<Job>, finished: Option<(u64, u64)>, requeue: Option<Job>, now: u64) {
    if let Some((group, used)) = finished {
        rq.descheduled(group, used, now);
    }
    if let Some(job) = requeue {
        let m = job.metadata().clone();
        let attained = m.stats.cpu_ns.load(Ordering::Relaxed);
        rq.push(m.group, attained, m.submitted, job, now);
    }
}

fn worker(pool: Weak<Shared>, slot: Arc<WorkerSlot>) {
    let Some(p) = pool.upgrade() else { return };
    POOL.with(|w| *w.borrow_mut() = pool.clone());
    set_nice(p.nice);
    if let Some(clock) = epoch::this_thread_clock() {
        let _ = slot.clock.set(clock);
    }
    // Held for the thread's life: Tokio's timers, channels and sockets find
    // their runtime from here. A job that awaits one returns Pending and
    // leaves the worker; the runtime's driver wakes it, which queues it again.
    let runtime = p.runtime.clone();
    let _runtime = runtime.as_ref().map(|h| h.enter());
    let mut cpu_mark = epoch::thread_cpu_time();
    let mut finished: Option<(u64, u64)> = None; // (group, cpu ns) of the last slice
    let mut requeue: Option<Job> = None;
    let mut retired = false;
    loop {
        let next = {
            let mut rq = lock(&p.queue);
            // Busy changes under the queue lock, in one step with the job
            // leaving or re-entering the queue: the pool's spare workers
            // (queue length and busy count together) never show a worker
            // free while its job is between two slices. Only a job that
            // finished gives its worker back earlier (`job_finished`).
            if finished.is_some() && !FINISHED.with(|f| f.replace(false)) {
                p.busy.fetch_sub(1, Ordering::Relaxed);
            }
            put_back(&mut rq, finished.take(), requeue.take(), p.now_ns());
            loop {
                if p.shutting_down() {
                    break None;
                }
                // A replacement made surplus by a stuck worker's return
                // retires; deciding under the queue lock retires exactly one.
                if p.live.load(Ordering::Acquire) > p.workers + p.extra.load(Ordering::Acquire) {
                    p.live.fetch_sub(1, Ordering::AcqRel);
                    retired = true;
                    break None;
                }
                if let Some(j) = rq.pop(p.now_ns()) {
                    p.busy.fetch_add(1, Ordering::Relaxed);
                    break Some(j);
                }
                rq = wait_timeout(&p.cv, rq, Duration::from_millis(200));
            }
        };
        let Some((group, job)) = next else { break };
        let meta = job.metadata().clone();
        let slice = meta.stats.begin_slice(&p.counts);
        meta.stats.slices.fetch_add(1, Ordering::Relaxed);
        meta.stats.first_run.get_or_init(Instant::now);
        *lock(&slot.job) = Some(meta.stats.clone());
        // The previous slice's end stands for this one's start: the CPU
        // spent in between (a queue pick) is microseconds, well inside what
        // the watchdog tolerates, and saves a clock read per slice.
        slot.cpu_start_ns
            .store(cpu_mark.as_nanos() as u64, Ordering::Relaxed);
        let began = epoch::begin_slice(p.slice_ticks);
        slot.since_epoch.store(began, Ordering::Release);

        // Panics are caught inside the task wrapper; this guard keeps the
        // worker alive should a future's drop glue panic all the same. What the
        // job allocates or frees meanwhile is its own, and a panic hook finds
        // the task's name on this thread.
        {
            let _entered = meta.stats.enter();
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()));
        }
        p.memory.after_slice(&meta.stats);

        epoch::end_slice();
        slot.since_epoch.store(0, Ordering::Release);
        let now_cpu = epoch::thread_cpu_time();
        let used = now_cpu.saturating_sub(cpu_mark).as_nanos() as u64;
        cpu_mark = now_cpu;
        meta.stats.cpu_ns.fetch_add(used, Ordering::Relaxed);
        p.cpu_ns_total.fetch_add(used, Ordering::Relaxed);
        *lock(&slot.job) = None;
        finished = Some((group, used));
        requeue = YIELDED.with(|y| y.take());
        if requeue.is_some() {
            meta.stats.requeued(&p.counts);
        } else {
            // Ended, or waiting for a wake from outside the pool; if that
            // wake came already, the job is queued and stays so.
            meta.stats.parked(slice, &p.counts);
        }
        if slot.replaced.swap(false, Ordering::AcqRel) {
            // This worker was stuck and has been replaced: the pool is now one
            // over strength, and the next worker to look for a job retires.
            p.extra.fetch_sub(1, Ordering::AcqRel);
        }
    }
    {
        let mut rq = lock(&p.queue);
        let handed_back = requeue.is_some();
        put_back(&mut rq, finished.take(), requeue.take(), p.now_ns());
        if handed_back {
            // Another worker takes over the job this one leaves behind.
            p.cv.notify_one();
        }
    }
    lock(&p.slots).retain(|s| !Arc::ptr_eq(s, &slot));
    if !retired {
        p.live.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{burn, pool};
    use super::super::{ComputeConfig, ComputePool, JobState};
    use super::*;
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::mpsc;
    use std::task::{Context, Poll};

    #[cfg(feature = "cluster")]
    #[tokio::test]
    async fn a_worker_whose_job_finished_is_spare_at_once() {
        // A peer answers an offer with its spare workers as soon as its last
        // task's output arrives: the worker must not still count as busy.
        let p = pool(1);
        for i in 0..200u32 {
            let t = p.spawn(1, Arc::new(JobStats::default()), None, async move { i });
            assert_eq!(t.await, i);
            assert_eq!(p.spare(), 1, "run {i}");
        }
    }

    #[cfg(feature = "cluster")]
    #[test]
    fn a_worker_between_slices_is_never_spare() {
        // The cluster hands a task to a peer only when no local worker is
        // spare; a worker that shows as free between two slices of the same
        // job would start a second task locally instead.
        let p = pool(1);
        let stats = Arc::new(JobStats::default());
        let (tx, rx) = mpsc::channel();
        let t = p.spawn(1, stats.clone(), None, async move {
            let r = burn(300).await;
            let _ = tx.send(());
            r
        });
        let mut samples = 0u32;
        loop {
            let spare = p.spare();
            // The job's last act is the send: a sample taken after it may
            // see the worker free, rightly.
            if rx.try_recv().is_ok() {
                break;
            }
            if stats.slices() > 0 {
                assert_eq!(
                    spare,
                    0,
                    "after {samples} samples, slice {}",
                    stats.slices()
                );
                samples += 1;
            }
            std::hint::spin_loop();
        }
        assert!(
            stats.slices() > 10,
            "a 300 ms job on 2 ms slices yields often"
        );
        drop(t);
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
            if stats.state() != JobState::Running && stats.cpu_time() >= Duration::from_millis(20) {
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

    /// Pending once, after another thread woke it while it was being polled.
    struct WokenFromElsewhere(bool);
    impl Future for WokenFromElsewhere {
        type Output = ();
        fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            if self.0 {
                return Poll::Ready(());
            }
            self.0 = true;
            let waker = cx.waker().clone();
            // Joined inside the poll: the wake surely lands while the job runs.
            let _ = thread::spawn(move || waker.wake()).join();
            Poll::Pending
        }
    }

    #[test]
    fn a_job_woken_by_another_thread_while_running_runs_again() {
        let p = ComputePool::new(ComputeConfig {
            workers: 1,
            nice: 0,
            ..ComputeConfig::default()
        });
        let g = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(JobStats::default());
        let (tx, rx) = mpsc::channel();
        let _t = p.spawn(1, stats.clone(), p.admit(&g).unwrap(), async move {
            WokenFromElsewhere(false).await;
            let _ = tx.send(());
        });
        rx.recv_timeout(Duration::from_secs(20))
            .expect("the worker requeued the job");
        assert!(stats.slices() >= 2);
    }

    /// Polls `f` until it holds, up to 10 s.
    fn eventually(mut f: impl FnMut() -> bool) -> bool {
        (0..2000).any(|_| {
            if f() {
                return true;
            }
            thread::sleep(Duration::from_millis(5));
            false
        })
    }

    #[test]
    fn a_waiting_job_leaves_the_pool_and_is_counted_until_woken() {
        let p = pool(1);
        let g = Arc::new(AtomicUsize::new(0));
        let stats = Arc::new(JobStats::default());
        let (wake, woken) = tokio::sync::oneshot::channel::<u64>();
        let (tx, rx) = mpsc::channel();
        let _t = p.spawn(1, stats.clone(), p.admit(&g).unwrap(), async move {
            let _ = tx.send(woken.await.unwrap_or(0));
        });
        assert!(eventually(|| p.stats().waiting == 1), "{:?}", p.stats());
        assert_eq!(stats.state(), JobState::Waiting);
        // Its worker is free meanwhile.
        let (tx2, rx2) = mpsc::channel();
        let _other = p.spawn(
            2,
            Arc::new(JobStats::default()),
            p.admit(&g).unwrap(),
            async move {
                let _ = tx2.send(());
            },
        );
        rx2.recv_timeout(Duration::from_secs(20)).unwrap();
        wake.send(5).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(20)).unwrap(), 5);
        assert!(eventually(|| {
            let s = p.stats();
            s.waiting == 0 && s.yielded == 0 && s.busy == 0
        }));
        assert_ne!(
            stats.state(),
            JobState::Running,
            "an ended job is not running"
        );
    }

    #[test]
    fn yielded_jobs_are_counted_while_queued() {
        let p = pool(1);
        let g = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..2)
            .map(|i| {
                let stop = stop.clone();
                p.spawn(
                    i,
                    Arc::new(JobStats::default()),
                    p.admit(&g).unwrap(),
                    async move {
                        while !stop.load(Ordering::Relaxed) {
                            burn(1).await;
                        }
                    },
                )
            })
            .collect();
        // Two jobs taking turns on one worker: one of them is always queued
        // after a yield once both have run.
        let seen = eventually(|| p.stats().yielded == 1);
        stop.store(true, Ordering::Relaxed);
        assert!(seen, "{:?}", p.stats());
        drop(tasks);
        assert!(eventually(
            || p.stats().yielded == 0 && p.stats().waiting == 0
        ));
    }

    #[test]
    fn workers_enter_the_runtime_the_pool_was_started_in() {
        async fn try_sleep() -> bool {
            // Without a runtime, `sleep` would panic ("there is no reactor
            // running"): a task is then answered as crashed.
            if tokio::runtime::Handle::try_current().is_err() {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
            true
        }
        fn run(p: &ComputePool) -> bool {
            let g = Arc::new(AtomicUsize::new(0));
            let (tx, rx) = mpsc::channel();
            let _t = p.spawn(
                1,
                Arc::new(JobStats::default()),
                p.admit(&g).unwrap(),
                async move {
                    let _ = tx.send(try_sleep().await);
                },
            );
            rx.recv_timeout(Duration::from_secs(20)).unwrap()
        }
        assert!(
            !run(&pool(1)),
            "started outside a runtime, the workers have none"
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let inside = rt.block_on(async {
            let p = pool(1);
            // The driver runs on this thread: wait for the job without blocking it.
            tokio::task::spawn_blocking(move || run(&p)).await.unwrap()
        });
        assert!(inside, "started in a runtime, the workers enter it");
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
}
