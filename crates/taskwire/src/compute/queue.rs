//! The scheduling policy, as a pure data structure with an explicit clock, so
//! that it can be tested deterministically without threads.
//!
//! Two steps pick the next job:
//! 1. the *group* (a connection) with the least recently attained CPU service:
//!    its usage decays exponentially (time constant `tau`), so a group that has
//!    just arrived runs ahead of one that has been flooding, and a flooder's
//!    claim recovers once it has waited. Equal claims go round-robin (among
//!    groups never picked yet: first created, first served).
//! 2. within that group, jobs fall in two classes by the CPU they have used:
//!    - *short* (below the threshold): the job with the least attained service,
//!      aged by its wait so that no job starves however many short jobs keep
//!      arriving; short jobs finish first;
//!    - *long* (at or past the threshold): the first submitted goes first, so
//!      that a connection's equal long jobs finish one after another instead of
//!      all advancing in lockstep (which delays every result to near the end of
//!      the batch).
//!
//!    Short jobs go before long ones, except that the long class as a whole is
//!    aged like one job that has used exactly the threshold and waited since
//!    the class last ran: a connection that never runs out of short jobs still
//!    gives its long jobs a slice now and then (once they have waited 64× the
//!    threshold), so none starves.
//!
//! Both orders are kept in ordered structures, so a decision (pop, charge,
//! push) costs O(log n) however many connections have work queued; the pool
//! takes it under one lock, once per slice of every worker. That works because
//! neither order changes while time passes:
//! - decayed usages `u·e^-(now-t)/τ` all shrink by the same factor as `now`
//!   grows, so they order like the time-invariant `ln u + t/τ`, which changes
//!   only when the group is charged (`u = 0` is `-inf`: equal to every other
//!   unused group, which then go round-robin);
//! - a short job's aged attained service `attained - (now - enqueued)/64`
//!   orders like `64·attained + enqueued`, fixed from its push to its pop; the
//!   long class's `threshold - (now - served)/64` like `64·threshold + served`,
//!   fixed until a long job is popped; a long job's submission stamp never
//!   changes.
//!
//! Rounding: a claim's `t/τ` term grows with uptime (86 400 after a day at
//! τ = 1 s), so two usages closer than ~1e-11 relative may compare either way,
//! a near-tie that the `exp` comparison also left to rounding.
//!
//! The scan these structures replace is kept as a reference in
//! `queue_reference.rs`; the tests below check that both make the same picks.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

/// How much a job's waiting time counts against its attained service.
/// 64 means a job that has waited 64 ms is treated as if it had used 1 ms less:
/// weak enough that new short jobs still run first, strong enough that every
/// job is eventually picked.
const AGING_DIVISOR: u64 = 64;

/// A group with nothing queued or running is forgotten once its decayed usage
/// is at most this (1 µs): it would restart from zero a hair ahead of that.
const FORGET_BELOW_NS: f64 = 1_000.0;

/// A group's claim, time-invariant: `ln(usage) + usage_at/τ`, so that a smaller
/// key is a smaller decayed usage at any later time. Never NaN and never -0.0
/// (`ln` of a positive number is not -0.0, and adding the non-negative
/// `usage_at/τ` cannot make it so), so `total_cmp` is the numeric order.
#[derive(Clone, Copy, Debug)]
struct Claim(f64);

impl Claim {
    fn of(usage: f64, usage_at_ns: u64, tau_ns: f64) -> Claim {
        if usage > 0.0 {
            Claim(usage.ln() + usage_at_ns as f64 / tau_ns)
        } else {
            Claim(f64::NEG_INFINITY)
        }
    }
}

impl PartialEq for Claim {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Claim {}
impl PartialOrd for Claim {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Claim {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Where a group with queued jobs stands: least claim first, then the one
/// picked least recently (round-robin), then, among groups never picked, the
/// one created first. Unique: pick stamps are unique once non-zero, and
/// creation stamps always are.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct ReadyKey {
    claim: Claim,
    last_pick: u64,
    created: u64,
}

/// Where an idle group (nothing queued or running) stands for forgetting:
/// the least claim decays below the threshold first.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
struct IdleKey {
    claim: Claim,
    created: u64,
}

struct Entry<T> {
    /// Short jobs: `64·attained + enqueued`; long jobs: the submission stamp.
    /// Smaller is picked first (see the module doc).
    aged: u128,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.aged, self.seq) == (other.aged, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    /// Reversed, so that the max-heap yields the least aged service, then the
    /// oldest push.
    fn cmp(&self, other: &Self) -> Ordering {
        (other.aged, other.seq).cmp(&(self.aged, self.seq))
    }
}

struct Group<T> {
    /// Decayed CPU usage in ns, as of `usage_at_ns`.
    usage: f64,
    usage_at_ns: u64,
    /// `Claim::of(usage, usage_at_ns)`, cached: it is the key in `ready`/`idle`.
    claim: Claim,
    /// Round-robin stamp: the pick counter when this group last ran.
    last_pick: u64,
    /// Tie-break among groups never picked: first created, first served.
    created: u64,
    /// Jobs of this group currently on a worker.
    running: usize,
    /// Jobs below the threshold, least aged attained service first.
    short: BinaryHeap<Entry<T>>,
    /// Jobs at or past the threshold, first submitted first.
    long: BinaryHeap<Entry<T>>,
    /// When the long class last ran or, if later, last became non-empty: its
    /// age in the comparison with the short class.
    long_served_ns: u64,
}

impl<T> Group<T> {
    fn decayed(&self, now_ns: u64, tau_ns: f64) -> f64 {
        let dt = now_ns.saturating_sub(self.usage_at_ns) as f64;
        self.usage * (-dt / tau_ns).exp()
    }

