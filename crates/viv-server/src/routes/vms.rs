//! The VM manager's routes (`/vms`, API key): define, list, get, edit (a JSON merge patch),
//! rename and delete VMs. `{id}` is a VM's id or its name.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use viv_api::vms::{NewVm, VmRename};

use super::{ApiPath, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms", get(list).post(create))
        .route("/vms/{id}", get(info).patch(edit).delete(delete))
        .route("/vms/{id}/rename", post(rename))
}

async fn create(State(state): State<AppState>, JsonBody(req): JsonBody<NewVm>) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.create_vm(req)?)).into_response())
}

async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_vms()?).into_response())
}

async fn info(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.vm_info(&id)?).into_response())
}

async fn edit(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.edit_vm(&id, patch)?).into_response())
}

async fn rename(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<VmRename>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.rename_vm(&id, &req.name)?).into_response())
}

async fn delete(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.delete_vm(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
