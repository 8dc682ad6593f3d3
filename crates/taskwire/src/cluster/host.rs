//! The peer's side: a task offered by another node, run here in this
//! node's pool under a fairness group of its origin connection, its progress
//! and outcome sent back to the origin.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::http::Extensions;
use serde_json::value::RawValue;

use super::wire::Msg;
use super::{to_wire, Cluster, Hosted, STOP_GRACE};
use crate::compute::Permit;
use crate::observe::{ConnInfo, ConnView};
use crate::protocol::Id;
use crate::sync::{lock, Outbox};
use crate::task::{
    guarded, stop_signal, CallerInfo, Ctx, Outbound, Outcome, Stopped, TaskInit, TaskKind,
    TaskShared,
};

/// One origin connection as this node's admin table lists it: the tasks it
/// runs for that connection of that peer.
pub(super) struct RemoteConn {
    id: u64,
    origin: Arc<str>,
    origin_conn: u64,
    opened: Instant,
    opened_at_ms: u64,
    pub(super) admitted: Arc<AtomicUsize>,
    tasks: Mutex<HashMap<u64, Arc<TaskShared>>>,
}

impl ConnView for RemoteConn {
    fn id(&self) -> u64 {
        self.id
    }
    fn info(&self) -> ConnInfo {
        ConnInfo {
            id: self.id,
            peer: format!("node {}", self.origin),
            caller: Some(format!("{}/conn{}", self.origin, self.origin_conn)),
            opened_at_ms: self.opened_at_ms,
            age_ms: self.opened.elapsed().as_millis() as u64,
            inflight: lock(&self.tasks).len(),
            bytes_in: 0,
            bytes_out: 0,
            messages_in: 0,
            messages_out: 0,
        }
    }
    fn task(&self, id: u64) -> Option<Arc<TaskShared>> {
        lock(&self.tasks).get(&id).cloned()
    }
    fn tasks(&self) -> Vec<Arc<TaskShared>> {
        lock(&self.tasks).values().cloned().collect()
    }
    fn outbound_depth(&self) -> usize {
        0
    }
    fn close_with(&self, _code: u16, _reason: &'static str) {
        for t in self.tasks() {
            t.stop(Stopped::Killed);
        }
    }
}

impl Cluster {
    /// Takes an offered task if a worker is free for it now: its id here,
    /// and the future that runs it and answers the origin.
    pub(super) fn host(
        self: &Arc<Self>,
        offer: Msg,
    ) -> Option<(u64, impl std::future::Future<Output = ()> + Send + 'static)> {
        let Msg::Offer {
            from,
            inc,
            rid,
            conn,
            caller,
            method,
            params,
            timeout_ms,
            progress,
            module,
        } = offer
        else {
            return None;
        };
        let pool = &self.parts.pool;
        if self.stop.is_cancelled() || pool.spare() == 0 {
            return None;
        }
        // A wasm task runs here only on the code it was admitted with: a
        // node that has not caught up with a replaced module refuses it.
        let installed;
        let def = match &module {
            None => self.parts.registry.get(&method)?,
            Some(sha) => {
                installed = self
                    .parts
                    .wasm
                    .get(&method)
                    .filter(|m| m.info.sha256 == *sha)?;
                &installed.def
            }
        };
        if !matches!(def.kind, TaskKind::Cpu | TaskKind::Wasm) {
            return None;
        }
        let origin: Arc<str> = Arc::from(from.as_str());
        if lock(&self.hosted).contains_key(&(origin.clone(), rid)) {
            return None;
        }
        let group = self.group(&origin, conn);
        let permit: Permit = pool.admit_remote(&group.admitted).ok()?;
        // Progress goes to the origin through this queue: one slot is
        // enough, the task keeps only its latest value.
        let outbox: Arc<Outbox<Outbound>> = Arc::new(Outbox::new(4));
        let id = self.parts.next_task.fetch_add(1, Ordering::Relaxed);
        let task = TaskShared::new(TaskInit {
            id,
            conn: group.id,
            request_id: Some(Id::Str(Arc::from(format!("{from}/{rid}")))),
            method: def.name.clone(),
            kind: def.kind,
            timeout_ms,
            progress_token: progress
                .then(|| RawValue::from_string("0".to_string()).ok())
                .flatten(),
            outbound: outbox.clone(),
            caller: Some(Arc::new(CallerInfo {
                id: Some(format!("{from}/{}", caller.as_deref().unwrap_or("anonymous")).into()),
                extensions: Extensions::new(),
            })),
            state: self.parts.states.clone(),
        });
        let fut = params.call(
            def,
            Ctx {
                shared: task.clone(),
            },
        )?;
        lock(&group.tasks).insert(id, task.clone());
        lock(&self.hosted).insert(
            (origin.clone(), rid),
            Hosted {
                origin: origin.clone(),
                origin_inc: inc,
                task: task.clone(),
            },
        );
        self.count(&origin, false);
        // Queued now, so that the next offer sees this worker taken; its
        // progress waits in `outbox` until the origin has the acceptance.
        let handle = pool
            .spawn(
                group.id,
                task.stats.clone(),
                permit,
                guarded(task.clone(), fut),
            )
            .fallible();
        let c = self.clone();
        let run = async move {
            let forward = c.forward_progress(&origin, rid, &task, &outbox);
            let run = run_hosted(&task, handle);
            tokio::pin!(run);
            tokio::pin!(forward);
            let outcome = tokio::select! {
                biased;
                o = &mut run => o,
                _ = &mut forward => run.await,
            };
            // Dropped by this node's pool as it shut down.
            let outcome = match outcome {
                Outcome::Lost if c.stop.is_cancelled() => Outcome::Err(Stopped::Shutdown.into()),
                o => o,
            };
            outbox.close();
            // The latest progress before the answer, as on one node.
            if task.close_progress() {
                if let Some(v) = task.take_progress_value() {
                    let msg = Msg::Progress {
                        from: c.node.to_string(),
                        rid,
                        value: v,
                    };
                    c.send(&origin, &msg).await;
                }
            }
            lock(&c.hosted).remove(&(origin.clone(), rid));
            c.parts.hooks.task_finished(&task, outcome.kind());
            c.ungroup(&group, id);
            let msg = Msg::Done {
                from: c.node.to_string(),
                rid,
                outcome: to_wire(&outcome, task.timeout_ms),
                cpu_ns: task.stats.cpu_time().as_nanos() as u64,
                spare: c.parts.pool.spare() as u32,
            };
            c.send(&origin, &msg).await;
        };
        Some((id, run))
    }

