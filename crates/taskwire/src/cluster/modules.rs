//! WebAssembly modules across the cluster: installed on one node, they reach
//! every node, by hash.
//!
//! Every beat carries a digest of the node's modules (names and SHA-256s).
//! A node that hears a digest unlike its own asks that peer for its list, at
//! most once per beat period. For each name the newest install or removal
//! wins (its time, then its hash), so every node converges on the same table
//! whichever node an operator used; a removal is remembered, so a node that
//! missed it does not bring the module back. Bytes a node lacks are fetched
//! by hash from the peer that listed them (chunked like any large message),
//! checked against the hash and compiled off the async threads. A wasm task
//! offered to a peer names its module's hash, and the peer runs it only on
//! that code: a node that has not caught up yet refuses, and the task stays
//! home.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;

use super::wire::Msg;
use super::Cluster;
use crate::sync::lock;
use crate::wasm::{InstallError, ModuleAd, ModuleSpec};

/// Fetches in flight at once; more modules wait for the next comparison.
const MAX_FETCHES: usize = 16;
/// A fetch not answered within this is given up (the next comparison asks again).
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Modules that failed to install here, remembered so that they are not
/// fetched at every beat; forgotten past this many.
const MAX_FAILED: usize = 256;

/// The comparisons and fetches under way.
#[derive(Default)]
pub(super) struct ModuleSync {
    /// When each peer was last asked for its list.
    asked: HashMap<Arc<str>, Instant>,
    /// Modules asked for by hash: when, and the names they go under.
    fetching: HashMap<String, (Instant, Vec<ModuleAd>)>,
    /// (name, hash) that would not install here (a name taken by a native
    /// task, a memory limit above this node's): not fetched again.
    failed: std::collections::HashSet<(String, String)>,
}

impl Cluster {
    /// Whether a peer's beat says its modules differ from this node's, and
    /// it was not asked within the last beat period.
    pub(super) fn should_ask_modules(&self, peer: &str, digest: u64) -> bool {
        if digest == self.parts.wasm.digest() {
            return false;
        }
        let mut s = lock(&self.modules);
        let now = Instant::now();
        match s.asked.get(peer) {
            Some(t) if now.duration_since(*t) < self.set.beat => false,
            _ => {
                if s.asked.len() >= super::MAX_PEERS && !s.asked.contains_key(peer) {
                    s.asked
                        .retain(|_, t| now.duration_since(*t) < self.set.dead_after);
                    if s.asked.len() >= super::MAX_PEERS {
                        return false;
                    }
                }
                s.asked.insert(Arc::from(peer), now);
                true
            }
        }
    }

    /// This node's list, for a peer that asked.
    pub(super) fn modules_msg(&self) -> Msg {
        let (modules, removed) = self.parts.wasm.ads();
        Msg::Modules {
            from: self.node.to_string(),
            modules,
            removed,
        }
    }

    /// A peer's list: removals applied, newer modules installed (from bytes
    /// this node has) or fetched from that peer.
    pub(super) async fn merge_modules(
        self: &Arc<Self>,
        from: &str,
        modules: Vec<ModuleAd>,
        removed: Vec<(String, u64)>,
    ) {
        let lane = &self.parts.wasm;
        for (name, at) in removed {
            if lane.remove_synced(&name, at) {
                tracing::info!(module = %name, peer = from, "cluster: wasm module removed as on a peer");
            }
        }
        let mut fetch = Vec::new();
        {
            let mut s = lock(&self.modules);
            let now = Instant::now();
            s.fetching
                .retain(|_, (t, _)| now.duration_since(*t) < FETCH_TIMEOUT);
            for ad in modules {
                if !lane.wants(&ad) || s.failed.contains(&(ad.name.clone(), ad.sha256.clone())) {
                    continue;
                }
                if let Some((_, names)) = s.fetching.get_mut(&ad.sha256) {
                    if !names.contains(&ad) {
                        names.push(ad);
                    }
                    continue;
                }
                if s.fetching.len() >= MAX_FETCHES {
                    continue;
                }
                let sha = ad.sha256.clone();
                s.fetching.insert(sha.clone(), (now, vec![ad]));
                fetch.push(sha);
            }
        }
        for sha256 in fetch {
            if let Some((spec, bytes)) = lane.for_peer(&sha256) {
                // The same bytes are here under another name.
                self.install_fetched(&sha256, spec, bytes.to_vec());
                continue;
            }
            let msg = Msg::Fetch {
                from: self.node.to_string(),
                sha256,
            };
            self.send(from, &msg).await;
        }
    }

    /// A peer asked for a module's bytes: sent if this node has them.
    pub(super) fn module_msg(&self, sha256: &str) -> Option<Msg> {
        let (spec, bytes) = self.parts.wasm.for_peer(sha256)?;
        Some(Msg::Module {
            from: self.node.to_string(),
            sha256: sha256.to_string(),
            spec,
            bytes: base64::engine::general_purpose::STANDARD.encode(&bytes),
        })
    }

    /// A module's bytes arrived: installed under every name they were
    /// fetched for, off the async threads (a compile takes seconds).
    pub(super) fn on_module(self: &Arc<Self>, sha256: &str, spec: ModuleSpec, bytes: &str) {
        if !lock(&self.modules).fetching.contains_key(sha256) {
            return;
        }
        match base64::engine::general_purpose::STANDARD.decode(bytes) {
            Ok(b) => self.install_fetched(sha256, spec, b),
            Err(_) => {
                lock(&self.modules).fetching.remove(sha256);
            }
        }
    }

    fn install_fetched(self: &Arc<Self>, sha256: &str, spec: ModuleSpec, bytes: Vec<u8>) {
        let c = self.clone();
        let sha256 = sha256.to_string();
        tokio::task::spawn_blocking(move || {
            let ads = lock(&c.modules)
                .fetching
                .get(&sha256)
                .map(|(_, a)| a.clone())
                .unwrap_or_default();
            for ad in ads {
                match c.parts.wasm.install_synced(&ad, &bytes, spec.clone()) {
                    Ok(_) => {
                        tracing::info!(module = %ad.name, sha256 = %ad.sha256, "cluster: wasm module installed as on a peer");
                    }
                    // Tried again at the next comparison.
                    Err(InstallError::Busy) => {}
                    Err(e) => {
                        tracing::warn!(module = %ad.name, sha256 = %ad.sha256, error = %e, "cluster: a peer's wasm module does not install here");
                        let mut s = lock(&c.modules);
                        if s.failed.len() >= MAX_FAILED {
                            s.failed.clear();
                        }
                        s.failed.insert((ad.name.clone(), ad.sha256.clone()));
                    }
                }
            }
            lock(&c.modules).fetching.remove(&sha256);
        });
    }
}
