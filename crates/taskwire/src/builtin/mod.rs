//! The built-in tasks of protocol v1, registered through the same public API
//! as a user's own tasks: [`register`] the ones safe for any client,
//! [`register_demo`] the demo ones (a CPU burner, a task that never ends, a
//! task that panics), for trying the server on one's own machine.

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::compute::thread_cpu_time;
use crate::{Ctx, RegisterError, Registry, TaskError};

/// Registers the tasks of protocol v1 that are safe to offer to anyone:
/// echo, sleep, hash_chain, count_primes (each bounded by its params).
///
/// # Errors
/// If one of these names is already taken in `r`.
pub fn register(r: &mut Registry) -> Result<&mut Registry, RegisterError> {
    r.io("echo", "Returns its `value` unchanged.", echo)?
        .io("sleep", "Waits `ms` milliseconds on a timer.", sleep)?
        .cpu(
            "hash_chain",
            "Applies splitmix64 `rounds` times to `seed`; returns the decimal digest.",
            hash_chain,
        )?
        .cpu(
            "count_primes",
            "Counts the primes below `below`, reporting progress.",
            count_primes,
        )
}

/// Registers the demo tasks: spin, runaway and crash. They show off the
/// scheduler, kill and crash isolation, and they hand any client a way to burn
/// CPU until stopped or to fill the log with panics: offer them only where the
/// clients are your own (the `taskwire` binary does so only with `--demo`).
///
/// # Errors
/// If one of these names is already taken in `r`.
pub fn register_demo(r: &mut Registry) -> Result<&mut Registry, RegisterError> {
    r.cpu("spin", "Burns `ms` milliseconds of its own CPU time.", spin)?
        .cpu(
            "runaway",
            "Burns CPU until cancelled, timed out or killed.",
            runaway,
        )?
        .cpu("crash", "Panics with `message`.", crash)
}

/// The result of a task that never returns (`runaway`, `crash`): its
/// schema admits no value.
#[derive(Debug, Serialize)]
pub enum Never {}

impl JsonSchema for Never {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Never".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::Schema::from(false)
    }
}

const MAX_MS: u64 = 3_600_000;
const MAX_ROUNDS: u64 = 1_000_000_000_000;
const MAX_BELOW: u64 = 10_000_000_000;

/// Params of `echo`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EchoParams {
    /// Any JSON value: it comes back exactly as sent.
    // Kept as its text, never parsed into numbers: a `Value` would round an
    // integer outside i64/u64 or a decimal with more digits than an f64
    // holds, and echo promises the value unchanged.
    #[schemars(with = "Value")]
    pub value: Box<RawValue>,
}

/// What `echo` returns: the value it was sent, exactly.
#[derive(Debug, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Echoed(#[schemars(with = "Value")] pub Box<RawValue>);

async fn echo(_ctx: Ctx, p: EchoParams) -> Result<Echoed, TaskError> {
    Ok(Echoed(p.value))
}

/// Params of `sleep` and `spin`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MsParams {
    /// Milliseconds, at most one hour.
    #[schemars(range(max = 3_600_000))]
    pub ms: u64,
}

fn check_ms(ms: u64) -> Result<u64, TaskError> {
    if ms > MAX_MS {
        return Err(TaskError::InvalidParams(format!(
            "`ms` must be at most {MAX_MS}"
        )));
    }
    Ok(ms)
}

/// What `sleep` returns.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct Slept {
    /// The milliseconds slept.
    slept_ms: u64,
}

async fn sleep(_ctx: Ctx, p: MsParams) -> Result<Slept, TaskError> {
    let ms = check_ms(p.ms)?;
    tokio::time::sleep(Duration::from_millis(ms)).await;
    Ok(Slept { slept_ms: ms })
}

/// Params of `hash_chain`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HashChainParams {
    /// The starting value.
    pub seed: u64,
    /// How many times to apply splitmix64, at most 10^12.
    #[schemars(range(max = 1_000_000_000_000u64))]
    pub rounds: u64,
}

/// One step of the splitmix64 generator, as PROTOCOL.md defines it.
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What `hash_chain` returns.
#[derive(Serialize, JsonSchema)]
struct Digest {
    /// The final value in decimal: a string, because a JSON number above
    /// 2^53 loses digits in JavaScript.
    #[schemars(pattern(r"^[0-9]{1,20}$"))]
    digest: String,
}

/// Rounds between checkpoints: about 50 µs of work.
const HASH_CHUNK: u64 = 1 << 15;