    /// Sends the task's progress to its origin as it comes; ends when the
    /// queue closes.
    async fn forward_progress(
        &self,
        origin: &str,
        rid: u64,
        task: &Arc<TaskShared>,
        outbox: &Outbox<Outbound>,
    ) {
        while let Some(item) = outbox.pop().await {
            if let Outbound::Progress(_) = item {
                if let Some(v) = task.take_progress_value() {
                    let msg = Msg::Progress {
                        from: self.node.to_string(),
                        rid,
                        value: v,
                    };
                    self.send(origin, &msg).await;
                }
            }
        }
        std::future::pending::<()>().await
    }

    /// The fairness group of an origin connection here: the same id for as
    /// long as it has tasks here, so its usage orders it among local ones.
    fn group(&self, origin: &Arc<str>, conn: u64) -> Arc<RemoteConn> {
        let mut h = std::hash::DefaultHasher::new();
        origin.hash(&mut h);
        conn.hash(&mut h);
        // Local connections count from 1; these ids cannot meet them.
        let id = (1u64 << 62) | (h.finish() >> 2);
        let mut groups = lock(&self.groups);
        if let Some(g) = groups.get(&id) {
            return g.clone();
        }
        let g = Arc::new(RemoteConn {
            id,
            origin: origin.clone(),
            origin_conn: conn,
            opened: Instant::now(),
            opened_at_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            admitted: Arc::new(AtomicUsize::new(0)),
            tasks: Mutex::new(HashMap::new()),
        });
        groups.insert(id, g.clone());
        self.parts.hooks.conn_opened(g.clone());
        g
    }

    fn ungroup(&self, g: &Arc<RemoteConn>, task: u64) {
        let mut groups = lock(&self.groups);
        let empty = {
            let mut t = lock(&g.tasks);
            t.remove(&task);
            t.is_empty()
        };
        if empty {
            groups.remove(&g.id);
            self.parts.hooks.conn_closed(g.id);
        }
    }
}

/// Awaits a hosted task's outcome, its deadline and stops applied as for a
/// local task.
async fn run_hosted(
    task: &Arc<TaskShared>,
    mut handle: async_task::FallibleTask<Outcome, Arc<crate::compute::JobMeta>>,
) -> Outcome {
    tokio::select! {
        biased;
        out = &mut handle => out.unwrap_or(Outcome::Lost),
        why = stop_signal(task) => {
            match tokio::time::timeout(STOP_GRACE, handle.cancel()).await {
                Ok(Some(out)) => out,
                _ => Outcome::Err(why.into()),
            }
        }
    }
}
