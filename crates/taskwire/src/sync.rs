//! Lock poisoning, dealt with in one place.
//!
//! A `Mutex` is poisoned when a thread panics while holding it. Task code
//! never runs while one of our locks is held, and every critical section of
//! ours is panic-free (no indexing that can fail, no `unwrap`, no user
//! callback), so a poisoned lock never guards a half-updated map: the data is
//! as consistent as after any other critical section. Recovering the guard
//! keeps the server serving; giving up (as `.lock().ok()?` did) would silently
//! drop bookkeeping, such as a slot never given back, for the rest of the
//! process's life.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Locks `m`, recovering the guard if a panic poisoned it (see the module doc
/// for why that is sound here).
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` for at most `timeout`, recovering the guard as [`lock`] does.
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    match cv.wait_timeout(guard, timeout) {
        Ok((g, _)) => g,
        Err(poisoned) => poisoned.into_inner().0,
    }
}

/// A bounded queue of messages for one consumer: a connection's outbound
/// queue, which its writer drains.
///
/// Tokio's bounded mpsc would do, but it allocates a block of 32 slots when
/// the channel is made, about a KiB for every connection even when idle; an
/// empty `Outbox` holds no buffer, grows with a burst and gives the memory back
/// once drained. The lock is taken per message and is uncontended in practice
/// (one writer, and answers are pushed one at a time).
pub(crate) struct Outbox<T> {
    state: Mutex<OutboxState<T>>,
    /// Wakes the consumer when a message arrives or the queue closes.
    ready: tokio::sync::Notify,
    /// Wakes producers waiting for room.
    room: tokio::sync::Notify,
    capacity: usize,
}

struct OutboxState<T> {
    items: std::collections::VecDeque<T>,
    closed: bool,
}

/// Why a message was not queued; the message comes back.
#[derive(Debug)]
pub(crate) enum PushError<T> {
    /// The queue holds `capacity` messages.
    Full(T),
    /// The consumer is gone.
    Closed(T),
}

/// A drained queue keeps at most this many slots of its last burst.
const OUTBOX_KEEP: usize = 16;

impl<T> Outbox<T> {
    pub(crate) fn new(capacity: usize) -> Outbox<T> {
        Outbox {
            state: Mutex::new(OutboxState {
                items: std::collections::VecDeque::new(),
                closed: false,
            }),
            ready: tokio::sync::Notify::new(),
            room: tokio::sync::Notify::new(),
            capacity,
        }
    }

    /// Queues `item` if there is room.
    pub(crate) fn try_push(&self, item: T) -> Result<(), PushError<T>> {
        let mut s = lock(&self.state);
        if s.closed {
            return Err(PushError::Closed(item));
        }
        if s.items.len() >= self.capacity {
            return Err(PushError::Full(item));
        }
        s.items.push_back(item);
        drop(s);
        self.ready.notify_one();
        Ok(())
    }

    /// Queues `item`, waiting for room; gives it back if the consumer is gone.
    pub(crate) async fn push(&self, mut item: T) -> Result<(), T> {
        loop {
            let room = self.room.notified();
            tokio::pin!(room);
            // Registered before the check, so a pop in between is not missed.
            room.as_mut().enable();
            match self.try_push(item) {
                Ok(()) => return Ok(()),
                Err(PushError::Closed(i)) => return Err(i),
                Err(PushError::Full(i)) => item = i,
            }
            room.await;
        }
    }

    /// The next message, if one is queued.
    pub(crate) fn try_pop(&self) -> Option<T> {
        let mut s = lock(&self.state);
        let item = s.items.pop_front();
        if s.items.is_empty() && s.items.capacity() > OUTBOX_KEEP {
            s.items.shrink_to(OUTBOX_KEEP);
        }
        drop(s);
        if item.is_some() {
            self.room.notify_one();
        }
        item
    }

    /// Moves up to `max` queued messages into `out` under one lock: the
    /// writer takes what is ready in one go instead of a lock per message.
    pub(crate) fn drain_into(&self, out: &mut Vec<T>, max: usize) {
        let mut s = lock(&self.state);
        let n = s.items.len().min(max);
        out.extend(s.items.drain(..n));
        if s.items.is_empty() && s.items.capacity() > OUTBOX_KEEP {
            s.items.shrink_to(OUTBOX_KEEP);
        }
        drop(s);
        if n > 0 {
            self.room.notify_waiters();
        }
    }

    /// The next message, waiting for one; `None` once closed and empty.
    pub(crate) async fn pop(&self) -> Option<T> {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Some(item) = self.try_pop() {
                return Some(item);
            }
            if lock(&self.state).closed {
                return None;
            }
            ready.await;
        }
    }

    /// Messages queued.
    pub(crate) fn len(&self) -> usize {
        lock(&self.state).items.len()
    }

    /// The consumer is gone: refuses new messages, wakes every waiter and
    /// hands back what was queued (for the caller to account for and drop: a
    /// message may hold what holds this queue).
    pub(crate) fn close(&self) -> std::collections::VecDeque<T> {
        let items = {
            let mut s = lock(&self.state);
            s.closed = true;
            std::mem::take(&mut s.items)
        };
        self.room.notify_waiters();
        self.ready.notify_waiters();
        items
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn the_outbox_is_bounded_wakes_and_closes() {
        let q = Arc::new(Outbox::new(2));
        q.try_push(1).unwrap();
        q.try_push(2).unwrap();
        assert!(matches!(q.try_push(3), Err(PushError::Full(3))));
        // A producer waits for room and gets it when the consumer takes one.
        let p = tokio::spawn({
            let q = q.clone();
            async move { q.push(3).await }
        });
        tokio::task::yield_now().await;
        assert_eq!(q.pop().await, Some(1));
        p.await.unwrap().unwrap();
        assert_eq!(q.len(), 2);
        // A consumer waits for a message.
        let mut taken = Vec::new();
        q.drain_into(&mut taken, 8);
        assert_eq!(taken, vec![2, 3]);
        let c = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.try_push(4).unwrap();
        assert_eq!(c.await.unwrap(), Some(4));
        // Closing wakes a waiting consumer and refuses producers.
        let c = tokio::spawn({
            let q = q.clone();
            async move { q.pop().await }
        });
        tokio::task::yield_now().await;
        q.close();
        assert_eq!(c.await.unwrap(), None);
        assert!(matches!(q.try_push(5), Err(PushError::Closed(5))));
        assert_eq!(q.push(6).await, Err(6));
    }

    #[test]
    fn a_drained_outbox_gives_its_memory_back() {
        let q = Outbox::new(1024);
        for i in 0..1000 {
            q.try_push(i).unwrap();
        }
        while q.try_pop().is_some() {}
        assert!(lock(&q.state).items.capacity() <= OUTBOX_KEEP);
    }

    #[test]
    fn a_poisoned_lock_still_gives_its_data() {
        let m = Arc::new(Mutex::new(1));
        let m2 = m.clone();
        let _ = std::thread::spawn(move || {
            let _g = lock(&m2);
            panic!("poison it");
        })
        .join();
        assert!(m.is_poisoned());
        *lock(&m) += 1;
        assert_eq!(*lock(&m), 2);
    }
}
