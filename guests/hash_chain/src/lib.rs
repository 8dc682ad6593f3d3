//! `hash_chain` as a taskwire WebAssembly task: params `{"seed": u64,
//! "rounds": u64}`, result `{"digest": "<decimal u64>"}`, progress
//! `{"done","total"}`; the same digests as the server's built-in.
//!
//! The `guest` module is the whole guest interface (docs/WASM.md): six
//! imports from the `taskwire` module and one export, `run`. No WASI call is
//! made, no allocator is needed beyond the params buffer.

mod guest {
    #[link(wasm_import_module = "taskwire")]
    extern "C" {
        fn params_len() -> i32;
        fn params_read(ptr: *mut u8) -> i32;
        fn result(ptr: *const u8, len: i32);
        fn error(code: i32, ptr: *const u8, len: i32);
        fn progress(ptr: *const u8, len: i32);
        fn log(ptr: *const u8, len: i32);
    }

    /// The params as JSON text.
    pub fn params() -> String {
        // SAFETY: the host writes exactly `params_len()` bytes at the pointer.
        unsafe {
            let mut buf = vec![0u8; params_len() as usize];
            params_read(buf.as_mut_ptr());
            String::from_utf8_unchecked(buf)
        }
    }

    /// Sets the result (JSON text).
    pub fn set_result(json: &str) {
        // SAFETY: the host only reads the slice.
        unsafe { result(json.as_ptr(), json.len() as i32) }
    }

    /// Fails the task with a JSON-RPC error (`-32602` is invalid params).
    pub fn fail(code: i32, message: &str) {
        // SAFETY: the host only reads the slice.
        unsafe { error(code, message.as_ptr(), message.len() as i32) }
    }

    /// Reports progress (JSON text); the server coalesces fast updates.
    pub fn report(json: &str) {
        // SAFETY: the host only reads the slice.
        unsafe { progress(json.as_ptr(), json.len() as i32) }
    }

    /// A line in the server's log (bounded per task).
    pub fn log_line(line: &str) {
        // SAFETY: the host only reads the slice.
        unsafe { log(line.as_ptr(), line.len() as i32) }
    }
}

const INVALID_PARAMS: i32 = -32602;
const MAX_ROUNDS: u64 = 1_000_000_000_000;
/// Rounds between progress reports.
const REPORT_EVERY: u64 = 1 << 22;

#[inline]
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The unsigned integer value of `"key": n` in a flat JSON object.
fn field(json: &str, key: &str) -> Result<u64, String> {
    let quoted = format!("\"{key}\"");
    let at = json
        .find(&quoted)
        .ok_or_else(|| format!("invalid params: missing field `{key}`"))?;
    let rest = json[at + quoted.len()..].trim_start();
    let rest = rest
        .strip_prefix(':')
        .ok_or_else(|| format!("invalid params: `{key}`"))?
        .trim_start();
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits
        .parse()
        .map_err(|_| format!("invalid params: `{key}` must be an unsigned integer"))
}

#[no_mangle]
pub extern "C" fn run() {
    let params = guest::params();
    let (seed, rounds) = match (field(&params, "seed"), field(&params, "rounds")) {
        (Ok(s), Ok(r)) => (s, r),
        (Err(e), _) | (_, Err(e)) => return guest::fail(INVALID_PARAMS, &e),
    };
    if rounds > MAX_ROUNDS {
        return guest::fail(INVALID_PARAMS, "invalid params: `rounds` is at most 10^12");
    }
    if rounds >= 1 << 30 {
        guest::log_line(&format!("a long chain: {rounds} rounds"));
    }
    let mut x = seed;
    let mut done = 0u64;
    while done < rounds {
        // No checkpoints: the server slices and stops this loop at its epoch
        // deadlines.
        let n = (rounds - done).min(REPORT_EVERY);
        for _ in 0..n {
            x = splitmix64(x);
        }
        done += n;
        if done < rounds {
            guest::report(&format!("{{\"done\":{done},\"total\":{rounds}}}"));
        }
    }
    guest::set_result(&format!("{{\"digest\":\"{x}\"}}"));
}
