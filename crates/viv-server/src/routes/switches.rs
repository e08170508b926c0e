//! VM switch routes (`/switches`, API key): create, list, get, edit (a JSON merge patch of
//! `kind`, `subnet`, `portIsolation`) and delete switches. `{name}` is a switch's name.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use viv_api::switches::NewSwitch;

use super::{ApiPath, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/switches", get(list).post(create))
        .route("/switches/{name}", get(info).patch(edit).delete(delete))
}

async fn create(State(state): State<AppState>, JsonBody(req): JsonBody<NewSwitch>) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.create_switch(req).await?)).into_response())
}

async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_switches()?).into_response())
}

async fn info(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.get_switch(&name)?).into_response())
}

async fn edit(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.edit_switch(&name, patch).await?).into_response())
}

async fn delete(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.delete_switch(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
