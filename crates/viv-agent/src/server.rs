//! The agent's HTTP routes: health, host-only init, the Connect services and `/files`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use futures::Stream;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use viv_proto::{envelope, ConnectError};

use crate::process::ProcessTable;
use crate::users::{self, User};

/// Shared state of all request handlers.
#[derive(Clone)]
pub struct AgentState {
    inner: Arc<Inner>,
}

struct Inner {
    access_token: RwLock<Option<String>>,
    env_vars: RwLock<BTreeMap<String, String>>,
    default_user: RwLock<Option<String>>,
    /// The working directory of processes whose request names none (a template's last
    /// `WORKDIR`); the user's home when unset or missing.
    default_workdir: RwLock<Option<String>>,
    processes: ProcessTable,
    watchers: crate::watch::Watchers,
}

impl Default for AgentState {
    fn default() -> Self {
        Self::new()
    }
}

impl AgentState {
    /// State of a freshly booted agent: no token, no extra env vars.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                access_token: RwLock::new(None),
                env_vars: RwLock::new(BTreeMap::new()),
                default_user: RwLock::new(None),
                default_workdir: RwLock::new(None),
                processes: ProcessTable::default(),
                watchers: crate::watch::Watchers::default(),
            }),
        }
    }

    /// The working directory of processes that name none, if the host set one.
    pub fn default_workdir(&self) -> Option<String> {
        self.inner.default_workdir.read().expect("workdir lock").clone()
    }

    /// Environment variables every process gets, set by the host at init.
    pub fn env_vars(&self) -> BTreeMap<String, String> {
        self.inner.env_vars.read().expect("env lock").clone()
    }

    /// The directory watchers clients poll.
    pub fn watchers(&self) -> &crate::watch::Watchers {
        &self.inner.watchers
    }

    /// The process table.
    pub fn processes(&self) -> &ProcessTable {
        &self.inner.processes
    }

    /// The user a request acts as: the one named by `Authorization: Basic base64("user:")` (as
    /// envd clients send it) or by `username`, else the sandbox's default user.
    pub fn request_user(&self, headers: &HeaderMap, username: Option<&str>) -> Result<User, ConnectError> {
        let from_header = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
            .and_then(|raw| String::from_utf8(raw).ok())
            .map(|s| s.split(':').next().unwrap_or_default().to_owned())
            .filter(|s| !s.is_empty());
        let name = username
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or(from_header)
            .unwrap_or_else(|| self.default_user());
        users::lookup(&name).ok_or_else(|| {
            ConnectError::new(
                "invalid_argument",
                format!("user '{name}' does not exist in the sandbox"),
            )
        })
    }

    fn default_user(&self) -> String {
        if let Some(user) = self.inner.default_user.read().expect("user lock").clone() {
            return user;
        }
        if users::lookup("user").is_some() {
            "user".into()
        } else {
            "root".into()
        }
    }
}

/// Builds the router.
pub fn router(state: AgentState) -> Router {
    let authed = Router::new()
        .route("/init", post(init))
        .route("/build/copy", post(crate::build::copy))
        .route("/build/sync", post(crate::build::sync))
        .route("/tunnel", post(crate::tunnel::tunnel))
        .route("/volume/mount", post(crate::volume::mount))
        .route("/envs", get(envs))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/files", get(crate::files::download).post(crate::files::upload))
        .merge(crate::process::routes())
        .merge(crate::files::rpc_routes())
        .merge(crate::watch::routes())
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/health", get(health))
        .merge(authed)
        .with_state(state)
        .layer(middleware::from_fn(crate::codec::protobuf))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(middleware::from_fn(answer_panics))
}

/// A handler that panics answers 500 with what it said, rather than leaving the host a reset
/// stream it cannot tell from a broken channel. (A panic is a bug all the same.)
async fn answer_panics(request: Request, next: Next) -> Response {
    use futures::FutureExt as _;
    let route = request.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(request)).catch_unwind().await {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            json_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the sandbox agent failed at {route}: {what}"),
            )
        }
    }
}

async fn health() -> impl IntoResponse {
    (StatusCode::NO_CONTENT, [("x-envd-version", viv_proto::ENVD_VERSION)])
}

