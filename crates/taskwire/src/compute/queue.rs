//! The scheduling policy, as a pure data structure with an explicit clock, so
//! that it can be tested deterministically without threads.
//!
//! Two steps pick the next job:
//! 1. the *group* (a connection) with the least recently attained CPU service:
//!    its usage decays exponentially (time constant `tau`), so a group that has
//!    just arrived runs ahead of one that has been flooding, and a flooder's
//!    claim recovers once it has waited. Equal claims go round-robin.
//! 2. within that group, the job with the least attained service, aged by its
//!    wait so that no job starves however many short jobs keep arriving.

use std::collections::HashMap;

/// How much a job's waiting time counts against its attained service.
/// 64 means a job that has waited 64 ms is treated as if it had used 1 ms less:
/// weak enough that new short jobs still run first, strong enough that every
/// job is eventually picked.
const AGING_DIVISOR: u64 = 64;

struct Entry<T> {
    attained_ns: u64,
    enqueued_ns: u64,
    seq: u64,
    item: T,
}

struct Group<T> {
    /// Decayed CPU usage in ns, as of `usage_at_ns`.
    usage: f64,
    usage_at_ns: u64,
    /// Round-robin stamp: the pick counter when this group last ran.
    last_pick: u64,
    /// Jobs of this group currently on a worker.
    running: usize,
    jobs: Vec<Entry<T>>,
}

impl<T> Group<T> {
    fn decayed(&self, now_ns: u64, tau_ns: f64) -> f64 {
        let dt = now_ns.saturating_sub(self.usage_at_ns) as f64;
        self.usage * (-dt / tau_ns).exp()
    }

    fn charge(&mut self, cpu_ns: u64, now_ns: u64, tau_ns: f64) {
        self.usage = self.decayed(now_ns, tau_ns) + cpu_ns as f64;
        self.usage_at_ns = now_ns;
    }
}

/// A run queue of jobs grouped by connection. `T` is the job (a runnable).
pub struct RunQueue<T> {
    groups: HashMap<u64, Group<T>>,
    tau_ns: f64,
    picks: u64,
    seq: u64,
    len: usize,
}

