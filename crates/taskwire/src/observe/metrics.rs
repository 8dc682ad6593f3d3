//! Prometheus metrics, in a registry of the server's own (not a process-global
//! recorder), so that several servers in one process keep separate figures.

use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use super::api::{Finished, OutcomeKind, RefusalReason, TaskCounts, TaskState};
use crate::compute::PoolStats;
use crate::task::TaskShared;

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
    queue_wait: Histogram,
    run_time: Histogram,
    cpu_time: Histogram,
}

pub(crate) struct Metrics {
    registry: Registry,
    by_method: std::collections::HashMap<String, MethodMetrics>,
    finished: Family<MethodOutcome, Counter>,
    queue_wait: Histograms,
    run_time: Histograms,
    cpu_time: Histograms,
    refusals: Family<ReasonLabel, Counter>,
    /// Made once at start, indexed by `RefusalReason as usize`: every
    /// reason is exported (at 0 until it happens), none can be missed.
    by_reason: [Counter; RefusalReason::ALL.len()],
    progress_coalesced: Counter,
    open_conns: Gauge,
    tasks: Family<StateLabel, Gauge>,
    pool_workers: Gauge,
    pool_live_workers: Gauge,
    pool_busy: Gauge,
    pool_queued: Gauge,
    pool_utilisation: Gauge<f64, AtomicU64>,
    pool_non_yielding: Gauge,
    outbound_depth: Gauge,
    outbound_bytes: Gauge,
    runtime_workers: Gauge,
    runtime_alive_tasks: Gauge,
    runtime_global_queue: Gauge,
    pool_addresses: Gauge,
    memory_allocated: Gauge,
    memory_used: Gauge,
    memory_rss: Gauge,
    memory_budget: Gauge,
    memory_over_budget: Gauge,
    memory_largest_task: Gauge,
    memory_trims: Gauge,
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
    pub(crate) fn new(methods: &[&str]) -> Metrics {
        let mut registry = Registry::with_prefix("taskwire");
        let m = Metrics {
            by_method: Default::default(),
            finished: Family::default(),
            queue_wait: Family::new_with_constructor(seconds_histogram),
            run_time: Family::new_with_constructor(seconds_histogram),
            cpu_time: Family::new_with_constructor(seconds_histogram),
            refusals: Family::default(),
            by_reason: Default::default(),
            progress_coalesced: Counter::default(),
            open_conns: Gauge::default(),
            tasks: Family::default(),
            pool_workers: Gauge::default(),
            pool_live_workers: Gauge::default(),
            pool_busy: Gauge::default(),
            pool_queued: Gauge::default(),
            pool_utilisation: Gauge::default(),
            pool_non_yielding: Gauge::default(),
            outbound_depth: Gauge::default(),
            outbound_bytes: Gauge::default(),
            runtime_workers: Gauge::default(),
            runtime_alive_tasks: Gauge::default(),
            runtime_global_queue: Gauge::default(),
            pool_addresses: Gauge::default(),
            memory_allocated: Gauge::default(),
            memory_used: Gauge::default(),
            memory_rss: Gauge::default(),
            memory_budget: Gauge::default(),
            memory_over_budget: Gauge::default(),
            memory_largest_task: Gauge::default(),
            memory_trims: Gauge::default(),
            totals: Default::default(),
            refused_total: AtomicU64::new(0),
            registry: Registry::default(),
        };
        registry.register(
            "tasks_finished",
            "Tasks finished, by method and outcome",
            m.finished.clone(),
        );
        registry.register(
            "task_queue_wait_seconds",
            "Time from admission to the first slice on the compute pool",
            m.queue_wait.clone(),
        );
        registry.register(
            "task_run_seconds",
            "Time from admission to the answer",
            m.run_time.clone(),
        );
        registry.register(
            "task_cpu_seconds",
            "CPU time a task used on the compute pool",
            m.cpu_time.clone(),
        );
        registry.register(
            "admission_refusals",
            "Requests or upgrades refused by admission control, by reason",
            m.refusals.clone(),
        );
        registry.register(
            "progress_coalesced",
            "Progress updates folded into a later notification",
            m.progress_coalesced.clone(),
        );
        registry.register(
            "connections_open",
            "Open WebSocket connections",
            m.open_conns.clone(),
        );
        registry.register("tasks", "Live tasks by state", m.tasks.clone());
        registry.register(
            "pool_workers",
            "Configured compute workers",
            m.pool_workers.clone(),
        );
        registry.register(
            "pool_live_workers",
            "Compute worker threads alive, including replacements for stuck ones",
            m.pool_live_workers.clone(),
        );
        registry.register(
            "pool_busy_workers",
            "Compute workers running a task",
            m.pool_busy.clone(),
        );
        registry.register(
            "pool_queued",
            "CPU tasks waiting for a worker",
            m.pool_queued.clone(),
        );
        registry.register(
            "pool_utilisation",
            "Fraction of compute worker time busy (recent window)",
            m.pool_utilisation.clone(),
        );
        registry.register(
            "pool_non_yielding",
            "CPU tasks ever flagged as not yielding",
            m.pool_non_yielding.clone(),
        );
        registry.register(
            "runtime_workers",
            "Tokio worker threads serving connections",
            m.runtime_workers.clone(),
        );
        registry.register(
            "runtime_alive_tasks",
            "Tokio tasks alive (connections, writers, waiting I/O tasks)",
            m.runtime_alive_tasks.clone(),
        );
        registry.register(
            "runtime_global_queue_depth",
            "Tokio tasks waiting in the runtime's global queue",
            m.runtime_global_queue.clone(),
        );
        registry.register(
            "outbound_queue_depth",
            "Messages waiting in connections' outbound queues",
            m.outbound_depth.clone(),
        );
        registry.register(
            "outbound_bytes",
            "Bytes of replies queued and batch answers kept over all connections (bounded by outbound_bytes_total)",
            m.outbound_bytes.clone(),
        );
        registry.register(
            "pool_addresses",
            "Client addresses (IPv6 /64s) with CPU tasks admitted",
            m.pool_addresses.clone(),
        );
        registry.register(
            "memory_allocated_bytes",
            "Bytes live through the counting allocator (0 when it is not installed)",
            m.memory_allocated.clone(),
        );
        registry.register(
            "memory_used_bytes",
            "Memory as the budget counts it: the counting allocator's total, else RSS",
            m.memory_used.clone(),
        );
        registry.register(
            "memory_rss_bytes",
            "Resident set size of the process",
            m.memory_rss.clone(),
        );
        registry.register(
            "memory_budget_bytes",
            "Memory past which new CPU tasks are refused",
            m.memory_budget.clone(),
        );
        registry.register(
            "memory_over_budget",
            "1 while new CPU tasks are refused for memory",
            m.memory_over_budget.clone(),
        );
        registry.register(
            "memory_largest_task_bytes",
            "Memory held by the largest live task",
            m.memory_largest_task.clone(),
        );
        registry.register(
            "memory_trims",
            "Times freed memory was handed back to the operating system",
            m.memory_trims.clone(),
        );
        let by_method = methods
            .iter()
            .map(|&method| {
                let label = MethodLabel {
                    method: method.to_string(),
                };
                let finished = OutcomeKind::ALL.map(|k| {
                    m.finished
                        .get_or_create(&MethodOutcome {
                            method: method.to_string(),
                            outcome: k.label().to_string(),
                        })
                        .clone()
                });
                let handles = MethodMetrics {
                    finished,
                    queue_wait: m.queue_wait.get_or_create(&label).clone(),
                    run_time: m.run_time.get_or_create(&label).clone(),
                    cpu_time: m.cpu_time.get_or_create(&label).clone(),
                };
                (method.to_string(), handles)
            })
            .collect();
        let by_reason = RefusalReason::ALL.map(|r| {
            m.refusals
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
        let Some(m) = self.by_method.get(&*t.method) else {
            return;
        };
        m.finished[kind as usize].inc();
        m.run_time.observe(t.created.elapsed().as_secs_f64());
        if let Some(first) = t.stats.first_run() {
            m.queue_wait
                .observe(first.saturating_duration_since(t.created).as_secs_f64());
            m.cpu_time.observe(t.stats.cpu_time().as_secs_f64());
        }
        let coalesced = t.progress_coalesced();
        if coalesced > 0 {
            self.progress_coalesced.inc_by(coalesced);
        }
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
        self.memory_allocated
            .set(crate::alloc::allocated_bytes() as i64);
        self.memory_used.set(live.pool.memory_used as i64);
        self.memory_rss.set(live.pool.memory_rss as i64);
        self.memory_budget.set(live.pool.memory_budget as i64);
        self.memory_over_budget
            .set(i64::from(live.pool.over_memory_budget));
        self.memory_largest_task
            .set(live.largest_task_memory as i64);
        self.memory_trims.set(live.pool.memory_trims as i64);
        self.pool_workers.set(live.pool.workers as i64);
        self.pool_live_workers.set(live.pool.live_workers as i64);
        self.pool_busy.set(live.pool.busy as i64);
        self.pool_queued.set(live.pool.queued as i64);
        self.pool_utilisation.set(live.pool.utilisation);
        self.pool_non_yielding
            .set(live.pool.non_yielding_total as i64);
        self.outbound_depth.set(live.outbound_depth as i64);
        self.outbound_bytes
            .set(i64::try_from(live.outbound_bytes).unwrap_or(i64::MAX));
        self.runtime_workers.set(live.runtime.workers as i64);
        self.runtime_alive_tasks
            .set(live.runtime.alive_tasks as i64);
        self.runtime_global_queue
            .set(live.runtime.global_queue_depth as i64);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