    fn charge(&mut self, cpu_ns: u64, now_ns: u64, tau_ns: f64) {
        self.usage = self.decayed(now_ns, tau_ns) + cpu_ns as f64;
        self.usage_at_ns = now_ns;
        self.claim = Claim::of(self.usage, self.usage_at_ns, tau_ns);
    }

    fn ready_key(&self) -> ReadyKey {
        ReadyKey {
            claim: self.claim,
            last_pick: self.last_pick,
            created: self.created,
        }
    }

    fn idle_key(&self) -> IdleKey {
        IdleKey {
            claim: self.claim,
            created: self.created,
        }
    }

    fn has_jobs(&self) -> bool {
        !self.short.is_empty() || !self.long.is_empty()
    }

    fn is_idle(&self) -> bool {
        !self.has_jobs() && self.running == 0
    }

    /// Takes this group's next job: the short class first, unless the long
    /// class has aged past its head (see the module doc).
    fn take(&mut self, threshold_ns: u64, now_ns: u64) -> Option<Entry<T>> {
        let long_first = match (self.short.peek(), self.long.peek()) {
            (Some(short), Some(_)) => {
                short.aged > long_class_key(threshold_ns, self.long_served_ns)
            }
            (None, Some(_)) => true,
            _ => false,
        };
        if long_first {
            self.long_served_ns = now_ns;
            self.long.pop()
        } else {
            self.short.pop()
        }
    }
}

/// The long class's aged service, in the units of a short job's key: that of a
/// job that has used exactly the threshold, enqueued when the class last ran.
fn long_class_key(threshold_ns: u64, served_ns: u64) -> u128 {
    u128::from(threshold_ns) * u128::from(AGING_DIVISOR) + u128::from(served_ns)
}

/// A run queue of jobs grouped by connection. `T` is the job (a runnable).
///
/// Every group is in exactly one of three states: in `ready` (it has jobs
/// queued), in `idle` (nothing queued or running), or in neither (nothing
/// queued, some job running). All three structures are sized by the groups
/// that exist, and groups by the jobs queued or running plus idle groups whose
/// usage has not yet decayed away.
pub struct RunQueue<T> {
    groups: HashMap<u64, Group<T>>,
    ready: BTreeMap<ReadyKey, u64>,
    idle: BTreeMap<IdleKey, u64>,
    tau_ns: f64,
    /// CPU time past which a job is long (`u64::MAX`: never, pure least
    /// attained service).
    threshold_ns: u64,
    picks: u64,
    seq: u64,
    len: usize,
}

impl<T> std::fmt::Debug for RunQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunQueue")
            .field("jobs", &self.len())
            .finish_non_exhaustive()
    }
}

impl<T> RunQueue<T> {
    /// An empty queue whose group usage decays with time constant `tau_ns`,
    /// and whose jobs are long once they have used `threshold_ns` of CPU
    /// (`u64::MAX`: never, so least attained service throughout).
    pub fn new(tau_ns: u64, threshold_ns: u64) -> Self {
        RunQueue {
            groups: HashMap::new(),
            ready: BTreeMap::new(),
            idle: BTreeMap::new(),
            tau_ns: tau_ns.max(1) as f64,
            threshold_ns,
            picks: 0,
            seq: 0,
            len: 0,
        }
    }

    /// Jobs waiting to run.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no job waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Groups the queue keeps state for (bounded: a group is forgotten once it
    /// has nothing queued or running and its usage has decayed away).
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Makes a job runnable. `attained_ns` is the CPU it has used so far;
    /// `submitted` a stamp that grows with submission order, the same at every
    /// push of the job (the pool numbers jobs as it spawns them): the order of
    /// long jobs.
    pub fn push(&mut self, group: u64, attained_ns: u64, submitted: u64, item: T, now_ns: u64) {
        self.seq += 1;
        let seq = self.seq;
        let g = self.groups.entry(group).or_insert_with(|| Group {
            usage: 0.0,
            usage_at_ns: now_ns,
            claim: Claim(f64::NEG_INFINITY),
            last_pick: 0,
            created: seq,
            running: 0,
            short: BinaryHeap::new(),
            long: BinaryHeap::new(),
            long_served_ns: now_ns,
        });
        if !g.has_jobs() {
            if g.running == 0 {
                self.idle.remove(&g.idle_key());
            }
            self.ready.insert(g.ready_key(), group);
        }
        if attained_ns < self.threshold_ns {
            g.short.push(Entry {
                aged: u128::from(attained_ns) * u128::from(AGING_DIVISOR) + u128::from(now_ns),
                seq,
                item,
            });
        } else {
            if g.long.is_empty() {
                // A class that was empty has not been waiting: its age starts now.
                g.long_served_ns = g.long_served_ns.max(now_ns);
            }
            g.long.push(Entry {
                aged: u128::from(submitted),
                seq,
                item,
            });
        }
        self.len += 1;
    }