async fn hash_chain(ctx: Ctx, p: HashChainParams) -> Result<Digest, TaskError> {
    if p.rounds > MAX_ROUNDS {
        return Err(TaskError::InvalidParams(format!(
            "`rounds` must be at most {MAX_ROUNDS}"
        )));
    }
    let mut x = p.seed;
    let mut left = p.rounds;
    while left > 0 {
        let n = left.min(HASH_CHUNK);
        for _ in 0..n {
            x = splitmix64(x);
        }
        left -= n;
        if left > 0 {
            ctx.checkpoint().await?;
        }
    }
    Ok(Digest {
        digest: x.to_string(),
    })
}

/// Params of `count_primes`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CountPrimesParams {
    /// Count the primes strictly below this, at most 10^10.
    #[schemars(range(max = 10_000_000_000u64))]
    pub below: u64,
}

/// What `count_primes` returns.
#[derive(Serialize, JsonSchema)]
struct Count {
    /// The number of primes below `below` (at most about 4.6 × 10^8, exact
    /// in JavaScript).
    count: u64,
}

#[derive(Serialize)]
struct Progress {
    done: u64,
    total: u64,
}

/// Numbers per sieve segment: fits in L1/L2 and is ~50 µs of work.
const SEGMENT: u64 = 1 << 15;

fn small_primes(limit: u64) -> Vec<u64> {
    let limit = limit as usize;
    let mut composite = vec![false; limit + 1];
    let mut primes = Vec::new();
    for i in 2..=limit {
        if !composite[i] {
            primes.push(i as u64);
            let mut j = i * i;
            while j <= limit {
                composite[j] = true;
                j += i;
            }
        }
    }
    primes
}

async fn count_primes(ctx: Ctx, p: CountPrimesParams) -> Result<Count, TaskError> {
    let n = p.below;
    if n > MAX_BELOW {
        return Err(TaskError::InvalidParams(format!(
            "`below` must be at most {MAX_BELOW}"
        )));
    }
    if n <= 2 {
        ctx.progress(Progress { done: n, total: n });
        return Ok(Count { count: 0 });
    }
    let root = (n as f64).sqrt() as u64 + 1;
    let primes = small_primes(root);
    let mut seg = vec![true; SEGMENT as usize];
    let mut count = 0u64;
    let mut low = 0u64;
    while low < n {
        let high = (low + SEGMENT).min(n);
        let len = (high - low) as usize;
        seg[..len].fill(true);
        for &q in &primes {
            if q * q >= high {
                break;
            }
            let mut m = (low.div_ceil(q) * q).max(q * q);
            while m < high {
                seg[(m - low) as usize] = false;
                m += q;
            }
        }
        let start = if low < 2 { (2 - low) as usize } else { 0 };
        count += seg[start.min(len)..len].iter().filter(|&&b| b).count() as u64;
        low = high;
        ctx.progress(Progress {
            done: low,
            total: n,
        });
        if low < n {
            ctx.checkpoint().await?;
        }
    }
    Ok(Count { count })
}

/// What `spin` returns.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct Spun {
    /// The milliseconds of CPU time burnt.
    spun_ms: u64,
}

/// About 30 µs of arithmetic that the optimiser cannot remove.
fn burn_chunk(seed: u64) -> u64 {
    let mut x = seed;
    for _ in 0..20_000 {
        x = splitmix64(x);
    }
    std::hint::black_box(x)
}

async fn spin(ctx: Ctx, p: MsParams) -> Result<Spun, TaskError> {
    let ms = check_ms(p.ms)?;
    let target = Duration::from_millis(ms);
    let mut own = Duration::ZERO;
    let mut x = 1;
    // Only the time between the two clock reads counts, so time spent
    // preempted at the checkpoint is not mistaken for our own.
    while own < target {
        let t0 = thread_cpu_time();
        x = burn_chunk(x);
        own += thread_cpu_time().saturating_sub(t0);
        ctx.checkpoint().await?;
    }
    Ok(Spun { spun_ms: ms })
}

/// Params of tasks that take none.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NoParams {}

async fn runaway(ctx: Ctx, _p: NoParams) -> Result<Never, TaskError> {
    let mut x = 1;
    loop {
        x = burn_chunk(x);
        ctx.checkpoint().await?;
    }
}

/// Params of `crash`.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CrashParams {
    /// The panic message.
    pub message: String,
}

async fn crash(_ctx: Ctx, p: CrashParams) -> Result<Never, TaskError> {
    panic!("{}", p.message);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(seed: u64, rounds: u64) -> u64 {
        (0..rounds).fold(seed, |x, _| splitmix64(x))
    }

    #[test]
    fn hash_chain_vectors() {
        assert_eq!(chain(1, 1), 10451216379200822465);
        assert_eq!(chain(0, 1_000_000), 1880736892155664098);
        assert_eq!(chain(42, 10), 8123981347576678140);
    }

    #[test]
    fn small_sieve() {
        assert_eq!(small_primes(30), vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29]);
    }
}
