//! Sandbox traffic the way E2B's SDKs send it: any request carrying `E2b-Sandbox-Id` (and
//! `E2b-Sandbox-Port`), or addressed to a host name `PORT-SANDBOXID.DOMAIN`, goes to that
//! sandbox's agent unchanged. The client's own `X-Access-Token` travels with it; the server adds
//! nothing, so the agent accepts only clients that hold the sandbox's token.
//!
//! A sandbox that is not running answers 502, which the SDKs read as "not running".

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::AppState;

/// Which sandbox and port a request is for, if it is sandbox traffic.
fn target(request: &Request) -> Option<(String, u16)> {
    let headers = request.headers();
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        let port = headers
            .get("e2b-sandbox-port")
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.parse().ok())
            .unwrap_or(viv_proto::ENVD_PORT);
        return Some((id.to_owned(), port));
    }
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok())?;
    let (label, _) = host.split_once('.')?;
    let (port, id) = label.split_once('-')?;
    let port = port.parse().ok()?;
    (!id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric())).then(|| (id.to_owned(), port))
}

/// Middleware in front of every route: sandbox traffic is forwarded, everything else goes on.
pub(super) async fn route_sandbox_traffic(State(state): State<AppState>, request: Request, next: Next) -> Response {
    match target(&request) {
        Some((id, port)) => forward(&state, &id, port, request)
            .await
            .unwrap_or_else(IntoResponse::into_response),
        None => next.run(request).await,
    }
}

async fn forward(state: &AppState, id: &str, port: u16, request: Request) -> Result<Response, ApiError> {
    if port != viv_proto::ENVD_PORT {
        return Err(ApiError::Sandbox(format!(
            "port {port} of sandbox {id} is not reachable through this server yet; only the agent's port {} is",
            viv_proto::ENVD_PORT
        )));
    }
    // Any state but running is "not running" for the SDKs, which only understand 502 here.
    let live = state.manager.live(id).map_err(|err| match err {
        ApiError::Sandbox(message) => ApiError::Sandbox(message),
        other => ApiError::Sandbox(format!("sandbox {id} is not running: {other}")),
    })?;
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    if path.starts_with("/init") || path.starts_with("/build/") {
        return Err(ApiError::NotFound(format!("no route {path} in the sandbox")));
    }
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut forward = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://agent{path_and_query}"));
    for (name, value) in &parts.headers {
        let hop_by_hop = matches!(
            name.as_str(),
            "host" | "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade" | "content-length"
        );
        if !hop_by_hop && !name.as_str().starts_with("e2b-sandbox-") {
            forward = forward.header(name, value);
        }
    }
    let forward = forward
        .body(body)
        .map_err(|e| ApiError::BadRequest(format!("forwarding the request: {e}")))?;
    let response = live
        .agent
        .send_as_is(forward)
        .await
        .map_err(|e| ApiError::Sandbox(format!("sandbox {id}: {e}")))?;
    Ok(response.map(Body::new).into_response())
}
