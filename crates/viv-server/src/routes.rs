//! The REST API: routes, API-key authentication and request handlers.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use serde::Deserialize;
use viv_api::NewSandbox;

use crate::agent_client::{collect, AgentError};
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::AppState;
pub(crate) use viv_node::extract::{json_object, ApiPath, ApiQuery, JsonBody, OptionalJsonBody};

mod console;
mod e2b_templates;
mod events;
mod exec;
mod listing;
mod metric_history;
mod node_forward;
mod nodes;
mod proxy;
mod sandbox_logs;
pub mod session;
mod signed;
mod snapshots;
mod storage;
mod switches;
mod templates;
mod terminal;
mod vm_backups;
mod vm_console;
mod vm_migrate;
mod vms;
mod volumes;

/// Builds the application router.
pub use vm_migrate::MIGRATION_PROTOCOL;

pub fn router(state: AppState) -> Router {
    let authed = Router::new()
        .route("/sandboxes", post(create_sandbox).get(listing::list_sandboxes))
        .route("/v2/sandboxes", post(create_sandbox).get(listing::list_sandboxes_v2))
        .route("/v2/sandboxes/{id}/connect", post(connect_sandbox))
        .route("/sandboxes/{id}/refreshes", post(refresh_sandbox))
        .route("/sandboxes/{id}/metrics", get(metric_history::sandbox_metrics))
        .route("/sandboxes/{id}", get(get_sandbox).delete(kill_sandbox))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/network", put(set_network))
        .route("/sandboxes/{id}/pause", post(pause_sandbox))
        .route("/sandboxes/{id}/connect", post(connect_sandbox))
        .route("/sandboxes/{id}/resume", post(resume_sandbox))
        .route("/sandboxes/{id}/fork", post(fork_sandbox))
        .route("/sandboxes/{id}/snapshots", post(snapshot_sandbox))
        .route("/snapshots", get(snapshots::list_snapshots))
        .route(
            "/snapshots/{id}",
            get(snapshots::get_snapshot).delete(snapshots::delete_snapshot),
        )
        .route("/sandboxes/{id}/commit", post(templates::commit))
        .route("/sandboxes/{id}/exec", post(exec::exec))
        .route("/sandboxes/{id}/terminal", get(terminal::terminal))
        .route("/sandboxes/{id}/logs", get(sandbox_logs::logs))
        .route("/sandboxes/{id}/logs/stream", get(sandbox_logs::stream))
        .route("/sandboxes/{id}/files", get(download).put(upload))
        .route("/sandboxes/{id}/files/list", get(list_files))
        .route("/sandboxes/{id}/envd/files", get(envd_files).post(envd_files))
        .route("/sandboxes/{id}/envd/{service}/{method}", post(envd_call))
        .route("/templates", post(templates::build).get(templates::list))
        .route("/templates/{name}", get(templates::get).delete(templates::delete))
        .route("/templates/builtin/{key}", post(templates::build_builtin))
        .route("/v3/templates", post(e2b_templates::request_build))
        .route("/templates/{id}/files/{hash}", get(e2b_templates::file_link))
        .route("/v2/templates/{id}/builds/{build}", post(e2b_templates::start_build))
        .route(
            "/templates/{id}/builds/{build}/status",
            get(e2b_templates::build_status),
        )
        .route("/templates/aliases/{alias}", get(e2b_templates::alias))
        .route(
            "/templates/tags",
            post(e2b_templates::assign_tags).delete(e2b_templates::delete_tags),
        )
        .route("/templates/{id}/tags", get(e2b_templates::tags))
        .route("/templates/{id}/tags/{tag}", put(templates::tag_version))
        .route("/templates/{id}/versions", get(templates::versions))
        .route("/templates/{id}/versions/{version}", delete(templates::delete_version))
        .merge(volumes::control())
        .merge(vms::routes())
        .merge(vm_backups::routes())
        .merge(vm_migrate::routes())
        .merge(switches::routes())
        .merge(vm_console::routes())
        .merge(storage::routes())
        .merge(events::routes())
        .merge(nodes::routes());
    // Metrics name VMs and count sandboxes: behind the key unless the operator made them public.
    let (authed, public) = if state.public_metrics {
        (authed, Router::new().route("/metrics", get(metrics)))
    } else {
        (authed.route("/metrics", get(metrics)), Router::new())
    };
    let authed = authed
        .layer(middleware::from_fn_with_state(state.clone(), require_api_key))
        .layer(axum::Extension(metric_history::History::start(&state)))
        .layer(axum::Extension(Arc::new(sandbox_logs::ConsoleLogs::default())));
    Router::new()
        .route("/health", get(health))
        .merge(public)
        .route("/openapi.yaml", get(openapi))
        // Authorized by the token of a link `GET /templates/{id}/files/{hash}` handed out.
        .route("/template-files/{template}/{hash}", put(e2b_templates::upload_files))
        .merge(authed)
        .merge(volumes::content())
        .merge(viv_node::node_api::routes(state.manager.clone()))
        .merge(session::routes())
        .merge(console::routes())
        .fallback(|| async { ApiError::NotFound("no such route; see /openapi.yaml".into()) })
        .method_not_allowed_fallback(|request: Request| async move {
            ApiError::MethodNotAllowed(format!(
                "{} is not allowed on {}; see /openapi.yaml",
                request.method(),
                request.uri().path()
            ))
        })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            proxy::route_sandbox_traffic,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            node_forward::route_to_node,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), count_requests))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(state)
}