async fn require_token(State(state): State<AgentState>, request: Request, next: Next) -> Response {
    let expected = state.inner.access_token.read().expect("token lock").clone();
    if let Some(expected) = expected {
        let given = request
            .headers()
            .get("x-access-token")
            .map(HeaderValue::as_bytes)
            .unwrap_or_default();
        // A signed `/files` URL (the SDKs' download_url / upload_url) stands in for the token
        // when the request carries none, as with envd.
        let signed = given.is_empty() && request.uri().path() == "/files";
        if signed {
            if let Err(err) = check_signature(&request, &expected) {
                return json_error(StatusCode::UNAUTHORIZED, err.to_string());
            }
        } else if !constant_time_eq(given, expected.as_bytes()) {
            return json_error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong X-Access-Token for this sandbox",
            );
        }
    }
    next.run(request).await
}

/// Checks the signature of a signed `/files` request against the sandbox's access token.
fn check_signature(request: &Request, token: &str) -> Result<(), viv_proto::signing::SignatureError> {
    use viv_proto::signing::{verify, Operation, SignatureError, SignedQuery};
    let axum::extract::Query(query) =
        axum::extract::Query::<SignedQuery>::try_from_uri(request.uri()).map_err(|_| SignatureError::Invalid)?;
    let operation = Operation::of_method(request.method().as_str()).ok_or(SignatureError::Invalid)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    verify(&query, operation, token, now)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the host sends after boot or restore.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    /// Host time in milliseconds since the epoch, to set the guest clock.
    #[serde(default)]
    timestamp_ms: Option<i64>,
    /// Environment variables for every process.
    #[serde(default)]
    env_vars: Option<BTreeMap<String, String>>,
    /// The token clients must present from now on; empty disables the check.
    #[serde(default)]
    access_token: Option<String>,
    /// The user processes run as when a request names none.
    #[serde(default)]
    default_user: Option<String>,
    /// The working directory of processes whose request names none (absolute).
    #[serde(default)]
    default_workdir: Option<String>,
    /// The guest's host name.
    #[serde(default)]
    hostname: Option<String>,
    /// The key of the host's channel reset markers from now on.
    #[serde(default)]
    channel_key: Option<String>,
    /// PEM certificates the guest should trust besides its own (added to the system bundle).
    #[serde(default)]
    ca_certificates: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct InitResponse {
    envd_version: &'static str,
    /// Guest clock after the update, for the host to measure the remaining skew.
    clock_ms: i64,
}

async fn init(State(state): State<AgentState>, Json(req): Json<InitRequest>) -> Response {
    if let Some(key) = req.channel_key.clone() {
        crate::channel::set_channel_key(key);
    }
    if let Some(ms) = req.timestamp_ms {
        if let Err(err) = crate::sys::set_clock_ms(ms) {
            tracing::warn!(error = %err, "cannot set the clock");
        }
    }
    if let Some(vars) = req.env_vars {
        if let Err(err) = publish_env_vars(&vars) {
            tracing::warn!(error = %err, "cannot write {SANDBOX_ENV_FILE}");
        }
        *state.inner.env_vars.write().expect("env lock") = vars;
    }
    if let Some(token) = req.access_token {
        *state.inner.access_token.write().expect("token lock") = (!token.is_empty()).then_some(token);
    }
    if let Some(user) = req.default_user {
        *state.inner.default_user.write().expect("user lock") = Some(user);
    }
    if let Some(dir) = req.default_workdir.filter(|d| d.starts_with('/')) {
        *state.inner.default_workdir.write().expect("workdir lock") = Some(dir);
    }
    if let Some(name) = req.hostname {
        let _ = crate::sys::set_hostname(&name);
    }
    if let Some(pem) = req.ca_certificates.filter(|p| !p.trim().is_empty()) {
        if let Err(err) = trust_certificates(&pem) {
            tracing::warn!(error = %err, "cannot add the host's CA certificates");
        }
    }
    let clock_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default();
    Json(InitResponse {
        envd_version: viv_proto::ENVD_VERSION,
        clock_ms,
    })
    .into_response()
}

/// Where programs that started before the sandbox existed (a template's start command, restored
/// from its snapshot, such as the code interpreter's server) find the sandbox's environment
/// variables: a JSON object, replaced whole (written aside, then renamed) at every `/init`.
pub const SANDBOX_ENV_FILE: &str = "/run/vivarium/sandbox-env.json";

fn publish_env_vars(vars: &BTreeMap<String, String>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::path::Path::new(SANDBOX_ENV_FILE);
    let dir = path.parent().expect("an absolute file path has a parent");
    std::fs::create_dir_all(dir)?;
    let staged = dir.join(".sandbox-env.json.new");
    std::fs::write(&staged, serde_json::to_vec(vars).expect("a string map serializes"))?;
    // Every process in the sandbox sees these variables anyway; readable by all, written by root.
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))?;
    std::fs::rename(&staged, path)
}

