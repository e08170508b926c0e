//! Node routes (`/nodes`, API key): list and show the cluster's nodes, drain one (nothing new
//! is placed on it, its running sandboxes are paused and its paused sandboxes move to other
//! nodes with their files), undrain it, and remove a node that is down. `{id}` is a node's id
//! or name.
//!
//! A drain runs on the node it drains (`node_forward.rs` sends it there), since only that node
//! can pause its sandboxes; a node that is down runs nothing and is not drained.

use std::collections::HashMap;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use viv_api::nodes::{DrainFailure, DrainMove, NodeDrain, NodeInfo, NodeState};
use viv_api::SandboxState;

use super::{ApiPath, ApiQuery};
use crate::cluster::Demand;
use crate::error::ApiError;
use crate::store::NodeRow;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/nodes", get(list))
        .route("/nodes/{id}", get(info).delete(remove))
        .route("/nodes/{id}/drain", post(drain))
        .route("/nodes/{id}/undrain", post(undrain))
}

fn node_info(state: &AppState, row: &NodeRow, counts: &HashMap<String, u32>) -> NodeInfo {
    row.info(
        counts.get(&row.id).copied().unwrap_or(0),
        row.id == state.cluster.node_id(),
    )
}

fn find(state: &AppState, id: &str) -> Result<NodeRow, ApiError> {
    state
        .store
        .node(id)?
        .ok_or_else(|| ApiError::NotFound(format!("node '{id}' not found; GET /nodes lists them")))
}

/// The node with id `id` as the API shows it, read now.
fn shown(state: &AppState, id: &str) -> Result<NodeInfo, ApiError> {
    let row = find(state, id)?;
    let counts: HashMap<String, u32> = state.store.sandboxes_per_node()?.into_iter().collect();
    Ok(node_info(state, &row, &counts))
}

async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    let counts: HashMap<String, u32> = state.store.sandboxes_per_node()?.into_iter().collect();
    let nodes: Vec<NodeInfo> = state
        .store
        .nodes()?
        .iter()
        .map(|row| node_info(&state, row, &counts))
        .collect();
    Ok(Json(nodes).into_response())
}

async fn info(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(shown(&state, &id)?).into_response())
}

/// `POST /nodes/{id}/drain?move=false`: pause only, keeping paused sandboxes on the node.
#[derive(Debug, serde::Deserialize)]
struct DrainQuery {
    #[serde(default = "yes", rename = "move")]
    move_paused: bool,
}

fn yes() -> bool {
    true
}

async fn drain(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<DrainQuery>,
) -> Result<Response, ApiError> {
    let row = find(&state, &id)?;
    if row.id != state.cluster.node_id() {
        // Only a node that is down is not forwarded its own drain.
        return Err(ApiError::Conflict(format!(
            "node {} is down: nothing runs on it to drain; remove it with DELETE /nodes/{}",
            row.name, row.id
        )));
    }
    state.store.set_node_state(&row.id, NodeState::Draining)?;
    let mut paused = Vec::new();
    let mut failed = Vec::new();
    for sandbox in state.store.local_sandboxes()? {
        if sandbox.state != SandboxState::Running {
            continue;
        }
        match state.manager.pause_keeping(&sandbox.id, true, false).await {
            Ok(_) => paused.push(sandbox.id),
            Err(err) => failed.push(DrainFailure {
                id: sandbox.id,
                error: err.to_string(),
            }),
        }
    }
    let mut moved = Vec::new();
    for sandbox in state.store.local_sandboxes()? {
        if !query.move_paused || sandbox.state != SandboxState::Paused {
            continue;
        }
        match move_paused(&state, &sandbox).await {
            Ok(Some(node)) => moved.push(DrainMove { id: sandbox.id, node }),
            // No other node: it stays paused here.
            Ok(None) => {}
            Err(err) => failed.push(DrainFailure {
                id: sandbox.id,
                error: err.to_string(),
            }),
        }
    }
    tracing::info!(node = %row.name, paused = paused.len(), moved = moved.len(), failed = failed.len(), "node drained");
    state.manager.publish_node(
        &row.id,
        &row.name,
        "draining",
        Some(format!(
            "{} sandbox(es) paused, {} moved to other nodes",
            paused.len(),
            moved.len()
        )),
    );
    let node = shown(&state, &row.id)?;
    Ok(Json(NodeDrain {
        node,
        paused,
        moved,
        failed,
    })
    .into_response())
}

/// Moves paused sandbox `sandbox` of this (draining) node to the node placement picks, which
/// fetches its files; returns that node's name, or `None` when no other node is up.
async fn move_paused(state: &AppState, sandbox: &crate::store::SandboxRow) -> Result<Option<String>, ApiError> {
    let demand = Demand {
        memory_mib: sandbox.memory_mb,
        vcpus: sandbox.cpu_count,
        template: None,
        prefer: None,
    };
    let Some(target) = state.cluster.place(&state.store, state.store.nodes()?, demand)? else {
        return Ok(None);
    };
    state.manager.hand_over_paused(&target, &sandbox.id).await?;
    Ok(Some(target.name))
}

async fn undrain(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let row = find(&state, &id)?;
    match row.state {
        NodeState::Draining => {
            state.store.set_node_state(&row.id, NodeState::Up)?;
            state
                .manager
                .publish_node(&row.id, &row.name, "up", Some("undrained".into()));
        }
        NodeState::Up => {}
        NodeState::Down => {
            return Err(ApiError::Conflict(format!(
                "node {} is down; it comes back up when its server starts",
                row.name
            )))
        }
    }
    Ok(Json(shown(&state, &row.id)?).into_response())
}

async fn remove(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let row = find(&state, &id)?;
    if row.state != NodeState::Down {
        return Err(ApiError::Conflict(format!(
            "node {} is {}: stop its server and wait until it is marked down before removing it",
            row.name,
            row.state.as_str()
        )));
    }
    let info = shown(&state, &row.id)?;
    if info.sandboxes > 0 {
        return Err(ApiError::Conflict(format!(
            "node {} still holds {} paused sandbox(es); kill them first (their files are on that node)",
            row.name, info.sandboxes
        )));
    }
    state.store.delete_node(&row.id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
