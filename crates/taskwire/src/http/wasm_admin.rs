//! The admin API of the WebAssembly lane: `GET /admin/wasm`,
//! `PUT /admin/wasm/{name}` (the module's bytes, binary or text) and
//! `DELETE /admin/wasm/{name}`, and `GET /admin/wasm/sha256/{hex}` (an
//! installed module's bytes by their hash), behind the same guard as the rest
//! of `/admin`.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use super::admin::AdminState;
use crate::observe::api::ApiError;
use crate::wasm::{InstallError, ModuleSpec, MAX_MODULE_BYTES};

/// The routes, to merge under the admin guard.
pub(super) fn routes<S>() -> Router<S>
where
    AdminState: axum::extract::FromRef<S>,
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/admin/wasm", get(list))
        .route("/admin/wasm/sha256/{hex}", get(by_sha256))
        .route(
            "/admin/wasm/{name}",
            axum::routing::put(install)
                .delete(remove)
                // A module may be larger than axum's default body limit.
                .layer(DefaultBodyLimit::max(MAX_MODULE_BYTES)),
        )
}

/// The bytes of the installed module with this SHA-256, as installed (binary
/// or text), its name in `x-taskwire-module`: how another node fetches code
/// it heard of by hash, to run the same code under the same name.
async fn by_sha256(State(app): State<AdminState>, Path(hex): Path<String>) -> Response {
    match app.wasm.by_sha256(&hex) {
        Some((info, bytes)) => (
            [
                (
                    axum::http::header::CONTENT_TYPE,
                    "application/octet-stream".to_string(),
                ),
                (
                    axum::http::HeaderName::from_static("x-taskwire-module"),
                    info.name,
                ),
            ],
            Bytes::from_owner(bytes),
        )
            .into_response(),
        None => error(StatusCode::NOT_FOUND, "no installed module has this sha256"),
    }
}

/// Options of an install; with none, a replaced module keeps its own.
#[derive(Debug, Default, Deserialize)]
struct InstallQuery {
    summary: Option<String>,
    memory_limit_bytes: Option<u64>,
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(ApiError { error: msg.into() })).into_response()
}

async fn list(State(app): State<AdminState>) -> Response {
    Json(serde_json::json!({ "modules": app.wasm.list() })).into_response()
}

async fn install(
    State(app): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<InstallQuery>,
    body: Bytes,
) -> Response {
    let spec = (q.summary.is_some() || q.memory_limit_bytes.is_some()).then_some(ModuleSpec {
        summary: q.summary,
        memory_limit_bytes: q.memory_limit_bytes,
        params: None,
    });
    let lane = app.wasm.clone();
    // Compiling takes milliseconds to seconds: never on a connection thread.
    let done =
        tokio::task::spawn_blocking(move || lane.install(&name, &body, spec).map(|i| (name, i)))
            .await;
    match done {
        Ok(Ok((name, info))) => {
            tracing::info!(module = %name, "wasm module installed by an operator");
            Json(info).into_response()
        }
        Ok(Err(e)) => {
            let status = match e {
                InstallError::BadName(_) | InstallError::Invalid(_) => StatusCode::BAD_REQUEST,
                InstallError::Clash(_) | InstallError::TooMany(_) => StatusCode::CONFLICT,
                InstallError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
                InstallError::Busy => StatusCode::SERVICE_UNAVAILABLE,
                InstallError::Unavailable(_) => StatusCode::NOT_IMPLEMENTED,
            };
            error(status, e.to_string())
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the compile failed: {e}"),
        ),
    }
}

async fn remove(State(app): State<AdminState>, Path(name): Path<String>) -> Response {
    if app.wasm.remove(&name) {
        tracing::info!(module = %name, "wasm module removed by an operator");
        Json(serde_json::json!({ "removed": true })).into_response()
    } else {
        error(StatusCode::NOT_FOUND, "no such module")
    }
}