    /// Takes the next job to run, with its group; the group counts it as running
    /// until [`RunQueue::descheduled`]. The orders are time-invariant: the
    /// clock only stamps when the long class last ran.
    pub fn pop(&mut self, now_ns: u64) -> Option<(u64, T)> {
        let (_, id) = self.ready.pop_first()?;
        let g = self.groups.get_mut(&id)?;
        let entry = g.take(self.threshold_ns, now_ns)?;
        self.picks += 1;
        g.last_pick = self.picks;
        g.running += 1;
        self.len -= 1;
        if g.has_jobs() {
            self.ready.insert(g.ready_key(), id);
        }
        Some((id, entry.item))
    }

    /// A job popped from `group` left its worker after using `cpu_ns`; it is
    /// charged to the group. Pushing it again (if it yielded) is separate.
    pub fn descheduled(&mut self, group: u64, cpu_ns: u64, now_ns: u64) {
        let tau = self.tau_ns;
        if let Some(g) = self.groups.get_mut(&group) {
            // The claim is part of the key: out, charge, back in.
            if g.has_jobs() {
                self.ready.remove(&g.ready_key());
            } else if g.running == 0 {
                self.idle.remove(&g.idle_key());
            }
            g.charge(cpu_ns, now_ns, tau);
            g.running = g.running.saturating_sub(1);
            if g.has_jobs() {
                self.ready.insert(g.ready_key(), group);
            } else if g.is_idle() {
                self.idle.insert(g.idle_key(), group);
            }
        }
        self.forget_idle(now_ns);
    }

    /// Decayed usage of a group, in ns (for tests and the admin view).
    pub fn usage(&self, group: u64, now_ns: u64) -> f64 {
        self.groups
            .get(&group)
            .map(|g| g.decayed(now_ns, self.tau_ns))
            .unwrap_or(0.0)
    }

    fn forget_idle(&mut self, now_ns: u64) {
        // Only once the map has grown, as the first scan did, so that a few
        // connections keep their history however long they idle.
        if self.groups.len() < 64 {
            return;
        }
        // Decayed usage <= FORGET_BELOW_NS  <=>  claim <= ln(FORGET_BELOW_NS) + now/τ:
        // idle groups fall below it in claim order, so only the front is looked at.
        let limit = Claim(FORGET_BELOW_NS.ln() + now_ns as f64 / self.tau_ns);
        while let Some(entry) = self.idle.first_entry() {
            if entry.key().claim > limit {
                break;
            }
            let id = entry.remove();
            self.groups.remove(&id);
        }
    }
}

// Its items are `pub` because benches/scheduler.rs includes the same file.
#[cfg(test)]
#[allow(unreachable_pub)]
#[path = "queue_reference.rs"]
mod reference;

#[cfg(test)]
impl<T> RunQueue<T> {
    /// Panics unless every group is in exactly the structure its state says.
    fn check_invariants(&self) {
        let (mut ready, mut idle, mut jobs) = (0, 0, 0);
        for (&id, g) in &self.groups {
            jobs += g.short.len() + g.long.len();
            if g.has_jobs() {
                assert_eq!(self.ready.get(&g.ready_key()), Some(&id));
                ready += 1;
            } else if g.running == 0 {
                assert_eq!(self.idle.get(&g.idle_key()), Some(&id));
                idle += 1;
            }
        }
        assert_eq!(ready, self.ready.len());
        assert_eq!(idle, self.idle.len());
        assert_eq!(jobs, self.len);
    }

    /// When the long class of `group` last ran (0 for an unknown group).
    fn long_served(&self, group: u64) -> u64 {
        self.groups.get(&group).map_or(0, |g| g.long_served_ns)
    }
}

#[cfg(test)]
mod tests {
    use super::reference::{Arith, ScanQueue};
    use super::*;

    const MS: u64 = 1_000_000;
    /// The default threshold (`las_threshold_ms`).
    const T: u64 = 10 * MS;

    /// Runs the queue like a pool of `workers` with fixed slices, recording
    /// when each job finishes. Jobs are (group, id, total cpu ms).
    fn simulate(workers: usize, jobs: &[(u64, u32, u64)], slice_ms: u64) -> HashMap<u32, u64> {
        let mut q = RunQueue::new(1_000 * MS, T);
        let mut left: HashMap<u32, (u64, u64)> = HashMap::new(); // id -> (remaining, attained)
        for &(g, id, ms) in jobs {
            q.push(g, 0, u64::from(id), id, 0);
            left.insert(id, (ms * MS, 0));
        }
        let mut now = 0;
        let mut done = HashMap::new();
        while !q.is_empty() {
            let mut batch = Vec::new();
            for _ in 0..workers {
                if let Some(j) = q.pop(now) {
                    batch.push(j);
                }
            }
            now += slice_ms * MS;
            for (g, id) in batch {
                let (rem, att) = left[&id];
                let used = rem.min(slice_ms * MS);
                q.descheduled(g, used, now);
                if rem > used {
                    left.insert(id, (rem - used, att + used));
                    q.push(g, att + used, u64::from(id), id, now);
                } else {
                    done.insert(id, now);
                }
            }
        }
        done
    }