/// The OpenAPI document, with the largest VM shape this host can run.
async fn openapi() -> Response {
    let limits = crate::capacity::HostLimits::host();
    (
        [(header::CONTENT_TYPE, "application/yaml")],
        viv_api::openapi_yaml(limits.max_vcpus, limits.max_memory_mib),
    )
        .into_response()
}

async fn count_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    state.metrics.http_requests.inc();
    next.run(request).await
}

/// The API key a request was authenticated with (its id), for handlers that record ownership.
/// Any other way of authenticating a request that creates sandboxes should insert it too.
#[derive(Debug, Clone)]
pub struct AuthedKey(pub String);

/// The token of an `Authorization: Bearer TOKEN` header, if any.
fn bearer_token(headers: &axum::http::HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

async fn require_api_key(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    // Already authenticated in front, by the cluster's forwarding (extensions are the server's
    // own: no client can set one).
    if request.extensions().get::<AuthedKey>().is_some() {
        return next.run(request).await;
    }
    match authenticated_key(&state, &request) {
        Ok(id) => {
            request.extensions_mut().insert(AuthedKey(id));
            next.run(request).await
        }
        Err(err) => err.into_response(),
    }
}

/// The id of the API key a request carries (in its header, as a bearer token or WebSocket
/// subprotocol, or through a web console session).
fn authenticated_key(state: &AppState, request: &Request) -> Result<String, ApiError> {
    let key = request
        .headers()
        .get(viv_api::API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        // Scrapers such as Prometheus send credentials as a bearer token.
        .or_else(|| bearer_token(request.headers()))
        // Browsers cannot set headers on a WebSocket: the key as a subprotocol.
        .or_else(|| vm_console::key_from_subprotocols(request.headers()));
    match key {
        // A browser signed in to the console: its session cookie (and, for what changes state,
        // its Origin) instead of a key; the session stands for the key it was opened with.
        None => match session::authorize(state, request) {
            Ok(Some(session)) => Ok(session.key_id),
            Ok(None) => Err(ApiError::Unauthorized(format!(
                "missing {} header",
                viv_api::API_KEY_HEADER
            ))),
            Err(err) => Err(err),
        },
        Some(key) => match state.store.key_id(&key) {
            Ok(Some(id)) => Ok(id),
            Ok(None) => Err(ApiError::Unauthorized("invalid or revoked API key".into())),
            Err(err) => Err(err.into()),
        },
    }
}

async fn health(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "vmm": "qemu",
        "accel": state.manager.accel().to_string(),
        "snapshots": state.manager.snapshots(),
        "sandboxes": state.manager.live_count(),
        "pooled": state.manager.pooled_count(),
        "poolWarming": state.manager.pool_warming(),
        "network": state.manager.network_mode().to_string(),
        "confinement": state.manager.confinement(),
        "networkSlots": state.manager.network_slots(),
    }))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        format!(
            "{}# HELP vivarium_network_slots Network namespaces in use (isolated mode).\n# TYPE vivarium_network_slots gauge\nvivarium_network_slots {}\n{}{}{}",
            state.metrics.render(state.manager.live_count()),
            state.manager.network_slots(),
            state.manager.render_pool_metrics(),
            state.manager.render_parked_metrics(),
            state.manager.render_vm_metrics().await
        ),
    )
}

