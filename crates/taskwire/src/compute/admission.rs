//! Admission: whether a CPU job may be queued at all, and for how long to
//! tell a refused client to wait.
//!
//! A [`Permit`] holds one slot of each count a job is bounded by: its
//! connection's (`per_connection_limit`), its client address's
//! (`address_cpu_limit`, IPv6 grouped by /64, so that one address flooding
//! from many connections cannot take every slot), and the pool's
//! (`queue_limit`). The permit travels with the job's future
//! ([`Permitted`]), so every slot comes back when the future is dropped,
//! whether it finished, failed or was cancelled. While the process is over
//! its memory budget no job is admitted at all.
//!
//! Depends on [`crate::limit`] for the counts and on no other part of the pool.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::limit::{Keyed, KeyedSlot, Slot};

/// Bounds of the retry hints: soon enough to be worth a retry, and never
/// longer than a client can be expected to wait and come back.
pub(super) const RETRY_MIN_MS: u64 = 50;
pub(super) const RETRY_MAX_MS: u64 = 30_000;

/// How often the watchdog refreshes the memory figures (and so the budget
/// flag that refuses jobs): a memory refusal's hint is never shorter.
pub(super) const MEMORY_SAMPLE_MS: u64 = 100;

/// Why the pool refused a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The connection already has `per_connection_limit` CPU tasks.
    #[error("the connection has too many CPU tasks queued")]
    ConnectionQueue {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The client's address already has `address_cpu_limit` CPU tasks.
    #[error("the client address has too many CPU tasks queued")]
    AddressLimit {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The pool already has `queue_limit` CPU tasks.
    #[error("the compute queue is full")]
    QueueFull {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The process is over its memory budget.
    #[error("the server is over its memory budget")]
    Memory {
        /// A hint for when to retry.
        retry_after_ms: u64,
    },
    /// The pool is shutting down.
    #[error("the compute pool is shutting down")]
    ShuttingDown,
}

impl Refusal {
    /// The `reason` the protocol sends.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::ConnectionQueue { .. } => "connection_queue",
            Refusal::AddressLimit { .. } => "address_limit",
            Refusal::QueueFull { .. } => "queue_full",
            Refusal::Memory { .. } => "memory",
            Refusal::ShuttingDown => "shutting_down",
        }
    }
    /// The `retryAfterMs` hint.
    pub fn retry_after_ms(&self) -> u64 {
        match self {
            Refusal::ConnectionQueue { retry_after_ms }
            | Refusal::AddressLimit { retry_after_ms }
            | Refusal::QueueFull { retry_after_ms }
            | Refusal::Memory { retry_after_ms } => *retry_after_ms,
            Refusal::ShuttingDown => 1_000,
        }
    }
}

/// What is kept about one client address while it holds CPU slots, for its
/// retry hint.
#[derive(Debug)]
pub(super) struct AddressEntry {
    /// When the address took its first slot held now.
    since: Instant,
    /// Jobs of this address that ended since then.
    ended: u64,
}

impl Default for AddressEntry {
    /// An entry is made when its address takes a first slot: now.
    fn default() -> Self {
        AddressEntry {
            since: Instant::now(),
            ended: 0,
        }
    }
}

impl AddressEntry {
    /// How long until one of the address's jobs can be expected to end: the
    /// mean time between its jobs' ends since it began holding slots, or, if
    /// none has ended yet, as long again as it has held them (the longer it
    /// holds, the longer the hint).
    fn hint(&self) -> u64 {
        let held = self.since.elapsed().as_millis() as u64;
        (held / self.ended.max(1)).clamp(RETRY_MIN_MS, RETRY_MAX_MS)
    }
}

/// An admission: the right to run one CPU job, released when dropped.
#[derive(Debug)]
pub(crate) struct Permit {
    // Field order is drop order; no order matters between independent counts.
    _connection: Slot,
    address: Option<KeyedSlot<IpAddr, AddressEntry>>,
    _pool: Slot,
    /// The pool's count of ended jobs, for its completion rate.
    ended: Arc<AtomicU64>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        // A job that ran ends here; an admission undone before its permit was
        // made never reaches this, so it counts no end.
        if let Some(a) = &mut self.address {
            a.on_release(|e| e.ended = e.ended.saturating_add(1));
        }
        self.ended.fetch_add(1, Ordering::Relaxed);
    }
}

/// The pool's admission counts and limits.
#[derive(Debug)]
pub(super) struct Admission {
    per_connection: usize,
    per_address: usize,
    total: usize,
    admitted: Arc<AtomicUsize>,
    /// Admitted jobs per client address group; an entry lives while its
    /// address holds a slot, so there are never more entries than admitted jobs.
    addresses: Arc<Keyed<IpAddr, AddressEntry>>,
    /// Permits released, ever; sampled into `completion_rate`.
    ended: Arc<AtomicU64>,
    /// Jobs finished per second, as f64 bits (one writer: the watchdog).
    completion_rate: AtomicU64,
}

/// What [`Admission::sample_rate`] keeps between its calls.
#[derive(Debug, Default)]
pub(super) struct RateMark(u64);

