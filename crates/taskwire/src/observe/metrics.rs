//! Prometheus metrics, in a registry of the server's own (not a process-global
//! recorder), so that several servers in one process keep separate figures.
//!
//! Names follow Prometheus' conventions: the unit in the name (`_seconds`,
//! `_bytes`, `_ratio`), counters end in `_total`, and a series that can never
//! leave 0 on this server is not exported at all (the pool's histograms of an
//! I/O method, the counting allocator's figure when it is not installed): an
//! empty series reads as "measured, nothing happened", which would be false.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use super::api::{Finished, OutcomeKind, RefusalReason, TaskCounts, TaskState};
use crate::compute::PoolStats;
use crate::task::{TaskKind, TaskShared};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodOutcome {
    method: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

type Histograms = Family<MethodLabel, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 100 µs .. ~105 s
    Histogram::new(exponential_buckets(0.0001, 2.0, 21))
}

/// One method's metric handles, made once at start so that recording a
/// finished task allocates nothing and takes no lock of the family maps.
struct MethodMetrics {
    /// Indexed by `OutcomeKind as usize`.
    finished: [Counter; OutcomeKind::ALL.len()],
    run_time: Histogram,
    /// Queue wait and CPU time: only for a method that runs on the compute
    /// pool (an I/O task never waits for a worker nor uses one).
    pool: Option<(Histogram, Histogram)>,
}

/// A counter whose total is kept elsewhere (the pool, the memory sampler):
/// set to that total at each scrape, never lowered, so that two scrapes at
/// once cannot make it run backwards.
fn set_total(c: &Counter, total: u64) {
    c.inner().fetch_max(total, Ordering::Relaxed);
}

/// As [`set_total`], for a total in seconds. Non-negative floats order as
/// their bit patterns do, so `fetch_max` on the bits keeps it monotonic.
fn set_total_f64(c: &Counter<f64, AtomicU64>, total: f64) {
    if total.is_finite() && total >= 0.0 {
        c.inner().fetch_max(total.to_bits(), Ordering::Relaxed);
    }
}

/// Methods that get their series when they first finish rather than at
/// start (WebAssembly modules, installed at run time), at most this many: a
/// module installed, run and removed over and over under new names must not
/// grow the exposition without end. Past it such a method counts in the
/// totals only.
pub(crate) const LATE_METHODS_MAX: usize = 256;

/// The per-method families, kept to make a late method's series.
struct MethodFamilies {
    finished: Family<MethodOutcome, Counter>,
    queue_wait: Histograms,
    run_time: Histograms,
    cpu_time: Histograms,
}

impl MethodFamilies {
    fn method(&self, method: &str, kind: TaskKind) -> MethodMetrics {
        let label = MethodLabel {
            method: method.to_string(),
        };
        let finished = OutcomeKind::ALL.map(|k| {
            self.finished
                .get_or_create(&MethodOutcome {
                    method: method.to_string(),
                    outcome: k.label().to_string(),
                })
                .clone()
        });
        let pool = (kind != TaskKind::Io).then(|| {
            (
                self.queue_wait.get_or_create(&label).clone(),
                self.cpu_time.get_or_create(&label).clone(),
            )
        });
        MethodMetrics {
            finished,
            run_time: self.run_time.get_or_create(&label).clone(),
            pool,
        }
    }
}

pub(crate) struct Metrics {
    registry: Registry,
    by_method: std::collections::HashMap<String, MethodMetrics>,
    families: MethodFamilies,
    /// Methods registered after start (see [`LATE_METHODS_MAX`]).
    late: std::sync::Mutex<std::collections::HashMap<String, Arc<MethodMetrics>>>,
    /// Made once at start, indexed by `RefusalReason as usize`: every
    /// reason is exported (at 0 until it happens), none can be missed.
    by_reason: [Counter; RefusalReason::ALL.len()],
    progress_coalesced: Counter,
    open_conns: Gauge,
    tasks: Family<StateLabel, Gauge>,
    pool_workers: Gauge,
    pool_live_workers: Gauge,
    pool_busy: Gauge,
    pool_queue_depth: Gauge,
    pool_admitted: Gauge,
    pool_utilisation: Gauge<f64, AtomicU64>,
    pool_non_yielding: Counter,
    pool_cpu: Counter<f64, AtomicU64>,
    outbound_depth: Gauge,
    outbound_bytes: Gauge,
    runtime_workers: Gauge,
    runtime_alive_tasks: Gauge,
    runtime_global_queue: Gauge,
    pool_addresses: Gauge,
    /// `None` without the counting allocator: it would read 0 for ever.
    memory_allocated: Option<Gauge>,
    memory_used: Gauge,
    memory_rss: Gauge,
    memory_budget: Gauge,
    memory_over_budget: Gauge,
    memory_largest_task: Gauge,
    memory_trims: Counter,
    process: super::process::ProcessMetrics,
    /// Indexed by `OutcomeKind as usize`.
    totals: [AtomicU64; OutcomeKind::ALL.len()],
    refused_total: AtomicU64,
}

