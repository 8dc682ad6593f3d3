//! The watchdog: one thread per pool, waking every 10 ms, that
//! - flags a job that burns far more CPU than its slice without a checkpoint
//!   and starts a replacement worker for it (up to `max_extra_workers`), so
//!   that one non-cooperative task does not take a core away from everybody
//!   else. It measures the worker thread's CPU clock, not the wall clock: a
//!   task that checkpoints but shares a core under contention has used
//!   little CPU however long its slice lasted, and is never flagged;
//! - averages the busy workers into the pool's utilisation, and the jobs
//!   ended into the completion rate behind the retry hints;
//! - samples the process's memory every 100 ms, sets the budget flag that
//!   refuses new jobs, flags the largest jobs while over it, and hands freed
//!   memory back to the operating system after a drop.
//!
//! Depends on the workers (it starts replacements), admission, the stats and
//! the epoch.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread;
use std::time::{Duration, Instant};

use super::admission::{RateMark, MEMORY_SAMPLE_MS};
use tracing::Level;

use super::epoch;
use super::stats::task_event;
use super::worker::{start_worker, Shared, WorkerSlot};
use crate::sync::lock;

/// How often the watchdog wakes.
const PERIOD_MS: u64 = 10;
/// Samples of `PERIOD_MS` averaged into one utilisation figure (a quarter second).
const WINDOW: u32 = 25;
/// How many of the largest jobs are flagged when over the budget.
const FLAG_LARGEST: usize = 3;
/// Freed memory worth handing back to the operating system: below this, a
/// trim is not worth the allocator lock it takes.
const TRIM_MIN_BYTES: u64 = 32 << 20;
/// Most one over-budget warning per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Starts the watchdog of `pool`; it ends when the pool shuts down or is gone.
pub(super) fn spawn(pool: Weak<Shared>) {
    // Without a watchdog the pool still runs jobs; it only loses the
    // replacement of stuck workers and its sampled figures.
    let _ = thread::Builder::new()
        .name("taskwire-watch".into())
        .spawn(move || watchdog(pool));
}

fn watchdog(pool: Weak<Shared>) {
    let (mut busy_sum, mut samples) = (0usize, 0u32);
    let mut rate = RateMark::default();
    let mut mem = MemoryWatch {
        peak: 0,
        last_trim: Instant::now(),
        last_warn: None,
        samples: 0,
    };
    let mut since_memory = 0u64;
    loop {
        thread::sleep(Duration::from_millis(PERIOD_MS));
        let Some(p) = pool.upgrade() else { return };
        if p.shutting_down() {
            return;
        }
        busy_sum += p.busy.load(Ordering::Relaxed).min(p.workers);
        samples += 1;
        if samples == WINDOW {
            let u = busy_sum as f64 / (WINDOW as f64 * p.workers as f64);
            p.utilisation.store(u.to_bits(), Ordering::Relaxed);
            (busy_sum, samples) = (0, 0);
            p.admission.sample_rate(&mut rate);
        }
        since_memory += PERIOD_MS;
        if since_memory >= MEMORY_SAMPLE_MS {
            since_memory = 0;
            sample_memory(&p, &mut mem);
        }
        replace_stuck_workers(&p);
    }
}

/// CPU time, in ns, that the worker of `slot` has burnt in its current
/// slice; `None` when it is not inside a slice.
fn slice_cpu_ns(slot: &WorkerSlot) -> Option<u64> {
    let since = slot.since_epoch.load(Ordering::Acquire);
    if since == 0 {
        return None;
    }
    let start = slot.cpu_start_ns.load(Ordering::Relaxed);
    let now = epoch::cpu_time_of(*slot.clock.get()?)?.as_nanos() as u64;
    // The same slice still: between two slices the figure means nothing.
    (slot.since_epoch.load(Ordering::Acquire) == since).then(|| now.saturating_sub(start))
}

/// Flags jobs that burnt more than `non_yield_cpu_ns` in one slice and
/// starts a replacement worker for each worker they hold, once, while under
/// `max_extra_workers`.
fn replace_stuck_workers(p: &Arc<Shared>) {
    let slots: Vec<Arc<WorkerSlot>> = lock(&p.slots).clone();
    for slot in slots {
        let Some(used) = slice_cpu_ns(&slot) else {
            continue;
        };
        if used < p.non_yield_cpu_ns {
            continue;
        }
        if let Some(stats) = lock(&slot.job).as_ref() {
            if !stats.not_yielding.swap(true, Ordering::Relaxed) {
                p.non_yielding_total.fetch_add(1, Ordering::Relaxed);
                let ms = used / 1_000_000;
                let what = "a CPU task has burnt CPU in one slice without a checkpoint";
                match stats.label() {
                    Some(l) => task_event!(Level::WARN, l, cpu_ms = ms, "{what}"),
                    None => tracing::warn!(cpu_ms = ms, "{what}"),
                }
            }
        }
        if slot.replaced.load(Ordering::Acquire) {
            continue;
        }
        if p.extra.load(Ordering::Acquire) < p.max_extra_workers {
            slot.replaced.store(true, Ordering::Release);
            p.extra.fetch_add(1, Ordering::AcqRel);
            start_worker(p);
        }
    }
}

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
fn sample_memory(p: &Shared, w: &mut MemoryWatch) {
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
    let budget = p.memory_budget;
    let over = used > budget;
    let was_over = m.over_budget.swap(over, Ordering::Relaxed);
    let largest = m.largest();
    m.largest_task.store(
        largest.first().map(|j| j.memory_bytes()).unwrap_or(0),
        Ordering::Relaxed,
    );
    for (i, j) in largest.iter().enumerate() {
        j.set_memory_flagged(over && i < FLAG_LARGEST);
    }
    if over && w.last_warn.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
        w.last_warn = Some(Instant::now());
        let names: Vec<String> = largest
            .iter()
            .take(FLAG_LARGEST)
            .map(|j| j.describe())
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
        w.samples.is_multiple_of(10)
            && alloc::allocator_free_bytes().is_some_and(|f| f >= TRIM_MIN_BYTES)
    };
    if worth {
        alloc::trim();
        m.trims.fetch_add(1, Ordering::Relaxed);
        w.last_trim = Instant::now();
        w.peak = used;
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{burn, pool};
    use super::super::{ComputeConfig, ComputePool, JobState, JobStats};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{mpsc, Arc};
    use std::thread;
    use std::time::Duration;

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