/// Runs a sandbox's change of state to its end even when the client goes away mid-way (hyper
/// drops a request's future when its connection closes, as when the API server that forwarded
/// it is killed): a create, resume, pause, fork, snapshot or kill cut off half-way could leave
/// a VM whose row says `starting`. A create whose client left is then a sandbox like any other
/// (listed, ended by its timeout).
async fn to_completion<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ApiError::Internal(format!("the request's work failed: {e}")))?
}

/// Pauses a sandbox with its memory or, with `memory: false`, only its disk.
async fn pause_sandbox(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<viv_api::PauseRequest>,
) -> Result<Response, ApiError> {
    let manager = state.manager.clone();
    to_completion(async move {
        manager
            .pause_keeping(&id, req.memory.unwrap_or(true), req.keep_warm.unwrap_or(true))
            .await
    })
    .await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// E2B's `connect`: 200 with the sandbox if it runs, 201 once a paused one is resumed.
async fn connect_sandbox(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<viv_api::ConnectSandbox>,
) -> Result<Response, ApiError> {
    let manager = state.manager.clone();
    let (sandbox, resumed) =
        to_completion(async move { manager.resume(&id, req.timeout, req.memory.unwrap_or(true)).await }).await?;
    let status = if resumed { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(sandbox)).into_response())
}

/// E2B's older `resume`: only for paused sandboxes.
async fn resume_sandbox(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<viv_api::ConnectSandbox>,
) -> Result<Response, ApiError> {
    if state.manager.get(&id)?.state == viv_api::SandboxState::Running {
        return Err(ApiError::Conflict(format!("sandbox '{id}' is already running")));
    }
    let manager = state.manager.clone();
    let (sandbox, _) =
        to_completion(async move { manager.resume(&id, req.timeout, req.memory.unwrap_or(true)).await }).await?;
    Ok((StatusCode::CREATED, Json(sandbox)).into_response())
}

async fn fork_sandbox(
    State(state): State<AppState>,
    owner: Option<axum::Extension<AuthedKey>>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<viv_api::ForkRequest>,
) -> Result<Response, ApiError> {
    let results = to_completion(async move {
        let results = state.manager.fork(&id, req.count.unwrap_or(1), req.timeout).await?;
        if let Some(axum::Extension(owner)) = owner {
            for forked in results.iter().filter_map(|r| r.sandbox.as_ref()) {
                state.store.set_sandbox_owner(&forked.sandbox_id, &owner.0)?;
            }
        }
        Ok(results)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(results)).into_response())
}