    /// One job of a simulation: (group, id, cpu ns, arrival ns).
    type SimJob = (u64, u32, u64, u64);

    /// Like [`simulate`], with a threshold and slices in ns, jobs that arrive
    /// over time (in the order given; an id's submission stamp is its place in
    /// that order), and a bound on simulated time. Returns when each job
    /// finished and the longest any job waited for a slice while below the
    /// threshold (past it, a job waits for the older ones by design).
    fn simulate_arrivals(
        threshold: u64,
        workers: usize,
        slice_ns: u64,
        jobs: &[SimJob],
        until_ns: u64,
    ) -> (HashMap<u32, u64>, u64) {
        let mut q = RunQueue::new(1_000 * MS, threshold);
        // id -> (remaining, attained, submitted, waiting since)
        let mut left: HashMap<u32, (u64, u64, u64, u64)> = HashMap::new();
        let (mut now, mut next, mut longest_wait) = (0u64, 0usize, 0u64);
        let mut done = HashMap::new();
        while now < until_ns && (next < jobs.len() || !q.is_empty()) {
            if q.is_empty() {
                now = now.max(jobs[next].3);
            }
            while let Some(&(g, id, cpu, at)) = jobs.get(next).filter(|j| j.3 <= now) {
                q.push(g, 0, next as u64, id, at.max(now));
                left.insert(id, (cpu, 0, next as u64, now));
                next += 1;
            }
            let batch: Vec<_> = (0..workers).filter_map(|_| q.pop(now)).collect();
            for (_, id) in &batch {
                if left[id].1 < threshold {
                    longest_wait = longest_wait.max(now - left[id].3);
                }
            }
            now += slice_ns;
            for (g, id) in batch {
                let (rem, att, sub, _) = left[&id];
                let used = rem.min(slice_ns);
                q.descheduled(g, used, now);
                if rem > used {
                    left.insert(id, (rem - used, att + used, sub, now));
                    q.push(g, att + used, sub, id, now);
                } else {
                    done.insert(id, now);
                }
            }
            q.check_invariants();
        }
        (done, longest_wait)
    }

    /// What the stream figures of `docs/SCHEDULING.md` are made of: `n` equal
    /// jobs of `job_ms` from one connection, then a 10 ms job from the same
    /// connection, on 2 workers with 2 ms slices. Returns (first, median and
    /// last of the batch, the 10 ms job), in ms of simulated time.
    fn stream_figures(threshold: u64, n: u32, job_ms: u64) -> (f64, f64, f64, f64) {
        let mut jobs: Vec<SimJob> = (0..n).map(|i| (1, i, job_ms * MS, 0)).collect();
        jobs.push((1, n, 10 * MS, 0));
        let (done, _) = simulate_arrivals(threshold, 2, 2 * MS, &jobs, u64::MAX);
        let mut batch: Vec<u64> = (0..n).map(|i| done[&i]).collect();
        batch.sort_unstable();
        let ms = |ns: u64| ns as f64 / MS as f64;
        (
            ms(batch[0]),
            ms(batch[batch.len() / 2]),
            ms(batch[batch.len() - 1]),
            ms(done[&n]),
        )
    }

    /// 256 equal 100 ms jobs and a 10 ms one from one connection on 2 workers.
    /// Least attained service alone (no threshold) runs them in lockstep: the
    /// first result comes near the end. With the default threshold the first
    /// comes after each job has had its first 10 ms (256 × 10 ms / 2 workers),
    /// then they finish one pair at a time, and the 10 ms job still finishes
    /// within the first phase. The sweep shows the trade that sets the
    /// default: a smaller threshold brings the first result earlier, but a
    /// 10 ms job then crosses it and waits for the whole batch.
    #[test]
    fn a_batch_of_equal_long_jobs_streams_its_results() {
        eprintln!("threshold ms: first / median / last of 256 x 100 ms, then a 10 ms job (ms)");
        for t_ms in [2, 4, 6, 8, 10, 12, 16, 20, 50] {
            let (first, median, last, short) = stream_figures(t_ms * MS, 256, 100);
            eprintln!("{t_ms:>5}: {first:>7.0} / {median:>7.0} / {last:>7.0}, {short:>7.0}");
        }
        let (first, median, last, short) = stream_figures(u64::MAX, 256, 100);
        eprintln!("  LAS: {first:>7.0} / {median:>7.0} / {last:>7.0}, {short:>7.0}");
        // Lockstep: nothing finishes before the last round.
        assert!(first >= 0.9 * last, "{first} against {last}");

        let (first, median, last, short) = stream_figures(T, 256, 100);
        // The work is the same: 25.6 s on 2 workers, plus the 10 ms job.
        assert!((12_800.0..=12_900.0).contains(&last), "{last}");
        assert!(first <= 1_500.0, "first result after {first} ms");
        assert!(median <= 0.6 * last, "median {median} ms, last {last} ms");
        assert!(short <= 1_500.0, "the 10 ms job finished after {short} ms");
    }