/// Where the guest's TLS clients (OpenSSL, curl, Debian's pip) find their trusted certificates.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Adds `pem` to the system certificate bundle once (a restored guest already has it) and keeps a
/// copy where `update-ca-certificates` picks it up again.
fn trust_certificates(pem: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    let marker = format!("# vivarium host certificates {:016x}\n", fingerprint(pem));
    let bundle = std::fs::read_to_string(SYSTEM_BUNDLE).unwrap_or_default();
    if bundle.contains(&marker) {
        return Ok(());
    }
    std::fs::create_dir_all("/usr/local/share/ca-certificates")?;
    std::fs::write("/usr/local/share/ca-certificates/vivarium-host.crt", pem)?;
    std::fs::create_dir_all("/etc/ssl/certs")?;
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(SYSTEM_BUNDLE)?;
    write!(file, "\n{marker}{pem}\n")
}

/// A stable 64-bit FNV-1a hash, to recognize certificates already added.
fn fingerprint(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn envs(State(state): State<AgentState>) -> Json<BTreeMap<String, String>> {
    Json(state.env_vars())
}

/// A JSON error body as envd's HTTP routes send it.
pub fn json_error(status: StatusCode, message: impl Into<String>) -> Response {
    (
        status,
        Json(serde_json::json!({ "code": status.as_u16(), "message": message.into() })),
    )
        .into_response()
}

/// A Connect unary error response.
pub fn connect_error(err: ConnectError) -> Response {
    let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, Json(err)).into_response()
}

/// Decodes a Connect request message: a plain JSON body for unary calls, or the first envelope of
/// an `application/connect+json` body for streaming ones.
pub fn decode_request<T: DeserializeOwned>(headers: &HeaderMap, body: &Bytes) -> Result<T, ConnectError> {
    let streaming = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/connect+"));
    let payload = if streaming {
        let mut decoder = envelope::Decoder::default();
        decoder.push(body);
        decoder
            .next_frame()
            .map_err(|e| ConnectError::new("invalid_argument", e.to_string()))?
            .ok_or_else(|| ConnectError::new("invalid_argument", "request stream carried no message"))?
            .data
    } else {
        body.clone()
    };
    let payload: &[u8] = if payload.is_empty() { b"{}" } else { &payload };
    serde_json::from_slice(payload)
        .map_err(|e| ConnectError::new("invalid_argument", format!("malformed request: {e}")))
}

/// A Connect unary success response.
pub fn unary_ok<T: Serialize>(message: &T) -> Response {
    Json(message).into_response()
}

/// A Connect server-stream response from a stream of messages, ended by the end-of-stream frame.
pub fn stream_response<S>(messages: S) -> Response
where
    S: Stream<Item = Result<Bytes, ConnectError>> + Send + 'static,
{
    use futures::StreamExt as _;
    let framed = messages
        .map(Some)
        .chain(futures::stream::once(async { None }))
        .scan(false, |failed, item| {
            let out = match item {
                _ if *failed => None,
                Some(Ok(frame)) => Some(frame),
                Some(Err(err)) => {
                    *failed = true;
                    Some(envelope::encode_end(Some(&err)))
                }
                None => Some(envelope::encode_end(None)),
            };
            futures::future::ready(out)
        })
        .map(Ok::<_, std::convert::Infallible>);
    Response::builder()
        .header(header::CONTENT_TYPE, "application/connect+json")
        .body(Body::from_stream(framed))
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use tower::ServiceExt as _;

    use super::*;

    #[tokio::test]
    async fn a_handler_that_panics_answers_500_with_its_message() {
        let app = Router::new()
            .route(
                "/boom",
                get(|| async {
                    if true {
                        panic!("wait() should either return Ok or panic");
                    }
                    StatusCode::OK
                }),
            )
            .layer(middleware::from_fn(answer_panics));
        let request = Request::get("/boom").body(Body::empty()).unwrap();
        let response = app.oneshot(request).await.unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        let error: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            error["message"],
            "the sandbox agent failed at /boom: wait() should either return Ok or panic"
        );
    }
}
