//! The run queue as it was first written, kept as a reference: every decision
//! scans every group (a decay per group) and every job of the chosen group, so
//! one decision costs O(groups + jobs of a group).
//!
//! Two users: the differential tests in `queue.rs` (the ordered [`RunQueue`]
//! must pick exactly what this scan picks), and `benches/scheduler.rs` (the
//! baseline of the same run). It depends on `std` only, because the bench
//! includes this file as a module of its own.
//!
//! [`Arith`] chooses how the scan compares:
//! - [`Arith::Exp`] is the original arithmetic, verbatim: a group's decayed
//!   usage `u·e^-(now-t)/τ` compared as an `f64` at the time of the pick, a
//!   job's wait credited in whole multiples of 64 ns (`wait / 64`, rounded
//!   down) and clamped at zero.
//! - [`Arith::Log`] is the same order in the time-invariant form the ordered
//!   queue keys on: `ln u + t/τ` for a group (`-inf` for `u = 0`), and the exact
//!   credit `64·attained - wait` for a job. In exact arithmetic both forms give
//!   the same order; in floating point they can differ only on a near-tie that
//!   rounding decides (and where `u·e^-x` underflows to 0 after hundreds of
//!   time constants, where `Exp` calls unequal usages equal).
//!
//! The two classes of a connection's jobs (short below the threshold, long at
//! or past it; see `queue.rs`) are scanned the same way: the short job with the
//! least aged service, the long job submitted first, and the long one only if
//! its class, aged as one job that has used the threshold and waited since the
//! class last ran, is ahead of the short one (in `Exp`, in whole 64 ns of wait
//! credit, like a short job).
//!
//! One change from the original in both modes: groups that tie on usage and on
//! their round-robin stamp (only groups never picked yet, stamp 0) were taken
//! in `HashMap` iteration order, which is random; here, and in [`RunQueue`],
//! the one created first goes first.
//!
//! [`RunQueue`]: super::RunQueue

#![allow(dead_code)]

use std::collections::HashMap;

/// How the scan compares groups and jobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arith {
    /// The original arithmetic (decayed usage with `exp`, wait credit in whole 64 ns).
    Exp,
    /// The time-invariant keys of the ordered queue, compared by a scan.
    Log,
}

const AGING_DIVISOR: u64 = 64;
const FORGET_BELOW_NS: f64 = 1_000.0;

struct Entry<T> {
    attained_ns: u64,
    enqueued_ns: u64,
    submitted: u64,
    /// At or past the threshold when pushed.
    long: bool,
    seq: u64,
    item: T,
}

struct Group<T> {
    usage: f64,
    usage_at_ns: u64,
    last_pick: u64,
    created: u64,
    running: usize,
    /// When the long class last ran or, if later, last became non-empty.
    long_served_ns: u64,
    jobs: Vec<Entry<T>>,
}

impl<T> Group<T> {
    fn decayed(&self, now_ns: u64, tau_ns: f64) -> f64 {
        let dt = now_ns.saturating_sub(self.usage_at_ns) as f64;
        self.usage * (-dt / tau_ns).exp()
    }

    fn log_key(&self, tau_ns: f64) -> f64 {
        if self.usage > 0.0 {
            self.usage.ln() + self.usage_at_ns as f64 / tau_ns
        } else {
            f64::NEG_INFINITY
        }
    }

    fn charge(&mut self, cpu_ns: u64, now_ns: u64, tau_ns: f64) {
        self.usage = self.decayed(now_ns, tau_ns) + cpu_ns as f64;
        self.usage_at_ns = now_ns;
    }
}

/// The scanning run queue; the same interface as [`RunQueue`](super::RunQueue).
pub struct ScanQueue<T> {
    groups: HashMap<u64, Group<T>>,
    tau_ns: f64,
    threshold_ns: u64,
    arith: Arith,
    picks: u64,
    seq: u64,
    len: usize,
}