    #[test]
    fn short_jobs_go_before_long_ones_of_the_same_connection() {
        let mut q = RunQueue::new(1_000 * MS, T);
        // Submitted first but past the threshold.
        q.push(1, 50 * MS, 0, "long", 0);
        q.push(1, 4 * MS, 1, "short, used 4 ms", MS);
        q.push(1, 0, 2, "short, fresh", 2 * MS);
        let order: Vec<_> = (0..3)
            .filter_map(|_| q.pop(3 * MS))
            .map(|(_, j)| j)
            .collect();
        assert_eq!(order, ["short, fresh", "short, used 4 ms", "long"]);
        // Among long jobs, the first submitted goes first whatever its service.
        let mut q = RunQueue::new(1_000 * MS, T);
        q.push(1, 90 * MS, 7, "second", 0);
        q.push(1, 20 * MS, 9, "third", 0);
        q.push(1, 80 * MS, 3, "first", 5 * MS);
        let order: Vec<_> = (0..3)
            .filter_map(|_| q.pop(6 * MS))
            .map(|(_, j)| j)
            .collect();
        assert_eq!(order, ["first", "second", "third"]);
    }

    /// One connection never runs out of fresh short jobs (two 2 ms jobs every
    /// 2 ms slice, all that its 2 workers can run) while it also has long
    /// jobs and one half-way below the threshold. Every job still finishes:
    /// the half-way one by ageing, the long ones because their class ages as
    /// one job that has used the threshold (a slice after waiting 64 × 10 ms).
    #[test]
    fn no_job_starves_behind_a_connection_s_own_short_jobs() {
        let slice = 2 * MS;
        let mut jobs: Vec<SimJob> =
            vec![(1, 0, 30 * MS, 0), (1, 1, 30 * MS, 0), (1, 2, 30 * MS, 0)];
        let mut id = 3;
        for step in 0..15_000u64 {
            for _ in 0..2 {
                jobs.push((1, id, slice, step * slice));
                id += 1;
            }
        }
        let (done, longest_wait) = simulate_arrivals(T, 2, slice, &jobs, 60_000 * MS);
        for long in 0..3 {
            assert!(done.contains_key(&long), "long job {long} starved");
        }
        assert_eq!(done.len(), jobs.len(), "every short job finished too");
        // Below the threshold a job's wait is bounded by its ageing: 64 x its
        // service, at most 64 x 10 ms, and the slices of the jobs that aged
        // ahead of it.
        assert!(
            longest_wait <= 2_000 * MS,
            "a job waited {} ms",
            longest_wait / MS
        );
        eprintln!(
            "long jobs done at {:?} ms; longest wait between slices {} ms",
            (0..3).map(|i| done[&i] / MS).collect::<Vec<_>>(),
            longest_wait / MS
        );
    }

    #[test]
    fn connections_share_equally_whatever_their_queue_length() {
        // Group 1 queues 50 jobs, group 2 queues 2; with one worker, group 2's
        // two jobs (20 ms in all) finish within ~2x their own work, not after
        // group 1's 500 ms.
        let mut jobs: Vec<(u64, u32, u64)> = (0..50).map(|i| (1, i, 10)).collect();
        jobs.push((2, 100, 10));
        jobs.push((2, 101, 10));
        let done = simulate(1, &jobs, 1);
        assert!(done[&100] <= 45 * MS, "{}", done[&100]);
        assert!(done[&101] <= 45 * MS, "{}", done[&101]);
    }

    #[test]
    fn short_jobs_finish_first_within_a_connection() {
        let mut jobs: Vec<(u64, u32, u64)> = (0..8).map(|i| (1, i, 100)).collect();
        jobs.push((1, 99, 2));
        let done = simulate(1, &jobs, 1);
        // Least attained service: the 2 ms job finishes after at most 2 rounds
        // of the 8 long ones plus its own 2 slices.
        assert!(done[&99] <= 20 * MS, "{}", done[&99]);
    }

    #[test]
    fn newcomer_runs_ahead_of_a_flooder() {
        let mut q = RunQueue::new(1_000 * MS, T);
        // Group 1 has used 500 ms recently; group 2 is new.
        q.push(1, 0, 0, "flood", 0);
        let (g, _) = q.pop(0).unwrap();
        q.descheduled(g, 500 * MS, 0);
        q.push(1, 500 * MS, 0, "flood", 0);
        q.push(2, 0, 1, "new", 0);
        assert_eq!(q.pop(MS).map(|(_, j)| j), Some("new"));
        // Its claim recovers once it has waited: after many time constants the
        // flooder's usage has decayed to nothing.
        assert!(q.usage(1, 30_000 * MS) < 1.0);
    }

    #[test]
    fn equal_claims_go_round_robin() {
        let mut q = RunQueue::new(1_000 * MS, T);
        for g in 1..=3 {
            q.push(g, 0, g, g, 0);
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let (g, j) = q.pop(0).unwrap();
            order.push(j);
            q.descheduled(g, 0, 0);
            q.push(g, 0, j, j, 0);
        }
        assert_eq!(order.len(), 6);
        // Each group appears once in every window of three picks.
        for w in order.chunks(3) {
            let mut w = w.to_vec();
            w.sort();
            assert_eq!(w, vec![1, 2, 3]);
        }
    }

