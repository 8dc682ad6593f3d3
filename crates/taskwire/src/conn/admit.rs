//! Admission: one request in, either an admitted task or one answer out.
//!
//! Protocol methods (`$/cancelRequest`, `$/ping`, `rpc.discover`) are answered
//! here; a task request passes the registry, its params, the connection's
//! in-flight limit (with duplicate ids) and the compute pool's admission, in
//! that order, and the first refusal is its answer. Nothing here awaits: the
//! caller delivers the answer or starts the task, in one place.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use serde_json::value::RawValue;

use super::reply::Offload;
use super::state::{ConnState, Refused};
use crate::app::App;
use crate::compute::Permit;
use crate::observe::RefusalReason;
use crate::protocol::{self, codes, ErrorObject, Id, Rejected, Request};
use crate::registry::TaskFuture;
use crate::session::{frames, Attachment, Session};
use crate::task::{stopped_error, Ctx, Stopped, TaskInit, TaskKind, TaskShared};

/// What became of one request.
pub(super) enum Admission {
    /// Answered at once: the answer (none for a notification) and its id.
    Answer {
        text: Option<String>,
        id: Option<Id>,
    },
    /// A task to run: in the in-flight table, with its compute permit if it is a CPU task.
    Task {
        task: Arc<TaskShared>,
        fut: TaskFuture,
        permit: Option<Permit>,
        /// Its params, kept should another node run it.
        offload: Option<Offload>,
    },
}

/// The answer to a request with this id (none for a notification).
fn answer(id: Option<Id>, err: &ErrorObject) -> Admission {
    let text = id.as_ref().map(|i| protocol::error_text(Some(i), err));
    Admission::Answer { text, id }
}

/// A successful answer with a fixed result (none for a notification).
fn constant(id: Option<Id>, result: &str) -> Admission {
    let text = id.as_ref().and_then(|i| {
        let v = RawValue::from_string(result.to_string()).ok()?;
        Some(protocol::success_text(i, &v))
    });
    Admission::Answer { text, id }
}

/// Where a request stands in its connection: session methods care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    /// The connection's first frame, a single request.
    First,
    /// A later single request.
    Single,
    /// An element of a batch.
    InBatch,
}

