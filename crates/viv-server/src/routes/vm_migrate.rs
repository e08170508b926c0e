//! Live migration routes (API key). On the source: `POST /vms/{id}/migrate` starts moving a
//! running VM to another server (`202`, an operation). On the destination, called by the source
//! server: `POST /migrations/incoming` receives a VM (`201`), `GET
//! /migrations/incoming/{id}/{ram|nbd}` upgrades to protocol [`MIGRATION_PROTOCOL`] and splices
//! the connection onto the incoming QEMU's socket, `POST /migrations/incoming/{id}/finish` lets
//! the VM run, `DELETE /migrations/incoming/{id}` deletes it.
//!
//! The destination's handlers are the node API's (`viv_node::node_api`): between nodes of one
//! cluster the source calls the same routes under `/internal` with the cluster's secret.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use viv_api::vms::VmMigrate;

use super::{ApiPath, JsonBody};
use crate::error::ApiError;
use crate::AppState;

pub use crate::manager::MIGRATION_PROTOCOL;

pub(super) fn routes() -> Router<AppState> {
    use viv_node::node_api::{abort, channel, finish, receive};
    Router::new()
        .route("/vms/{id}/migrate", post(migrate))
        .route("/migrations/incoming", post(receive))
        .route("/migrations/incoming/{id}", delete(abort))
        .route("/migrations/incoming/{id}/finish", post(finish))
        .route("/migrations/incoming/{id}/{channel}", get(channel))
}

async fn migrate(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<VmMigrate>,
) -> Result<Response, ApiError> {
    let op = state.manager.migrate_vm(&id, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        [(header::LOCATION, format!("/operations/{}", op.id))],
        Json(op),
    )
        .into_response())
}