    #[test]
    fn no_job_starves() {
        // One long job and a stream of fresh short jobs in the same group:
        // the long one still gets picked because its wait ages it.
        let mut q = RunQueue::new(1_000 * MS, T);
        q.push(1, 10 * MS, 0, 0u32, 0);
        let mut now = 0;
        let mut picked_long = false;
        for i in 1..10_000u32 {
            q.push(1, 0, u64::from(i), i, now);
            let (g, j) = q.pop(now).unwrap();
            now += MS;
            q.descheduled(g, MS, now);
            if j == 0 {
                picked_long = true;
                break;
            }
        }
        assert!(picked_long);
    }

    #[test]
    fn idle_groups_are_forgotten() {
        let mut q = RunQueue::new(MS, T);
        for g in 0..200u64 {
            q.push(g, 0, g, g, 0);
            let (g, _) = q.pop(0).unwrap();
            q.descheduled(g, 1_000, 0);
        }
        q.push(999, 0, 999, 0, 10_000 * MS);
        let (g, _) = q.pop(10_000 * MS).unwrap();
        q.descheduled(g, 0, 10_000 * MS);
        assert!(q.groups() < 64, "{}", q.groups());
    }

    /// In simulated time: one connection has 200 jobs of 50 ms queued, a
    /// second sends a burst of 10 such jobs 100 ms later; on two workers the
    /// burst finishes within 2x of its solo time (250 ms). The threshold
    /// changes the order within each connection, not the share between them:
    /// the burst ends as it did under least attained service alone, and its
    /// median job earlier.
    #[test]
    fn a_burst_behind_a_flood_stays_within_twice_its_solo_time() {
        let mut jobs: Vec<SimJob> = (0..200).map(|i| (1, i, 50 * MS, 0)).collect();
        jobs.extend((1000..1010).map(|i| (2, i, 50 * MS, 100 * MS)));
        let burst = |threshold| {
            let (done, _) = simulate_arrivals(threshold, 2, 2 * MS, &jobs, u64::MAX);
            let mut ends: Vec<u64> = (1000..1010).map(|i| done[&i] - 100 * MS).collect();
            ends.sort_unstable();
            let makespan = (0..200).map(|i| done[&i]).max().unwrap_or(0);
            (ends[9] / MS, ends[4] / MS, makespan / MS)
        };
        let (took, median, makespan) = burst(T);
        let (las_took, las_median, las_makespan) = burst(u64::MAX);
        eprintln!(
            "burst: last {took} ms, median {median} ms, flood makespan {makespan} ms; \
             least attained service alone: {las_took}, {las_median}, {las_makespan} ms"
        );
        assert!(took <= 500, "the burst took {took} ms");
        assert!(
            took <= las_took + las_took / 10,
            "{took} against {las_took} ms"
        );
        assert!(median <= las_median, "{median} against {las_median} ms");
        assert_eq!(makespan, las_makespan, "the same work");
    }