impl<T> ScanQueue<T> {
    /// An empty queue whose group usage decays with time constant `tau_ns`,
    /// and whose jobs are long once they have used `threshold_ns`.
    pub fn new(tau_ns: u64, threshold_ns: u64, arith: Arith) -> Self {
        ScanQueue {
            groups: HashMap::new(),
            tau_ns: tau_ns.max(1) as f64,
            threshold_ns,
            arith,
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

    /// Groups the queue keeps state for.
    pub fn groups(&self) -> usize {
        self.groups.len()
    }

    /// Makes a job runnable. `attained_ns` is the CPU it has used so far,
    /// `submitted` its submission stamp.
    pub fn push(&mut self, group: u64, attained_ns: u64, submitted: u64, item: T, now_ns: u64) {
        self.seq += 1;
        let seq = self.seq;
        let g = self.groups.entry(group).or_insert_with(|| Group {
            usage: 0.0,
            usage_at_ns: now_ns,
            last_pick: 0,
            created: seq,
            running: 0,
            long_served_ns: now_ns,
            jobs: Vec::new(),
        });
        let long = attained_ns >= self.threshold_ns;
        if long && !g.jobs.iter().any(|e| e.long) {
            g.long_served_ns = g.long_served_ns.max(now_ns);
        }
        g.jobs.push(Entry {
            attained_ns,
            enqueued_ns: now_ns,
            submitted,
            long,
            seq,
            item,
        });
        self.len += 1;
    }

    /// Takes the next job to run, with its group.
    pub fn pop(&mut self, now_ns: u64) -> Option<(u64, T)> {
        let tau = self.tau_ns;
        let arith = self.arith;
        let mut best: Option<(u64, f64, u64, u64)> = None;
        for (&id, g) in &self.groups {
            if g.jobs.is_empty() {
                continue;
            }
            let usage = match arith {
                Arith::Exp => g.decayed(now_ns, tau),
                Arith::Log => g.log_key(tau),
            };
            let better = match best {
                None => true,
                Some((_, bu, bp, bc)) => {
                    usage < bu
                        || (usage == bu
                            && (g.last_pick < bp || (g.last_pick == bp && g.created < bc)))
                }
            };
            if better {
                best = Some((id, usage, g.last_pick, g.created));
            }
        }
        let (id, _, _, _) = best?;
        self.picks += 1;
        let picks = self.picks;
        let g = self.groups.get_mut(&id)?;
        let aged = |attained: u64, since: u64| match arith {
            Arith::Exp => {
                let waited = now_ns.saturating_sub(since) / AGING_DIVISOR;
                attained as i128 - waited as i128
            }
            Arith::Log => {
                attained as i128 * AGING_DIVISOR as i128 - (now_ns as i128 - since as i128)
            }
        };
        let short = g
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.long)
            .min_by_key(|(_, e)| (aged(e.attained_ns, e.enqueued_ns), e.seq))
            .map(|(i, e)| (i, aged(e.attained_ns, e.enqueued_ns)));
        let long = g
            .jobs
            .iter()
            .enumerate()
            .filter(|(_, e)| e.long)
            .min_by_key(|(_, e)| (e.submitted, e.seq))
            .map(|(i, _)| i);
        let idx = match (short, long) {
            (Some((s, key)), Some(l)) => {
                if key > aged(self.threshold_ns, g.long_served_ns) {
                    g.long_served_ns = now_ns;
                    l
                } else {
                    s
                }
            }
            (Some((s, _)), None) => s,
            (None, Some(l)) => {
                g.long_served_ns = now_ns;
                l
            }
            (None, None) => return None,
        };
        let entry = g.jobs.swap_remove(idx);
        g.last_pick = picks;
        g.running += 1;
        self.len -= 1;
        Some((id, entry.item))
    }

    /// A job popped from `group` left its worker after using `cpu_ns`.
    pub fn descheduled(&mut self, group: u64, cpu_ns: u64, now_ns: u64) {
        let tau = self.tau_ns;
        if let Some(g) = self.groups.get_mut(&group) {
            g.charge(cpu_ns, now_ns, tau);
            g.running = g.running.saturating_sub(1);
        }
        self.forget_idle(now_ns);
    }

    /// Decayed usage of a group, in ns.
    pub fn usage(&self, group: u64, now_ns: u64) -> f64 {
        self.groups
            .get(&group)
            .map(|g| g.decayed(now_ns, self.tau_ns))
            .unwrap_or(0.0)
    }

    /// When the long class of `group` last ran (0 for an unknown group).
    pub fn long_served(&self, group: u64) -> u64 {
        self.groups.get(&group).map_or(0, |g| g.long_served_ns)
    }

    fn forget_idle(&mut self, now_ns: u64) {
        if self.groups.len() < 64 {
            return;
        }
        let tau = self.tau_ns;
        let arith = self.arith;
        let log_limit = FORGET_BELOW_NS.ln() + now_ns as f64 / tau;
        self.groups.retain(|_, g| {
            !g.jobs.is_empty()
                || g.running > 0
                || match arith {
                    Arith::Exp => g.decayed(now_ns, tau) > FORGET_BELOW_NS,
                    Arith::Log => g.log_key(tau) > log_limit,
                }
        });
    }
}
