//! Memory attributed to the task that allocated it: a counting global
//! allocator, and the process's memory as the server budgets it.
//!
//! [`CountingAlloc`] wraps the system allocator. Each allocation and free
//! costs one thread-local read and one or two relaxed atomic adds: it adds the
//! size to the process total (striped over a few cache lines, so that threads
//! do not contend on one counter) and, when the thread is polling a task, to
//! that task's own count. The compute pool's workers set the task while they
//! poll a job, so a task's count is "bytes allocated minus bytes freed while it
//! ran": what it holds across its checkpoints. Memory a task allocates and
//! another thread frees (a result sent back to the connection) stays counted
//! against the task, which has ended by then; memory a task frees that it did
//! not allocate can make its count negative, shown as 0.
//!
//! The library works without it (tasks then show 0 bytes and the memory budget
//! uses the resident set size from `/proc/self/statm`). An application that
//! embeds taskwire installs it in its binary:
//!
//! ```
//! #[global_allocator]
//! static ALLOC: taskwire::alloc::CountingAlloc = taskwire::alloc::CountingAlloc;
//! # fn main() {}
//! ```
//!
//! On stable Rust a failed allocation aborts the process: no accounting here
//! can contain a native task that allocates without bound after the fact.
//! The budget only stops *new* CPU work and names the largest tasks, so that
//! an operator (or a deadline) can end them first.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicI64, Ordering};

/// Stripes of the process total. A power of two; threads hash onto them by the
/// address of their thread-local block.
const STRIPES: usize = 16;

#[repr(align(128))]
struct Stripe(AtomicI64);

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: Stripe = Stripe(AtomicI64::new(0));
static LIVE: [Stripe; STRIPES] = [ZERO; STRIPES];

thread_local! {
    /// The byte count of the task this thread is polling, or null. `const`
    /// and without a destructor: safe to touch from inside the allocator, at
    /// any point of a thread's life, and it never allocates.
    static CURRENT: Cell<*const AtomicI64> = const { Cell::new(std::ptr::null()) };
}

/// A global allocator that counts live bytes for the process and for the task
/// each thread is running. See the [module docs](self) for how to install it.
#[derive(Clone, Copy, Debug, Default)]
pub struct CountingAlloc;

#[inline]
fn account(delta: i64) {
    // `try_with` never fails for a const, destructor-less key; it is used so
    // that no code path of the allocator can panic.
    let _ = CURRENT.try_with(|c| {
        let task = c.get();
        // The thread-local's own address tells threads apart for free.
        let addr = c as *const Cell<*const AtomicI64> as u64;
        let stripe = (addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) as usize;
        LIVE[stripe & (STRIPES - 1)]
            .0
            .fetch_add(delta, Ordering::Relaxed);
        if !task.is_null() {
            // SAFETY: the pointer is set by `Attributed` from a live `Arc`
            // that the setter keeps alive until it clears the pointer.
            unsafe { (*task).fetch_add(delta, Ordering::Relaxed) };
        }
    });
}

// SAFETY: every method forwards to `System` with the same arguments and only
// adds bookkeeping that neither allocates nor unwinds.
unsafe impl GlobalAlloc for CountingAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            account(layout.size() as i64);
        }
        p
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        account(-(layout.size() as i64));
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            account(new_size as i64 - layout.size() as i64);
        }
        p
    }
}

/// Bytes live through [`CountingAlloc`] in this process, or 0 if it is not the
/// global allocator. Sums a few counters: cheap, but not for every request.
pub fn allocated_bytes() -> u64 {
    let sum: i64 = LIVE.iter().map(|s| s.0.load(Ordering::Relaxed)).sum();
    sum.max(0) as u64
}

/// Whether [`CountingAlloc`] is the global allocator (it has counted something:
/// any process has allocated by the time it asks).
pub fn installed() -> bool {
    allocated_bytes() != 0
}

/// Attributes this thread's allocations to `counter` until the guard drops.
/// The compute pool does this around every slice of a job.
pub(crate) struct Attributed<'a> {
    prev: *const AtomicI64,
    _counter: std::marker::PhantomData<&'a AtomicI64>,
}

impl<'a> Attributed<'a> {
    pub(crate) fn new(counter: &'a AtomicI64) -> Attributed<'a> {
        let prev = CURRENT.with(|c| c.replace(counter as *const AtomicI64));
        Attributed {
            prev,
            _counter: std::marker::PhantomData,
        }
    }
}

impl Drop for Attributed<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.prev));
    }
}

/// The resident set size of this process in bytes (`/proc/self/statm`), or 0
/// where that file does not exist. A file read: sample it, do not call it per
/// request.
pub(crate) fn rss_bytes() -> u64 {
    let Ok(text) = std::fs::read_to_string("/proc/self/statm") else {
        return 0;
    };
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * page_size()
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// The memory this process may use: the machine's physical memory, or the
/// cgroup's limit (`memory.max`, cgroup v2) when that is smaller.
pub(crate) fn available_memory() -> Option<u64> {
    // SAFETY: sysconf has no preconditions; it returns -1 on error.
    let pages = unsafe { libc::sysconf(libc::_SC_PHYS_PAGES) };
    let physical = (pages > 0).then(|| pages as u64 * page_size());
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|t| t.trim().parse::<u64>().ok());
    match (physical, cgroup) {
        (Some(p), Some(c)) => Some(p.min(c)),
        (p, c) => p.or(c),
    }
}

/// Bytes the C allocator holds free (glibc's `mallinfo2().fordblks`), or
/// `None` where it cannot say. Walks the free lists: once a second at most.
pub(crate) fn allocator_free_bytes() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallinfo2 has no preconditions and returns a plain struct.
        let mi = unsafe { libc::mallinfo2() };
        Some(mi.fordblks as u64)
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
    }
}

/// Gives freed memory back to the operating system (glibc's `malloc_trim(0)`:
/// every arena, including free pages in the middle of the heap). Holds the
/// allocator's locks while it walks the heap, a few ms for a heap of GiBs:
/// call it rarely, off the request path. A no-op on other C libraries.
pub(crate) fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_and_memory_are_readable_here() {
        assert!(rss_bytes() > 0);
        assert!(available_memory().is_some_and(|m| m > 0));
    }

    #[test]
    fn attribution_nests_and_restores() {
        let a = AtomicI64::new(0);
        let b = AtomicI64::new(0);
        {
            let _ga = Attributed::new(&a);
            {
                let _gb = Attributed::new(&b);
                account(10);
            }
            account(5);
        }
        account(7);
        assert_eq!(a.load(Ordering::Relaxed), 5);
        assert_eq!(b.load(Ordering::Relaxed), 10);
        // The process total moved by all three (undone, not to skew others).
        account(-22);
    }
}
