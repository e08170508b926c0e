//! Requests for a sandbox, VM or snapshot held by another node of the cluster go to that node,
//! and creates go to the node placement picks (`crate::cluster`), so any server answers any
//! request. The request travels unchanged (its API key, access token, host name and body, a
//! WebSocket upgrade spliced through) with [`FORWARDED_BY`] added; the node authenticates it
//! against the shared store as if the client had come to it.
//!
//! Invariants:
//! - a request is forwarded at most once: one carrying [`FORWARDED_BY`] is served where it
//!   lands. The header grants nothing (the receiving node checks the key or token itself), so
//!   a client that sets it only keeps its request from being forwarded;
//! - API requests are authenticated before they are forwarded, so no unauthenticated request
//!   costs a second server anything; sandbox traffic (`PORT-ID.DOMAIN`) carries the sandbox's
//!   own token, which only its node's agent checks;
//! - a row of a node that is down, or of no node, is served here: its state says what happened
//!   to it (lost sandboxes are `failed` with the reason);
//! - roles (`viv serve --role`): an API server (`api`) answers from the store only what
//!   [`answered_by_control_plane`] lists (lists, reads of templates and nodes, events, the
//!   console, sign-in) and sends everything else to a node: a row's node, placement's pick,
//!   or, for node-local work that has no row yet (VM definitions, disks, ISOs, switches,
//!   template builds, storage operations), [`crate::cluster::Cluster::default_node`]. It never
//!   starts a VM: what would need one with no node up to take it is a 503 or 429. A node
//!   (`node`) answers clients only [`answered_by_node_directly`] (health, metrics, the node
//!   API, incoming migrations) and refuses the rest with a 421 naming where to go.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use viv_api::nodes::{NodeRole, NodeState};

use crate::cluster::Demand;
use crate::error::ApiError;
use crate::store::NodeRow;
use crate::AppState;

/// The header a forwarded request carries: the id of the node that forwarded it.
pub const FORWARDED_BY: &str = "x-viv-forwarded-by";

/// Largest create body read for placement (a create is a small JSON document).
const MAX_CREATE_BODY: usize = 1 << 20;

/// How long connecting to another node may take.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What a request is about, as far as where it runs goes.
#[derive(Debug, PartialEq, Eq)]
enum Subject {
    Sandbox(String),
    /// A resume (or E2B connect) of a sandbox, which may be paused.
    Resume(String),
    SandboxTraffic(String),
    Vm(String),
    Snapshot(String),
    Node(String),
    /// An operation, whose id names its node.
    Operation(String),
    Volume(String),
    VolumeContent(String),
    Create,
    CreateVolume,
}

fn subject_of_path(method: &Method, path: &str) -> Option<Subject> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let id = |s: &&str| (!s.is_empty()).then(|| s.to_string());
    match segments.as_slice() {
        ["sandboxes"] | ["v2", "sandboxes"] if method == Method::POST => Some(Subject::Create),
        ["volumes"] if method == Method::POST => Some(Subject::CreateVolume),
        ["volumes", volume] => id(volume).map(Subject::Volume),
        ["volumecontent", volume, ..] => id(volume).map(Subject::VolumeContent),
        ["sandboxes", sandbox, "resume" | "connect"] | ["v2", "sandboxes", sandbox, "connect"]
            if method == Method::POST =>
        {
            id(sandbox).map(Subject::Resume)
        }
        ["sandboxes", sandbox, ..] => id(sandbox).map(Subject::Sandbox),
        ["vms", vm, ..] if *vm != "import" => id(vm).map(Subject::Vm),
        ["snapshots", snapshot] => id(snapshot).map(Subject::Snapshot),
        ["nodes", node, "drain"] => id(node).map(Subject::Node),
        ["operations", op, ..] => id(op).map(Subject::Operation),
        _ => None,
    }
}

/// Whether an API server answers a request that names no sandbox, VM, snapshot or volume
/// itself (from the store, its event bus and its embedded console) rather than on a node.
fn answered_by_control_plane(method: &Method, path: &str) -> bool {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let read = method == Method::GET || method == Method::HEAD;
    match segments.as_slice() {
        [""] | ["assets", ..] | ["health"] | ["openapi.yaml"] | ["metrics"] | ["events"] | ["auth", "session"] => true,
        // The node API is answered where it is sent (nodes call nodes).
        ["internal", ..] => true,
        // Drains have a subject (the node); lists, reads, undrains and removals are rows.
        ["nodes", ..] => true,
        ["sandboxes"] | ["v2", "sandboxes"] | ["snapshots"] | ["snapshot-tree"] | ["vms"] | ["volumes"] => read,
        // Each node's own, gathered from every node by the handler (`gather_from_nodes`).
        ["operations"] => read,
        ["templates"] | ["templates", _] | ["templates", "aliases", _] | ["templates", _, "tags" | "versions"] => read,
        _ => false,
    }
}

