//! Micro-benchmark: what `ctx.checkpoint().await` costs when no yield is due,
//! against an empty loop and against reading the thread's CPU clock (what a
//! design that checks the time at every checkpoint would pay).
//!
//! `cargo bench -p taskwire --bench checkpoint`

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::task::noop_waker_ref;
use taskwire::bench_internals::thread_cpu_time;
use taskwire::Ctx;

const N: u64 = 20_000_000;

fn per_iter(label: &str, n: u64, mut f: impl FnMut(u64) -> u64) -> f64 {
    let t = Instant::now();
    let mut acc = 0u64;
    for i in 0..n {
        acc = acc.wrapping_add(f(black_box(i)));
    }
    black_box(acc);
    let ns = t.elapsed().as_nanos() as f64 / n as f64;
    println!("{label:<44} {ns:>8.2} ns/iter");
    ns
}

fn main() {
    let ctx = Ctx::detached("bench");
    let mut cx = Context::from_waker(noop_waker_ref());
    let base = per_iter("empty loop", N, |i| i);
    let check = per_iter("ctx.checkpoint() polled, no yield due", N, |i| {
        let fut = pin!(black_box(&ctx).checkpoint());
        match fut.poll(&mut cx) {
            Poll::Ready(Ok(())) => i,
            _ => 0,
        }
    });
    let clock = per_iter("thread CPU clock read (clock_gettime)", N / 100, |i| {
        i.wrapping_add(thread_cpu_time().as_nanos() as u64)
    });
    println!(
        "checkpoint: {:.2} ns over the empty loop; a clock read per checkpoint would cost {:.0} ns",
        check - base,
        clock - base
    );
}
