//! A running VM's consoles (API key): the serial console as a WebSocket shared by any number
//! of clients, its capped log, the graphical display as a WebSocket for VNC clients (noVNC),
//! and PNG screenshots. `{id}` is a VM's id or its name.
//!
//! - `GET /vms/{id}/console` upgrades to a WebSocket (subprotocol `viv-console` when asked):
//!   binary frames from the server are console output — first the replay of the last output
//!   (`?replay=false` skips it), then live bytes; binary frames from the client are input; a
//!   text frame `{"type":"break"}` sends a serial break. The server closes the socket (1000,
//!   "the VM stopped") when the VM stops.
//! - `GET /vms/{id}/vnc` upgrades to a WebSocket (subprotocol `binary` when asked, as
//!   websockify does) carrying the RFB stream of the VM's VNC display, binary frames both ways.
//! - `GET /vms/{id}/console/log?tail=BYTES` and `GET /vms/{id}/screenshot` are plain GETs.
//!
//! Browsers cannot set headers on a WebSocket: the API key may instead be offered as a
//! subprotocol `viv-key.KEY` beside the real one (`new WebSocket(url, ["binary",
//! "viv-key." + key])`). The server never selects it, so the key is not echoed back, and it
//! never appears in a URL (where logs and proxies would keep it).
//!
//! Invariants: a WebSocket upgrade is answered only for a running VM (404 unknown, 409 not
//! running or no display) and, for VNC, once the display's socket accepted the connection; a
//! screenshot's temporary file lives in a server-owned directory (not the run directory a
//! jailed QEMU can write) and is removed whatever happens.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures::{SinkExt as _, StreamExt as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::{ApiPath, ApiQuery};
use crate::error::ApiError;
use crate::manager::ConsoleHub;
use crate::AppState;

/// The subprotocol a browser offers to carry the API key (`viv-key.KEY`).
pub const KEY_SUBPROTOCOL_PREFIX: &str = "viv-key.";
/// The console WebSocket's subprotocol.
pub const CONSOLE_SUBPROTOCOL: &str = "viv-console";
/// Largest WebSocket message a client may send (input, RFB messages).
const MAX_MESSAGE: usize = 1 << 20;
/// Close code of a socket whose VM stopped (normal closure).
const CLOSE_NORMAL: u16 = 1000;
/// Close code of a client that sent what the server does not take (unsupported data).
const CLOSE_UNSUPPORTED: u16 = 1003;

/// Routes that take the API key.
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/vms/{id}/console", get(console))
        .route("/vms/{id}/console/log", get(console_log))
        .route("/vms/{id}/vnc", get(vnc))
        .route("/vms/{id}/screenshot", get(screenshot))
}

/// The API key offered as a `viv-key.KEY` subprotocol of a WebSocket upgrade, if any.
pub(super) fn key_from_subprotocols(headers: &HeaderMap) -> Option<String> {
    let upgrade = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    if !upgrade {
        return None;
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(KEY_SUBPROTOCOL_PREFIX).map(str::to_owned))
        .filter(|k| !k.is_empty())
}

/// The upgrade of a WebSocket route, or 400 for a plain request.
pub(super) fn upgrade(
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
    route: &str,
) -> Result<WebSocketUpgrade, ApiError> {
    ws.map(|ws| ws.max_message_size(MAX_MESSAGE).max_frame_size(MAX_MESSAGE))
        .map_err(|e| {
            ApiError::BadRequest(format!(
                "{route} is a WebSocket: send a WebSocket upgrade request ({e})"
            ))
        })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsoleQuery {
    /// Whether to send the last output first (default true).
    replay: Option<bool>,
}

async fn console(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConsoleQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let live = state.manager.live_vm(&id)?;
    let ws = upgrade(ws, "/vms/{id}/console")?;
    let hub = live.console.clone();
    let replay = q.replay.unwrap_or(true);
    Ok(ws
        .protocols([CONSOLE_SUBPROTOCOL])
        .on_upgrade(move |socket| console_session(socket, hub, replay)))
}

/// A control message in a text frame.
#[derive(serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum Control {
    /// A serial break.
    Break,
}