/// Whether a node (`--role node`) answers a request that no API server forwarded: its health
/// and metrics, the node API other nodes call and incoming live migrations.
fn answered_by_node_directly(path: &str) -> bool {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    matches!(first, "health" | "metrics" | "openapi.yaml" | "internal" | "migrations")
}

/// Middleware in front of every route: sends what belongs to another node there.
pub(super) async fn route_to_node(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if request.headers().contains_key(FORWARDED_BY) {
        return next.run(request).await;
    }
    if !state.cluster.role().serves_clients() && !answered_by_node_directly(request.uri().path()) {
        return ApiError::Misdirected(format!(
            "this server is a node of a cluster (--role node) and answers only requests its API servers \
             forward; send {} {} to an API server (`viv node list` shows the servers of role api)",
            request.method(),
            request.uri().path()
        ))
        .into_response();
    }
    match destination(&state, request).await {
        Ok((Some(node), request)) => forward(&state, &node, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        Ok((None, request)) => next.run(request).await,
        Err(err) => err.into_response(),
    }
}

/// The node a request must go to (`None`: this one), and the request (its body read back in
/// when placement had to read it).
async fn destination(state: &AppState, mut request: Request) -> Result<(Option<NodeRow>, Request), ApiError> {
    // A signed file URL whose signature is no sandbox's is refused where it lands (401).
    let mut bad_signature = false;
    let subject = match super::proxy::target(&request) {
        Some((id, _)) => Some(Subject::SandboxTraffic(id)),
        // A signed file URL names its sandbox by its signature alone.
        None => match super::signed::sandbox_for(state, &request) {
            Some(Ok(id)) => Some(Subject::SandboxTraffic(id)),
            Some(Err(_)) => {
                bad_signature = true;
                None
            }
            None => subject_of_path(request.method(), request.uri().path()),
        },
    };
    let cluster = &state.cluster;
    let store = &state.store;
    let api_server = !cluster.role().runs_vms();
    let Some(subject) = subject else {
        if !api_server || bad_signature || answered_by_control_plane(request.method(), request.uri().path()) {
            return Ok((None, request));
        }
        // Node-local work with no row yet: the node the client names, else the default one.
        // Template file uploads carry their link's token, which the node checks.
        if !request.uri().path().starts_with("/template-files/") {
            let key = super::authenticated_key(state, &request)?;
            request.extensions_mut().insert(super::AuthedKey(key));
        }
        let asked = request
            .headers()
            .get(viv_api::NODE_HEADER)
            .and_then(|v| v.to_str().ok());
        let node = cluster.default_node(store.nodes()?, asked)?;
        return Ok((Some(node), request));
    };
    // Sandbox traffic carries the sandbox's token and volume content the volume's: their
    // node checks them.
    // A key checked here is not checked again behind (`require_api_key`).
    if !matches!(subject, Subject::SandboxTraffic(_) | Subject::VolumeContent(_)) {
        let key = super::authenticated_key(state, &request)?;
        request.extensions_mut().insert(super::AuthedKey(key));
    }
    // What an API server cannot do without the thing's node: change a VM or a volume.
    let changes = !matches!(*request.method(), Method::GET | Method::HEAD | Method::DELETE);
    let needs_its_node = match &subject {
        Subject::Vm(id) if changes => Some(format!("VM '{id}'")),
        Subject::Volume(id) | Subject::VolumeContent(id) if changes => Some(format!("volume '{id}'")),
        _ => None,
    };
    let owner = match subject {
        Subject::Sandbox(id) | Subject::SandboxTraffic(id) => store.sandbox_node(&id)?.flatten(),
        Subject::Vm(id) => store.vm_node(&id)?.flatten(),
        Subject::Snapshot(id) => store.snapshot_node(&id)?.flatten(),
        Subject::Node(id) => store.node(&id)?.map(|n| n.id),
        Subject::Operation(id) => crate::manager::operations::operation_node(&id).map(str::to_owned),
        Subject::Volume(id) | Subject::VolumeContent(id) => store.volume_node(&id)?.flatten(),
        Subject::Resume(id) => return Ok((place_resume(state, &id)?, request)),
        Subject::Create => return place(state, request).await,
        Subject::CreateVolume => {
            // A volume takes no memory; it goes where sandboxes would.
            let demand = Demand {
                memory_mib: 0,
                vcpus: 0,
                template: None,
                prefer: None,
            };
            return Ok((cluster.place(store, store.nodes()?, demand)?, request));
        }
    };
    let held = cluster.owner(store, owner.as_deref())?;
    if let (None, Some(what), true) = (&held, needs_its_node, api_server) {
        return Err(ApiError::Unavailable(format!(
            "{what} is on a node that is down or gone, and this API server runs no VM: \
             it can be changed once its node is back (see GET /nodes)"
        )));
    }
    Ok((held, request))
}

/// Places a create: reads its body for the shape and template it asks for.
async fn place(state: &AppState, request: Request) -> Result<(Option<NodeRow>, Request), ApiError> {
    let nodes = state.store.nodes()?;
    if state.cluster.alone(&nodes) {
        return Ok((None, request));
    }
    let (parts, body) = request.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_CREATE_BODY).await.map_err(|e| {
        ApiError::TooLarge(format!(
            "reading the create request: {e} (a create is a JSON document of at most {} KiB)",
            MAX_CREATE_BODY >> 10
        ))
    })?;
    // A body the handler will refuse is refused there, with its message: placed here.
    let asked: viv_api::NewSandbox = serde_json::from_slice(&bytes).unwrap_or_default();
    let request = Request::from_parts(parts, Body::from(bytes));
    let template = asked
        .template_id
        .as_deref()
        .map(|t| crate::manager::canonical_template_name(t).to_owned());
    if let Some(template) = &template {
        // A snapshot's files are on one node: the sandbox starts there or nowhere.
        if let Some(owner) = state.store.snapshot_node(template)? {
            let node = held_for_create(state, owner.as_deref(), &format!("snapshot '{template}'"))?;
            return Ok((node, request));
        }
    }
    // So are a volume's: a sandbox mounting volumes starts where they are.
    for mount in asked.volume_mounts.iter().flatten() {
        if let Some(owner) = state.store.volume_node(&mount.name)? {
            let node = held_for_create(state, owner.as_deref(), &format!("volume '{}'", mount.name))?;
            return Ok((node, request));
        }
    }
    let (vcpus, memory_mib) = state.manager.default_shape(template.as_deref());
    let demand = Demand {
        memory_mib: asked.memory_mb.unwrap_or(memory_mib),
        vcpus: asked.cpu_count.unwrap_or(vcpus),
        template: template.as_deref(),
        prefer: None,
    };
    Ok((state.cluster.place(&state.store, nodes, demand)?, request))
}

