//! The storage pool's routes (API key): `/disks`, `/isos` and `/operations`.
//!
//! Bodies of uploads and imports are streamed to files, never held in memory; the SHA-256 an
//! upload must have comes in the `X-Content-SHA256` header or the `sha256` query parameter.
//! Long work (clone, import, wipe) answers `202 Accepted` with an operation (and its URL in
//! `Location`), which `GET /operations/{id}/wait` awaits.

use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures::TryStreamExt as _;
use serde::Deserialize;
use viv_api::storage::{DiskClone, DiskFormat, DiskResize, NewDisk, Operation};

use super::{ApiPath, ApiQuery, JsonBody};
use crate::error::ApiError;
use crate::manager::operations::MAX_WAIT_SECS;
use crate::AppState;

/// The header carrying an upload's expected SHA-256.
pub const SHA256_HEADER: &str = "x-content-sha256";

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/disks", get(list_disks).post(create_disk))
        .route("/disks/{name}", get(disk).delete(delete_disk))
        .route("/disks/{name}/resize", post(resize_disk))
        .route("/disks/{name}/clone", post(clone_disk))
        .route("/disks/{name}/wipe", post(wipe_disk))
        .route("/disks/{name}/upload", put(upload_disk))
        .route("/disks/{name}/import", put(import_disk))
        .route("/disks/{name}/download", get(download_disk))
        .route("/disks/{name}/export", get(export_disk))
        .route("/isos", get(list_isos))
        .route("/isos/{name}", get(iso).put(add_iso).delete(delete_iso))
        .route("/operations", get(list_operations))
        .route("/operations/{id}", get(operation))
        .route("/operations/{id}/wait", get(wait_operation))
}

/// Query of upload routes.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    /// The body's SHA-256 (or the `X-Content-SHA256` header).
    sha256: Option<String>,
    /// An import's disk format.
    format: Option<DiskFormat>,
}

/// The expected SHA-256 from the header or the query (they must agree when both are given).
fn expected_sha256(headers: &HeaderMap, query: &UploadQuery) -> Result<Option<String>, ApiError> {
    let from_header = match headers.get(SHA256_HEADER) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::BadRequest("the X-Content-SHA256 header is not text".into()))?
                .to_owned(),
        ),
        None => None,
    };
    match (from_header, query.sha256.clone()) {
        (Some(h), Some(q)) if !h.trim().eq_ignore_ascii_case(q.trim()) => Err(ApiError::BadRequest(
            "the X-Content-SHA256 header and the sha256 parameter differ; give one".into(),
        )),
        (h, q) => Ok(h.or(q)),
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// The body as a byte reader.
pub(super) fn reader(body: Body) -> impl tokio::io::AsyncRead + Unpin {
    tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other))
}

pub(super) fn accepted(op: Operation) -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/operations/{}", op.id))],
        Json(op),
    )
        .into_response()
}

async fn list_disks(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_disks().await?).into_response())
}

async fn create_disk(State(state): State<AppState>, JsonBody(req): JsonBody<NewDisk>) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.create_disk(req).await?)).into_response())
}

async fn disk(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.disk(&name).await?).into_response())
}

async fn delete_disk(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.delete_disk(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn resize_disk(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    JsonBody(req): JsonBody<DiskResize>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.resize_disk(&name, req.size, req.force).await?).into_response())
}

async fn clone_disk(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    JsonBody(req): JsonBody<DiskClone>,
) -> Result<Response, ApiError> {
    Ok(accepted(state.manager.clone_disk(&name, req).await?))
}

async fn wipe_disk(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(accepted(state.manager.wipe_disk(&name).await?))
}

async fn upload_disk(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if q.format.is_some() {
        return Err(ApiError::BadRequest(
            "an upload keeps a raw or qcow2 image as it is (other formats become qcow2); format is for imports".into(),
        ));
    }
    let sha256 = expected_sha256(&headers, &q)?.ok_or_else(|| {
        ApiError::BadRequest("an upload needs its SHA-256: send the X-Content-SHA256 header or ?sha256=".into())
    })?;
    let info = state
        .manager
        .upload_disk(&name, &sha256, content_length(&headers), &mut reader(body))
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn import_disk(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let sha256 = expected_sha256(&headers, &q)?;
    let op = state
        .manager
        .import_disk(
            &name,
            q.format.unwrap_or_default(),
            sha256.as_deref(),
            content_length(&headers),
            &mut reader(body),
        )
        .await?;
    Ok(accepted(op))
}

async fn download_disk(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    let download = state.manager.download_disk(&name).await?;
    let stream = tokio_util::io::ReaderStream::new(download.file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, download.len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{}\"", download.format),
            ),
            (
                header::HeaderName::from_static("x-disk-format"),
                download.format.to_string(),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `?format=` of `GET /disks/{name}/export`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    format: Option<String>,
}

async fn export_disk(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    super::ApiQuery(query): super::ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    let format = query.format.unwrap_or_else(|| "qcow2".into());
    let export = state.manager.export_disk(&name, &format).await?;
    let stream = tokio_util::io::ReaderStream::new(export.file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, export.len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.{format}\""),
            ),
            (header::HeaderName::from_static("x-disk-format"), format),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

async fn list_isos(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_isos().await?).into_response())
}

async fn iso(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.iso(&name).await?).into_response())
}

async fn add_iso(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if q.format.is_some() {
        return Err(ApiError::BadRequest("an ISO has no format parameter".into()));
    }
    let sha256 = expected_sha256(&headers, &q)?;
    let info = state
        .manager
        .add_iso(&name, sha256.as_deref(), content_length(&headers), &mut reader(body))
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn delete_iso(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.delete_iso(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// This node's operations and, in a cluster, every other node's, oldest first.
async fn list_operations(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let mut all = state.manager.list_operations();
    all.extend(super::node_forward::gather_from_nodes::<Operation>(&state, &headers, "/operations").await?);
    all.sort_by(|a, b| a.created_at.cmp(&b.created_at));
    Ok(Json(all).into_response())
}

async fn operation(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.operation(&id)?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitQuery {
    /// Seconds to wait at most (default 30).
    timeout: Option<u64>,
}

async fn wait_operation(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Response, ApiError> {
    let timeout = q.timeout.unwrap_or(30);
    if timeout > MAX_WAIT_SECS {
        return Err(ApiError::BadRequest(format!(
            "timeout is at most {MAX_WAIT_SECS} seconds, got {timeout}"
        )));
    }
    let op = state.manager.wait_operation(&id, Duration::from_secs(timeout)).await?;
    Ok(Json(op).into_response())
}
