//! The host side of the agent channel: one multiplexed HTTP/2 connection per sandbox over the
//! Unix socket QEMU exposes for the virtio-serial port.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use axum::body::Body;
use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper::client::conn::http2::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;
use viv_proto::envelope;
use viv_proto::process::{DataEvent, ProcessEvent, StartRequest, StreamResponse};

/// Why a call to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The channel could not be opened or broke.
    #[error("agent channel: {0}")]
    Channel(String),
    /// The agent did not answer in time.
    #[error("the sandbox agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent answered with an error.
    #[error("{message}")]
    Rpc {
        /// HTTP status.
        status: u16,
        /// Connect error code.
        code: String,
        /// Message.
        message: String,
    },
    /// The agent's answer did not parse.
    #[error("unexpected agent response: {0}")]
    Decode(String),
}

/// How long one readiness probe waits before trying on a new connection. The cold-boot path
/// connects only after the guest opened its port, so a healthy guest answers well within this;
/// it bounds the wait when bytes were lost to a channel reset.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A client for one sandbox's agent.
#[derive(Debug)]
pub struct AgentClient {
    socket: PathBuf,
    sender: tokio::sync::Mutex<Option<SendRequest<Body>>>,
    token: std::sync::RwLock<Option<String>>,
    channel_key: std::sync::RwLock<String>,
}

impl AgentClient {
    /// A client for the agent behind `socket`; connects lazily.
    pub fn new(socket: PathBuf) -> Self {
        Self {
            socket,
            sender: tokio::sync::Mutex::new(None),
            token: std::sync::RwLock::new(None),
            channel_key: std::sync::RwLock::new(String::new()),
        }
    }

