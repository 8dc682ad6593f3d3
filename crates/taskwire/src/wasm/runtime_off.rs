//! The lane without the `wasm` cargo feature: the table and the admin API
//! exist, and every install is refused with the reason.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use super::{About, Limits};
use crate::registry::TaskDef;

/// Compiled code: nothing to hold without an engine.
pub(super) type Code = ();

/// No engine.
#[derive(Debug)]
pub(crate) struct Runtime;

impl Runtime {
    pub(super) fn new(_: Limits) -> Result<Runtime, String> {
        Err("this build has no WebAssembly lane (cargo feature `wasm`)".into())
    }

    pub(super) fn task(
        &self,
        _about: About,
        _bytes: &[u8],
        _code: Option<Code>,
        _memory_limit: u64,
        _running: Arc<AtomicUsize>,
    ) -> Result<(TaskDef, Code), String> {
        Err("this build has no WebAssembly lane (cargo feature `wasm`)".into())
    }
}

pub(super) fn sha256_hex(_: &[u8]) -> String {
    String::new()
}