/// Tokio's own stable runtime metrics.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct RuntimeStats {
    /// Worker threads serving connections.
    pub workers: usize,
    /// Tokio tasks alive (connections, writers, waiting I/O tasks).
    pub alive_tasks: usize,
    /// Tokio tasks waiting in the runtime's global queue.
    pub global_queue_depth: usize,
}

pub(crate) struct Live {
    pub open_conns: usize,
    pub runtime: RuntimeStats,
    /// Live tasks by state, abandoned ones included.
    pub states: TaskCounts,
    /// The most memory held by one live task.
    pub largest_task_memory: u64,
    pub pool: PoolStats,
    pub outbound_depth: usize,
    /// Bytes of replies queued and batch answers kept, over every connection.
    pub outbound_bytes: usize,
}

impl Metrics {
    /// `methods`: every registered task with its kind, so that each gets its
    /// series at start (at 0 until it runs) and only those that can happen.
    pub(crate) fn new(methods: &[(&str, TaskKind)]) -> Metrics {
        // The root registry holds the `process_*` series, which by convention
        // carry no application prefix; everything else is `taskwire_*`.
        let mut registry = Registry::default();
        let process = super::process::ProcessMetrics::register(&mut registry);
        let r = registry.sub_registry_with_prefix("taskwire");
        r.register(
            "build",
            "The taskwire library this server runs",
            Info::new(VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_string(),
            }),
        );

        let finished: Family<MethodOutcome, Counter> = Family::default();
        let queue_wait: Histograms = Family::new_with_constructor(seconds_histogram);
        let run_time: Histograms = Family::new_with_constructor(seconds_histogram);
        let cpu_time: Histograms = Family::new_with_constructor(seconds_histogram);
        let refusals: Family<ReasonLabel, Counter> = Family::default();
        r.register(
            "tasks_finished",
            "Tasks finished, by method and outcome",
            finished.clone(),
        );
        r.register(
            "task_queue_wait_seconds",
            "Time from admission to the first slice on the compute pool (pool tasks)",
            queue_wait.clone(),
        );
        r.register(
            "task_run_seconds",
            "Time from admission to the answer",
            run_time.clone(),
        );
        r.register(
            "task_cpu_seconds",
            "CPU time a task used on the compute pool (pool tasks)",
            cpu_time.clone(),
        );
        r.register(
            "admission_refusals",
            "Requests or upgrades refused by admission control, by reason",
            refusals.clone(),
        );

