//! The source server's client for the destination server of a live migration: JSON calls and
//! upgraded connections (raw byte channels) over plain HTTP/1.1, authenticated with the API key
//! the operator gave for this migration, or, between two nodes of one cluster, with the
//! cluster's secret on the node API (`/internal/migrations/…`).
//!
//! Invariants:
//! - the key or secret lives in memory for the migration only; it is never logged, stored or
//!   echoed (`Remote`'s `Debug` leaves it out);
//! - every call has a deadline: an unreachable or stuck destination is an error, never a hang;
//! - only `http://HOST:PORT` targets are accepted (no path, no userinfo), so a target cannot
//!   smuggle a request line or headers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::StatusCode;
use hyper_util::rt::TokioIo;

use crate::error::ApiError;

/// Connecting to the destination.
/// The `Upgrade` protocol of a migration channel.
pub const MIGRATION_PROTOCOL: &str = "vivarium-migration";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a JSON call may take (receiving a VM launches its QEMU).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Largest answer read.
const MAX_ANSWER: usize = 4 << 20;

/// The destination server.
#[derive(Clone)]
pub(super) struct Remote {
    /// `HOST:PORT`.
    authority: String,
    /// The header carrying the credential, and the credential.
    auth: (&'static str, String),
    /// What the migration routes' paths start with there (`/internal` on the node API).
    prefix: &'static str,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("authority", &self.authority)
            .finish_non_exhaustive()
    }
}

impl Remote {
    /// The target `http://HOST:PORT` (a trailing `/` allowed) with its key; 400 otherwise.
    pub(super) fn parse(target: &str, key: &str) -> Result<Self, ApiError> {
        let bad = |why: &str| ApiError::BadRequest(format!("invalid target {target:?}: {why}"));
        let rest = target
            .strip_prefix("http://")
            .ok_or_else(|| bad("give the destination server as http://HOST:PORT"))?;
        let authority = rest.strip_suffix('/').unwrap_or(rest);
        let ok = !authority.is_empty()
            && authority.len() <= 255
            && authority
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'));
        if !ok {
            return Err(bad("expected http://HOST:PORT with no path"));
        }
        if key.is_empty() || key.len() > 512 || !key.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ApiError::BadRequest(
                "targetKey must be the destination server's API key (printable ASCII)".into(),
            ));
        }
        Ok(Self {
            authority: authority.to_owned(),
            auth: (viv_api::API_KEY_HEADER, key.to_owned()),
            prefix: "",
        })
    }

    /// Another node of this cluster at `url` (its `http://HOST:PORT`), through the node API
    /// with the cluster's `secret`.
    pub(super) fn node(url: &str, secret: &str) -> Result<Self, ApiError> {
        let mut remote = Self::parse(url, secret)?;
        remote.auth = (super::CLUSTER_SECRET_HEADER, secret.to_owned());
        remote.prefix = "/internal";
        Ok(remote)
    }

    /// The target as the operator wrote it, for messages.
    pub(super) fn url(&self) -> String {
        format!("http://{}", self.authority)
    }

    fn unreachable(&self, why: impl std::fmt::Display) -> ApiError {
        ApiError::Sandbox(format!("the target server {} is unreachable: {why}", self.url()))
    }

    async fn open(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, ApiError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&self.authority))
            .await
            .map_err(|_| self.unreachable("connecting timed out"))?
            .map_err(|e| self.unreachable(e))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        Ok(sender)
    }

    fn request(&self, method: hyper::Method, path: &str) -> hyper::http::request::Builder {
        hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(hyper::header::HOST, &self.authority)
            .header(self.auth.0, &self.auth.1)
    }

    /// One JSON call: the status and the answer (`null` when empty or not JSON).
    pub(super) async fn call(
        &self,
        method: hyper::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        self.call_within(CALL_TIMEOUT, method, path, body).await
    }

    /// [`Remote::call`] with a deadline of its own (a call that copies disks).
    pub(super) async fn call_within(
        &self,
        deadline: Duration,
        method: hyper::Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(StatusCode, serde_json::Value), ApiError> {
        let work = async {
            let mut sender = self.open().await?;
            let mut request = self.request(method, path);
            let body = match body {
                Some(json) => {
                    request = request.header(hyper::header::CONTENT_TYPE, "application/json");
                    Full::new(Bytes::from(json.to_string()))
                }
                None => Full::new(Bytes::new()),
            };
            let request = request
                .body(body)
                .map_err(|e| ApiError::Internal(format!("building a request: {e}")))?;
            let response = sender.send_request(request).await.map_err(|e| self.unreachable(e))?;
            let status = response.status();
            let limited = http_body_util::Limited::new(response.into_body(), MAX_ANSWER);
            let bytes = limited
                .collect()
                .await
                .map_err(|e| self.unreachable(format!("reading its answer: {e}")))?
                .to_bytes();
            Ok((
                status,
                serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
            ))
        };
        tokio::time::timeout(deadline, work)
            .await
            .map_err(|_| self.unreachable(format!("no answer within {} s", deadline.as_secs())))?
    }

    /// Opens a raw byte channel: `GET path` upgraded to protocol `vivarium-migration`.
    pub(super) async fn channel(&self, path: &str) -> Result<TokioIo<hyper::upgrade::Upgraded>, ApiError> {
        let work = async {
            let mut sender = self.open().await?;
            let request = self
                .request(hyper::Method::GET, path)
                .header(hyper::header::CONNECTION, "upgrade")
                .header(hyper::header::UPGRADE, MIGRATION_PROTOCOL)
                .body(Full::new(Bytes::new()))
                .map_err(|e| ApiError::Internal(format!("building a request: {e}")))?;
            let mut response = sender.send_request(request).await.map_err(|e| self.unreachable(e))?;
            if response.status() != StatusCode::SWITCHING_PROTOCOLS {
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                return Err(remote_error(
                    status,
                    &serde_json::from_slice(&body).unwrap_or_default(),
                    "opening a channel",
                ));
            }
            hyper::upgrade::on(&mut response)
                .await
                .map(TokioIo::new)
                .map_err(|e| self.unreachable(format!("upgrading the channel: {e}")))
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .map_err(|_| self.unreachable("opening a channel timed out"))?
    }
}

/// The destination's error answer as an error here: its status and message, with `what`.
pub(super) fn remote_error(status: StatusCode, body: &serde_json::Value, what: &str) -> ApiError {
    let message = body["message"]
        .as_str()
        .or_else(|| body["error"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message = format!("the target server refused {what}: {message}");
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => ApiError::BadRequest(format!(
            "the target server refused targetKey ({message}): give an API key of the target server"
        )),
        StatusCode::CONFLICT => ApiError::Conflict(message),
        StatusCode::BAD_REQUEST | StatusCode::NOT_FOUND | StatusCode::UNPROCESSABLE_ENTITY => {
            ApiError::BadRequest(message)
        }
        _ => ApiError::Sandbox(message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_checked() {
        assert!(Remote::parse("http://127.0.0.1:8080", "k").is_ok());
        assert!(Remote::parse("http://host:1/", "k").is_ok());
        assert!(Remote::parse("https://host:1", "k").is_err());
        assert!(Remote::parse("http://host:1/x", "k").is_err());
        assert!(Remote::parse("http://a@host:1", "k").is_err());
        assert!(Remote::parse("http://host:1\r\nX: y", "k").is_err());
        assert!(Remote::parse("http://host:1", "").is_err());
        assert!(Remote::parse("http://host:1", "a b").is_err());
        let debug = format!("{:?}", Remote::parse("http://h:1", "secret").unwrap());
        assert!(!debug.contains("secret"));
    }
}