/// The node a create from `what` (a snapshot or volume, whose files are on node `owner`)
/// runs on: that node; when it is down, here (the create fails with why), except on an API
/// server, which starts no VM.
fn held_for_create(state: &AppState, owner: Option<&str>, what: &str) -> Result<Option<NodeRow>, ApiError> {
    let held = state.cluster.owner(&state.store, owner)?;
    if held.is_none() && state.cluster.role() == NodeRole::Api {
        return Err(ApiError::Unavailable(format!(
            "{what} is on a node that is down or gone: a sandbox can start from it once its node is back (see GET /nodes)"
        )));
    }
    Ok(held)
}

/// Where a resume runs: a running sandbox's node; a paused one's own node while it is up, not
/// draining and has room (its files are there), else (its node down) a node holding a copy of
/// it, else the node placement picks; a node other than its own adopts it
/// (`manager/snapshot_move.rs`). With no node that has room, its own node answers.
fn place_resume(state: &AppState, id: &str) -> Result<Option<NodeRow>, ApiError> {
    let (cluster, store) = (&state.cluster, &state.store);
    // A cluster of one: every resume is local, without reading the sandbox here.
    let nodes = store.nodes()?;
    if cluster.alone(&nodes) {
        return Ok(None);
    }
    let owner = store.sandbox_node(id)?.flatten();
    let paused = store
        .sandbox(id)?
        .filter(|row| row.state == viv_api::SandboxState::Paused);
    let Some(row) = paused else {
        return cluster.owner(store, owner.as_deref());
    };
    // Its own node while it is up, else a node with a copy of its snapshot (no fetch there).
    let up = |id: &str| nodes.iter().any(|n| n.id == id && n.state == NodeState::Up);
    let prefer = match owner.as_deref() {
        Some(owner) if up(owner) => Some(owner.to_owned()),
        _ => match row.snapshot_id.as_deref() {
            Some(snapshot) => store.snapshot_replicas(snapshot)?.into_iter().find(|n| up(n)),
            None => None,
        },
    };
    let demand = Demand {
        memory_mib: row.memory_mb,
        vcpus: row.cpu_count,
        template: None,
        prefer: prefer.as_deref(),
    };
    match cluster.place(store, nodes, demand) {
        // An API server cannot take it itself: no room is the answer.
        Err(err @ ApiError::NoRoom(_)) => match cluster.owner(store, owner.as_deref())? {
            None if cluster.role() == NodeRole::Api => Err(err),
            held => Ok(held),
        },
        placed => placed,
    }
}

