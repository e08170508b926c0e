//! The VM manager's routes (`/vms`, API key): define, list, get, edit (a JSON merge patch),
//! rename and delete VMs; start, stop, restart, pause, resume and kill them. `{id}` is a VM's
//! id or its name. Every state change is also published on `GET /events`. Snapshots:
//! `/vms/{id}/snapshots[/{snapshot}[/revert]]`, `{snapshot}` an id or a name. Bridges to
//! sandboxes: `POST /vms` with `fromSnapshot`/`fromTemplate`, `POST /vms/{id}/exec`;
//! `POST /vms/{id}/template` makes a sandbox template of one; `POST /vms/{id}/fork` forks a
//! running VM; `GET /snapshot-tree` lists sandbox and VM snapshots together. Disks:
//! `POST /vms/{id}/disks`, `DELETE /vms/{id}/disks/{disk}` (live on q35 with hotplug ports); NICs:
//! `POST /vms/{id}/nics`, `PATCH`/`DELETE /vms/{id}/nics/{index}` (switch moves and limits live,
//! hotplug on q35); vCPUs: `PUT /vms/{id}/vcpus`; the balloon: `GET`/`PUT /vms/{id}/memory`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use viv_api::vms::{NewVm, NewVmSnapshot, VmClone, VmDeleteQuery, VmFork, VmMedium, VmRename, VmStopQuery, VmTemplate};

use super::{ApiPath, ApiQuery, JsonBody};
use crate::error::ApiError;
use crate::AppState;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms", get(list).post(create))
        .route("/vms/{id}", get(info).patch(edit).delete(delete))
        .route("/vms/{id}/rename", post(rename))
        .route("/vms/{id}/start", post(start))
        .route("/vms/{id}/stop", post(stop))
        .route("/vms/{id}/restart", post(restart))
        .route("/vms/{id}/pause", post(pause))
        .route("/vms/{id}/resume", post(resume))
        .route("/vms/{id}/kill", post(kill))
        .route("/vms/{id}/clone", post(clone))
        .route("/vms/{id}/fork", post(fork))
        .route("/vms/{id}/template", post(make_template))
        .route("/vms/{id}/exec", post(super::exec::vm_exec))
        .route("/vms/{id}/cdroms/{drive}", axum::routing::put(change_medium))
        .route("/vms/{id}/disks", post(attach_disk))
        .route("/vms/{id}/disks/{disk}", axum::routing::delete(detach_disk))
        .route("/vms/{id}/nics", post(add_nic))
        .route(
            "/vms/{id}/nics/{index}",
            axum::routing::patch(edit_nic).delete(remove_nic),
        )
        .route("/vms/{id}/vcpus", axum::routing::put(set_vcpus))
        .route("/vms/{id}/memory", get(memory).put(set_memory))
        .route("/vms/{id}/nvram/reset", post(reset_nvram))
        .route("/vms/{id}/snapshots", get(list_snapshots).post(create_snapshot))
        .route("/vms/{id}/snapshots/{snapshot}", get(snapshot).delete(delete_snapshot))
        .route("/vms/{id}/snapshots/{snapshot}/revert", post(revert_snapshot))
        .route("/snapshot-tree", get(snapshot_tree))
}

async fn create(State(state): State<AppState>, JsonBody(req): JsonBody<NewVm>) -> Result<Response, ApiError> {
    let vm = if req.from_snapshot.is_some() || req.from_template.is_some() {
        state.manager.create_vm_from_sandbox(req).await?
    } else {
        state.manager.create_vm(req)?
    };
    Ok((StatusCode::CREATED, Json(vm)).into_response())
}

/// Sandbox snapshot nodes and VM snapshots in one listing.
async fn snapshot_tree(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.snapshot_tree().await?).into_response())
}

async fn make_template(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<VmTemplate>,
) -> Result<Response, ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.template_from_vm(&id, req).await?),
    )
        .into_response())
}

async fn fork(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<VmFork>,
) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.fork_vm(&id, req).await?)).into_response())
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

async fn delete(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<VmDeleteQuery>,
) -> Result<Response, ApiError> {
    state.manager.delete_vm(&id, q.disks).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn start(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.start_vm(&id).await?).into_response())
}

async fn stop(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<VmStopQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.stop_vm(&id, q.force, q.timeout_secs).await?).into_response())
}

async fn restart(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<VmStopQuery>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.restart_vm(&id, q.force, q.timeout_secs).await?).into_response())
}

async fn pause(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.pause_vm(&id).await?).into_response())
}

async fn resume(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.resume_vm(&id).await?).into_response())
}

async fn kill(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.kill_vm(&id).await?).into_response())
}

async fn list_snapshots(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_vm_snapshots(&id)?).into_response())
}

async fn create_snapshot(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<NewVmSnapshot>,
) -> Result<Response, ApiError> {
    Ok((
        StatusCode::CREATED,
        Json(state.manager.create_vm_snapshot(&id, req).await?),
    )
        .into_response())
}

async fn snapshot(
    State(state): State<AppState>,
    ApiPath((id, snapshot)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.vm_snapshot(&id, &snapshot)?).into_response())
}

async fn delete_snapshot(
    State(state): State<AppState>,
    ApiPath((id, snapshot)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    state.manager.delete_vm_snapshot(&id, &snapshot).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn revert_snapshot(
    State(state): State<AppState>,
    ApiPath((id, snapshot)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.revert_vm_snapshot(&id, &snapshot).await?).into_response())
}

async fn clone(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<VmClone>,
) -> Result<Response, ApiError> {
    Ok((StatusCode::CREATED, Json(state.manager.clone_vm(&id, req).await?)).into_response())
}

async fn change_medium(
    State(state): State<AppState>,
    ApiPath((id, drive)): ApiPath<(String, usize)>,
    JsonBody(req): JsonBody<VmMedium>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.change_vm_medium(&id, drive, req.iso.as_deref()).await?).into_response())
}

async fn attach_disk(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(disk): JsonBody<viv_api::vms::VmDisk>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.attach_vm_disk(&id, disk).await?).into_response())
}

async fn detach_disk(
    State(state): State<AppState>,
    ApiPath((id, disk)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.detach_vm_disk(&id, &disk).await?).into_response())
}

async fn add_nic(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(nic): JsonBody<viv_api::vms::VmNic>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.add_vm_nic(&id, nic).await?).into_response())
}

async fn edit_nic(
    State(state): State<AppState>,
    ApiPath((id, index)): ApiPath<(String, usize)>,
    JsonBody(patch): JsonBody<serde_json::Value>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.edit_vm_nic(&id, index, patch).await?).into_response())
}

async fn remove_nic(
    State(state): State<AppState>,
    ApiPath((id, index)): ApiPath<(String, usize)>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.remove_vm_nic(&id, index).await?).into_response())
}

async fn set_vcpus(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<viv_api::vms::VmVcpus>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.set_vm_vcpus(&id, req.count).await?).into_response())
}

async fn memory(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.vm_memory(&id).await?).into_response())
}

async fn set_memory(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<viv_api::vms::VmMemoryTarget>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.set_vm_memory(&id, req.target_mib).await?).into_response())
}

async fn reset_nvram(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.reset_vm_nvram(&id).await?).into_response())
}