impl Admission {
    pub(super) fn new(per_connection: usize, per_address: usize, total: usize) -> Admission {
        Admission {
            per_connection,
            per_address,
            total,
            admitted: Arc::default(),
            addresses: Arc::default(),
            ended: Arc::default(),
            completion_rate: AtomicU64::new(0),
        }
    }

    /// Admits one more job for a group whose admitted count is `group`, from
    /// the client address group `address` if any.
    ///
    /// Checked in this order, the most specific first so that a flooder learns
    /// that the limit is its own: shutdown, memory budget, the connection's
    /// limit, the address's limit, the pool's limit. A refusal gives back every
    /// slot it took (by dropping it).
    pub(super) fn admit(
        &self,
        group: &Arc<AtomicUsize>,
        address: Option<IpAddr>,
        shutting_down: bool,
        over_memory: bool,
    ) -> Result<Permit, Refusal> {
        if shutting_down {
            return Err(Refusal::ShuttingDown);
        }
        if over_memory {
            // Memory comes back when tasks end: not before the next one does,
            // nor before the next sample of the budget.
            return Err(Refusal::Memory {
                retry_after_ms: self.completion_hint().max(MEMORY_SAMPLE_MS * 10),
            });
        }
        let connection =
            Slot::acquire(group, self.per_connection).ok_or_else(|| Refusal::ConnectionQueue {
                retry_after_ms: self.completion_hint(),
            })?;
        let address = match address {
            Some(a) => Some(
                Keyed::acquire_or(&self.addresses, a, self.per_address, AddressEntry::hint)
                    .map_err(|retry_after_ms| Refusal::AddressLimit { retry_after_ms })?,
            ),
            None => None,
        };
        let pool = Slot::acquire(&self.admitted, self.total).ok_or_else(|| Refusal::QueueFull {
            retry_after_ms: self.completion_hint(),
        })?;
        Ok(Permit {
            _connection: connection,
            address,
            _pool: pool,
            ended: self.ended.clone(),
        })
    }

    /// Jobs admitted and not finished.
    pub(super) fn admitted(&self) -> usize {
        self.admitted.load(Ordering::Relaxed)
    }

    /// Client addresses holding admitted jobs now.
    pub(super) fn addresses(&self) -> usize {
        self.addresses.len()
    }

    /// Jobs finished per second, recently.
    pub(super) fn completion_rate(&self) -> f64 {
        f64::from_bits(self.completion_rate.load(Ordering::Relaxed))
    }

    /// How long until some admitted job ends, at the rate jobs have been
    /// ending lately (the watchdog's average over about a second): when
    /// nothing ends (every slot held by tasks that run on), the longest hint.
    fn completion_hint(&self) -> u64 {
        let rate = self.completion_rate();
        if rate <= 0.0 {
            return RETRY_MAX_MS;
        }
        ((1000.0 / rate) as u64).clamp(RETRY_MIN_MS, RETRY_MAX_MS)
    }

    /// Folds the jobs ended over the last quarter second into the completion
    /// rate, averaged with the past so that the rate spans about a second.
    /// Called by the watchdog, every quarter second.
    pub(super) fn sample_rate(&self, mark: &mut RateMark) {
        let ended = self.ended.load(Ordering::Relaxed);
        let now_rate = ended.saturating_sub(mark.0) as f64 * 4.0;
        mark.0 = ended;
        let rate = 0.75 * self.completion_rate() + 0.25 * now_rate;
        let rate = if rate < 0.01 { 0.0 } else { rate };
        self.completion_rate
            .store(rate.to_bits(), Ordering::Relaxed);
    }
}

pin_project_lite::pin_project! {
    /// A job's future with its admission: the permit is released when the
    /// future is dropped, whether it finished or was cancelled; then the job
    /// is marked as ended, so that its worker does not count it as waiting.
    pub(super) struct Permitted<F> {
        pub(super) _permit: Option<Permit>,
        #[pin]
        pub(super) fut: F,
        pub(super) _ends: super::stats::EndsJob,
    }
}