impl<T> RunQueue<T> {
    /// An empty queue whose group usage decays with time constant `tau_ns`.
    pub fn new(tau_ns: u64) -> Self {
        RunQueue {
            groups: HashMap::new(),
            tau_ns: tau_ns.max(1) as f64,
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

    /// Makes a job runnable. `attained_ns` is the CPU it has used so far.
    pub fn push(&mut self, group: u64, attained_ns: u64, item: T, now_ns: u64) {
        let g = self.groups.entry(group).or_insert_with(|| Group {
            usage: 0.0,
            usage_at_ns: now_ns,
            last_pick: 0,
            running: 0,
            jobs: Vec::new(),
        });
        self.seq += 1;
        g.jobs.push(Entry {
            attained_ns,
            enqueued_ns: now_ns,
            seq: self.seq,
            item,
        });
        self.len += 1;
    }

    /// Takes the next job to run, with its group; the group counts it as running
    /// until [`RunQueue::descheduled`].
    pub fn pop(&mut self, now_ns: u64) -> Option<(u64, T)> {
        let tau = self.tau_ns;
        let mut best: Option<(u64, f64, u64)> = None;
        for (&id, g) in &self.groups {
            if g.jobs.is_empty() {
                continue;
            }
            let usage = g.decayed(now_ns, tau);
            let better = match best {
                None => true,
                Some((_, bu, bp)) => usage < bu || (usage == bu && g.last_pick < bp),
            };
            if better {
                best = Some((id, usage, g.last_pick));
            }
        }
        let (id, _, _) = best?;
        self.picks += 1;
        let picks = self.picks;
        let g = self.groups.get_mut(&id)?;
        let idx = g
            .jobs
            .iter()
            .enumerate()
            .min_by_key(|(_, e)| {
                let waited = now_ns.saturating_sub(e.enqueued_ns) / AGING_DIVISOR;
                (e.attained_ns as i128 - waited as i128, e.seq)
            })
            .map(|(i, _)| i)?;
        let entry = g.jobs.swap_remove(idx);
        g.last_pick = picks;
        g.running += 1;
        self.len -= 1;
        Some((id, entry.item))
    }

    /// A job popped from `group` left its worker after using `cpu_ns`; it is
    /// charged to the group. Pushing it again (if it yielded) is separate.
    pub fn descheduled(&mut self, group: u64, cpu_ns: u64, now_ns: u64) {
        let tau = self.tau_ns;
        if let Some(g) = self.groups.get_mut(&group) {
            g.charge(cpu_ns, now_ns, tau);
            g.running = g.running.saturating_sub(1);
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
        // Only when the map has grown: the scan is O(groups).
        if self.groups.len() < 64 {
            return;
        }
        let tau = self.tau_ns;
        self.groups
            .retain(|_, g| !g.jobs.is_empty() || g.running > 0 || g.decayed(now_ns, tau) > 1_000.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Runs the queue like a pool of `workers` with fixed slices, recording
    /// when each job finishes. Jobs are (group, id, total cpu ms).
    fn simulate(workers: usize, jobs: &[(u64, u32, u64)], slice_ms: u64) -> HashMap<u32, u64> {
        let mut q = RunQueue::new(1_000 * MS);
        let mut left: HashMap<u32, (u64, u64)> = HashMap::new(); // id -> (remaining, attained)
        for &(g, id, ms) in jobs {
            q.push(g, 0, id, 0);
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
                    q.push(g, att + used, id, now);
                } else {
                    done.insert(id, now);
                }
            }
        }
        done
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
        let mut q = RunQueue::new(1_000 * MS);
        // Group 1 has used 500 ms recently; group 2 is new.
        q.push(1, 0, "flood", 0);
        let (g, _) = q.pop(0).unwrap();
        q.descheduled(g, 500 * MS, 0);
        q.push(1, 500 * MS, "flood", 0);
        q.push(2, 0, "new", 0);
        assert_eq!(q.pop(MS).map(|(_, j)| j), Some("new"));
        // Its claim recovers once it has waited: after many time constants the
        // flooder's usage has decayed to nothing.
        assert!(q.usage(1, 30_000 * MS) < 1.0);
    }

    #[test]
    fn equal_claims_go_round_robin() {
        let mut q = RunQueue::new(1_000 * MS);
        for g in 1..=3 {
            q.push(g, 0, g, 0);
        }
        let mut order = Vec::new();
        for _ in 0..6 {
            let (g, j) = q.pop(0).unwrap();
            order.push(j);
            q.descheduled(g, 0, 0);
            q.push(g, 0, j, 0);
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
        let mut q = RunQueue::new(1_000 * MS);
        q.push(1, 10 * MS, 0u32, 0);
        let mut now = 0;
        let mut picked_long = false;
        for i in 1..10_000u32 {
            q.push(1, 0, i, now);
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
        let mut q = RunQueue::new(MS);
        for g in 0..200u64 {
            q.push(g, 0, g, 0);
            let (g, _) = q.pop(0).unwrap();
            q.descheduled(g, 1_000, 0);
        }
        q.push(999, 0, 0, 10_000 * MS);
        let (g, _) = q.pop(10_000 * MS).unwrap();
        q.descheduled(g, 0, 10_000 * MS);
        assert!(q.groups() < 64, "{}", q.groups());
    }

    /// The target 2, in simulated time: one connection has 200 jobs of
    /// 50 ms queued, a second sends a burst of 10 such jobs 100 ms later; on
    /// two workers the burst finishes within 2x of its solo time (250 ms).
    #[test]
    fn a_burst_behind_a_flood_stays_within_twice_its_solo_time() {
        let mut q = RunQueue::new(1_000 * MS);
        let mut left = HashMap::new();
        for i in 0..200u32 {
            q.push(1, 0, i, 0);
            left.insert(i, (50 * MS, 0u64));
        }
        let (mut now, mut arrived, mut done, mut end) = (0, false, 0, 0);
        while done < 10 {
            if !arrived && now >= 100 * MS {
                for i in 1000..1010u32 {
                    q.push(2, 0, i, now);
                    left.insert(i, (50 * MS, 0));
                }
                arrived = true;
            }
            let batch: Vec<_> = (0..2).filter_map(|_| q.pop(now)).collect();
            now += 2 * MS;
            for (g, id) in batch {
                let (rem, att) = left[&id];
                let used = rem.min(2 * MS);
                q.descheduled(g, used, now);
                if rem > used {
                    left.insert(id, (rem - used, att + used));
                    q.push(g, att + used, id, now);
                } else if g == 2 {
                    done += 1;
                    end = now;
                }
            }
        }
        let took = end - 100 * MS;
        assert!(took <= 500 * MS, "the burst took {} ms", took / MS);
    }
}
