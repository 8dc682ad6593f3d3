//! The placement hook: who runs a CPU task that another node could take.
//!
//! A task that may be offloaded is queued locally as usual, wrapped in
//! [`Claimed`]. Whoever moves its [`Claim`] out of `FREE` first runs it: the
//! local worker on the job's first poll, or the offloader once a peer has
//! agreed to take it. While an offer is out (`OFFERING`) the local job waits
//! off the pool; a refused offer hands the task back (`FREE`) and wakes it.
//! So a task never runs on two nodes, and never on none.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use crate::sync::lock;

const FREE: u8 = 0;
const LOCAL: u8 = 1;
const OFFERING: u8 = 2;
const REMOTE: u8 = 3;

/// Where a task runs, decided once.
#[derive(Debug, Default)]
pub(crate) struct Claim {
    state: AtomicU8,
    /// Set while the task waits for a peer: no local worker starts it yet
    /// (time slicing would otherwise start it within a slice, and it could
    /// never leave). Cleared when the wait is over or no peer takes it.
    held: std::sync::atomic::AtomicBool,
    /// The local job, parked while an offer is out.
    waker: Mutex<Option<Waker>>,
}

impl Claim {
    /// Takes the task for the local pool; false if an offer is out or a peer has it.
    pub(crate) fn take_local(&self) -> bool {
        self.cas(FREE, LOCAL) || self.state.load(Ordering::Acquire) == LOCAL
    }

    /// Starts an offer to a peer; false once the task runs somewhere.
    pub(crate) fn start_offer(&self) -> bool {
        self.cas(FREE, OFFERING)
    }

    /// The peer took the task: the local job ends without running.
    pub(crate) fn offer_taken(&self) {
        self.state.store(REMOTE, Ordering::Release);
        self.wake();
    }

    /// The peer refused: the task is free again, for either side.
    pub(crate) fn offer_refused(&self) {
        self.state.store(FREE, Ordering::Release);
        self.wake();
    }

    /// Keeps local workers from starting the task until [`Claim::release`].
    pub(crate) fn hold(&self) {
        self.held.store(true, Ordering::Release);
    }

    /// Lets local workers start the task.
    pub(crate) fn release(&self) {
        if self.held.swap(false, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// Whether nobody has the task yet.
    pub(crate) fn is_free(&self) -> bool {
        self.state.load(Ordering::Acquire) == FREE
    }

    /// Whether a peer has the task or is being offered it.
    pub(crate) fn is_remote(&self) -> bool {
        matches!(self.state.load(Ordering::Acquire), OFFERING | REMOTE)
    }

    fn cas(&self, from: u8, to: u8) -> bool {
        self.state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    fn wake(&self) {
        if let Some(w) = lock(&self.waker).take() {
            w.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// A job that runs its future only if it wins the claim; `None` when a
    /// peer won it.
    pub(crate) struct Claimed<F> {
        claim: std::sync::Arc<Claim>,
        won: bool,
        #[pin]
        fut: F,
    }
}

impl<F> Claimed<F> {
    pub(crate) fn new(claim: std::sync::Arc<Claim>, fut: F) -> Self {
        Claimed {
            claim,
            won: false,
            fut,
        }
    }
}

impl<F: Future> Future for Claimed<F> {
    type Output = Option<F::Output>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if !*this.won {
            loop {
                if this.claim.held.load(Ordering::Acquire)
                    && this.claim.state.load(Ordering::Acquire) == FREE
                {
                    *lock(&this.claim.waker) = Some(cx.waker().clone());
                    if this.claim.held.load(Ordering::Acquire) {
                        return Poll::Pending;
                    }
                }
                if this.claim.take_local() {
                    *this.won = true;
                    break;
                }
                match this.claim.state.load(Ordering::Acquire) {
                    REMOTE => return Poll::Ready(None),
                    OFFERING => {
                        *lock(&this.claim.waker) = Some(cx.waker().clone());
                        // The offer may have ended before the waker was set.
                        if this.claim.state.load(Ordering::Acquire) == OFFERING {
                            return Poll::Pending;
                        }
                    }
                    _ => {}
                }
            }
        }
        this.fut.poll(cx).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_side_wins() {
        let c = Claim::default();
        assert!(c.start_offer());
        assert!(!c.take_local());
        c.offer_refused();
        assert!(c.take_local());
        assert!(!c.start_offer(), "a task running here is never offered");
        let c = Claim::default();
        assert!(c.start_offer());
        c.offer_taken();
        assert!(!c.take_local() && c.is_remote());
    }

    #[test]
    fn a_job_whose_task_went_to_a_peer_ends_without_running() {
        let c = Arc::new(Claim::default());
        assert!(c.start_offer());
        let mut job = Box::pin(Claimed::new(c.clone(), async { 7 }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(job.as_mut().poll(&mut cx).is_pending());
        c.offer_taken();
        assert_eq!(job.as_mut().poll(&mut cx), Poll::Ready(None));
        let c = Arc::new(Claim::default());
        let mut job = Box::pin(Claimed::new(c.clone(), async { 7 }));
        assert_eq!(job.as_mut().poll(&mut cx), Poll::Ready(Some(7)));
        assert!(!c.start_offer());
    }
}