async fn snapshot_sandbox(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(req): OptionalJsonBody<viv_api::SnapshotRequest>,
) -> Result<Response, ApiError> {
    let manager = state.manager.clone();
    let info = to_completion(async move { manager.snapshot(&id, req.name, req.memory.unwrap_or(true)).await }).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn create_sandbox(
    State(state): State<AppState>,
    owner: Option<axum::Extension<AuthedKey>>,
    JsonBody(req): JsonBody<NewSandbox>,
) -> Result<Response, ApiError> {
    let created = to_completion(async move {
        let created = state.manager.create(req).await?;
        // The creating key owns it: only that key's SSH keys reach it (crates/viv-ssh). A
        // request authenticated otherwise (no AuthedKey) creates a sandbox no SSH key reaches.
        if let Some(axum::Extension(owner)) = owner {
            state.store.set_sandbox_owner(&created.sandbox_id, &owner.0)?;
        }
        Ok(created)
    })
    .await?;
    Ok((StatusCode::CREATED, Json(created)).into_response())
}

/// States named in a `state=` query.
fn parse_states(list: &str) -> Result<Vec<viv_api::SandboxState>, ApiError> {
    list.split(',')
        .map(|s| {
            viv_api::SandboxState::parse(s).ok_or_else(|| {
                ApiError::BadRequest(format!(
                    "unknown state '{s}'; give a comma-separated list of starting, running, paused and failed"
                ))
            })
        })
        .collect()
}

/// The pairs of a `?metadata=k1%3Dv1%26k2%3Dv2` filter, as E2B's API encodes metadata filters.
fn metadata_filter(encoded: Option<&String>) -> Result<BTreeMap<String, String>, ApiError> {
    match encoded {
        Some(encoded) => serde_urlencoded::from_str(encoded)
            .map_err(|e| ApiError::BadRequest(format!("invalid metadata filter: {e}"))),
        None => Ok(BTreeMap::new()),
    }
}

#[derive(Deserialize, Default)]
struct RefreshBody {
    /// Seconds to add from now.
    duration: Option<u64>,
}

/// E2B's keep-alive: the sandbox lives `duration` seconds (default 60) from now, unless it
/// would live longer anyway.
async fn refresh_sandbox(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    OptionalJsonBody(body): OptionalJsonBody<RefreshBody>,
) -> Result<Response, ApiError> {
    state.manager.refresh(&id, body.duration.unwrap_or(60))?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_sandbox(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.get(&id)?).into_response())
}

async fn kill_sandbox(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let manager = state.manager.clone();
    to_completion(async move { manager.kill(&id).await }).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

#[derive(Deserialize)]
struct TimeoutBody {
    timeout: u64,
}

async fn set_timeout(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(body): JsonBody<TimeoutBody>,
) -> Result<Response, ApiError> {
    state.manager.set_timeout(&id, body.timeout)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// E2B's `PUT /sandboxes/{id}/network`: replaces the sandbox's egress rules.
async fn set_network(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(body): JsonBody<viv_api::NetworkUpdate>,
) -> Result<Response, ApiError> {
    state.manager.update_network(&id, body).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn agent_error(err: AgentError) -> ApiError {
    let AgentError::Rpc { status, message, .. } = &err else {
        return ApiError::Sandbox(err.to_string());
    };
    let message = message.clone();
    match status {
        400 => ApiError::BadRequest(message),
        403 => ApiError::Forbidden(message),
        404 => ApiError::NotFound(message),
        409 => ApiError::Conflict(message),
        _ => ApiError::Sandbox(err.to_string()),
    }
}

/// Sends a request to the sandbox's agent; a non-2xx answer becomes the matching [`ApiError`].
async fn agent_ok(
    state: &AppState,
    live: &Arc<LiveSandbox>,
    request: hyper::Request<Body>,
) -> Result<hyper::Response<hyper::body::Incoming>, ApiError> {
    match live.agent.send_ok(request).await {
        Ok(response) => Ok(response),
        Err(err) => Err(agent_failure(state, live, err).await),
    }
}

/// [`agent_ok`] and the whole body of its answer.
async fn agent_body(
    state: &AppState,
    live: &Arc<LiveSandbox>,
    request: hyper::Request<Body>,
) -> Result<Bytes, ApiError> {
    let response = agent_ok(state, live, request).await?;
    match collect(response).await {
        Ok(body) => Ok(body),
        Err(err) => Err(agent_failure(state, live, err).await),
    }
}

/// The error for a request to a sandbox's agent that failed. A pause (or a kill, or a timeout)
/// stops the VM under requests in flight on purpose: once it is done, the sandbox's state says
/// why (409 paused, 404 gone) instead of a 502 for a broken channel. A VM that stopped by
/// itself is a 502 with its reason.
async fn agent_failure(state: &AppState, live: &Arc<LiveSandbox>, err: AgentError) -> ApiError {
    if matches!(err, AgentError::Rpc { .. }) {
        return agent_error(err);
    }
    state.manager.settle(live).await;
    match state.manager.live(&live.id) {
        Err(now) => now,
        Ok(current) if !Arc::ptr_eq(&current, live) => ApiError::Conflict(format!(
            "sandbox '{}' was paused and resumed while the request ran; send it again",
            live.id
        )),
        Ok(_) => match live.vm.exit().borrow().as_ref() {
            Some(exit) => ApiError::Sandbox(format!("sandbox '{}' stopped: {}", live.id, exit.reason)),
            None => agent_error(err),
        },
    }
}

fn basic_user(user: Option<&str>) -> Option<String> {
    user.filter(|u| !u.is_empty()).map(|u| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
        )
    })
}

/// Deepest directory listing `GET /sandboxes/{id}/files/list` walks.
const MAX_LIST_DEPTH: u32 = 64;

#[derive(Deserialize)]
struct FileQuery {
    path: Option<String>,
    user: Option<String>,
    #[serde(default)]
    depth: Option<u32>,
}

impl FileQuery {
    fn path(&self) -> Result<&str, ApiError> {
        self.path
            .as_deref()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ApiError::BadRequest("the path query parameter is required".into()))
    }

    fn agent_query(&self) -> Result<String, ApiError> {
        let mut pairs = vec![("path", self.path()?.to_owned())];
        if let Some(user) = self.user.as_ref().filter(|u| !u.is_empty()) {
            pairs.push(("username", user.clone()));
        }
        serde_urlencoded::to_string(pairs).map_err(|e| ApiError::BadRequest(e.to_string()))
    }
}

