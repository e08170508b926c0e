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
//! - `/internal/sandboxes/{id}/agent/{path}`: a request for the agent of a sandbox of this node
//!   (its `process.Process/…` calls and its `tunnel`), passed on over the sandbox's channel with
//!   this node's token after the sandbox is woken (resumed when paused). Another node's SSH
//!   gateway reaches sandboxes through it ([`crate::agent_client::AgentClient::via_node`]);
//! - `/internal/migrations/incoming…`: the destination's side of a VM moved live from another
//!   node (`manager/vm_incoming.rs`; the same handlers answer the public
//!   `/migrations/incoming…`, behind an API key there);
//! - `POST /internal/vms/{id}/adopt`: take a stopped VM from the node holding it, which serves
//!   its writable disks (`GET /internal/vms/{id}/disks/{disk}`, with their SHA-256) and its UEFI
//!   variables (`GET /internal/vms/{id}/nvram`, 204 without) (`manager/vm_move.rs`).
//!
//! Invariants: every route here is behind the cluster's secret, checked before any handler
//! runs (a node that has not joined a cluster has no secret and refuses them all); a
//! migration channel is spliced only after `101` was sent and only to a socket of a pending
//! incoming VM of this node; file answers carry their length, so a cut transfer is seen.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRef, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use viv_api::vms::IncomingVm;

use crate::error::ApiError;
use crate::extract::{ApiPath, JsonBody};
use crate::manager::{
    AdoptVm, ExportedFile, IncomingChannel, Manager, CLUSTER_SECRET_HEADER, DISK_SHA256_HEADER, MIGRATION_PROTOCOL,
    SNAPSHOT_CHANNEL_KEY_HEADER, SNAPSHOT_MEMORY_HEADER,
};

/// The node API's routes, for any router whose state gives the node's [`Manager`].
pub fn routes<S>(manager: Arc<Manager>) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Arc<Manager>: FromRef<S>,
{
    Router::new()
        .route("/internal/migrations/incoming", post(receive))
        .route("/internal/migrations/incoming/{id}", delete(abort))
        .route("/internal/migrations/incoming/{id}/finish", post(finish))
        .route("/internal/migrations/incoming/{id}/{channel}", get(channel))
        .route("/internal/layers/{key}", get(layer))
        .route("/internal/snapshots/{id}/disk", get(snapshot_disk))
        .route("/internal/snapshots/{id}/state", get(snapshot_state))
        .route("/internal/snapshots/{id}", delete(drop_snapshot))
        .route("/internal/snapshots/{id}/replicate", post(replicate_snapshot))
        .route("/internal/sandboxes/{id}/adopt", post(adopt_sandbox))
        .route(
            "/internal/sandboxes/{id}/agent/{*path}",
            axum::routing::any(sandbox_agent),
        )
        .route("/internal/vms/{id}/adopt", post(adopt_vm))
        .route("/internal/vms/{id}/disks/{disk}", get(vm_disk))
        .route("/internal/vms/{id}/nvram", get(vm_nvram))
        .route_layer(axum::middleware::from_fn_with_state(
            manager,
            |State(manager): State<Arc<Manager>>, request: Request, next: axum::middleware::Next| async move {
                match check_secret(&manager, request.headers()) {
                    Ok(()) => next.run(request).await,
                    Err(err) => err.into_response(),
                }
            },
        ))
}

