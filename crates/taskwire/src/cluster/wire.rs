//! What nodes say to each other: the messages, as JSON, and the chunks that
//! carry a message larger than NATS's `max_payload` (1 MiB by default).
//! Params, results and progress values are JSON already: they are embedded
//! as they are (`RawValue`), not as strings, so that they are neither
//! escaped on the way out nor unescaped and parsed again on the way in.
//!
//! A message whose JSON is at most [`CHUNK_BYTES`] goes as one NATS message
//! (it starts with `{`). A larger one goes as parts, each `C<xfer>:<i>:<n>\n`
//! followed by its bytes; the receiver reads its inbox in order (one
//! subscription, one loop) and so gets the parts in order, and keeps at most
//! [`MAX_PARTIAL_BYTES`] of unfinished transfers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::wasm::{ModuleAd, ModuleSpec};

/// Largest NATS payload this node sends: well below the server's 1 MiB default.
pub(super) const CHUNK_BYTES: usize = 256 << 10;
/// Bytes of unfinished chunked messages a node keeps, over all senders.
pub(super) const MAX_PARTIAL_BYTES: usize = 64 << 20;
/// Unfinished transfers a node keeps; the oldest goes first past it.
pub(super) const MAX_PARTIALS: usize = 64;
/// A transfer whose next part has not come for this long is dropped.
const PARTIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// A node's announcement, every `cluster_beat_ms`, on [`super::BEAT_SUBJECT`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Beat {
    pub node: String,
    /// Random per process: a node restarted under the same name is a new one.
    pub inc: u64,
    pub seq: u64,
    /// Workers it could give a peer's task now.
    pub spare: u32,
    pub workers: u32,
    pub queued: u32,
    /// A digest of its WebAssembly modules ([`crate::wasm::Lane::digest`]);
    /// a peer whose own differs asks for the list.
    #[serde(default)]
    pub modules: u64,
}

/// A task's params as the origin received them, `_meta` removed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) enum WireParams {
    None,
    Object(Box<RawValue>),
    Array(Box<RawValue>),
}

impl WireParams {
    /// Bytes kept for it.
    pub(super) fn len(&self) -> usize {
        match self {
            WireParams::None => 0,
            WireParams::Object(s) | WireParams::Array(s) => s.get().len(),
        }
    }
}

/// How a task ended, across the wire. An error is sent as rendered (code,
/// message, data) and answered exactly so by the origin.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum WireOutcome {
    Ok(Box<RawValue>),
    Err {
        code: i32,
        message: String,
        data: Option<serde_json::Value>,
    },
    Stopped(u8),
    Crashed(String),
    Lost,
}

/// A message to one node's inbox.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) enum Msg {
    /// Origin → peer: run this task, if you have a worker for it now.
    Offer {
        from: String,
        inc: u64,
        rid: u64,
        conn: u64,
        caller: Option<String>,
        method: String,
        params: WireParams,
        /// What is left of the task's deadline.
        timeout_ms: Option<u64>,
        progress: bool,
        /// A WebAssembly task: the SHA-256 of the module it was admitted
        /// with; the peer runs it only with the same code.
        #[serde(default)]
        module: Option<String>,
    },
    /// Peer → origin: it runs as `task` there.
    Accept {
        from: String,
        rid: u64,
        task: u64,
        spare: u32,
    },
    /// Peer → origin: not now; the origin keeps the task.
    Refuse { from: String, rid: u64, spare: u32 },
    /// Peer → origin: the latest progress value (coalesced as on one node).
    Progress {
        from: String,
        rid: u64,
        value: Box<RawValue>,
    },
    /// Peer → origin: the task ended, having used `cpu_ns` of CPU there.
    Done {
        from: String,
        rid: u64,
        outcome: WireOutcome,
        cpu_ns: u64,
        spare: u32,
    },
    /// Origin → peer: stop it (cancel, deadline, kill, disconnect, shutdown).
    Cancel { from: String, rid: u64, why: u8 },
    /// Any node → the node running task `task`: an operator's kill.
    Kill { from: String, task: u64 },
    /// A node whose module digest differs → that peer: your modules, please.
    ModulesQuery { from: String },
    /// The answer: the modules and removals the peer knows.
    Modules {
        from: String,
        modules: Vec<ModuleAd>,
        removed: Vec<(String, u64)>,
    },
    /// A node → a peer that has it: the module with these bytes.
    Fetch { from: String, sha256: String },
    /// The answer: the module's spec and bytes (base64), checked against the
    /// hash by the receiver.
    Module {
        from: String,
        sha256: String,
        spec: ModuleSpec,
        bytes: String,
    },
}

