//! The connection as the live table sees it ([`ConnView`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::ConnState;
use crate::observe::{ConnInfo, ConnView};
use crate::task::{CallerInfo, TaskShared};

impl ConnView for ConnState {
    fn id(&self) -> u64 {
        self.id
    }

    fn info(&self) -> ConnInfo {
        ConnInfo {
            id: self.id,
            peer: self.peer.to_string(),
            caller: CallerInfo::id_of(&self.caller).map(str::to_owned),
            opened_at_ms: self
                .opened_at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            age_ms: self.opened.elapsed().as_millis() as u64,
            inflight: self.inflight_len(),
            bytes_in: self.bytes_in.load(Ordering::Relaxed),
            bytes_out: self.bytes_out.load(Ordering::Relaxed),
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
        }
    }

    fn task(&self, id: u64) -> Option<Arc<TaskShared>> {
        ConnState::task(self, id)
    }

    fn tasks(&self) -> Vec<Arc<TaskShared>> {
        ConnState::tasks(self)
    }

    fn outbound_depth(&self) -> usize {
        ConnState::outbound_depth(self)
    }

    fn close_with(&self, code: u16, reason: &'static str) {
        ConnState::close_with(self, code, reason)
    }
}
