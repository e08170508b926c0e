//! E2B's volume routes: `/volumes` (create, list, get with token, destroy; API key) and the
//! content API `/volumecontent/{volumeID}/{dir,path,file}` (the volume's bearer token).
//!
//! File system work runs on the blocking pool; an upload streams into a temporary file and
//! appears only once its whole body arrived (see `manager::volume_fs`).

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;
use viv_api::volumes::{NewVolume, VolumeMetadataUpdate};

use super::{ApiPath, ApiQuery, JsonBody};
use crate::error::ApiError;
use crate::manager::volume_fs::{Meta, VolPath, VolumeDir};
use crate::AppState;

/// Routes that take the API key.
pub(super) fn control() -> Router<AppState> {
    Router::new()
        .route("/volumes", get(list).post(create))
        .route("/volumes/{id}", get(info).delete(destroy))
}

/// Routes that take a volume's token.
pub(super) fn content() -> Router<AppState> {
    Router::new()
        .route("/volumecontent/{id}/dir", get(list_dir).post(make_dir))
        .route(
            "/volumecontent/{id}/path",
            get(stat).patch(update_metadata).delete(remove),
        )
        .route("/volumecontent/{id}/file", get(read_file).put(write_file))
}

async fn create(State(state): State<AppState>, JsonBody(req): JsonBody<NewVolume>) -> Result<Response, ApiError> {
    let created = state.manager.create_volume(&req.name)?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_volumes()?).into_response())
}

async fn info(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.volume_info(&id)?).into_response())
}

async fn destroy(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.destroy_volume(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Query of the content routes.
#[derive(Debug, Deserialize)]
struct ContentQuery {
    path: String,
    #[serde(default)]
    depth: Option<usize>,
    #[serde(default)]
    uid: Option<u32>,
    #[serde(default)]
    gid: Option<u32>,
    #[serde(default)]
    mode: Option<u32>,
    #[serde(default)]
    force: Option<bool>,
}

impl ContentQuery {
    fn path(&self) -> Result<VolPath, ApiError> {
        Ok(VolPath::parse(&self.path)?)
    }

    fn meta(&self) -> Result<Meta, ApiError> {
        if self.mode.is_some_and(|m| m > 0o7777) {
            return Err(ApiError::BadRequest(
                "mode must be permission bits, at most 0o7777 (4095)".into(),
            ));
        }
        // (u32::MAX is chown's "leave unchanged", not an id.)
        if self.uid == Some(u32::MAX) || self.gid == Some(u32::MAX) {
            return Err(ApiError::BadRequest("uid and gid must be at most 4294967294".into()));
        }
        Ok(Meta {
            uid: self.uid,
            gid: self.gid,
            mode: self.mode,
        })
    }
}

/// The volume named in the route, if the request carries its token.
fn open(state: &AppState, id: &str, headers: &HeaderMap) -> Result<VolumeDir, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    state.manager.volume_content(id, token)
}

/// Runs blocking file system work.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ApiError::Internal(format!("volume operation failed: {e}")))?
}

async fn list_dir(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let path = q.path()?;
    let depth = q.depth.unwrap_or(1);
    if depth == 0 {
        return Err(ApiError::BadRequest("depth must be at least 1".into()));
    }
    let entries = blocking(move || Ok(vol.list(&path, depth)?)).await?;
    Ok(Json(entries).into_response())
}

async fn make_dir(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let (path, meta) = (q.path()?, q.meta()?);
    let parents = q.force.unwrap_or(false);
    let made = blocking(move || Ok(vol.make_dir(&path, parents, meta)?)).await?;
    Ok((StatusCode::CREATED, Json(made)).into_response())
}

async fn stat(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let path = q.path()?;
    Ok(Json(blocking(move || Ok(vol.stat(&path)?)).await?).into_response())
}

async fn update_metadata(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
    JsonBody(update): JsonBody<VolumeMetadataUpdate>,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let path = q.path()?;
    let meta = ContentQuery {
        uid: update.uid,
        gid: update.gid,
        mode: update.mode,
        ..q
    }
    .meta()?;
    Ok(Json(blocking(move || Ok(vol.update_metadata(&path, meta)?)).await?).into_response())
}

async fn remove(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let path = q.path()?;
    blocking(move || Ok(vol.remove(&path)?)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn read_file(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let path = q.path()?;
    let (file, size) = blocking(move || Ok(vol.open_file(&path)?)).await?;
    let stream = tokio_util::io::ReaderStream::new(tokio::fs::File::from_std(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `PUT /volumecontent/{id}/file`: the body is the content; missing parent directories are
/// made; an existing file is replaced only with `force=true` (409 otherwise).
async fn write_file(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ContentQuery>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let vol = open(&state, &id, &headers)?;
    let (path, meta) = (q.path()?, q.meta()?);
    let overwrite = q.force.unwrap_or(false);
    let mut upload = blocking(move || Ok(vol.begin_upload(&path, true, overwrite)?)).await?;
    let mut file = tokio::fs::File::from_std(upload.take_file());
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing the volume file: {e}")))?;
    }
    let file = file.into_std().await;
    let written = blocking(move || Ok(upload.commit(file, meta)?)).await?;
    Ok((StatusCode::CREATED, Json(written)).into_response())
}
