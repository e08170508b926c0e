//! Backups of VMs' disks (API key): `POST /vms/{id}/backups` starts one (202 with an
//! operation), `GET /vms/{id}/backups` lists them, `DELETE /vms/{id}/backups/{backup}` deletes
//! one (a later backup based on it is merged first), `POST /vms/{id}/backups/{backup}/restore`
//! restores one into new disks or over the VM's own (202 with an operation).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use viv_api::backups::{NewVmBackup, RestoreVmBackup};

use super::storage::accepted;
use super::{ApiPath, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms/{id}/backups", get(list).post(create))
        .route("/vms/{id}/backups/{backup}", delete(remove))
        .route("/vms/{id}/backups/{backup}/restore", post(restore))
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