/// One message as NATS payloads (one, or its chunks).
pub(super) fn encode(msg: &Msg, xfer: u64) -> Vec<Vec<u8>> {
    let Ok(bytes) = serde_json::to_vec(msg) else {
        return Vec::new();
    };
    if bytes.len() <= CHUNK_BYTES {
        return vec![bytes];
    }
    let n = bytes.len().div_ceil(CHUNK_BYTES);
    bytes
        .chunks(CHUNK_BYTES)
        .enumerate()
        .map(|(i, part)| {
            let mut out = format!("C{xfer}:{i}:{n}\n").into_bytes();
            out.extend_from_slice(part);
            out
        })
        .collect()
}

struct Partial {
    next: usize,
    total: usize,
    bytes: Vec<u8>,
    last: Instant,
}

/// Unfinished chunked messages, bounded in count and bytes.
#[derive(Default)]
pub(super) struct Partials {
    open: HashMap<u64, Partial>,
    bytes: usize,
}

impl Partials {
    /// Takes one payload; the whole message once it is complete.
    pub(super) fn accept(&mut self, payload: &[u8]) -> Option<Msg> {
        if payload.first() == Some(&b'{') {
            return serde_json::from_slice(payload).ok();
        }
        let nl = payload.iter().position(|&b| b == b'\n')?;
        let head = std::str::from_utf8(payload.get(1..nl)?).ok()?;
        let mut it = head.split(':').map(str::parse::<u64>);
        let (xfer, i, n) = (
            it.next()?.ok()?,
            it.next()?.ok()? as usize,
            it.next()?.ok()? as usize,
        );
        let body = &payload[nl + 1..];
        self.expire();
        if i == 0 {
            if self.open.len() >= MAX_PARTIALS {
                let oldest = self
                    .open
                    .iter()
                    .min_by_key(|(_, p)| p.last)
                    .map(|(k, _)| *k)?;
                self.drop_one(oldest);
            }
            self.open.insert(
                xfer,
                Partial {
                    next: 0,
                    total: n,
                    bytes: Vec::new(),
                    last: Instant::now(),
                },
            );
        }
        let p = self.open.get_mut(&xfer)?;
        if p.next != i || p.total != n || self.bytes + body.len() > MAX_PARTIAL_BYTES {
            self.drop_one(xfer);
            return None;
        }
        p.bytes.extend_from_slice(body);
        p.next += 1;
        p.last = Instant::now();
        self.bytes += body.len();
        if p.next < p.total {
            return None;
        }
        let done = self.open.remove(&xfer)?;
        self.bytes -= done.bytes.len();
        serde_json::from_slice(&done.bytes).ok()
    }

    fn drop_one(&mut self, xfer: u64) {
        if let Some(p) = self.open.remove(&xfer) {
            self.bytes -= p.bytes.len();
        }
    }

    fn expire(&mut self) {
        let old: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, p)| p.last.elapsed() > PARTIAL_TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.drop_one(k);
        }
    }

    /// Bytes held now.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_message_goes_in_chunks_and_comes_back_whole() {
        let big = "x".repeat(3 * CHUNK_BYTES + 17);
        let msg = Msg::Progress {
            from: "a".into(),
            rid: 7,
            value: RawValue::from_string(format!("{{\"blob\":\"{big}\"}}")).expect("JSON"),
        };
        let parts = encode(&msg, 1);
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|p| p.len() <= CHUNK_BYTES + 32));
        let mut p = Partials::default();
        let mut out = None;
        for part in &parts {
            out = p.accept(part);
        }
        match out {
            Some(Msg::Progress { value, rid: 7, .. }) => {
                assert_eq!(value.get().len(), big.len() + 11)
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.held(), 0);
    }

    #[test]
    fn unfinished_transfers_are_bounded() {
        let mut p = Partials::default();
        for xfer in 0..(MAX_PARTIALS as u64 + 10) {
            let mut part = format!("C{xfer}:0:2\n").into_bytes();
            part.extend_from_slice(&[b'x'; 1000]);
            assert!(p.accept(&part).is_none());
        }
        assert_eq!(p.open.len(), MAX_PARTIALS);
        assert_eq!(p.held(), MAX_PARTIALS * 1000);
        // A part out of order drops its transfer.
        assert!(p.accept(b"C70:5:2\nxx").is_none());
        assert!(p.accept(b"garbage").is_none());
    }
}
