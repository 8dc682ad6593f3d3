//! The counting guard, written once: take a slot while a count is under its
//! limit, give it back when the guard drops.
//!
//! Every bound on things held at once goes through here: open WebSockets (in
//! all, per address, per token), connections not yet upgraded, CPU tasks
//! admitted (per connection, per address, in the pool). A count is either one
//! shared counter ([`Slot`]) or a counter per key ([`Keyed`], such as per
//! client address), whose entry is removed when its count falls to zero, so
//! that the map never holds more keys than there are slots taken.
//!
//! The rate limits are here too: a [`TokenBucket`] per connection, and the
//! [`LogLimiter`] that keeps a flood of refusals from flooding the log.
//!
//! This module depends on nothing else in the crate but [`crate::sync`].

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::sync::lock;

/// One unit of a shared count, given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot {
    count: Arc<AtomicUsize>,
}

impl Slot {
    /// Takes a slot of `count` if fewer than `limit` are taken.
    ///
    /// A compare-and-swap rather than add-then-undo: the count never goes past
    /// its limit even for an instant, so a concurrent acquirer is not refused
    /// for a slot that was never really taken, and a reader waiting for zero
    /// (shutdown) never sees a phantom one.
    pub(crate) fn acquire(count: &Arc<AtomicUsize>, limit: usize) -> Option<Slot> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()?;
        Some(Slot {
            count: count.clone(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One key's count, with whatever its owner keeps about the key meanwhile
/// (made with `V::default()` when the key's first slot is taken, forgotten
/// with its last).
#[derive(Debug)]
struct Entry<V> {
    held: usize,
    data: V,
}

/// Counts per key, each under the same limit. An entry exists only while its
/// key holds a slot: the map is bounded by the slots taken.
#[derive(Debug)]
pub(crate) struct Keyed<K, V = ()> {
    map: Mutex<HashMap<K, Entry<V>>>,
}

impl<K, V> Default for Keyed<K, V> {
    fn default() -> Self {
        Keyed {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone, V: Default> Keyed<K, V> {
    /// Takes a slot of `key` if it holds fewer than `limit`.
    pub(crate) fn acquire(table: &Arc<Self>, key: K, limit: usize) -> Option<KeyedSlot<K, V>> {
        Self::acquire_or(table, key, limit, |_| ()).ok()
    }

    /// Takes a slot of `key` if it holds fewer than `limit`; else the answer
    /// of `refuse`, which sees what is kept about the key (to tell, say, how
    /// long until it can expect a slot back).
    pub(crate) fn acquire_or<E>(
        table: &Arc<Self>,
        key: K,
        limit: usize,
        refuse: impl FnOnce(&V) -> E,
    ) -> Result<KeyedSlot<K, V>, E> {
        let mut m = lock(&table.map);
        let e = m.entry(key.clone()).or_insert_with(|| Entry {
            held: 0,
            data: V::default(),
        });
        if e.held >= limit {
            let answer = refuse(&e.data);
            if e.held == 0 {
                // Only with a limit of 0: no entry without a slot, all the same.
                m.remove(&key);
            }
            return Err(answer);
        }
        e.held += 1;
        drop(m);
        Ok(KeyedSlot {
            table: table.clone(),
            key,
            on_release: None,
        })
    }

    /// Keys holding at least one slot now.
    pub(crate) fn len(&self) -> usize {
        lock(&self.map).len()
    }
}

/// One slot of one key of a [`Keyed`] count, given back when dropped.
#[derive(Debug)]
pub(crate) struct KeyedSlot<K: Eq + Hash, V> {
    table: Arc<Keyed<K, V>>,
    key: K,
    on_release: Option<fn(&mut V)>,
}

impl<K: Eq + Hash, V> KeyedSlot<K, V> {
    /// Has `f` update what is kept about the key when this slot is given back
    /// (under the same lock, so it sees the entry before it may go). `f` must
    /// not panic.
    pub(crate) fn on_release(&mut self, f: fn(&mut V)) {
        self.on_release = Some(f);
    }
}

impl<K: Eq + Hash, V> Drop for KeyedSlot<K, V> {
    fn drop(&mut self) {
        let mut m = lock(&self.table.map);
        if let Some(e) = m.get_mut(&self.key) {
            if let Some(f) = self.on_release {
                f(&mut e.data);
            }
            e.held = e.held.saturating_sub(1);
            if e.held == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// At most one log line per period for a flood of refusals: the first refusal
/// of a period is logged with the count of those suppressed since the last
/// line. Time is passed in, so the test needs no clock.
#[derive(Debug)]
pub(crate) struct LogLimiter {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl LogLimiter {
    pub(crate) fn new(period: Duration) -> LogLimiter {
        LogLimiter {
            period,
            state: Mutex::new((None, 0)),
        }
    }

    /// `Some(suppressed)` when this event should be logged.
    pub(crate) fn allow(&self, now: Instant) -> Option<u64> {
        let mut s = lock(&self.state);
        match s.0 {
            Some(last) if now.saturating_duration_since(last) < self.period => {
                s.1 += 1;
                None
            }
            _ => {
                let suppressed = s.1;
                *s = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `per_second`. Owned by one
/// connection's reader, so it needs no atomics; time is passed in, so the
/// tests need no clock.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    per_second: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// `per_second` and `burst` as in the `RateLimit` setting; 0 counts as 1.
    pub(crate) fn new(per_second: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            per_second: f64::from(per_second.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now.max(self.last);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

/// The unit that per-address limits count against: an IPv4 address as is (an
/// IPv4-mapped IPv6 address as its IPv4 address), an IPv6 address by its /64,
/// since one subscriber usually holds a whole /64 and could otherwise take a
/// fresh address for every connection.
pub(crate) fn address_group(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => std::net::IpAddr::V4(v4),
        std::net::IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_honours_its_limit_and_gives_back_on_drop() {
        let n = Arc::new(AtomicUsize::new(0));
        let a = Slot::acquire(&n, 2).unwrap();
        let b = Slot::acquire(&n, 2).unwrap();
        assert!(Slot::acquire(&n, 2).is_none());
        assert_eq!(n.load(Ordering::Acquire), 2, "a refusal takes nothing");
        drop(a);
        let c = Slot::acquire(&n, 2).unwrap();
        drop((b, c));
        assert_eq!(n.load(Ordering::Acquire), 0);
        assert!(Slot::acquire(&n, 0).is_none(), "a limit of 0 admits none");
    }

    #[test]
    fn a_keyed_count_forgets_a_key_at_zero() {
        let t: Arc<Keyed<u32>> = Arc::default();
        let a = Keyed::acquire(&t, 1, 2).unwrap();
        let b = Keyed::acquire(&t, 1, 2).unwrap();
        assert!(Keyed::acquire(&t, 1, 2).is_none());
        let other = Keyed::acquire(&t, 2, 2).unwrap();
        assert_eq!(t.len(), 2);
        drop(a);
        let c = Keyed::acquire(&t, 1, 2).unwrap();
        drop((b, c));
        assert_eq!(t.len(), 1, "key 1 gone with its last slot");
        drop(other);
        assert_eq!(t.len(), 0);
        assert!(Keyed::acquire(&t, 3, 0).is_none());
        assert_eq!(t.len(), 0, "a refusal leaves no empty entry");
    }

    #[test]
    fn a_keyed_count_keeps_data_while_the_key_holds_slots() {
        let t: Arc<Keyed<u32, u64>> = Arc::default();
        let mut a = Keyed::acquire(&t, 7, 1).unwrap();
        a.on_release(|n| *n += 1);
        let b = Keyed::acquire(&t, 7, 2).unwrap();
        drop(a);
        assert_eq!(Keyed::acquire_or(&t, 7, 1, |n| *n).unwrap_err(), 1);
        drop(b);
        assert_eq!(Keyed::acquire_or(&t, 7, 0, |n| *n).unwrap_err(), 0);
    }

    #[test]
    fn concurrent_acquire_and_release_never_pass_the_limit() {
        const LIMIT: usize = 3;
        let n = Arc::new(AtomicUsize::new(0));
        let t: Arc<Keyed<u8>> = Arc::default();
        let peak = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (n, t, peak) = (n.clone(), t.clone(), peak.clone());
                std::thread::spawn(move || {
                    let mut got = 0;
                    for _ in 0..2_000 {
                        let s = Slot::acquire(&n, LIMIT);
                        let k = Keyed::acquire(&t, (i % 2) as u8, LIMIT);
                        peak.fetch_max(n.load(Ordering::Acquire), Ordering::AcqRel);
                        got += usize::from(s.is_some()) + usize::from(k.is_some());
                    }
                    got
                })
            })
            .collect();
        let got: usize = threads.into_iter().map(|h| h.join().unwrap()).sum();
        assert!(got > 0);
        assert!(peak.load(Ordering::Acquire) <= LIMIT);
        assert_eq!(n.load(Ordering::Acquire), 0, "every slot given back");
        assert_eq!(t.len(), 0, "every key forgotten");
    }
}