    // ---- the ordered queue against the scan it replaces ----------------------

    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            let out = crate::builtin::splitmix64(self.0);
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            out
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n.max(1)
        }
        fn chance(&mut self, percent: u64) -> bool {
            self.below(100) < percent
        }
    }

    /// How a random sequence moves its clock.
    struct Clock {
        tau_ns: u64,
        /// Largest ordinary step between operations, in ns.
        step_ns: u64,
        /// Percent of clock steps that jump up to `jump_taus` time constants.
        jump_percent: u64,
        jump_taus: u64,
        /// Percent of pushes stamped up to 1 µs before the last clock reading
        /// (the pool reads the clock before taking the lock).
        late_push_percent: u64,
    }

    /// Why a sequence stopped before its end.
    #[derive(Debug)]
    enum Split {
        /// Different groups, whose decayed usages differ by at most `rel`.
        Groups { rel: f64 },
        /// The same group, different jobs, whose aged services differ by `ns64`
        /// 64ths of a ns.
        Jobs { ns64: i128 },
        /// Anything else: a real difference.
        Other(String),
    }

    /// Runs one random sequence of `ops` operations on the ordered queue and
    /// on the scan, comparing every pick, length, group count and usage.
    /// Returns the number of picks made and of groups forgotten, or where the
    /// picks first differed.
    fn side_by_side(seed: u64, ops: u32, arith: Arith, clock: &Clock) -> Result<(u64, u64), Split> {
        let mut rng = Rng(seed);
        let groups = 1 + rng.below(150);
        // Pure least attained service, or a threshold that about half the
        // pushes reach (attained is up to 10 ms plus what the slices add).
        let threshold = [u64::MAX, MS, 5 * MS, 9 * MS][rng.below(4) as usize];
        let mut new: RunQueue<u32> = RunQueue::new(clock.tau_ns, threshold);
        let mut old: ScanQueue<u32> = ScanQueue::new(clock.tau_ns, threshold, arith);
        // job id -> (group, attained, enqueued, submitted) of queued jobs
        let mut queued: HashMap<u32, (u64, u64, u64, u64)> = HashMap::new();
        // (group, id, attained, submitted)
        let mut running: Vec<(u64, u32, u64, u64)> = Vec::new();
        let (mut now, mut next_id, mut picks, mut forgot) = (0u64, 0u32, 0u64, 0u64);
        for _ in 0..ops {
            let groups_before = new.groups();
            match rng.below(100) {
                0..=34 => {
                    let g = rng.below(groups);
                    let attained = if rng.chance(50) {
                        0
                    } else {
                        rng.below(10_000_000)
                    };
                    let at = if rng.chance(clock.late_push_percent) {
                        now.saturating_sub(rng.below(1_000))
                    } else {
                        now
                    };
                    next_id += 1;
                    // Submission stamps: mostly increasing, some equal (ties
                    // go to the earlier push), some out of order.
                    let submitted = if rng.chance(20) {
                        rng.below(u64::from(next_id))
                    } else {
                        u64::from(next_id)
                    };
                    new.push(g, attained, submitted, next_id, at);
                    old.push(g, attained, submitted, next_id, at);
                    queued.insert(next_id, (g, attained, at, submitted));
                }
                35..=64 => {
                    let (a, b) = (new.pop(now), old.pop(now));
                    if a != b {
                        let (Some((ga, ja)), Some((gb, jb))) = (a, b) else {
                            return Err(Split::Other(format!("{a:?} against {b:?}")));
                        };
                        if ga != gb {
                            let (ua, ub) = (old.usage(ga, now), old.usage(gb, now));
                            let rel =
                                (ua - ub).abs() / ua.abs().max(ub.abs()).max(f64::MIN_POSITIVE);
                            return Err(Split::Groups { rel });
                        }
                        // A long job stands for its class (see the module doc).
                        let aged = |j: &u32| {
                            let (_, att, enq, _) = queued[j];
                            // The side that picked the short job still holds
                            // the class's stamp from before the pick.
                            let (att, enq) = if att >= threshold {
                                (threshold, new.long_served(ga).min(old.long_served(ga)))
                            } else {
                                (att, enq)
                            };
                            i128::from(att) * 64 - (i128::from(now) - i128::from(enq))
                        };
                        return Err(Split::Jobs {
                            ns64: aged(&ja) - aged(&jb),
                        });
                    }
                    if let Some((g, id)) = a {
                        let (_, attained, _, submitted) = queued.remove(&id).unwrap_or_default();
                        running.push((g, id, attained, submitted));
                        picks += 1;
                    }
                }
                65..=89 if !running.is_empty() => {
                    let (g, id, attained, submitted) =
                        running.swap_remove(rng.below(running.len() as u64) as usize);
                    let cpu = if rng.chance(10) {
                        0
                    } else {
                        rng.below(4_000_000)
                    };
                    new.descheduled(g, cpu, now);
                    old.descheduled(g, cpu, now);
                    if rng.chance(60) {
                        new.push(g, attained + cpu, submitted, id, now);
                        old.push(g, attained + cpu, submitted, id, now);
                        queued.insert(id, (g, attained + cpu, now, submitted));
                    }
                }
                90..=91 => {
                    // A charge the queue did not expect: it must stay consistent.
                    let g = rng.below(groups);
                    let cpu = rng.below(1_000_000);
                    new.descheduled(g, cpu, now);
                    old.descheduled(g, cpu, now);
                }
                _ => {
                    now += if rng.chance(clock.jump_percent) {
                        rng.below(clock.jump_taus * clock.tau_ns)
                    } else {
                        rng.below(clock.step_ns)
                    };
                }
            }
            new.check_invariants();
            forgot += groups_before.saturating_sub(new.groups()) as u64;
            if (new.len(), new.groups()) != (old.len(), old.groups()) {
                return Err(Split::Other(format!(
                    "len/groups {:?} against {:?}",
                    (new.len(), new.groups()),
                    (old.len(), old.groups())
                )));
            }
            // One group per operation: all of them would make the test slow.
            let g = rng.below(groups);
            let (a, b) = (new.usage(g, now), old.usage(g, now));
            if a.to_bits() != b.to_bits() {
                return Err(Split::Other(format!("usage of {g}: {a} against {b}")));
            }
        }
        // Drain: the remaining picks must agree too.
        loop {
            let (a, b) = (new.pop(now), old.pop(now));
            if a != b {
                return Err(Split::Other(format!("drain: {a:?} against {b:?}")));
            }
            if a.is_none() {
                return Ok((picks, forgot));
            }
            picks += 1;
        }
    }

    /// With the same arithmetic, the ordered structures make exactly the
    /// scan's picks: over wide clocks (jumps of hundreds of time constants,
    /// where `exp` underflows), late pushes, unexpected charges, forgetting.
    #[test]
    fn same_picks_as_the_scan_with_the_same_keys() {
        let (mut picks, mut forgot) = (0, 0);
        for (i, tau) in [1_000u64, MS, 1_000 * MS, 7_777_777]
            .into_iter()
            .enumerate()
        {
            let clock = Clock {
                tau_ns: tau,
                step_ns: 3 * MS,
                jump_percent: 5,
                jump_taus: 1_000,
                late_push_percent: 10,
            };
            for seed in 0..60 {
                match side_by_side(seed * 4 + i as u64, 1_500, Arith::Log, &clock) {
                    Ok((n, f)) => (picks, forgot) = (picks + n, forgot + f),
                    Err(Split::Other(why)) => panic!("tau {tau} seed {seed}: {why}"),
                    Err(e) => panic!("tau {tau} seed {seed}: {e:?}"),
                }
            }
        }
        assert!(picks > 100_000, "{picks}");
        assert!(forgot > 1_000, "{forgot}");
    }

    /// Against the original arithmetic (`exp` at the time of the pick, wait
    /// credit in whole 64 ns) on clocks that stay within a few hundred time
    /// constants: the picks agree, and a sequence may only part on a near-tie
    /// that rounding decides (usages within 1e-9 of each other, or jobs within
    /// one 64 ns quantum of wait credit).
    #[test]
    fn same_picks_as_the_original_scan() {
        let (mut picks, mut parted, mut runs) = (0, 0, 0);
        for tau in [MS, 1_000 * MS] {
            let clock = Clock {
                tau_ns: tau,
                step_ns: tau / 4,
                jump_percent: 1,
                jump_taus: 3,
                late_push_percent: 0,
            };
            for seed in 0..100 {
                runs += 1;
                match side_by_side(1_000 + seed, 1_500, Arith::Exp, &clock) {
                    Ok((n, _)) => picks += n,
                    Err(Split::Groups { rel }) if rel <= 1e-9 => parted += 1,
                    Err(Split::Jobs { ns64 }) if ns64.abs() < 64 => parted += 1,
                    Err(Split::Other(why)) => panic!("tau {tau} seed {seed}: {why}"),
                    Err(e) => panic!("tau {tau} seed {seed}: {e:?}"),
                }
            }
        }
        eprintln!("{runs} sequences, {picks} picks, {parted} parted on a near-tie");
        assert!(
            parted * 20 <= runs,
            "{parted} of {runs} sequences parted on a near-tie"
        );
        assert!(picks > 50_000, "{picks}");
    }

    /// The key itself: for random usages and times, `ln u + t/τ` orders like
    /// the decayed usage computed with `exp` at a later time, except where the
    /// two decayed usages are within rounding of each other.
    #[test]
    fn claims_order_like_decayed_usage() {
        let mut rng = Rng(7);
        let tau = 1_000.0 * MS as f64;
        let decayed = |u: f64, t: u64, now: u64| u * (-((now - t) as f64) / tau).exp();
        let mut compared = 0;
        for _ in 0..200_000 {
            let usage = |rng: &mut Rng| match rng.below(10) {
                0 => 0.0,
                1 => 1_000.0,
                _ => rng.below(10_000_000_000) as f64,
            };
            let (u1, u2) = (usage(&mut rng), usage(&mut rng));
            let t1 = rng.below(100_000 * MS);
            let t2 = if rng.chance(20) {
                t1
            } else {
                rng.below(100_000 * MS)
            };
            let now = t1.max(t2) + rng.below(300_000 * MS);
            let (d1, d2) = (decayed(u1, t1, now), decayed(u2, t2, now));
            let (k1, k2) = (Claim::of(u1, t1, tau), Claim::of(u2, t2, tau));
            let gap = (d1 - d2).abs() / d1.max(d2).max(f64::MIN_POSITIVE);
            if gap > 1e-9 {
                assert_eq!(
                    d1.partial_cmp(&d2),
                    Some(k1.cmp(&k2)),
                    "{u1}@{t1} {u2}@{t2} now {now}"
                );
                compared += 1;
            } else if d1 == 0.0 && d2 == 0.0 && u1 == 0.0 && u2 == 0.0 {
                assert_eq!(k1, k2);
            }
            if u1 == u2 && t1 == t2 {
                assert_eq!(k1, k2);
            }
        }
        assert!(compared > 150_000, "{compared}");
    }

    /// Forgetting looks only at the front of the idle groups, yet forgets every
    /// group that has decayed away, and none that has work.
    #[test]
    fn forgetting_keeps_only_groups_with_work_or_recent_usage() {
        let mut q = RunQueue::new(MS, T);
        // 100 groups run once and go idle with different usages; 10 keep a job.
        for g in 0..110u64 {
            q.push(g, 0, g, g, 0);
            let (g, _) = q.pop(0).unwrap();
            q.descheduled(g, 2_000 + g * 1_000_000, 0);
            if g >= 100 {
                q.push(g, 0, g, g, 0);
            }
        }
        q.check_invariants();
        assert_eq!(q.groups(), 110);
        // 8 time constants later, usages below ~3 ms have decayed under 1 µs
        // (groups 0 to 2).
        q.push(500, 0, 500, 500, 8 * MS);
        let (g, _) = q.pop(8 * MS).unwrap();
        q.descheduled(g, MS, 8 * MS);
        q.check_invariants();
        for g in 0..110u64 {
            let kept = q.usage(g, 8 * MS) > 0.0;
            if g >= 100 {
                assert!(kept, "group {g} has a job queued");
            } else {
                assert_eq!(kept, q.usage(g, 8 * MS) > 1_000.0);
            }
        }
        assert!(q.groups() < 110 && q.groups() > 11, "{}", q.groups());
        assert_eq!(q.len(), 10);
    }
}
