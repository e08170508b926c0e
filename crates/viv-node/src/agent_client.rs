//! The host side of the agent channel: one multiplexed HTTP/2 connection per sandbox over the
//! Unix socket QEMU exposes for the virtio-serial port, or, for a sandbox on another node of the
//! cluster, over TCP to that node's API (`/internal/sandboxes/{id}/agent/…`, HTTP/2 without TLS),
//! which passes each request on to its own channel ([`AgentClient::via_node`]).
//!
//! Invariants:
//! - every connection over the channel starts with the reset handshake of
//!   [`viv_proto::channel`]; a connection to a node carries the cluster's secret on every
//!   request and never the sandbox's token (the node adds its own);
//! - one connection is shared by all requests to a sandbox; it is replaced only when it is
//!   closed (or does not answer while the guest boots), never because one request failed, since
//!   a request's stream can fail alone while others still run on the connection (and QEMU
//!   serves one connection at a time, so a second one would wait behind the first);
//! - an upload (`POST /files`) to a sandbox with its own network goes over the data path (a
//!   TCP connection opened from the sandbox's namespace for that request, see
//!   `viv_agent::data_path`) when it connects; otherwise, or once that failed for this client,
//!   over the channel. A request is sent on one path only: the choice is made before any byte
//!   of it is sent;
//! - a forwarded upload ([`UploadBody`]) ends with the length trailer the agent checks, and
//!   remembers whether the client's body broke, so the caller can tell a cut upload (400) from
//!   a broken channel (502).

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

/// The HTTP/2 client settings of every agent connection: windows and frames large enough that
/// a file transfer is not paced by window updates.
fn http2_client() -> hyper::client::conn::http2::Builder<TokioExecutor> {
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .initial_stream_window_size(8 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(1 << 20);
    builder
}

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

/// How long one readiness probe waits at most before trying on a new connection. The cold-boot
/// path connects only after the guest opened its port, so a healthy guest answers well within
/// this; it bounds the wait when bytes were lost to a channel reset.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the first readiness probe waits; each later one waits twice as long, up to
/// [`ATTEMPT_TIMEOUT`]. A restored guest answers in ~60–80 ms (TCG), but about one restore in
/// 300 got no answer on its first connection at all (the cause is not found: it did not happen
/// in 1600 restores while something queried QEMU's monitor every 0.1–0.7 s, which suggests
/// QEMU's main loop), and a new connection always got one: short first attempts turn that 2 s
/// stall into a fraction of a second, and a slow guest still gets the full wait.
const FIRST_ATTEMPT: Duration = Duration::from_millis(250);

/// How long connecting to another node may take.
const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

// The namespace's rules let in answers from the port the agent serves its data path on.
const _: () = assert!(viv_net::rules::AGENT_DATA_PORT == viv_proto::ENVD_PORT);

/// How long opening the data path may take (a closed port answers at once; this bounds a guest
/// that does not answer at all, and is long enough for one whose vCPU waits behind others).
const DATA_PATH_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// A connected stream of either route (a Unix socket to QEMU, TCP to a node).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static> Stream for T {}

/// The open connection to an agent: its number and the handle that sends requests on it.
#[derive(Debug)]
struct Connection {
    id: u64,
    sender: SendRequest<Body>,
    /// The task driving the connection: aborting it closes the socket at once, even while
    /// streams are open on it (a background command's output).
    driver: tokio::task::AbortHandle,
}

/// Where an [`AgentClient`]'s connection goes.
enum Route {
    /// The Unix socket of this node's QEMU for the guest's agent port.
    Channel(PathBuf),
    /// Another node's API, which passes requests on to the sandbox's agent there.
    Node {
        /// `host:port` of the node.
        address: String,
        /// The path the agent's paths are appended to (`/internal/sandboxes/{id}/agent`).
        prefix: String,
        /// The cluster's secret.
        secret: hyper::header::HeaderValue,
    },
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Not the secret.
        match self {
            Self::Channel(socket) => write!(f, "{}", socket.display()),
            Self::Node { address, prefix, .. } => write!(f, "http://{address}{prefix}"),
        }
    }
}

/// A client for one sandbox's agent.
#[derive(Debug)]
pub struct AgentClient {
    route: Route,
    sender: tokio::sync::Mutex<Option<Connection>>,
    connections: std::sync::atomic::AtomicU64,
    token: std::sync::RwLock<Option<String>>,
    channel_key: std::sync::RwLock<String>,
    /// The sandbox's network namespace, while its data path is to be tried.
    data_path: std::sync::RwLock<Option<PathBuf>>,
}

