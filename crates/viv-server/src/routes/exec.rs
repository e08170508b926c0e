//! `exec`: a command run through an agent's `process.Process/Start`, its Connect event stream
//! relayed to the client as NDJSON lines ([`ExecEvent`]). The same relay serves sandboxes
//! (`POST /sandboxes/{id}/exec`) and VMs that run the sandbox agent (`POST /vms/{id}/exec`).
//!
//! Invariants: the stream ends with exactly one `end` or `error` line; a target whose VM stops
//! mid-run ends it with an `error` naming the reason, never with a hang.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt as _;
use http_body_util::BodyExt as _;
use viv_api::{ExecEvent, ExecRequest};
use viv_proto::envelope;
use viv_proto::process::{
    DataEvent, ProcessConfig, ProcessEvent, ProcessInput, ProcessSelector, StartRequest, StreamResponse,
};

use super::{agent_ok, basic_user, ApiPath, JsonBody};
use crate::agent_client::AgentClient;
use crate::error::ApiError;
use crate::manager::LiveSandbox;
use crate::AppState;

/// What runs an agent: a sandbox, or a VM booted with the sandbox kernel.
pub(super) trait ExecTarget: Send + Sync + 'static {
    /// How errors name it.
    const WHAT: &'static str;
    /// Its agent's client.
    fn agent(&self) -> &AgentClient;
    /// Reports its VM's exit.
    fn exit(&self) -> tokio::sync::watch::Receiver<Option<viv_vmm::VmExit>>;
}

impl ExecTarget for LiveSandbox {
    const WHAT: &'static str = "sandbox";
    fn agent(&self) -> &AgentClient {
        &self.agent
    }
    fn exit(&self) -> tokio::sync::watch::Receiver<Option<viv_vmm::VmExit>> {
        self.vm.exit()
    }
}

/// A VM running the sandbox agent.
pub(super) struct VmTarget {
    live: Arc<crate::manager::LiveVm>,
    agent: Arc<crate::manager::VmAgent>,
}

impl ExecTarget for VmTarget {
    const WHAT: &'static str = "VM";
    fn agent(&self) -> &AgentClient {
        &self.agent.client
    }
    fn exit(&self) -> tokio::sync::watch::Receiver<Option<viv_vmm::VmExit>> {
        self.live.machine.exit()
    }
}

/// Runs a command through the agent of a VM made from a sandbox and streams NDJSON events.
pub(super) async fn vm_exec(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let AgentExec { start, stdin, auth } = start_request(req)?;
    let (live, agent) = state.manager.vm_agent(&id).await?;
    let response = agent
        .client
        .send_ok(agent_request(&start, auth)?)
        .await
        .map_err(|e| ApiError::Unavailable(format!("the agent of VM '{id}': {e}")))?;
    Ok(relay(Arc::new(VmTarget { live, agent }), response, stdin))
}

/// An exec request as the agent sees it.
pub(super) struct AgentExec {
    /// `process.Process/Start`'s request.
    start: StartRequest,
    /// Bytes for the process's stdin.
    stdin: Option<Vec<u8>>,
    /// The `Authorization` header naming the user.
    auth: Option<String>,
}

/// An exec request as the agent's start request, its stdin and its `Authorization` header.
pub(super) fn start_request(req: ExecRequest) -> Result<AgentExec, ApiError> {
    let (cmd, args) = match (req.argv.split_first(), &req.command) {
        (Some((cmd, args)), _) => (cmd.clone(), args.to_vec()),
        (None, Some(command)) => ("/bin/bash".to_owned(), vec!["-l".into(), "-c".into(), command.clone()]),
        (None, None) => {
            return Err(ApiError::BadRequest(
                "give either argv (a non-empty list) or command".into(),
            ))
        }
    };
    let stdin = req
        .stdin
        .as_deref()
        .map(|b| base64::engine::general_purpose::STANDARD.decode(b))
        .transpose()
        .map_err(|e| ApiError::BadRequest(format!("stdin is not valid base64: {e}")))?;
    let start = StartRequest {
        process: ProcessConfig {
            cmd,
            args,
            envs: req.env,
            cwd: req.cwd,
        },
        pty: None,
        tag: None,
        stdin: Some(stdin.is_some()),
    };
    Ok(AgentExec {
        start,
        stdin,
        auth: basic_user(req.user.as_deref()),
    })
}

/// The agent's `process.Process/Start` request for `start`.
pub(super) fn agent_request(start: &StartRequest, auth: Option<String>) -> Result<hyper::Request<Body>, ApiError> {
    let mut request = hyper::Request::post("http://agent/process.Process/Start")
        .header(header::CONTENT_TYPE, "application/connect+json")
        .header("connect-protocol-version", "1");
    if let Some(auth) = auth {
        request = request.header(header::AUTHORIZATION, auth);
    }
    request
        .body(Body::from(envelope::encode_json(start)))
        .map_err(|e| ApiError::Internal(e.to_string()))
}

