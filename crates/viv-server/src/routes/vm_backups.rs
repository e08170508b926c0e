//! Backups of VMs' disks (API key): `POST /vms/{id}/backups` starts one (202 with an
//! operation), `GET /vms/{id}/backups` lists them, `DELETE /vms/{id}/backups/{backup}` deletes
//! one (a later backup based on it is merged first), `POST /vms/{id}/backups/{backup}/restore`
//! restores one into new disks or over the VM's own (202 with an operation). OVA packages:
//! `GET /vms/{id}/export.ova` streams a stopped VM as an OVA, `POST /vms/import?name=` creates
//! a VM and its disks from an uploaded one (201 with the VM), or, with an XML content type, a VM
//! from libvirt domain XML whose files are in the pool.

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use viv_api::backups::{NewVmBackup, RestoreVmBackup};

use super::storage::accepted;
use super::{ApiPath, ApiQuery, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms/{id}/backups", get(list).post(create))
        .route("/vms/{id}/backups/{backup}", delete(remove))
        .route("/vms/{id}/backups/{backup}/restore", post(restore))
        .route("/vms/{id}/export.ova", get(export_ova))
        .route("/vms/import", post(import_ova))
}

async fn export_ova(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let (file, len, name) = state.manager.export_vm_ova(&id).await?;
    let stream = tokio_util::io::ReaderStream::new(file);
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-tar".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}.ova\""),
            ),
        ],
        Body::from_stream(stream),
    )
        .into_response())
}

/// `?name=` of `POST /vms/import`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    name: Option<String>,
}

async fn import_ova(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ImportQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let xml = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("xml"));
    if xml {
        // libvirt domain XML: read at most the limit (one byte more tells it was exceeded).
        let limit = viv_storage::libvirt::MAX_DOMAIN_SIZE;
        let bytes = axum::body::to_bytes(body, limit + 1)
            .await
            .map_err(|_| ApiError::TooLarge(format!("the domain XML is larger than {limit} bytes")))?;
        let info = state.manager.import_vm_libvirt(query.name, &bytes)?;
        return Ok((StatusCode::CREATED, Json(info)).into_response());
    }
    let info = state
        .manager
        .import_vm_ova(query.name, &mut super::storage::reader(body))
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_vm_backups(&id)?).into_response())
}

async fn create(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<NewVmBackup>,
) -> Result<Response, ApiError> {
    Ok(accepted(state.manager.start_vm_backup(&id, req)?))
}

async fn remove(
    State(state): State<AppState>,
    ApiPath((id, backup)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    state.manager.delete_vm_backup(&id, &backup).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn restore(
    State(state): State<AppState>,
    ApiPath((id, backup)): ApiPath<(String, String)>,
    JsonBody(req): JsonBody<RestoreVmBackup>,
) -> Result<Response, ApiError> {
    Ok(accepted(state.manager.start_vm_restore(&id, &backup, req)?))
}