    /// Sets the access token sent with every request.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().expect("token lock") = token;
    }

    async fn sender(&self) -> Result<SendRequest<Body>, AgentError> {
        let mut guard = self.sender.lock().await;
        if let Some(sender) = guard.as_ref() {
            if !sender.is_closed() {
                return Ok(sender.clone());
            }
        }
        let mut stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|e| AgentError::Channel(format!("connecting {}: {e}", self.socket.display())))?;
        self.reset_channel(&mut stream).await?;
        let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .initial_stream_window_size(8 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(1 << 20);
        let (sender, connection) = builder
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AgentError::Channel(format!("HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "agent connection ended");
            }
        });
        *guard = Some(sender.clone());
        Ok(sender)
    }

    /// Opens a connection on the channel: sends the reset marker and skips whatever the agent
    /// sends before its answer (bytes of an older connection; see [`viv_proto::channel`]).
    async fn reset_channel(&self, stream: &mut UnixStream) -> Result<(), AgentError> {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let nonce = crate::manager::random_id(viv_proto::channel::NONCE_LEN);
        let key = self.channel_key.read().expect("key lock").clone();
        let marker = viv_proto::channel::reset_marker(&key, &nonce);
        let ready = viv_proto::channel::ready_marker(nonce.as_bytes());
        let exchange = async {
            stream.write_all(&marker).await?;
            let mut seen: Vec<u8> = Vec::new();
            let mut buf = [0u8; 4096];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "channel closed"));
                }
                seen.extend_from_slice(&buf[..n]);
                if let Some(at) = seen.windows(ready.len()).position(|w| w == ready.as_slice()) {
                    // The agent says nothing more until the HTTP/2 preface.
                    if at + ready.len() != seen.len() {
                        return Err(std::io::Error::other("unexpected bytes after the channel answer"));
                    }
                    return Ok(());
                }
                // Keep only what could be the start of the answer.
                let keep = seen.len().min(ready.len() - 1);
                seen.drain(..seen.len() - keep);
            }
        };
        match tokio::time::timeout(ATTEMPT_TIMEOUT, exchange).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(AgentError::Channel(format!("channel reset: {err}"))),
            Err(_) => Err(AgentError::Channel(format!(
                "the agent did not answer the channel reset within {ATTEMPT_TIMEOUT:?}"
            ))),
        }
    }

    /// Sets the key of the reset markers (what the agent was last told at `/init`).
    pub fn set_channel_key(&self, key: String) {
        *self.channel_key.write().expect("key lock") = key;
    }

    /// Closes the connection, if one is open; the next request opens a new one.
    pub async fn close(&self) {
        self.sender.lock().await.take();
    }

    /// Sends a request (path and query relative to the agent's root), adding the access token.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        if let Some(token) = self.token.read().expect("token lock").clone() {
            request.headers_mut().insert(
                "x-access-token",
                token.parse().map_err(|_| AgentError::Channel("bad token".into()))?,
            );
        }
        self.send_as_is(request).await
    }

    /// Sends a request without adding the access token: a client's request passed through,
    /// which the agent accepts only with the client's own token.
    pub async fn send_as_is(&self, request: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        let mut sender = self.sender().await?;
        sender.ready().await.map_err(|e| AgentError::Channel(e.to_string()))?;
        match sender.send_request(request).await {
            Ok(response) => Ok(response),
            Err(err) => {
                // Drop a broken connection so the next call reconnects.
                self.sender.lock().await.take();
                Err(AgentError::Channel(err.to_string()))
            }
        }
    }

    /// Waits until the agent answers `/health`, for at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), AgentError> {
        let start = Instant::now();
        loop {
            let remaining = limit.saturating_sub(start.elapsed());
            if remaining.is_zero() {
                return Err(AgentError::Timeout(limit));
            }
            let request = Request::get("http://agent/health")
                .body(Body::empty())
                .expect("static request");
            // A connection that gets no answer is replaced: its bytes may have gone to a
            // channel the guest was still resetting.
            let attempt = remaining.min(ATTEMPT_TIMEOUT);
            match tokio::time::timeout(attempt, self.send(request)).await {
                Ok(Ok(response)) if response.status().is_success() => return Ok(()),
                _ => {
                    self.sender.lock().await.take();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// A unary JSON call (Connect unary or a plain JSON route).
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> Result<Resp, AgentError> {
        let request = Request::post(format!("http://agent{path}"))
            .header("content-type", "application/json")
            .header("connect-protocol-version", "1")
            .body(Body::from(serde_json::to_vec(body).expect("request serializes")))
            .expect("valid request");
        let bytes = collect(self.send_ok(request).await?).await?;
        serde_json::from_slice(&bytes).map_err(|e| AgentError::Decode(e.to_string()))
    }

    /// Like [`AgentClient::send`], but a non-2xx answer becomes [`AgentError::Rpc`] with the
    /// agent's message.
    pub async fn send_ok(&self, request: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        let response = self.send(request).await?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = collect(response).await?;
        Err(rpc_error(status.as_u16(), &body))
    }
}

/// Which stream a chunk of process output came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    /// Standard output (or the terminal).
    Stdout,
    /// Standard error.
    Stderr,
}

impl AgentClient {
    /// Starts a process through `process.Process/Start` as `user` (the agent's default when
    /// `None`) and returns its event stream, already past the start event, with its pid.
    async fn start_process(
        &self,
        start: &StartRequest,
        user: Option<&str>,
    ) -> Result<(u32, Incoming, envelope::Decoder), AgentError> {
        let mut request = Request::post("http://agent/process.Process/Start")
            .header("content-type", "application/connect+json")
            .header("connect-protocol-version", "1");
        if let Some(user) = user.filter(|u| !u.is_empty()) {
            use base64::Engine as _;
            let basic = base64::engine::general_purpose::STANDARD.encode(format!("{user}:"));
            request = request.header("authorization", format!("Basic {basic}"));
        }
        let request = request
            .body(Body::from(envelope::encode_json(start)))
            .map_err(|e| AgentError::Decode(e.to_string()))?;
        let mut body = self.send_ok(request).await?.into_body();
        let mut decoder = envelope::Decoder::default();
        loop {
            match next_event(&mut body, &mut decoder).await? {
                Some(ProcessEvent::Start(started)) => return Ok((started.pid, body, decoder)),
                Some(_) => continue,
                None => {
                    return Err(AgentError::Decode(
                        "the process stream ended before the process started".into(),
                    ))
                }
            }
        }
    }

    /// Starts a process and leaves it running in the background; returns its pid.
    pub async fn spawn(&self, start: &StartRequest, user: Option<&str>) -> Result<u32, AgentError> {
        let (pid, _events, _) = self.start_process(start, user).await?;
        Ok(pid)
    }

    /// Runs a process to its end, handing every chunk of output to `on_output`; returns its
    /// exit code.
    pub async fn run(
        &self,
        start: &StartRequest,
        user: Option<&str>,
        mut on_output: impl FnMut(OutputStream, &[u8]),
    ) -> Result<i32, AgentError> {
        let (_, mut body, mut decoder) = self.start_process(start, user).await?;
        loop {
            match next_event(&mut body, &mut decoder).await? {
                Some(ProcessEvent::Data(DataEvent::Stdout(d) | DataEvent::Pty(d))) => {
                    on_output(OutputStream::Stdout, &d)
                }
                Some(ProcessEvent::Data(DataEvent::Stderr(d))) => on_output(OutputStream::Stderr, &d),
                Some(ProcessEvent::End(end)) => return Ok(end.exit_code),
                Some(_) => {}
                None => {
                    return Err(AgentError::Decode(
                        "the process stream ended without an exit status".into(),
                    ))
                }
            }
        }
    }
}

/// The next event of a process stream; `None` at its end (an error end becomes an error).
async fn next_event(body: &mut Incoming, decoder: &mut envelope::Decoder) -> Result<Option<ProcessEvent>, AgentError> {
    loop {
        if let Some(frame) = decoder.next_frame().map_err(|e| AgentError::Decode(e.to_string()))? {
            if frame.is_end() {
                let end: envelope::EndOfStream = serde_json::from_slice(&frame.data).unwrap_or_default();
                return match end.error {
                    Some(err) => Err(AgentError::Rpc {
                        status: err.http_status(),
                        code: err.code,
                        message: err.message,
                    }),
                    None => Ok(None),
                };
            }
            let message: StreamResponse =
                serde_json::from_slice(&frame.data).map_err(|e| AgentError::Decode(e.to_string()))?;
            return Ok(Some(message.event));
        }
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    decoder.push(&data);
                }
            }
            Some(Err(err)) => return Err(AgentError::Channel(err.to_string())),
            None => return Ok(None),
        }
    }
}

/// Reads a whole response body.
pub async fn collect(response: Response<Incoming>) -> Result<Bytes, AgentError> {
    response
        .into_body()
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| AgentError::Channel(e.to_string()))
}

/// Turns an agent error body (Connect or envd JSON error) into an [`AgentError`].
pub fn rpc_error(status: u16, body: &[u8]) -> AgentError {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let message = value["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let code = value["code"].as_str().unwrap_or_default().to_owned();
    AgentError::Rpc { status, code, message }
}