impl AgentClient {
    /// A client for the agent behind `socket`; connects lazily.
    pub fn new(socket: PathBuf) -> Self {
        Self::with_route(Route::Channel(socket))
    }

    /// A client for the agent of sandbox `sandbox` on the node whose API is at `node_url`
    /// (`http://host:port`), through its node API with the cluster's `secret`; connects lazily.
    pub fn via_node(node_url: &str, sandbox: &str, secret: &str) -> Result<Self, AgentError> {
        let address = node_url
            .strip_prefix("http://")
            .map(|rest| rest.trim_end_matches('/'))
            .filter(|address| !address.is_empty() && !address.contains('/'))
            .ok_or_else(|| {
                AgentError::Channel(format!(
                    "the node's address {node_url} is not http://HOST:PORT, which sessions through a node need"
                ))
            })?;
        let secret = secret
            .parse()
            .map_err(|_| AgentError::Channel("the cluster's secret is not a header value".into()))?;
        Ok(Self::with_route(Route::Node {
            address: address.to_owned(),
            prefix: format!("/internal/sandboxes/{sandbox}/agent"),
            secret,
        }))
    }

    fn with_route(route: Route) -> Self {
        Self {
            route,
            sender: tokio::sync::Mutex::new(None),
            connections: std::sync::atomic::AtomicU64::new(0),
            token: std::sync::RwLock::new(None),
            channel_key: std::sync::RwLock::new(String::new()),
            data_path: std::sync::RwLock::new(None),
        }
    }

    /// Sends uploads over the sandbox's network, from the namespace at `netns`, instead of the
    /// channel (None: the channel only).
    pub fn set_data_path(&self, netns: Option<PathBuf>) {
        *self.data_path.write().expect("data path lock") = netns;
    }