/// The NDJSON answer relaying `response`'s process stream from `live`'s agent.
pub(super) fn relay<T: ExecTarget>(
    live: Arc<T>,
    response: hyper::Response<hyper::body::Incoming>,
    stdin: Option<Vec<u8>>,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(32);
    tokio::spawn(relay_exec(live, response.into_body(), stdin, tx));
    let body =
        Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, std::convert::Infallible>));
    ([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response()
}

/// Runs a command through the sandbox's agent and streams NDJSON events.
pub(super) async fn exec(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    JsonBody(req): JsonBody<ExecRequest>,
) -> Result<Response, ApiError> {
    let AgentExec { start, stdin, auth } = start_request(req)?;
    let live = state.manager.live(&id)?;
    let response = agent_ok(&state, &live, agent_request(&start, auth)?).await?;
    Ok(relay(live, response, stdin))
}

/// Turns the agent's Connect event stream into NDJSON lines, feeding stdin once the process runs.
async fn relay_exec<T: ExecTarget>(
    live: Arc<T>,
    mut body: hyper::body::Incoming,
    mut stdin: Option<Vec<u8>>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let send = |event: ExecEvent| {
        let mut line = serde_json::to_vec(&event).expect("events serialize");
        line.push(b'\n');
        let tx = tx.clone();
        async move { tx.send(Bytes::from(line)).await.is_ok() }
    };
    let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
    let mut decoder = envelope::Decoder::default();
    let mut ended = false;
    let mut vm_exit = live.exit();
    loop {
        let stopped = tokio::select! {
            frame = body.frame() => Err(frame),
            result = vm_exit.wait_for(Option::is_some) => Ok(result.is_ok()),
        };
        let frame = match stopped {
            Err(Some(frame)) => frame,
            Err(None) => break,
            Ok(_) => {
                let reason = vm_exit.borrow().as_ref().map(|e| e.reason.clone()).unwrap_or_default();
                send(ExecEvent::Error {
                    message: format!("the {} stopped: {reason}", T::WHAT),
                })
                .await;
                return;
            }
        };
        let data = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
            Err(err) => {
                send(ExecEvent::Error {
                    message: format!("stream from the {} broke: {err}", T::WHAT),
                })
                .await;
                return;
            }
        };
        decoder.push(&data);
        loop {
            let frame = match decoder.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(err) => {
                    send(ExecEvent::Error {
                        message: err.to_string(),
                    })
                    .await;
                    return;
                }
            };
            if frame.is_end() {
                let end: envelope::EndOfStream = serde_json::from_slice(&frame.data).unwrap_or_default();
                if let Some(err) = end.error {
                    send(ExecEvent::Error { message: err.message }).await;
                } else if !ended {
                    send(ExecEvent::Error {
                        message: "the process stream ended without an exit status".into(),
                    })
                    .await;
                }
                return;
            }
            let Ok(message) = serde_json::from_slice::<StreamResponse>(&frame.data) else {
                continue;
            };
            let event = match message.event {
                ProcessEvent::Start(s) => {
                    if let Some(bytes) = stdin.take() {
                        feed_stdin(live.agent(), s.pid, bytes).await;
                    }
                    ExecEvent::Start { pid: s.pid }
                }
                ProcessEvent::Data(DataEvent::Stdout(d) | DataEvent::Pty(d)) => ExecEvent::Stdout { data: b64(&d) },
                ProcessEvent::Data(DataEvent::Stderr(d)) => ExecEvent::Stderr { data: b64(&d) },
                ProcessEvent::End(end) => {
                    ended = true;
                    ExecEvent::End {
                        exit_code: end.exit_code,
                        status: end.status,
                    }
                }
                ProcessEvent::Keepalive(_) => continue,
            };
            if !send(event).await {
                return;
            }
        }
    }
}

async fn feed_stdin(agent: &AgentClient, pid: u32, bytes: Vec<u8>) {
    let input = viv_proto::process::SendInputRequest {
        process: ProcessSelector::Pid(pid),
        input: ProcessInput::Stdin(bytes),
    };
    if let Err(err) = agent
        .call::<_, serde_json::Value>("/process.Process/SendInput", &input)
        .await
    {
        tracing::debug!(error = %err, "writing stdin");
    }
    let close = viv_proto::process::SelectorRequest {
        process: ProcessSelector::Pid(pid),
    };
    let _ = agent
        .call::<_, serde_json::Value>("/process.Process/CloseStdin", &close)
        .await;
}