impl<F: Future> Future for Permitted<F> {
    type Output = F::Output;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let out = self.project().fut.poll(cx);
        if out.is_ready() {
            super::worker::job_finished();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limit::address_group;

    fn admit(a: &Admission, g: &Arc<AtomicUsize>) -> Result<Permit, Refusal> {
        a.admit(g, None, false, false)
    }
    fn admit_from(a: &Admission, g: &Arc<AtomicUsize>, ip: IpAddr) -> Result<Permit, Refusal> {
        a.admit(g, Some(address_group(ip)), false, false)
    }

    #[test]
    fn admission_limits() {
        let p = Admission::new(2, 2_560, 3);
        let a = Arc::new(AtomicUsize::new(0));
        let b = Arc::new(AtomicUsize::new(0));
        let p1 = admit(&p, &a).unwrap();
        let _p2 = admit(&p, &a).unwrap();
        assert!(matches!(
            admit(&p, &a),
            Err(Refusal::ConnectionQueue { .. })
        ));
        let _p3 = admit(&p, &b).unwrap();
        let e = admit(&p, &b).unwrap_err();
        assert_eq!(e.reason(), "queue_full");
        assert!(e.retry_after_ms() >= 50);
        drop(p1);
        assert!(admit(&p, &b).is_ok());
    }

    #[test]
    fn shutdown_and_memory_come_first() {
        let p = Admission::new(1, 1, 1);
        let g = Arc::new(AtomicUsize::new(0));
        let e = p.admit(&g, None, true, true).unwrap_err();
        assert_eq!(e, Refusal::ShuttingDown);
        let e = p.admit(&g, None, false, true).unwrap_err();
        assert_eq!(e.reason(), "memory");
        assert!(e.retry_after_ms() >= MEMORY_SAMPLE_MS * 10);
        assert_eq!(g.load(Ordering::Acquire), 0, "a refusal takes nothing");
        assert_eq!(p.admitted(), 0);
    }

    #[test]
    fn one_address_takes_at_most_its_share() {
        let p = Admission::new(2, 5, 100);
        let flooder: IpAddr = "192.0.2.7".parse().unwrap();
        // Many connections from one address: 5 admitted in all, then refused.
        let conns: Vec<_> = (0..4).map(|_| Arc::new(AtomicUsize::new(0))).collect();
        let mut held = Vec::new();
        let mut refused = Vec::new();
        for c in &conns {
            for _ in 0..2 {
                match admit_from(&p, c, flooder) {
                    Ok(permit) => held.push(permit),
                    Err(e) => refused.push(e),
                }
            }
        }
        assert_eq!(held.len(), 5);
        assert_eq!(refused.len(), 3);
        for e in &refused {
            assert_eq!(e.reason(), "address_limit");
            assert!((RETRY_MIN_MS..=RETRY_MAX_MS).contains(&e.retry_after_ms()));
        }
        // A refusal gives back what it took: the connection's own count.
        let counted: usize = conns.iter().map(|c| c.load(Ordering::Acquire)).sum();
        assert_eq!(counted, 5);
        // A newcomer from another address is admitted; so is the same /64's
        // neighbour only up to the /64's share.
        let other = Arc::new(AtomicUsize::new(0));
        let newcomer = admit_from(&p, &other, "198.51.100.1".parse().unwrap()).unwrap();
        let v6 = Arc::new(AtomicUsize::new(0));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let v6_permits: Vec<_> = (0..5)
            .map(|i| {
                let c = Arc::new(AtomicUsize::new(0));
                admit_from(&p, &c, if i % 2 == 0 { a } else { b }).unwrap()
            })
            .collect();
        assert_eq!(
            admit_from(&p, &v6, b).unwrap_err().reason(),
            "address_limit",
            "one /64 is one address"
        );
        assert!(admit_from(&p, &v6, "2001:db8:1:3::1".parse().unwrap()).is_ok());
        assert_eq!(p.addresses(), 3, "an entry per address with jobs");
        // The table forgets an address when its last job ends.
        drop(held);
        drop(v6_permits);
        assert_eq!(p.addresses(), 1);
        drop(newcomer);
        assert_eq!(p.addresses(), 0, "bounded: no entry without a job");
        assert_eq!(p.admitted(), 0);
        // Once its jobs ended, the flooder is admitted again.
        assert!(admit_from(&p, &conns[0], flooder).is_ok());
    }

    #[test]
    fn the_pool_limit_undoes_the_address_count() {
        let p = Admission::new(256, 10, 2);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let g = Arc::new(AtomicUsize::new(0));
        let _a = admit_from(&p, &g, ip).unwrap();
        let _b = admit_from(&p, &g, "192.0.2.2".parse().unwrap()).unwrap();
        let e = admit_from(&p, &g, ip).unwrap_err();
        assert_eq!(e.reason(), "queue_full");
        // Nothing ends: the hint says so with its longest value.
        assert_eq!(e.retry_after_ms(), RETRY_MAX_MS);
        assert_eq!(p.addresses(), 2);
        assert_eq!(g.load(Ordering::Acquire), 2);
    }

    #[test]
    fn ended_jobs_make_the_completion_rate() {
        let p = Admission::new(256, 10, 100);
        let g = Arc::new(AtomicUsize::new(0));
        let mut mark = RateMark::default();
        p.sample_rate(&mut mark);
        assert_eq!(p.completion_rate(), 0.0);
        let permits: Vec<_> = (0..10).map(|_| admit(&p, &g).unwrap()).collect();
        drop(permits);
        p.sample_rate(&mut mark);
        // 10 ended in a quarter second is 40/s, a quarter of it folded in.
        assert!((p.completion_rate() - 10.0).abs() < 1e-9);
        let e = Refusal::QueueFull {
            retry_after_ms: p.completion_hint(),
        };
        assert_eq!(e.retry_after_ms(), 100);
    }

    #[test]
    fn address_groups() {
        let g = |s: &str| address_group(s.parse().unwrap()).to_string();
        assert_eq!(g("203.0.113.9"), "203.0.113.9");
        assert_eq!(g("::ffff:203.0.113.9"), "203.0.113.9");
        assert_eq!(g("2001:db8:a:b:c:d:e:f"), "2001:db8:a:b::");
        assert_eq!(g("::1"), "::");
    }
}
