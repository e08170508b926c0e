//! E2B's template routes, as the SDK's `Template.build` uses them: request a build
//! (`POST /v3/templates`), upload each `COPY` step's files by their hash
//! (`GET /templates/{id}/files/{hash}` gives a link; `PUT /template-files/...` takes the
//! archive), start it (`POST /v2/templates/{id}/builds/{build}`), poll its status and logs, check
//! a name (`GET /templates/aliases/{alias}`) and manage tags (`/templates/tags`,
//! `GET /templates/{id}/tags`).
//!
//! Invariant: the upload route is the only one without an API key; it takes a body only with
//! the one-use token of a link an authenticated call handed out.

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

use super::{ApiPath, ApiQuery, JsonBody};
use crate::error::ApiError;
use crate::manager::BuildStatusQuery;
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RequestBuild {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    alias: Option<String>,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    cpu_count: Option<u32>,
    #[serde(default, rename = "memoryMB")]
    memory_mb: Option<u32>,
    /// Accepted and ignored (disks grow as the layers need), but checked.
    #[serde(default, rename = "minFreeDiskMB")]
    min_free_disk_mb: Option<i64>,
}

/// `POST /v3/templates` → 202 with the template and build ids.
pub(super) async fn request_build(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<RequestBuild>,
) -> Result<Response, ApiError> {
    let plain_name = |n: &str| {
        (1..=63).contains(&n.len())
            && n.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && n.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
    };
    if let Some(alias) = req.alias.as_deref().filter(|a| !plain_name(a)) {
        return Err(ApiError::BadRequest(format!(
            "alias '{alias}' is not a template name (1 to 63 lowercase letters, digits, '-' or '_')"
        )));
    }
    if req.min_free_disk_mb.is_some_and(|mb| mb < 0) {
        return Err(ApiError::BadRequest("minFreeDiskMB must not be negative".into()));
    }
    let name = req
        .name
        .or(req.alias)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::BadRequest("name is required (name or name:tag)".into()))?;
    let requested =
        state
            .manager
            .sdk_request_build(&name, req.tags.unwrap_or_default(), req.cpu_count, req.memory_mb)?;
    Ok((StatusCode::ACCEPTED, Json(requested)).into_response())
}

/// How the client reached this server, for the upload link.
fn base_url(headers: &HeaderMap) -> Result<String, ApiError> {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic() && b != b'/' && b != b'@'))
        .ok_or_else(|| ApiError::BadRequest("the request needs a Host header".into()))?;
    let scheme = match headers.get("x-forwarded-proto").and_then(|h| h.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    Ok(format!("{scheme}://{host}"))
}

/// `GET /templates/{id}/files/{hash}` → 201 `{present, url}`.
pub(super) async fn file_link(
    State(state): State<AppState>,
    ApiPath((template, hash)): ApiPath<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let link = state.manager.sdk_file_upload(&template, &hash, &base_url(&headers)?)?;
    Ok((StatusCode::CREATED, Json(link)).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct UploadQuery {
    token: String,
}

/// `PUT /template-files/{template}/{hash}?token=` → 200 once stored.
pub(super) async fn upload_files(
    State(state): State<AppState>,
    ApiPath((template, hash)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    state
        .manager
        .sdk_store_file(&template, &hash, &query.token, body)
        .await?;
    Ok(StatusCode::OK.into_response())
}

/// `POST /v2/templates/{id}/builds/{build}` → 202; the build runs in the background.
pub(super) async fn start_build(
    State(state): State<AppState>,
    ApiPath((template, build)): ApiPath<(String, String)>,
    JsonBody(start): JsonBody<crate::manager::StartBuild>,
) -> Result<Response, ApiError> {
    state.manager.sdk_start_build(&template, &build, start).await?;
    Ok(StatusCode::ACCEPTED.into_response())
}

/// `GET /templates/{id}/builds/{build}/status?logsOffset=&limit=&level=`.
pub(super) async fn build_status(
    State(state): State<AppState>,
    ApiPath((template, build)): ApiPath<(String, String)>,
    ApiQuery(query): ApiQuery<BuildStatusQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.sdk_build_status(&template, &build, &query)?).into_response())
}

/// `GET /templates/aliases/{alias}` → 200 if a template has that name, else 404.
pub(super) async fn alias(
    State(state): State<AppState>,
    ApiPath(alias): ApiPath<String>,
) -> Result<Response, ApiError> {
    if !state.manager.sdk_alias_exists(&alias)? {
        return Err(ApiError::NotFound(format!("no template is named '{alias}'")));
    }
    let template = alias.split(':').next().unwrap_or_default().to_owned();
    Ok(Json(serde_json::json!({"templateID": template, "public": false})).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct AssignTags {
    target: String,
    tags: Vec<String>,
}

/// `POST /templates/tags` → 201 `{tags, buildID}`.
pub(super) async fn assign_tags(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<AssignTags>,
) -> Result<Response, ApiError> {
    let assigned = state.manager.sdk_assign_tags(&req.target, req.tags).await?;
    Ok((StatusCode::CREATED, Json(assigned)).into_response())
}

#[derive(Debug, Deserialize)]
pub(super) struct DeleteTags {
    name: String,
    tags: Vec<String>,
}

/// `DELETE /templates/tags` → 204.
pub(super) async fn delete_tags(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<DeleteTags>,
) -> Result<Response, ApiError> {
    state.manager.sdk_delete_tags(&req.name, req.tags).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /templates/{id}/tags` → the template's tags with their builds.
pub(super) async fn tags(
    State(state): State<AppState>,
    ApiPath(template): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.sdk_tags(&template)?).into_response())
}