    /// Opens the data path: a TCP connection from the sandbox's namespace to the agent, with
    /// an HTTP/2 handshake, ready for a request.
    async fn open_data_path(&self, netns: PathBuf) -> Result<SendRequest<Body>, AgentError> {
        let address = std::net::SocketAddr::from((viv_net::rules::GUEST_ADDRESS, viv_net::rules::AGENT_DATA_PORT));
        let stream = tokio::task::spawn_blocking(move || {
            let stream = viv_net::connect_in(&netns, address, DATA_PATH_CONNECT_TIMEOUT)?;
            stream.set_nodelay(true)?;
            stream.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(stream)
        })
        .await
        .map_err(|e| AgentError::Channel(format!("data path: {e}")))?
        .and_then(tokio::net::TcpStream::from_std)
        .map_err(|e| AgentError::Channel(format!("data path: connecting {address}: {e}")))?;
        let handshake = http2_client().handshake(TokioIo::new(stream));
        let (mut sender, connection) = tokio::time::timeout(DATA_PATH_CONNECT_TIMEOUT, handshake)
            .await
            .map_err(|_| AgentError::Channel("data path: no HTTP/2 handshake in time".into()))?
            .map_err(|e| AgentError::Channel(format!("data path: HTTP/2 handshake: {e}")))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %describe(&err), "data path connection ended");
            }
        });
        sender
            .ready()
            .await
            .map_err(|err| AgentError::Channel(format!("data path: {}", describe(&err))))?;
        Ok(sender)
    }

    /// The data path, if the sandbox has one and it opens; a failure turns it off for this
    /// client (the channel carries on).
    async fn data_path(&self) -> Option<SendRequest<Body>> {
        let netns = self.data_path.read().expect("data path lock").clone()?;
        match self.open_data_path(netns).await {
            Ok(sender) => Some(sender),
            Err(err) => {
                tracing::info!(error = %err, "file transfers of this sandbox go over the channel");
                self.set_data_path(None);
                None
            }
        }
    }

    /// Sets the access token sent with every request.
    pub fn set_token(&self, token: Option<String>) {
        *self.token.write().expect("token lock") = token;
    }

    /// The open connection (its number and a sender), opened if there is none or it closed.
    async fn sender(&self) -> Result<(u64, SendRequest<Body>), AgentError> {
        let mut guard = self.sender.lock().await;
        if let Some(open) = guard.as_ref() {
            if !open.sender.is_closed() {
                return Ok((open.id, open.sender.clone()));
            }
        }
        let stream: Box<dyn Stream> = match &self.route {
            Route::Channel(socket) => {
                let mut stream = UnixStream::connect(socket)
                    .await
                    .map_err(|e| AgentError::Channel(format!("connecting {}: {e}", socket.display())))?;
                self.reset_channel(&mut stream).await?;
                Box::new(stream)
            }
            Route::Node { address, .. } => {
                let connect = tokio::net::TcpStream::connect(address.as_str());
                let stream = tokio::time::timeout(NODE_CONNECT_TIMEOUT, connect)
                    .await
                    .map_err(|_| AgentError::Channel(format!("node {address} did not accept a connection in time")))?
                    .map_err(|e| AgentError::Channel(format!("connecting node {address}: {e}")))?;
                let _ = stream.set_nodelay(true);
                Box::new(stream)
            }
        };
        let (sender, connection) = http2_client()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| AgentError::Channel(format!("HTTP/2 handshake: {e}")))?;
        let route = format!("{:?}", self.route);
        let driver = tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(%route, error = %describe(&err), "agent connection ended");
            }
        })
        .abort_handle();
        let id = self.connections.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        *guard = Some(Connection {
            id,
            sender: sender.clone(),
            driver,
        });
        Ok((id, sender))
    }

    /// Forgets connection `id` if it is still the open one, so the next request opens another.
    async fn forget(&self, id: u64) {
        let mut guard = self.sender.lock().await;
        if guard.as_ref().is_some_and(|open| open.id == id) {
            guard.take();
        }
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

    /// Hangs up the connection, if one is open, with every stream still open on it (they fail
    /// at once); the next request opens a new one. Only dropping its sender would leave the
    /// connection open while a stream is, and QEMU's channel takes one connection at a time:
    /// the next would wait for that stream to end.
    pub async fn close(&self) {
        if let Some(open) = self.sender.lock().await.take() {
            open.driver.abort();
        }
    }

    /// Sends a request (path and query relative to the agent's root), adding the access token.
    pub async fn send(&self, mut request: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        if matches!(self.route, Route::Node { .. }) {
            return self.send_as_is(request).await;
        }
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
    pub async fn send_as_is(&self, mut request: Request<Body>) -> Result<Response<Incoming>, AgentError> {
        if let Route::Node {
            address,
            prefix,
            secret,
        } = &self.route
        {
            let path = request.uri().path_and_query().map_or("/", |pq| pq.as_str());
            *request.uri_mut() = format!("http://{address}{prefix}{path}")
                .parse()
                .map_err(|_| AgentError::Channel(format!("bad agent path {path}")))?;
            request
                .headers_mut()
                .insert(crate::manager::CLUSTER_SECRET_HEADER, secret.clone());
        }
        // Uploads only: downloads measured no faster over the guest's TCP stack than over the
        // channel's 32 KiB writes (see bench/RESULTS.md, "The data path").
        let upload = request.method() == hyper::Method::POST && request.uri().path() == "/files";
        if upload && matches!(self.route, Route::Channel(_)) {
            if let Some(mut sender) = self.data_path().await {
                crate::metrics::FILE_UPLOADS_NETWORK.inc();
                return sender
                    .send_request(request)
                    .await
                    .map_err(|err| AgentError::Channel(format!("data path: {}", describe(&err))));
            }
            crate::metrics::FILE_UPLOADS_CHANNEL.inc();
        }
        let (id, mut sender) = self.sender().await?;
        if let Err(err) = sender.ready().await {
            self.forget(id).await;
            return Err(AgentError::Channel(describe(&err)));
        }
        match sender.send_request(request).await {
            Ok(response) => Ok(response),
            Err(err) => {
                // One request can fail while the connection serves others (a reset stream, a
                // client body that broke): only a closed connection is replaced.
                if sender.is_closed() {
                    self.forget(id).await;
                }
                Err(AgentError::Channel(describe(&err)))
            }
        }
    }

    /// Waits until the agent answers `/health`, for at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), AgentError> {
        let start = Instant::now();
        let mut patience = FIRST_ATTEMPT;
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
            let attempt = remaining.min(patience);
            patience = (patience * 2).min(ATTEMPT_TIMEOUT);
            match tokio::time::timeout(attempt, self.send(request)).await {
                Ok(Ok(response)) if response.status().is_success() => return Ok(()),
                outcome => {
                    let why = match outcome {
                        Ok(Ok(response)) => format!("answered {}", response.status()),
                        Ok(Err(err)) => err.to_string(),
                        Err(_) => format!("no answer within {attempt:?}"),
                    };
                    tracing::debug!(route = ?self.route, waited_ms = start.elapsed().as_millis() as u64, %why, "agent not ready; trying a new connection");
                    // Booting: whatever connection is open has not answered in time.
                    self.close().await;
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
    pub(crate) async fn start_process(
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
pub(crate) async fn next_event(
    body: &mut Incoming,
    decoder: &mut envelope::Decoder,
) -> Result<Option<ProcessEvent>, AgentError> {
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
            Some(Err(err)) => return Err(AgentError::Channel(describe(&err))),
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
        .map_err(|e| AgentError::Channel(describe(&e)))
}

/// An error with its causes (hyper's own message is only "http2 error" and the like).
pub fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// What became of a client's upload body forwarded by an [`UploadBody`].
#[derive(Debug, Default)]
pub struct UploadOutcome {
    /// Bytes forwarded so far.
    sent: std::sync::atomic::AtomicU64,
    /// Why the client's body broke, if it did.
    broken: std::sync::Mutex<Option<String>>,
}

impl UploadOutcome {
    /// Bytes forwarded so far.
    pub fn sent(&self) -> u64 {
        self.sent.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the client's body broke (it sent less than it declared, or its connection failed),
    /// as a message for the client.
    pub fn broken(&self) -> Option<String> {
        let why = self.broken.lock().expect("outcome lock").clone()?;
        Some(format!("the upload was cut short after {} bytes: {why}", self.sent()))
    }
}

/// Prepares the body of a request for the agent: an upload (`POST /files`) becomes an
/// [`UploadBody`] announced in `headers`; anything else passes as it is.
pub fn forward_body(
    method: &hyper::Method,
    path: &str,
    headers: &mut hyper::HeaderMap,
    body: Body,
) -> (Body, Option<std::sync::Arc<UploadOutcome>>) {
    // A client must not announce a trailer the host does not send.
    headers.remove(viv_proto::UPLOAD_LENGTH_ANNOUNCE);
    if method != hyper::Method::POST || path.trim_end_matches('/') != "/files" {
        return (body, None);
    }
    let (body, outcome) = UploadBody::new(body);
    UploadBody::announce(headers);
    (Body::new(body), Some(outcome))
}

/// A client's upload body on its way to the agent: passed through as it comes (its exact
/// length, when known, stays the request's Content-Length), ended by the
/// [`viv_proto::UPLOAD_LENGTH_TRAILER`] trailer with the number of bytes sent, which the agent
/// checks before it keeps the file. A body that breaks ends with its error, which hyper turns
/// into a reset of the request's stream, and is recorded in the [`UploadOutcome`].
pub struct UploadBody {
    inner: Body,
    outcome: std::sync::Arc<UploadOutcome>,
    trailer_sent: bool,
}

impl UploadBody {
    /// Wraps `body`; mark the request with [`UploadBody::announce`].
    pub fn new(body: Body) -> (Self, std::sync::Arc<UploadOutcome>) {
        let outcome = std::sync::Arc::new(UploadOutcome::default());
        let body = Self {
            inner: body,
            outcome: outcome.clone(),
            trailer_sent: false,
        };
        (body, outcome)
    }

    /// Tells the agent that the body ends with the length trailer.
    pub fn announce(headers: &mut hyper::HeaderMap) {
        headers.insert(
            viv_proto::UPLOAD_LENGTH_ANNOUNCE,
            hyper::header::HeaderValue::from_static("1"),
        );
    }

    fn length_trailer(&self) -> hyper::header::HeaderValue {
        hyper::header::HeaderValue::from(self.outcome.sent())
    }
}

impl http_body::Body for UploadBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        use std::task::Poll;
        if self.trailer_sent {
            return Poll::Ready(None);
        }
        match std::pin::Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    self.outcome
                        .sent
                        .fetch_add(data.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    Poll::Ready(Some(Ok(http_body::Frame::data(data))))
                }
                Err(frame) => {
                    // The client's own trailers end the body: ours joins them (and wins).
                    let mut trailers = frame.into_trailers().unwrap_or_default();
                    trailers.insert(viv_proto::UPLOAD_LENGTH_TRAILER, self.length_trailer());
                    self.trailer_sent = true;
                    Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
                }
            },
            Poll::Ready(Some(Err(err))) => {
                *self.outcome.broken.lock().expect("outcome lock") = Some(describe(&err));
                Poll::Ready(Some(Err(err)))
            }
            Poll::Ready(None) => {
                let mut trailers = hyper::HeaderMap::new();
                trailers.insert(viv_proto::UPLOAD_LENGTH_TRAILER, self.length_trailer());
                self.trailer_sent = true;
                Poll::Ready(Some(Ok(http_body::Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Even an empty body has its trailer still to send.
        self.trailer_sent
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
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
