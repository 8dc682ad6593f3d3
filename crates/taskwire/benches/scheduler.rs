//! Micro-benchmark: what one scheduling decision costs the compute pool (pop
//! the next job, charge its slice to its connection, push it back), as the
//! number of connections with work queued grows. The pool takes every decision
//! under one lock, once per slice of every worker, so this cost is serialised.
//!
//! Each size runs twice in the same process: `scan` is the first run queue
//! (every group and every job of the chosen group examined per decision, kept
//! in `src/compute/queue_reference.rs`), `ordered` is [`RunQueue`].
//!
//! `cargo bench -p taskwire --bench scheduler`

#[path = "../src/compute/queue_reference.rs"]
mod reference;

use std::hint::black_box;
use std::time::{Duration, Instant};

use reference::{Arith, ScanQueue};
use taskwire::bench_internals::RunQueue;
use taskwire::builtin::splitmix64;

const MS: u64 = 1_000_000;
/// Time constant of usage decay: the pool's default (1 s).
const TAU_NS: u64 = 1_000 * MS;
/// CPU time past which a job is long: the pool's default (10 ms). Every job
/// here is charged ~2 ms per decision, so both classes are exercised.
const THRESHOLD_NS: u64 = 10 * MS;
/// Simulated clock step per decision: 2 ms slices on 16 workers.
const STEP_NS: u64 = 2 * MS / 16;
/// Each measurement runs for this long (or `MAX_DECISIONS`), after a warm-up.
const BUDGET: Duration = Duration::from_millis(400);
const MAX_DECISIONS: u64 = 2_000_000;

/// The run-queue operations a decision uses, for both implementations.
trait Queue {
    fn push(&mut self, group: u64, attained: u64, now: u64);
    fn pop(&mut self, now: u64) -> Option<(u64, u64)>;
    fn descheduled(&mut self, group: u64, cpu: u64, now: u64);
}

impl Queue for RunQueue<u64> {
    fn push(&mut self, group: u64, attained: u64, now: u64) {
        RunQueue::push(self, group, attained, 0, attained, now)
    }
    fn pop(&mut self, now: u64) -> Option<(u64, u64)> {
        RunQueue::pop(self, now)
    }
    fn descheduled(&mut self, group: u64, cpu: u64, now: u64) {
        RunQueue::descheduled(self, group, cpu, now)
    }
}

impl Queue for ScanQueue<u64> {
    fn push(&mut self, group: u64, attained: u64, now: u64) {
        ScanQueue::push(self, group, attained, 0, attained, now)
    }
    fn pop(&mut self, now: u64) -> Option<(u64, u64)> {
        ScanQueue::pop(self, now)
    }
    fn descheduled(&mut self, group: u64, cpu: u64, now: u64) {
        ScanQueue::descheduled(self, group, cpu, now)
    }
}

/// Runs decisions on a queue holding `groups` × `jobs` jobs, each job yielding
/// after a slice of 1.5 to 2.5 ms (varied, so usages differ), until the budget
/// is spent; returns ns per decision.
fn per_decision(q: &mut impl Queue, groups: u64, jobs: u64) -> f64 {
    let mut now = 0;
    for g in 0..groups {
        for _ in 0..jobs {
            q.push(g, 0, now);
        }
    }
    let mut decide = |i: u64, now: u64| {
        let Some((g, attained)) = q.pop(now) else {
            return 0;
        };
        let cpu = 1_500_000 + splitmix64(i) % MS;
        q.descheduled(g, cpu, now);
        q.push(g, attained + cpu, now);
        g
    };
    // Warm-up: every group charged at least once, so no group is left at usage 0.
    let mut i = 0;
    while i < (groups * jobs).min(20_000) {
        now += STEP_NS;
        black_box(decide(i, now));
        i += 1;
    }
    let t = Instant::now();
    let mut n = 0;
    while n < MAX_DECISIONS && t.elapsed() < BUDGET {
        for _ in 0..64 {
            now += STEP_NS;
            black_box(decide(i, now));
            i += 1;
        }
        n += 64;
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn main() {
    println!("one decision = pop + charge + push; tau 1 s, clock step {STEP_NS} ns per decision");
    println!(
        "{:<34} {:>14} {:>14} {:>8}",
        "queued", "scan ns", "ordered ns", "scan/ordered"
    );
    let sizes: [(u64, u64); 5] = [(10, 1), (100, 1), (1_000, 1), (10_000, 1), (1, 10_000)];
    for (groups, jobs) in sizes {
        let scan = per_decision(
            &mut ScanQueue::new(TAU_NS, THRESHOLD_NS, Arith::Exp),
            groups,
            jobs,
        );
        let ordered = per_decision(&mut RunQueue::new(TAU_NS, THRESHOLD_NS), groups, jobs);
        let label = format!("{groups} connections x {jobs} job(s)");
        println!(
            "{label:<34} {scan:>14.1} {ordered:>14.1} {:>8.1}x",
            scan / ordered
        );
    }
}
