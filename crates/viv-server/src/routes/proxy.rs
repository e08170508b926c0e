//! Sandbox traffic the way E2B's SDKs send it: any request carrying `E2b-Sandbox-Id` (and
//! `E2b-Sandbox-Port`), or addressed to a host name `PORT-SANDBOXID.DOMAIN`, goes to that
//! sandbox's agent unchanged. The client's own `X-Access-Token` travels with it; the server adds
//! nothing, so the agent accepts only clients that hold the sandbox's token.
//!
//! Other ports (`get_host(port)`) reach services in the guest through a byte tunnel the agent
//! opens to `127.0.0.1:PORT` (`/tunnel`); the server speaks HTTP/1.1 to the service over it and
//! splices upgraded connections (WebSocket) through, so no guest networking is involved.
//!
//! A paused sandbox created with auto-resume is resumed before its request goes through (the
//! request waits; see `manager/lifecycle.rs`). A sandbox that is not running answers 502, which
//! the SDKs read as "not running"; one that is gone or paused says it "was not found", as E2B's
//! proxy does.
//!
//! Signed file URLs without a sandbox header (`/files?...&signature=`) are routed by their
//! signature (`routes/signed.rs`).
//!
//! Uploads (`POST /files`) travel as an [`crate::agent_client::UploadBody`]: the agent keeps a file only if it
//! received every byte the client sent, and a client whose body breaks (fewer bytes than its
//! Content-Length, a chunked body without its end) gets a 400 that says so, not a 502.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::agent_client::forward_body;
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::AppState;

/// Which sandbox and port a request is for, if it is sandbox traffic.
pub(super) fn target(request: &Request) -> Option<(String, u16)> {
    let headers = request.headers();
    if let Some(id) = headers.get("e2b-sandbox-id").and_then(|v| v.to_str().ok()) {
        let port = headers
            .get("e2b-sandbox-port")
            .and_then(|v| v.to_str().ok())
            .and_then(|p| p.parse().ok())
            .unwrap_or(viv_proto::ENVD_PORT);
        return Some((id.to_owned(), port));
    }
    // HTTP/2 carries the host name in the URI's authority, not in a Host header.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))?;
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
        None => match super::signed::sandbox_for(&state, &request) {
            Some(Ok(id)) => forward(&state, &id, viv_proto::ENVD_PORT, request)
                .await
                .unwrap_or_else(IntoResponse::into_response),
            Some(Err(err)) => err.into_response(),
            None => next.run(request).await,
        },
    }
}

async fn forward(state: &AppState, id: &str, port: u16, request: Request) -> Result<Response, ApiError> {
    // A paused sandbox with auto-resume is resumed first. Any state but running is "not
    // running" for the SDKs, which only understand 502 here. As E2B's proxy says it, a sandbox
    // that is gone (killed, timed out, failed) or paused "was not found": the SDKs read that
    // phrase as "the sandbox is not running any more" (a stream cut by a kill then ends with
    // "killed or reached its end of life"). One still starting is not gone; a failed resume
    // says why after that phrase.
    let live = state.manager.wake(id).await.map_err(|err| {
        let starting = matches!(state.manager.get(id), Ok(info) if info.state == viv_api::SandboxState::Starting);
        if starting {
            ApiError::Sandbox(format!("sandbox {id} is not running yet: {err}"))
        } else {
            ApiError::Sandbox(format!("the sandbox {id} was not found: {err}"))
        }
    })?;
    if port != viv_proto::ENVD_PORT {
        // `allowPublicTraffic: false`: the sandbox's ports need its traffic token.
        if let Some(token) = state.store.traffic_token(id)? {
            let given = request
                .headers()
                .get("e2b-traffic-access-token")
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !viv_proto::signing::same(given, token.as_bytes()) {
                return Err(ApiError::Forbidden(format!(
                    "port {port} of sandbox {id} needs its traffic access token in the E2B-Traffic-Access-Token header"
                )));
            }
        }
        return forward_to_port(&live, id, port, request).await;
    }
    let (parts, body) = request.into_parts();
    let path = parts.uri.path();
    if path.starts_with("/init") || path.starts_with("/build/") || path.starts_with("/volume/") {
        return Err(ApiError::NotFound(format!("no route {path} in the sandbox")));
    }
    let path_and_query = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let mut headers = hyper::HeaderMap::new();
    for (name, value) in &parts.headers {
        let hop_by_hop = matches!(
            name.as_str(),
            "host" | "connection" | "keep-alive" | "transfer-encoding" | "te" | "upgrade" | "content-length"
        );
        if !hop_by_hop && !name.as_str().starts_with("e2b-sandbox-") {
            headers.append(name.clone(), value.clone());
        }
    }
    let (body, upload) = forward_body(&parts.method, path, &mut headers, body);
    let mut forward = hyper::Request::builder()
        .method(parts.method.clone())
        .uri(format!("http://agent{path_and_query}"))
        .body(body)
        .map_err(|e| ApiError::BadRequest(format!("forwarding the request: {e}")))?;
    *forward.headers_mut() = headers;
    let response = match live.agent.send_as_is(forward).await {
        Ok(response) => response,
        Err(err) => {
            if let Some(cut) = upload.as_ref().and_then(|u| u.broken()) {
                return Err(ApiError::BadRequest(cut));
            }
            // A VM that died is recorded as failed before the client hears of it, so that what
            // it asks next (the sandbox's info, a list) agrees.
            state.manager.settle(&live).await;
            return Err(ApiError::Sandbox(format!("sandbox {id}: {err}")));
        }
    };
    Ok(response.map(Body::new).into_response())
}