async fn download(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let query = q.agent_query()?;
    let live = state.manager.live(&id)?;
    let request = hyper::Request::get(format!("http://agent/files?{query}"))
        .body(Body::empty())
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let response = agent_ok(&state, &live, request).await?;
    Ok(response.map(Body::new).into_response())
}

async fn upload(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    let query = q.agent_query()?;
    let live = state.manager.live(&id)?;
    // The agent keeps the file only if every byte arrived (see `UploadBody`); a client whose
    // body breaks gets a 400 rather than a 502.
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "application/octet-stream".parse().expect("static value"),
    );
    let (body, upload) = crate::agent_client::forward_body(&hyper::Method::POST, "/files", &mut headers, body);
    let mut request = hyper::Request::post(format!("http://agent/files?{query}"))
        .body(body)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    *request.headers_mut() = headers;
    let body = agent_body(&state, &live, request)
        .await
        .map_err(|err| cut_upload(&upload, err))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

async fn list_files(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response, ApiError> {
    let mut headers = HeaderMap::new();
    if let Some(auth) = basic_user(q.user.as_deref()) {
        headers.insert(
            header::AUTHORIZATION,
            auth.parse()
                .map_err(|_| ApiError::BadRequest("invalid user name".into()))?,
        );
    }
    let depth = q.depth.unwrap_or(1);
    if !(1..=MAX_LIST_DEPTH).contains(&depth) {
        return Err(ApiError::BadRequest(format!(
            "depth must be between 1 and {MAX_LIST_DEPTH}, got {depth}"
        )));
    }
    let body = serde_json::json!({ "path": q.path()?, "depth": depth });
    let live = state.manager.live(&id)?;
    let mut request = hyper::Request::post("http://agent/filesystem.Filesystem/ListDir")
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_string()))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    request.headers_mut().extend(headers);
    let body = agent_body(&state, &live, request).await?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Whether `path` (without its leading `/`) is an envd route clients may call through
/// `/sandboxes/{id}/envd/`: a method of the `process.Process` or `filesystem.Filesystem`
/// Connect services, or `files`. The host's own routes (`init`, `build/*`, `tunnel`) are not.
fn is_envd_route(path: &str) -> bool {
    if path == "files" {
        return true;
    }
    match path.split_once('/') {
        Some((service, method)) => {
            matches!(service, "process.Process" | "filesystem.Filesystem")
                && !method.is_empty()
                && method.bytes().all(|b| b.is_ascii_alphanumeric())
        }
        None => false,
    }
}

