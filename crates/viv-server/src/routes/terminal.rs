//! `GET /sandboxes/{id}/terminal`: an interactive terminal in a running sandbox over a
//! WebSocket (subprotocol `viv-terminal.v1`), for `viv shell` and the web console.
//!
//! The contract:
//! - query: `cols` and `rows` (the terminal's size, 1 to 65535; 80×24 when absent), `user`
//!   (the sandbox's default user when absent), `cmd` (a command line the user's login shell
//!   runs with `-c`; an interactive login shell when absent), `pty` (default true; `false` runs
//!   the process with pipes instead of a terminal, for scripts piped in: output is its stdout
//!   and stderr, merged, and no input is echoed);
//! - client → server: binary frames are input bytes; text frames are JSON control messages,
//!   `{"type":"resize","cols":N,"rows":N}` and `{"type":"eof"}` (closes the process's stdin;
//!   with a terminal, send Ctrl-D instead);
//! - server → client: first a text frame `{"type":"started","pid":N}`, then binary frames of
//!   terminal output, and at the end a text frame `{"type":"exit","exitCode":N}` (-1 when a
//!   signal ended the process) followed by a close with code 1000; on a failure (the process
//!   could not start, the sandbox stopped) a text frame `{"type":"error","message":"…"}` and a
//!   close with code 1011; a control message the server does not understand is an error frame
//!   and a close with code 1003.
//!
//! Authentication is the API middleware's (the `X-API-Key` header, the `viv-key.KEY`
//! subprotocol browsers offer beside `viv-terminal.v1`, or the web console's session cookie,
//! which a WebSocket upgrade carries only with the server's own `Origin`).
//!
//! Invariants: the upgrade is answered only for a running sandbox (404 unknown, 409 paused or
//! starting) with valid query parameters (400); the process lives as long as the socket: a
//! client that leaves gets its process killed (the session's drop); output is read from the
//! sandbox only as fast as the client takes it (each frame is flushed before the next is read)
//! and input goes through the session's bounded queue, so nothing buffers without limit.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use futures::stream::SplitSink;
use futures::{SinkExt as _, StreamExt as _};
use viv_proto::process::PtySize;

use super::{ApiPath, ApiQuery};
use crate::agent_client::AgentError;
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::process_session::{ProcessSession, ProcessSpec, SessionError, SessionEvent};
use crate::AppState;

/// The terminal WebSocket's subprotocol.
pub const TERMINAL_SUBPROTOCOL: &str = "viv-terminal.v1";
/// Close code after the process exited.
const CLOSE_NORMAL: u16 = 1000;
/// Close code after a control message the server does not take.
const CLOSE_UNSUPPORTED: u16 = 1003;
/// Close code after a failure.
const CLOSE_ERROR: u16 = 1011;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TerminalQuery {
    cols: Option<u32>,
    rows: Option<u32>,
    user: Option<String>,
    cmd: Option<String>,
    pty: Option<bool>,
}

/// A control message in a text frame.
#[derive(Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
enum Control {
    /// The client's terminal changed size.
    Resize { cols: u16, rows: u16 },
    /// The client's input ended (closes stdin of a process without a terminal).
    Eof,
}

/// A terminal dimension from the query: 1 to 65535, `default` when absent.
fn dimension(value: Option<u32>, name: &str, default: u32) -> Result<u32, ApiError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=u32::from(u16::MAX)).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::BadRequest(format!(
            "{name} must be between 1 and 65535, not {n}"
        ))),
    }
}

pub(super) async fn terminal(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TerminalQuery>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let size = PtySize {
        cols: dimension(q.cols, "cols", 80)?,
        rows: dimension(q.rows, "rows", 24)?,
    };
    let user = q.user.filter(|u| !u.is_empty());
    if user.as_deref().is_some_and(|u| u.contains([':', '\0', '\n', '\r'])) {
        return Err(ApiError::BadRequest("user must be a user name in the sandbox".into()));
    }
    if q.cmd.as_deref().is_some_and(|c| c.contains('\0')) {
        return Err(ApiError::BadRequest("cmd must not contain NUL bytes".into()));
    }
    let live = state.manager.live(&id)?;
    let ws = super::vm_console::upgrade(ws, "/sandboxes/{id}/terminal")?;
    let spec = ProcessSpec::login_shell(q.cmd.as_deref());
    let size = q.pty.unwrap_or(true).then_some(size);
    Ok(ws
        .protocols([TERMINAL_SUBPROTOCOL])
        .on_upgrade(move |socket| session(socket, state, live, user, spec, size)))
}

type Sink = SplitSink<WebSocket, Message>;

fn text(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

/// Sends an error frame and closes with `code`.
async fn fail(tx: &mut Sink, code: u16, message: &str) {
    let _ = tx
        .send(text(serde_json::json!({"type": "error", "message": message})))
        .await;
    let _ = tx.send(close(code, "")).await;
}

fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }))
}