/// `{"jsonrpc":"2.0","id":<id>,"result":null}`.
fn null_result(id: &Id) -> String {
    let mut out = String::from(r#"{"jsonrpc":"2.0","id":"#);
    id.write_json(&mut out);
    out.push_str(r#","result":null}"#);
    out
}

/// A `$/session.*` request's answer is not numbered: it is queued here, at
/// once, and the request counts as answered with nothing more to deliver.
fn unnumbered(id: Option<Id>) -> Admission {
    Admission::Answer { text: None, id }
}

fn refuse_unnumbered(conn: &ConnState, id: Option<Id>, err: &ErrorObject) -> Admission {
    if let Some(i) = &id {
        conn.try_send(protocol::error_text(Some(i), err));
    }
    unnumbered(id)
}

fn open_session(
    app: &Arc<App>,
    conn: &Arc<ConnState>,
    req: Request<'_>,
    place: Place,
) -> Admission {
    if place == Place::InBatch {
        let err = ErrorObject::invalid_request("$/session.open cannot be part of a batch");
        return answer(req.id, &err);
    }
    if conn.session().is_some() {
        let err = ErrorObject::invalid_request("this connection already has a session");
        return refuse_unnumbered(conn, req.id, &err);
    }
    let params = match frames::parse_open(&req.params) {
        Ok(p) => p,
        Err(err) => return refuse_unnumbered(conn, req.id, &err),
    };
    let install = |s: &Arc<Session>| {
        let _ = conn.session.set(s.clone());
    };
    let attachment: Arc<dyn Attachment> = conn.clone();
    if let Err(err) = app.sessions.open(
        (conn.owner.clone(), conn.peer.ip()),
        params.window_ms,
        (conn.table().clone(), conn.cpu_admitted.clone()),
        attachment,
        req.id.as_ref(),
        &install,
    ) {
        return refuse_unnumbered(conn, req.id, &err);
    }
    tracing::debug!("session opened");
    unnumbered(req.id)
}

fn resume_session(
    app: &Arc<App>,
    conn: &Arc<ConnState>,
    req: Request<'_>,
    place: Place,
) -> Admission {
    if place == Place::InBatch {
        let err = ErrorObject::invalid_request("$/session.resume cannot be part of a batch");
        return answer(req.id, &err);
    }
    if place != Place::First || conn.session().is_some() {
        let err = ErrorObject::invalid_request(
            "$/session.resume must be the first request of a connection without a session",
        );
        return refuse_unnumbered(conn, req.id, &err);
    }
    let params = match frames::parse_resume(&req.params) {
        Ok(Some(p)) => p,
        Ok(None) => return refuse_unnumbered(conn, req.id, &no_such_session()),
        Err(err) => return refuse_unnumbered(conn, req.id, &err),
    };
    let install = |s: &Arc<Session>| {
        // The first request: the connection has no table of its own yet.
        let _ = conn.inflight.set(s.table.clone());
        let _ = conn.session.set(s.clone());
    };
    let attachment: Arc<dyn Attachment> = conn.clone();
    match app
        .sessions
        .resume(&params, &conn.owner, attachment, req.id.as_ref(), &install)
    {
        Ok(resumed) => {
            for t in resumed.tasks {
                t.retarget(conn.tx.clone());
            }
            tracing::debug!(session = resumed.session.id, "session resumed");
            unnumbered(req.id)
        }
        Err(_) => refuse_unnumbered(conn, req.id, &no_such_session()),
    }
}

fn no_such_session() -> ErrorObject {
    ErrorObject::new(
        codes::NO_SUCH_SESSION,
        "no such session: unknown, expired, already resumed, or other credentials",
    )
}

/// Admits one request of the connection (`shutting_down`: the server is
/// shutting down, new tasks are refused `-32005`).
pub(super) fn admit(
    app: &Arc<App>,
    conn: &Arc<ConnState>,
    r: Result<Request<'_>, Rejected>,
    shutting_down: bool,
    place: Place,
) -> Admission {
    let req = match r {
        Ok(req) => req,
        Err(rej) => {
            let text =
                (!rej.notification).then(|| protocol::error_text(rej.id.as_ref(), &rej.error));
            return Admission::Answer { text, id: rej.id };
        }
    };
    match req.method.as_str() {
        protocol::CANCEL_METHOD => {
            if let Some(target) = protocol::cancel_target(req.params) {
                if let Some(t) = conn.task_by_request(&target) {
                    t.stop(Stopped::Cancelled);
                }
            }
            // Sent as a request by mistake: it still gets exactly one answer.
            return constant(req.id, "null");
        }
        // The protocol's heartbeat: answered here, whatever tasks exist.
        protocol::PING_METHOD => return constant(req.id, "{}"),
        frames::OPEN_METHOD => return open_session(app, conn, req, place),
        frames::RESUME_METHOD => return resume_session(app, conn, req, place),
        frames::ACK_METHOD => {
            if let (Some(s), Some(n)) = (conn.session(), frames::parse_ack(&req.params)) {
                s.ack(n);
            }
            if let Some(id) = &req.id {
                conn.try_send(null_result(id));
            }
            return unnumbered(req.id);
        }
        protocol::DISCOVER_METHOD => {
            let with_modules = app.wasm.discover();
            let discover = with_modules.as_deref().unwrap_or(&app.discover);
            let text = req
                .id
                .as_ref()
                .map(|id| protocol::success_text(id, discover));
            return Admission::Answer { text, id: req.id };
        }
        _ => {}
    }
    // Native tasks first: a module can never shadow one (installs refuse
    // their names).
    let module;
    let mut module_sha = None;
    let def = match app.registry.get(&req.method) {
        Some(def) => def,
        None => match app.wasm.get(&req.method) {
            Some(m) => {
                module = m;
                module_sha = Some(module.info.sha256.clone());
                &module.def
            }
            None => return answer(req.id, &ErrorObject::method_not_found(&req.method)),
        },
    };
    if shutting_down {
        return answer(req.id, &stopped_error(Stopped::Shutdown, None));
    }
    let timeout_ms = req
        .meta
        .timeout_ms
        .unwrap_or(u64::MAX)
        .min(app.cfg.max_task_timeout.as_millis() as u64);
    let task = TaskShared::new(TaskInit {
        id: app.next_task.fetch_add(1, Ordering::Relaxed),
        conn: conn.id,
        request_id: req.id.clone(),
        method: def.name.clone(),
        kind: def.kind,
        timeout_ms: Some(timeout_ms),
        progress_token: req.meta.progress_token,
        outbound: conn.tx.clone(),
        caller: conn.caller.clone(),
        state: app.states.clone(),
    });
    let ctx = Ctx {
        shared: task.clone(),
    };
    // CPU and WebAssembly tasks may run on another node; a wasm task only
    // where the module of the same hash is installed.
    let offload = match def.kind {
        TaskKind::Cpu => Offload::keep(app, conn, &req.params, None),
        TaskKind::Wasm => Offload::keep(app, conn, &req.params, module_sha),
        TaskKind::Io => None,
    };
    let fut = match (def.call)(ctx, req.params) {
        Ok(f) => f,
        Err(err) => {
            // The only refusal a call makes: a wasm module's instance slots.
            if err.code == codes::OVERLOADED {
                app.hooks.refused(RefusalReason::WasmInstances);
            }
            return answer(req.id, &err);
        }
    };
    // Admission: the connection's in-flight limit, then the pool's queues.
    match conn.insert(&task) {
        Ok(()) => {}
        Err(Refused::Superseded) => {
            return Admission::Answer {
                text: None,
                id: None,
            }
        }
        Err(Refused::Answer(err)) => {
            if err.code == codes::OVERLOADED {
                app.hooks.refused(RefusalReason::ConnectionInflight);
            }
            return answer(req.id, &err);
        }
    }
    let permit = match def.kind {
        TaskKind::Io => None,
        TaskKind::Cpu | TaskKind::Wasm => {
            match app.pool.admit_from(conn.charge().1, conn.peer.ip()) {
                Ok(p) => Some(p),
                Err(refusal) => {
                    conn.remove(&task);
                    let reason = RefusalReason::from(&refusal);
                    app.hooks.refused(reason);
                    let err = ErrorObject::overloaded(reason.label(), refusal.retry_after_ms());
                    return answer(req.id, &err);
                }
            }
        }
    };
    Admission::Task {
        task,
        fut,
        permit,
        offload,
    }
}
