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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