/// envd's `/files` (GET a file, POST an upload), passed through.
async fn envd_files(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    request: Request,
) -> Result<Response, ApiError> {
    envd_passthrough(state, id, "files", request).await
}

/// A Connect call of envd's `process.Process` or `filesystem.Filesystem`, passed through.
/// Other paths under `/envd/` (the host's own agent routes `init`, `build/*` and `tunnel`
/// among them) are 404s.
async fn envd_call(
    State(state): State<AppState>,
    ApiPath((id, service, method)): ApiPath<(String, String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    let path = format!("{service}/{method}");
    envd_passthrough(state, id, &path, request).await
}

/// Forwards an envd route (`process.Process/*`, `filesystem.Filesystem/*`, `files`) to the
/// sandbox's agent, adding its access token. An error the agent answers without a JSON body
/// (such as a method its services do not have) becomes an [`ApiError`] with its status.
async fn envd_passthrough(
    state: AppState,
    id: String,
    path_in_agent: &str,
    request: Request,
) -> Result<Response, ApiError> {
    if !is_envd_route(path_in_agent) {
        return Err(ApiError::NotFound(format!(
            "no envd route '{path_in_agent}': use process.Process/METHOD, filesystem.Filesystem/METHOD or files"
        )));
    }
    let live = state.manager.live(&id)?;
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().map(|q| format!("?{q}")).unwrap_or_default();
    let mut headers = HeaderMap::new();
    for (name, value) in &parts.headers {
        if matches!(
            name.as_str(),
            "host" | "connection" | "transfer-encoding" | "x-api-key" | "x-access-token" | "content-length"
        ) {
            continue;
        }
        headers.append(name.clone(), value.clone());
    }
    let (body, upload) =
        crate::agent_client::forward_body(&parts.method, &format!("/{path_in_agent}"), &mut headers, body);
    let mut forward = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://agent/{path_in_agent}{query}"))
        .body(body)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    *forward.headers_mut() = headers;
    let response = match live.agent.send(forward).await {
        Ok(response) => response,
        Err(err) => return Err(cut_upload(&upload, agent_failure(&state, &live, err).await)),
    };
    let status = response.status();
    let json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    if !status.is_success() && !json {
        let body = match collect(response).await {
            Ok(body) => body,
            Err(err) => return Err(agent_failure(&state, &live, err).await),
        };
        let text = String::from_utf8_lossy(&body);
        let message = format!(
            "the sandbox's agent answered {status} to {} /{path_in_agent}{}",
            parts.method,
            if text.trim().is_empty() {
                String::new()
            } else {
                format!(": {}", text.trim())
            }
        );
        return Err(match status.as_u16() {
            404 => ApiError::NotFound(message),
            405 => ApiError::MethodNotAllowed(message),
            415 => ApiError::UnsupportedMediaType(message),
            400..=499 => ApiError::BadRequest(message),
            _ => ApiError::Sandbox(message),
        });
    }
    Ok(response.map(Body::new).into_response())
}

/// The error of a request whose upload body broke on the client's side is the client's (400),
/// whatever the agent channel reported.
fn cut_upload(upload: &Option<std::sync::Arc<crate::agent_client::UploadOutcome>>, err: ApiError) -> ApiError {
    match upload.as_ref().and_then(|u| u.broken()) {
        Some(cut) => ApiError::BadRequest(cut),
        None => err,
    }
}

#[cfg(test)]
mod tests {
    use super::is_envd_route;

    #[test]
    fn only_envd_services_and_files_pass_through() {
        for ok in ["files", "process.Process/Start", "filesystem.Filesystem/ListDir"] {
            assert!(is_envd_route(ok), "{ok}");
        }
        for refused in [
            "init",
            "build/copy",
            "tunnel",
            "metrics",
            "",
            "0",
            "process.Process/",
            "process.Process/Start/x",
            "filesystem.Filesystem/../init",
            "other.Service/Call",
        ] {
            assert!(!is_envd_route(refused), "{refused}");
        }
    }
}