/// Largest list read from one node when gathering a list from every node.
const MAX_GATHERED: usize = 16 << 20;

/// The JSON list at `path` (a read of what lives in each node's memory, such as operations)
/// from every other node that runs VMs and is up, asked with the client's `headers` (its key,
/// which each node checks): the parts the handler adds to this node's own. None when the
/// request was itself forwarded (a node answers for itself only). A node that cannot answer
/// is left out, with a warning in the log.
pub(super) async fn gather_from_nodes<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &axum::http::HeaderMap,
    path: &'static str,
) -> Result<Vec<T>, ApiError> {
    if headers.contains_key(FORWARDED_BY) {
        return Ok(Vec::new());
    }
    let others: Vec<NodeRow> = state
        .store
        .nodes()?
        .into_iter()
        .filter(|n| n.runs_vms() && n.state == NodeState::Up && n.id != state.cluster.node_id())
        .collect();
    let asks = others.iter().map(|node| async move {
        let mut request = Request::get(path).body(Body::empty()).expect("a GET of a static path");
        for (name, value) in headers {
            if name != axum::http::header::CONTENT_LENGTH {
                request.headers_mut().append(name.clone(), value.clone());
            }
        }
        let answer = forward(state, node, request).await.map_err(|e| e.to_string())?;
        if !answer.status().is_success() {
            return Err(format!("it answered {}", answer.status()));
        }
        let bytes = axum::body::to_bytes(answer.into_body(), MAX_GATHERED)
            .await
            .map_err(|e| format!("reading its answer: {e}"))?;
        serde_json::from_slice::<Vec<T>>(&bytes).map_err(|e| format!("its answer is not the list: {e}"))
    });
    let mut all = Vec::new();
    for (node, answer) in others.iter().zip(futures::future::join_all(asks).await) {
        match answer {
            Ok(items) => all.extend(items),
            Err(err) => tracing::warn!(node = %node.name, path, error = %err, "a node's part of a list is missing"),
        }
    }
    Ok(all)
}

