//! The node API: what the nodes of a cluster ask each other, under `/internal`, authenticated
//! by the cluster's secret (`X-Viv-Cluster-Secret`, kept in the shared store) instead of an API
//! key. Not part of the public API (absent from `/openapi.yaml`); keep node addresses on a
//! private network.
//!
//! - `GET /internal/layers/{key}`: a template layer this node has, for a node that has to start
//!   the template (`manager/layer_fetch.rs`);
//! - `GET /internal/snapshots/{id}/disk` and `…/state`: a snapshot node's disk made whole down to
//!   its template's layer, and its memory, for a node adopting a paused sandbox;
//!   `DELETE /internal/snapshots/{id}`: drop the copy of a snapshot that no longer names this
//!   node; `POST /internal/snapshots/{id}/replicate`: copy a paused sandbox's snapshot here
//!   (`manager/snapshot_replicas.rs`);
//!   `POST /internal/sandboxes/{id}/adopt`: take a paused sandbox from the node holding it (a
//!   drain asks this) (`manager/snapshot_move.rs`);
//! - `/internal/migrations/incoming…`: the destination's side of a VM moved live from another
//!   node (`routes/vm_migrate.rs`, `manager/vm_incoming.rs`);
//! - `POST /internal/vms/{id}/adopt`: take a stopped VM from the node holding it, which serves
//!   its writable disks (`GET /internal/vms/{id}/disks/{disk}`, with their SHA-256) and its UEFI
//!   variables (`GET /internal/vms/{id}/nvram`, 204 without) (`manager/vm_move.rs`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;

use crate::error::ApiError;
use crate::manager::{ExportedFile, CLUSTER_SECRET_HEADER, SNAPSHOT_CHANNEL_KEY_HEADER, SNAPSHOT_MEMORY_HEADER};
use crate::AppState;

/// The node API's routes.
pub(super) fn routes(state: &AppState) -> Router<AppState> {
    let migrations = super::vm_migrate::node_routes().route_layer(axum::middleware::from_fn_with_state(
        state.clone(),
        |State(state): State<AppState>, request: axum::extract::Request, next: axum::middleware::Next| async move {
            match check_secret(&state, request.headers()) {
                Ok(()) => next.run(request).await,
                Err(err) => err.into_response(),
            }
        },
    ));
    Router::new()
        .merge(migrations)
        .route("/internal/layers/{key}", get(layer))
        .route("/internal/snapshots/{id}/disk", get(snapshot_disk))
        .route("/internal/snapshots/{id}/state", get(snapshot_state))
        .route("/internal/snapshots/{id}", delete(drop_snapshot))
        .route("/internal/snapshots/{id}/replicate", post(replicate_snapshot))
        .route("/internal/sandboxes/{id}/adopt", post(adopt_sandbox))
        .route("/internal/vms/{id}/adopt", post(adopt_vm))
        .route("/internal/vms/{id}/disks/{disk}", get(vm_disk))
        .route("/internal/vms/{id}/nvram", get(vm_nvram))
}

fn check_secret(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(CLUSTER_SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if given.is_empty() || !viv_proto::signing::same(given, state.cluster.secret().as_bytes()) {
        return Err(ApiError::Unauthorized(
            "the node API takes the cluster's secret in X-Viv-Cluster-Secret".into(),
        ));
    }
    Ok(())
}

async fn layer(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    let path = state
        .manager
        .layer_file(&key)
        .ok_or_else(|| ApiError::NotFound(format!("this node has no layer '{key}'")))?;
    Ok(file_answer(ExportedFile::open(&path).await?, []))
}

async fn snapshot_disk(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    let (disk, memory, key) = state.manager.export_snapshot_disk(&id).await?;
    let mut answer = file_answer(disk, [(SNAPSHOT_MEMORY_HEADER, memory)]);
    let key = axum::http::HeaderValue::from_str(&key)
        .map_err(|_| ApiError::Internal("a channel key that is not a header value".into()))?;
    answer.headers_mut().insert(SNAPSHOT_CHANNEL_KEY_HEADER, key);
    Ok(answer)
}

async fn snapshot_state(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    Ok(file_answer(state.manager.export_snapshot_state(&id).await?, []))
}

async fn drop_snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    state.manager.drop_moved_snapshot(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn replicate_snapshot(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    state.manager.replicate_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn adopt_sandbox(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    state.manager.adopt_paused_sandbox(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A file streamed as an answer, with its length and `extra` headers.
async fn adopt_vm(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    axum::Json(req): axum::Json<crate::manager::AdoptVm>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    Ok(axum::Json(state.manager.adopt_stopped_vm(&id, &req.from).await?).into_response())
}

async fn vm_disk(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((id, disk)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    let (file, sha256) = state.manager.export_vm_disk(&id, &disk).await?;
    let mut answer = file_answer(file, []);
    let sha256 = axum::http::HeaderValue::from_str(&sha256).map_err(|e| ApiError::Internal(e.to_string()))?;
    answer.headers_mut().insert(crate::manager::DISK_SHA256_HEADER, sha256);
    Ok(answer)
}

async fn vm_nvram(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    Ok(match state.manager.export_vm_nvram(&id)? {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

fn file_answer<const N: usize>(exported: ExportedFile, extra: [(&'static str, &'static str); N]) -> Response {
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(exported.file));
    let mut response = (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, exported.len.to_string()),
        ],
        body,
    )
        .into_response();
    for (name, value) in extra {
        response
            .headers_mut()
            .insert(name, axum::http::HeaderValue::from_static(value));
    }
    response
}