/// What a failed session tells the client: the agent's own words for a refused call, and for
/// a sandbox that stopped or became unreachable, its state once settled (killed, paused…).
async fn failure_message(state: &AppState, live: &Arc<LiveSandbox>, err: SessionError) -> String {
    if let SessionError::Agent(AgentError::Rpc { message, .. }) = &err {
        return message.clone();
    }
    state.manager.settle(live).await;
    match state.manager.live(&live.id) {
        Err(now) => format!("the sandbox is no longer running: {now}"),
        Ok(current) if !Arc::ptr_eq(&current, live) => {
            "the sandbox was paused and resumed; open a new terminal".to_owned()
        }
        Ok(_) => err.to_string(),
    }
}

/// One terminal: the process's output to the socket, the socket's input and controls to the
/// process, until the process ends (exit frame) or the client leaves (the process is killed).
async fn session(
    socket: WebSocket,
    state: AppState,
    live: Arc<LiveSandbox>,
    user: Option<String>,
    spec: ProcessSpec,
    size: Option<PtySize>,
) {
    let (mut tx, mut rx) = socket.split();
    let process = match ProcessSession::open(live.clone(), user.as_deref(), spec, size).await {
        Ok(process) => process,
        Err(err) => {
            let message = failure_message(&state, &live, err).await;
            fail(&mut tx, CLOSE_ERROR, &message).await;
            return;
        }
    };
    let pid = process.pid();
    tracing::debug!(sandbox = %live.id, pid, "terminal opened");
    if tx
        .send(text(serde_json::json!({"type": "started", "pid": pid})))
        .await
        .is_err()
    {
        return;
    }
    let (input, mut events) = process.into_parts();
    // A control message the server does not take: reported by the output side, which owns `tx`.
    let (refused_tx, mut refused) = tokio::sync::mpsc::channel::<String>(1);
    let output = async {
        loop {
            let event = tokio::select! {
                event = events.next() => event,
                Some(message) = refused.recv() => {
                    fail(&mut tx, CLOSE_UNSUPPORTED, &message).await;
                    return;
                }
            };
            let message = match event {
                Some(SessionEvent::Pty(data) | SessionEvent::Stdout(data) | SessionEvent::Stderr(data)) => {
                    Message::Binary(data)
                }
                Some(SessionEvent::Exit(exit)) => {
                    let frame = text(serde_json::json!({"type": "exit", "exitCode": exit.code}));
                    if tx.send(frame).await.is_ok() {
                        let _ = tx.send(close(CLOSE_NORMAL, "")).await;
                    }
                    return;
                }
                Some(SessionEvent::Error(err)) => {
                    let message = failure_message(&state, &live, err).await;
                    fail(&mut tx, CLOSE_ERROR, &message).await;
                    return;
                }
                None => return,
            };
            if tx.send(message).await.is_err() {
                return;
            }
        }
    };
    let input_side = async {
        let mut forwarding = true;
        while let Some(Ok(message)) = rx.next().await {
            match message {
                Message::Binary(data) if forwarding => {
                    // A process whose input closed ends soon: its exit comes through the output.
                    forwarding = input.write(data).await.is_ok();
                }
                Message::Binary(_) => {}
                Message::Text(text) => match serde_json::from_str::<Control>(&text) {
                    Ok(Control::Resize { cols, rows }) => {
                        if let Err(err) = input.resize(cols, rows).await {
                            tracing::debug!(error = %err, "resizing a terminal");
                        }
                    }
                    Ok(Control::Eof) => {
                        if let Err(err) = input.close_stdin().await {
                            tracing::debug!(error = %err, "closing a terminal's stdin");
                        }
                        forwarding = false;
                    }
                    Err(e) => {
                        let _ = refused_tx
                            .send(format!(
                                "unknown control message ({e}): send input as binary frames and \
                                 {{\"type\":\"resize\",\"cols\":N,\"rows\":N}} to resize"
                            ))
                            .await;
                        // The output side closes the socket.
                        std::future::pending::<()>().await;
                    }
                },
                Message::Close(_) => return,
                Message::Ping(_) | Message::Pong(_) => {}
            }
        }
    };
    tokio::select! {
        () = output => {}
        () = input_side => {}
    }
    // `events` drops here: a process still running (the client left) is killed.
    tracing::debug!(sandbox = %live.id, pid, "terminal closed");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_messages() {
        assert_eq!(
            serde_json::from_str::<Control>(r#"{"type":"resize","cols":120,"rows":40}"#).unwrap(),
            Control::Resize { cols: 120, rows: 40 }
        );
        assert_eq!(
            serde_json::from_str::<Control>(r#"{"type":"eof"}"#).unwrap(),
            Control::Eof
        );
        for bad in [
            r#"{"type":"resize","cols":0}"#,
            r#"{"type":"resize","cols":70000,"rows":1}"#,
            r#"{"type":"kill"}"#,
            r#"[1,2]"#,
            "not json",
        ] {
            assert!(serde_json::from_str::<Control>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dimensions() {
        assert_eq!(dimension(None, "cols", 80).unwrap(), 80);
        assert_eq!(dimension(Some(65535), "cols", 80).unwrap(), 65535);
        assert!(dimension(Some(0), "rows", 24).is_err());
        assert!(dimension(Some(65536), "rows", 24).is_err());
    }
}
