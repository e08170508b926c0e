//! Live migration routes (API key). On the source: `POST /vms/{id}/migrate` starts moving a
//! running VM to another server (`202`, an operation). On the destination, called by the source
//! server: `POST /migrations/incoming` receives a VM (`201`), `GET
//! /migrations/incoming/{id}/{ram|nbd}` upgrades to protocol [`MIGRATION_PROTOCOL`] and splices
//! the connection onto the incoming QEMU's socket, `POST /migrations/incoming/{id}/finish` lets
//! the VM run, `DELETE /migrations/incoming/{id}` deletes it.
//!
//! Between nodes of one cluster the source calls the same routes under `/internal` with the
//! cluster's secret ([`node_routes`]).
//!
//! Invariants: a channel is spliced only after `101` was sent and only to a socket of a pending
//! incoming VM of this server; bytes are relayed, never interpreted here.

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use hyper_util::rt::TokioIo;
use viv_api::vms::{IncomingVm, VmMigrate};

use super::{ApiPath, JsonBody};
use crate::error::ApiError;
use crate::manager::IncomingChannel;
use crate::AppState;

pub use crate::manager::MIGRATION_PROTOCOL;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms/{id}/migrate", post(migrate))
        .route("/migrations/incoming", post(receive))
        .route("/migrations/incoming/{id}", delete(abort))
        .route("/migrations/incoming/{id}/finish", post(finish))
        .route("/migrations/incoming/{id}/{channel}", get(channel))
}

/// The destination's routes again on the node API (`/internal/migrations/…`, behind the
/// cluster's secret: `routes/internal.rs`), for VMs moved between nodes of one cluster.
pub(super) fn node_routes() -> Router<AppState> {
    Router::new()
        .route("/internal/migrations/incoming", post(receive))
        .route("/internal/migrations/incoming/{id}", delete(abort))
        .route("/internal/migrations/incoming/{id}/finish", post(finish))
        .route("/internal/migrations/incoming/{id}/{channel}", get(channel))
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

async fn receive(State(state): State<AppState>, JsonBody(req): JsonBody<IncomingVm>) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.receive_vm(req).await?)).into_response())
}

async fn finish(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.finish_incoming(&id).await?).into_response())
}

async fn abort(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    state.manager.abort_incoming(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn channel(
    State(state): State<AppState>,
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
    let mut qemu = state.manager.incoming_channel(&id, which).await?;
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