fn check_secret(manager: &Manager, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(CLUSTER_SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let known = manager.cluster_secret().unwrap_or_default();
    if given.is_empty() || known.is_empty() || !viv_proto::signing::same(given, known.as_bytes()) {
        return Err(ApiError::Unauthorized(
            "the node API takes the cluster's secret in X-Viv-Cluster-Secret".into(),
        ));
    }
    Ok(())
}

async fn layer(State(manager): State<Arc<Manager>>, ApiPath(key): ApiPath<String>) -> Result<Response, ApiError> {
    let path = manager
        .layer_file(&key)
        .ok_or_else(|| ApiError::NotFound(format!("this node has no layer '{key}'")))?;
    Ok(file_answer(ExportedFile::open(&path).await?, []))
}

async fn snapshot_disk(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let (disk, memory, key) = manager.export_snapshot_disk(&id).await?;
    let mut answer = file_answer(disk, [(SNAPSHOT_MEMORY_HEADER, memory)]);
    let key = axum::http::HeaderValue::from_str(&key)
        .map_err(|_| ApiError::Internal("a channel key that is not a header value".into()))?;
    answer.headers_mut().insert(SNAPSHOT_CHANNEL_KEY_HEADER, key);
    Ok(answer)
}

async fn snapshot_state(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(file_answer(manager.export_snapshot_state(&id).await?, []))
}

async fn drop_snapshot(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    manager.drop_moved_snapshot(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn replicate_snapshot(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    manager.replicate_snapshot(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn adopt_sandbox(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    manager.adopt_paused_sandbox(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// The agent paths another node may call: what interactive sessions and port forwards use.
fn agent_path_allowed(path: &str) -> bool {
    path.strip_prefix("process.Process/")
        .is_some_and(|method| !method.is_empty() && method.bytes().all(|b| b.is_ascii_alphanumeric()))
        || path == "tunnel"
}

/// Headers of a passed-on agent request that the agent reads.
const AGENT_REQUEST_HEADERS: [header::HeaderName; 3] = [
    header::CONTENT_TYPE,
    header::AUTHORIZATION,
    header::HeaderName::from_static("connect-protocol-version"),
];

async fn sandbox_agent(
    State(manager): State<Arc<Manager>>,
    ApiPath((id, path)): ApiPath<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    if !agent_path_allowed(&path) {
        return Err(ApiError::NotFound(format!(
            "the node API passes on only process.Process calls and tunnels, not '{path}'"
        )));
    }
    let live = manager.wake(&id).await?;
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut builder = hyper::Request::builder()
        .method(parts.method)
        .uri(format!("http://agent/{path}{query}"));
    for name in AGENT_REQUEST_HEADERS {
        if let Some(value) = parts.headers.get(&name) {
            builder = builder.header(name, value);
        }
    }
    let request = builder
        .body(body)
        .map_err(|e| ApiError::BadRequest(format!("cannot pass the request on: {e}")))?;
    let answer = live
        .agent
        .send(request)
        .await
        .map_err(|e| ApiError::Sandbox(format!("sandbox {id}'s agent: {e}")))?;
    let (parts, body) = answer.into_parts();
    Ok(Response::from_parts(parts, Body::new(body)))
}

async fn adopt_vm(
    State(manager): State<Arc<Manager>>,
    ApiPath(id): ApiPath<String>,
    axum::Json(req): axum::Json<AdoptVm>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(manager.adopt_stopped_vm(&id, &req.from).await?).into_response())
}

async fn vm_disk(
    State(manager): State<Arc<Manager>>,
    ApiPath((id, disk)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let (file, sha256) = manager.export_vm_disk(&id, &disk).await?;
    let mut answer = file_answer(file, []);
    let sha256 = axum::http::HeaderValue::from_str(&sha256).map_err(|e| ApiError::Internal(e.to_string()))?;
    answer.headers_mut().insert(DISK_SHA256_HEADER, sha256);
    Ok(answer)
}

async fn vm_nvram(State(manager): State<Arc<Manager>>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(match manager.export_vm_nvram(&id)? {
        Some(bytes) => ([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response(),
        None => StatusCode::NO_CONTENT.into_response(),
    })
}

/// A file streamed as an answer, with its length and `extra` headers.
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

/// `POST …/migrations/incoming`: a VM to receive (`201`, its incoming QEMU waiting).
pub async fn receive(
    State(manager): State<Arc<Manager>>,
    JsonBody(req): JsonBody<IncomingVm>,
) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(manager.receive_vm(req).await?)).into_response())
}

/// `POST …/migrations/incoming/{id}/finish`: the migrated VM runs here from now on.
pub async fn finish(State(manager): State<Arc<Manager>>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(manager.finish_incoming(&id).await?).into_response())
}

/// `DELETE …/migrations/incoming/{id}`: the incoming VM is deleted.
pub async fn abort(State(manager): State<Arc<Manager>>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    manager.abort_incoming(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET …/migrations/incoming/{id}/{ram|nbd}`: upgraded to [`MIGRATION_PROTOCOL`] and spliced
/// onto the incoming QEMU's socket.
pub async fn channel(
    State(manager): State<Arc<Manager>>,
    ApiPath((id, channel)): ApiPath<(String, String)>,
    mut request: Request,
) -> Result<Response, ApiError> {
    let which = match channel.as_str() {
        "ram" => IncomingChannel::Ram,
        "nbd" => IncomingChannel::Nbd,
        other => {
            return Err(ApiError::NotFound(format!(
                "no migration channel '{other}' (ram or nbd)"
            )))
        }
    };
    let wants = request
        .headers()
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(MIGRATION_PROTOCOL));
    if !wants {
        return Err(ApiError::BadRequest(format!(
            "a migration channel is an upgraded connection: send Connection: upgrade, Upgrade: {MIGRATION_PROTOCOL}"
        )));
    }
    let mut qemu = manager.incoming_channel(&id, which).await?;
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut qemu).await;
            }
            Err(err) => tracing::warn!(error = %err, "a migration channel was not upgraded"),
        }
    });
    let mut response = StatusCode::SWITCHING_PROTOCOLS.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    response
        .headers_mut()
        .insert(header::UPGRADE, HeaderValue::from_static(MIGRATION_PROTOCOL));
    Ok(response)
}