/// One console client: output to the socket, input and controls to the hub, until either
/// side ends.
async fn console_session(socket: WebSocket, hub: Arc<ConsoleHub>, replay: bool) {
    let mut client = hub.attach(replay);
    let (mut tx, mut rx) = socket.split();
    let (errors, mut error_rx) = tokio::sync::mpsc::channel::<String>(4);
    let output = async {
        loop {
            tokio::select! {
                chunk = client.recv() => match chunk {
                    Some(bytes) => {
                        if tx.send(Message::Binary(bytes)).await.is_err() {
                            return;
                        }
                    }
                    None => {
                        let _ = tx.send(close(CLOSE_NORMAL, "the VM stopped")).await;
                        return;
                    }
                },
                Some(error) = error_rx.recv() => {
                    let text = serde_json::json!({"type": "error", "message": error}).to_string();
                    if tx.send(Message::Text(text.into())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let input = async {
        while let Some(Ok(message)) = rx.next().await {
            let sent = match message {
                Message::Binary(bytes) => hub.send(&bytes).await,
                Message::Text(text) => match serde_json::from_str::<Control>(&text) {
                    Ok(Control::Break) => hub.send_break().await,
                    Err(e) => {
                        let _ = errors
                            .send(format!(
                                "unknown control message ({e}): send input as binary frames and \
                                 {{\"type\":\"break\"}} for a break"
                            ))
                            .await;
                        Ok(())
                    }
                },
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => Ok(()),
            };
            if sent.is_err() {
                return;
            }
        }
    };
    // Output ends the session when the VM stops; input when the client leaves.
    tokio::select! {
        () = output => {}
        () = input => {}
    }
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    /// Only the last this many bytes.
    tail: Option<u64>,
}

async fn console_log(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<LogQuery>,
) -> Result<Response, ApiError> {
    let log = state.manager.vm_console_log(&id, q.tail)?;
    Ok(([(header::CONTENT_TYPE, "text/plain")], log).into_response())
}

async fn vnc(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let info = state.manager.vm_info(&id)?;
    let live = state.manager.live_vm(&info.id)?;
    if info.definition.display == viv_api::vms::Display::None {
        return Err(ApiError::Conflict(format!(
            "VM '{}' has no display (its definition's display is none): use its serial console",
            info.name
        )));
    }
    let ws = upgrade(ws, "/vms/{id}/vnc")?;
    let display = tokio::net::UnixStream::connect(live.machine.vnc_socket())
        .await
        .map_err(|e| ApiError::Conflict(format!("the display of VM '{}' is not reachable: {e}", info.name)))?;
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |socket| vnc_session(socket, display)))
}

/// Bridges a WebSocket and the VNC socket until either side ends.
async fn vnc_session(socket: WebSocket, display: tokio::net::UnixStream) {
    let (mut tx, mut rx) = socket.split();
    let (mut reader, mut writer) = display.into_split();
    let from_display = async {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send(close(CLOSE_NORMAL, "the display closed")).await;
                    return;
                }
                Ok(n) => {
                    if tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let to_display = async {
        while let Some(Ok(message)) = rx.next().await {
            match message {
                Message::Binary(bytes) => {
                    if writer.write_all(&bytes).await.is_err() {
                        return None;
                    }
                }
                Message::Text(_) => return Some(close(CLOSE_UNSUPPORTED, "send RFB data in binary frames")),
                Message::Close(_) => return None,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
        None
    };
    let refused = tokio::select! {
        () = from_display => None,
        refused = to_display => refused,
    };
    if let Some(message) = refused {
        let _ = tx.send(message).await;
    }
}

async fn screenshot(State(state): State<AppState>, ApiPath(id): ApiPath<String>) -> Result<Response, ApiError> {
    let info = state.manager.vm_info(&id)?;
    let live = state.manager.live_vm(&info.id)?;
    let dir = state.manager.vm_console_dir(&info.id);
    let io = |what: &str, e: std::io::Error| ApiError::Internal(format!("{what} for a screenshot: {e}"));
    std::fs::create_dir_all(&dir).map_err(|e| io("creating a directory", e))?;
    let png = dir.join(format!("screenshot-{}.png", crate::manager::random_id(12)));
    // Created here, never followed if something else is at this name.
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&png)
        .map_err(|e| io("creating a file", e))?;
    let taken = match live.machine.screenshot(&png).await {
        Ok(()) => std::fs::read(&png).map_err(|e| io("reading the file", e)),
        Err(viv_vmm::machine::ScreenshotError::NoDisplay(_)) => Err(ApiError::Conflict(format!(
            "VM '{}' has no display (its definition's display is none)",
            info.name
        ))),
        Err(e) => Err(ApiError::Internal(format!("screenshot of VM '{}': {e}", info.name))),
    };
    let _ = std::fs::remove_file(&png);
    Ok(([(header::CONTENT_TYPE, "image/png")], taken?).into_response())
}