        let m = Metrics {
            by_method: Default::default(),
            families: MethodFamilies {
                finished: finished.clone(),
                queue_wait: queue_wait.clone(),
                run_time: run_time.clone(),
                cpu_time: cpu_time.clone(),
            },
            late: Default::default(),
            by_reason: Default::default(),
            progress_coalesced: Counter::default(),
            open_conns: Gauge::default(),
            tasks: Family::default(),
            pool_workers: Gauge::default(),
            pool_live_workers: Gauge::default(),
            pool_busy: Gauge::default(),
            pool_queue_depth: Gauge::default(),
            pool_admitted: Gauge::default(),
            pool_utilisation: Gauge::default(),
            pool_non_yielding: Counter::default(),
            pool_cpu: Counter::default(),
            outbound_depth: Gauge::default(),
            outbound_bytes: Gauge::default(),
            runtime_workers: Gauge::default(),
            runtime_alive_tasks: Gauge::default(),
            runtime_global_queue: Gauge::default(),
            pool_addresses: Gauge::default(),
            memory_allocated: crate::alloc::installed().then(Gauge::default),
            memory_used: Gauge::default(),
            memory_rss: Gauge::default(),
            memory_budget: Gauge::default(),
            memory_over_budget: Gauge::default(),
            memory_largest_task: Gauge::default(),
            memory_trims: Counter::default(),
            process,
            totals: Default::default(),
            refused_total: AtomicU64::new(0),
            registry: Registry::default(),
        };
        r.register(
            "progress_coalesced",
            "Progress updates folded into a later notification",
            m.progress_coalesced.clone(),
        );
        r.register(
            "connections_open",
            "Open WebSocket connections",
            m.open_conns.clone(),
        );
        r.register(
            "tasks",
            "Live tasks by state (queued, running, yielded, waiting, abandoned)",
            m.tasks.clone(),
        );
        r.register(
            "pool_workers",
            "Configured compute workers",
            m.pool_workers.clone(),
        );
        r.register(
            "pool_live_workers",
            "Compute worker threads alive, including replacements for stuck ones",
            m.pool_live_workers.clone(),
        );
        r.register(
            "pool_busy_workers",
            "Compute workers running a task",
            m.pool_busy.clone(),
        );
        r.register(
            "pool_queue_depth",
            "CPU tasks in the run queue waiting for a worker (new and yielded)",
            m.pool_queue_depth.clone(),
        );
        r.register(
            "pool_admitted_tasks",
            "CPU tasks admitted and not finished (bounded by queue_limit)",
            m.pool_admitted.clone(),
        );
        r.register(
            "pool_utilisation_ratio",
            "Fraction of compute worker time busy, 0 to 1 (last quarter second)",
            m.pool_utilisation.clone(),
        );
        r.register(
            "pool_non_yielding_tasks",
            "CPU tasks flagged as not yielding (ran far past their slice)",
            m.pool_non_yielding.clone(),
        );
        r.register(
            "pool_cpu_seconds",
            "CPU time run on the compute pool",
            m.pool_cpu.clone(),
        );
        r.register(
            "runtime_workers",
            "Tokio worker threads serving connections",
            m.runtime_workers.clone(),
        );
        r.register(
            "runtime_alive_tasks",
            "Tokio tasks alive (connections, writers, waiting I/O tasks)",
            m.runtime_alive_tasks.clone(),
        );
        r.register(
            "runtime_global_queue_depth",
            "Tokio tasks waiting in the runtime's global queue",
            m.runtime_global_queue.clone(),
        );
        r.register(
            "outbound_queue_depth",
            "Messages waiting in connections' outbound queues",
            m.outbound_depth.clone(),
        );
        r.register(
            "outbound_bytes",
            "Bytes of replies queued and batch answers kept over all connections (bounded by outbound_bytes_total)",
            m.outbound_bytes.clone(),
        );
        r.register(
            "pool_addresses",
            "Client addresses (IPv6 /64s) with CPU tasks admitted",
            m.pool_addresses.clone(),
        );
        if let Some(g) = &m.memory_allocated {
            r.register(
                "memory_allocated_bytes",
                "Bytes live through the counting allocator",
                g.clone(),
            );
        }
        r.register(
            "memory_used_bytes",
            "Memory as the budget counts it: the counting allocator's total, else RSS",
            m.memory_used.clone(),
        );
        r.register(
            "memory_rss_bytes",
            "Resident set size of the process",
            m.memory_rss.clone(),
        );
        r.register(
            "memory_budget_bytes",
            "Memory past which new CPU tasks are refused",
            m.memory_budget.clone(),
        );
        r.register(
            "memory_over_budget",
            "1 while new CPU tasks are refused for memory",
            m.memory_over_budget.clone(),
        );
        r.register(
            "memory_largest_task_bytes",
            "Memory held by the largest live task",
            m.memory_largest_task.clone(),
        );
        r.register(
            "memory_trims",
            "Times freed memory was handed back to the operating system",
            m.memory_trims.clone(),
        );
        let by_method = methods
            .iter()
            .map(|&(method, kind)| (method.to_string(), m.families.method(method, kind)))
            .collect();
        let by_reason = RefusalReason::ALL.map(|r| {
            refusals
                .get_or_create(&ReasonLabel {
                    reason: r.label().to_string(),
                })
                .clone()
        });
        Metrics {
            registry,
            by_method,
            by_reason,
            ..m
        }
    }

    pub(crate) fn task_finished(&self, t: &TaskShared, kind: OutcomeKind) {
        self.totals[kind as usize].fetch_add(1, Ordering::Relaxed);
        let late;
        let m = match self.by_method.get(&*t.method) {
            Some(m) => m,
            None if t.kind == TaskKind::Wasm => match self.late_method(&t.method, t.kind) {
                Some(m) => {
                    late = m;
                    &*late
                }
                None => return,
            },
            None => return,
        };
        m.finished[kind as usize].inc();
        m.run_time.observe(t.created.elapsed().as_secs_f64());
        if let (Some((queue_wait, cpu_time)), Some(first)) = (&m.pool, t.stats.first_run()) {
            queue_wait.observe(first.saturating_duration_since(t.created).as_secs_f64());
            cpu_time.observe(t.stats.cpu_time().as_secs_f64());
        }
        let coalesced = t.progress_coalesced();
        if coalesced > 0 {
            self.progress_coalesced.inc_by(coalesced);
        }
    }

    /// A late method's series, made at its first finish; `None` past
    /// [`LATE_METHODS_MAX`].
    fn late_method(&self, method: &str, kind: TaskKind) -> Option<Arc<MethodMetrics>> {
        let mut late = crate::sync::lock(&self.late);
        if let Some(m) = late.get(method) {
            return Some(m.clone());
        }
        if late.len() >= LATE_METHODS_MAX {
            return None;
        }
        let m = Arc::new(self.families.method(method, kind));
        late.insert(method.to_string(), m.clone());
        Some(m)
    }

    pub(crate) fn refused(&self, reason: RefusalReason) {
        self.by_reason[reason as usize].inc();
        self.refused_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Finished tasks by outcome, and refusals, since start.
    pub(crate) fn totals(&self) -> Finished {
        let mut f = Finished {
            refused: self.refused_total.load(Ordering::Relaxed),
            ..Finished::default()
        };
        for k in OutcomeKind::ALL {
            f.set(k, self.totals[k as usize].load(Ordering::Relaxed));
        }
        f
    }

    /// The exposition text, after bringing the gauges up to date.
    pub(crate) fn render(&self, live: &Live) -> String {
        self.open_conns.set(live.open_conns as i64);
        for s in TaskState::ALL {
            self.tasks
                .get_or_create(&StateLabel {
                    state: s.label().to_string(),
                })
                .set(live.states.get(s) as i64);
        }
        self.pool_addresses.set(live.pool.addresses as i64);
        if let Some(g) = &self.memory_allocated {
            g.set(crate::alloc::allocated_bytes() as i64);
        }
        self.memory_used.set(live.pool.memory_used as i64);
        self.memory_rss.set(live.pool.memory_rss as i64);
        self.memory_budget.set(live.pool.memory_budget as i64);
        self.memory_over_budget
            .set(i64::from(live.pool.over_memory_budget));
        self.memory_largest_task
            .set(live.largest_task_memory as i64);
        set_total(&self.memory_trims, live.pool.memory_trims);
        self.pool_workers.set(live.pool.workers as i64);
        self.pool_live_workers.set(live.pool.live_workers as i64);
        self.pool_busy.set(live.pool.busy as i64);
        self.pool_queue_depth.set(live.pool.queued as i64);
        self.pool_admitted.set(live.pool.admitted as i64);
        self.pool_utilisation.set(live.pool.utilisation);
        set_total(&self.pool_non_yielding, live.pool.non_yielding_total);
        set_total_f64(&self.pool_cpu, live.pool.cpu_ns_total as f64 / 1e9);
        self.outbound_depth.set(live.outbound_depth as i64);
        self.outbound_bytes
            .set(i64::try_from(live.outbound_bytes).unwrap_or(i64::MAX));
        self.runtime_workers.set(live.runtime.workers as i64);
        self.runtime_alive_tasks
            .set(live.runtime.alive_tasks as i64);
        self.runtime_global_queue
            .set(live.runtime.global_queue_depth as i64);
        self.process.update();
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_methods_are_bounded() {
        let m = Metrics::new(&[("echo", TaskKind::Io)]);
        for i in 0..LATE_METHODS_MAX {
            assert!(m.late_method(&format!("m{i}"), TaskKind::Wasm).is_some());
        }
        // One seen before still has its series; a new one past the bound none.
        assert!(m.late_method("m0", TaskKind::Wasm).is_some());
        assert!(m.late_method("one_too_many", TaskKind::Wasm).is_none());
        assert_eq!(crate::sync::lock(&m.late).len(), LATE_METHODS_MAX);
    }
}