/// Sends a request to `node` and relays its answer.
async fn forward(state: &AppState, node: &NodeRow, mut request: Request) -> Result<Response, ApiError> {
    let unreachable = |what: String| {
        ApiError::Unavailable(format!(
            "node {} ({}) holds this and could not be reached: {what}",
            node.name, node.url
        ))
    };
    let authority = node
        .url
        .strip_prefix("http://")
        .map(|rest| rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| unreachable("its address is not http://HOST:PORT".into()))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(authority))
        .await
        .map_err(|_| unreachable(format!("no connection within {} s", CONNECT_TIMEOUT.as_secs())))?
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = stream.set_nodelay(true);
    let by = axum::http::HeaderValue::from_str(state.cluster.node_id()).expect("node ids are ASCII");
    request.headers_mut().insert(FORWARDED_BY, by);
    // HTTP/2 carries the host name in the URI's authority; HTTP/1.1 needs it as Host (host-name
    // routing of sandbox traffic reads it there).
    if !request.headers().contains_key(axum::http::header::HOST) {
        if let Some(host) = request
            .uri()
            .authority()
            .and_then(|a| axum::http::HeaderValue::from_str(a.as_str()).ok())
        {
            request.headers_mut().insert(axum::http::header::HOST, host);
        }
    }
    state.metrics.requests_forwarded.inc();
    super::proxy::relay_http1(stream, request, false)
        .await
        .map_err(unreachable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_servers_answer_reads_of_rows_and_send_node_local_work_on() {
        let (get, post, delete) = (Method::GET, Method::POST, Method::DELETE);
        for path in [
            "/",
            "/assets/app.js",
            "/health",
            "/metrics",
            "/events",
            "/nodes",
            "/nodes/n1",
            "/sandboxes",
            "/v2/sandboxes",
            "/snapshots",
            "/snapshot-tree",
            "/vms",
            "/volumes",
            "/templates",
            "/templates/base",
            "/templates/aliases/py",
            "/templates/t1/tags",
            "/templates/t1/versions",
            "/operations",
        ] {
            assert!(answered_by_control_plane(&get, path), "{path}");
        }
        assert!(answered_by_control_plane(&post, "/auth/session"));
        assert!(answered_by_control_plane(&post, "/nodes/n1/undrain"));
        assert!(answered_by_control_plane(&delete, "/nodes/n1"));
        for (method, path) in [
            (&post, "/templates"),
            (&post, "/templates/builtin/code-interpreter"),
            (&post, "/v3/templates"),
            (&post, "/v2/templates/t1/builds/b1"),
            (&get, "/templates/t1/builds/b1/status"),
            (&get, "/templates/t1/files/abc"),
            (&delete, "/templates/base"),
            (&post, "/vms"),
            (&post, "/vms/import"),
            (&get, "/disks"),
            (&post, "/disks"),
            (&get, "/isos"),
            (&get, "/switches"),
            (&get, "/operations/op-x"),
            (&post, "/volumes"),
            (&get, "/no/such/route"),
        ] {
            assert!(!answered_by_control_plane(method, path), "{method} {path}");
        }
    }

    #[test]
    fn nodes_answer_clients_only_their_health_metrics_and_the_node_api() {
        for path in [
            "/health",
            "/metrics",
            "/openapi.yaml",
            "/internal/layers/k",
            "/migrations/incoming",
        ] {
            assert!(answered_by_node_directly(path), "{path}");
        }
        for path in [
            "/",
            "/sandboxes",
            "/v2/sandboxes",
            "/nodes",
            "/events",
            "/vms",
            "/auth/session",
            "/healthz",
        ] {
            assert!(!answered_by_node_directly(path), "{path}");
        }
    }

    #[test]
    fn paths_name_the_thing_whose_node_serves_them() {
        let get = Method::GET;
        let post = Method::POST;
        let sandbox = |id: &str| Some(Subject::Sandbox(id.into()));
        assert_eq!(subject_of_path(&post, "/sandboxes"), Some(Subject::Create));
        assert_eq!(subject_of_path(&post, "/v2/sandboxes"), Some(Subject::Create));
        assert_eq!(subject_of_path(&get, "/sandboxes"), None);
        assert_eq!(subject_of_path(&get, "/v2/sandboxes"), None);
        assert_eq!(subject_of_path(&get, "/sandboxes/abc"), sandbox("abc"));
        assert_eq!(subject_of_path(&post, "/sandboxes/abc/exec"), sandbox("abc"));
        let resume = |id: &str| Some(Subject::Resume(id.into()));
        assert_eq!(subject_of_path(&post, "/v2/sandboxes/abc/connect"), resume("abc"));
        assert_eq!(subject_of_path(&post, "/sandboxes/abc/connect"), resume("abc"));
        assert_eq!(subject_of_path(&post, "/sandboxes/abc/resume"), resume("abc"));
        assert_eq!(subject_of_path(&get, "/sandboxes/abc/resume"), sandbox("abc"));
        assert_eq!(subject_of_path(&post, "/sandboxes/abc/pause"), sandbox("abc"));
        assert_eq!(subject_of_path(&get, "/sandboxes//exec"), None);
        assert_eq!(
            subject_of_path(&get, "/vms/web1/console"),
            Some(Subject::Vm("web1".into()))
        );
        assert_eq!(subject_of_path(&post, "/vms/import"), None);
        assert_eq!(subject_of_path(&post, "/vms"), None);
        assert_eq!(
            subject_of_path(&Method::DELETE, "/snapshots/s1"),
            Some(Subject::Snapshot("s1".into()))
        );
        assert_eq!(
            subject_of_path(&post, "/nodes/n1/drain"),
            Some(Subject::Node("n1".into()))
        );
        assert_eq!(subject_of_path(&get, "/nodes/n1"), None);
        assert_eq!(
            subject_of_path(&get, "/operations/op-n1-x/wait"),
            Some(Subject::Operation("op-n1-x".into()))
        );
        assert_eq!(subject_of_path(&get, "/operations"), None);
        assert_eq!(subject_of_path(&get, "/templates"), None);
        assert_eq!(subject_of_path(&post, "/volumes"), Some(Subject::CreateVolume));
        assert_eq!(subject_of_path(&get, "/volumes"), None);
        assert_eq!(
            subject_of_path(&Method::DELETE, "/volumes/v1"),
            Some(Subject::Volume("v1".into()))
        );
        assert_eq!(
            subject_of_path(&Method::PUT, "/volumecontent/v1/file"),
            Some(Subject::VolumeContent("v1".into()))
        );
    }
}