/// Forwards an HTTP request (or a WebSocket upgrade) to a service listening on `port` in the
/// guest, over a tunnel through the agent.
async fn forward_to_port(live: &LiveSandbox, id: &str, port: u16, request: Request) -> Result<Response, ApiError> {
    let unreachable = |what: String| ApiError::Sandbox(format!("port {port} of sandbox {id}: {what}"));
    let (to_guest, guest_input) = tokio::sync::mpsc::channel::<Bytes>(16);
    let input = tokio_stream::wrappers::ReceiverStream::new(guest_input).map(Ok::<_, std::convert::Infallible>);
    let open = hyper::Request::post(format!("http://agent/tunnel?port={port}"))
        .body(Body::from_stream(input))
        .map_err(|e| unreachable(e.to_string()))?;
    let tunnel = live.agent.send_ok(open).await.map_err(|e| unreachable(e.to_string()))?;
    // The HTTP client below talks to one end of an in-memory pipe; the other end is spliced
    // onto the tunnel.
    let (client_end, tunnel_end) = tokio::io::duplex(64 * 1024);
    let (mut from_client, mut to_client) = tokio::io::split(tunnel_end);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to_guest.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut output = tunnel.into_body();
    tokio::spawn(async move {
        while let Some(Ok(frame)) = output.frame().await {
            if let Ok(data) = frame.into_data() {
                if to_client.write_all(&data).await.is_err() {
                    return;
                }
            }
        }
        let _ = to_client.shutdown().await;
    });
    relay_http1(client_end, request, true).await.map_err(unreachable)
}

/// Sends `request` as HTTP/1.1 over `io` and answers with the response, splicing an upgraded
/// connection (WebSocket) through. Hop-by-hop headers stay behind, except those that ask for an
/// upgrade; `E2b-Sandbox-*` headers too when `strip_sandbox_headers` (they were for us).
pub(super) async fn relay_http1<IO>(
    io: IO,
    mut request: Request,
    strip_sandbox_headers: bool,
) -> Result<Response, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    let wants_upgrade = request.headers().contains_key(header::UPGRADE);
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));
    let (parts, body) = request.into_parts();
    let mut forward = hyper::Request::builder()
        .method(parts.method)
        .uri(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
    for (name, value) in &parts.headers {
        let keep = match name.as_str() {
            "keep-alive" | "transfer-encoding" | "te" | "proxy-connection" => false,
            "connection" | "upgrade" => wants_upgrade,
            other => !(strip_sandbox_headers && other.starts_with("e2b-sandbox-")),
        };
        if keep {
            forward = forward.header(name, value);
        }
    }
    let forward = forward.body(body).map_err(|e| e.to_string())?;
    let mut response = sender
        .send_request(forward)
        .await
        .map_err(|e| format!("the service did not answer: {e}"))?;
    if response.status() == hyper::StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let far_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(far)) = (client_upgrade.await, far_upgrade.await) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(far)).await;
                }
            });
        }
    }
    Ok(response.map(Body::new).into_response())
}
