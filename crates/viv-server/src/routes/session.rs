//! Web console sessions: `POST /auth/session` trades an API key for a session cookie,
//! `GET /auth/session` tells whether the cookie's session is valid, `DELETE /auth/session`
//! ends it; [`authorize`] lets the API-key middleware accept the cookie instead of a key.
//!
//! The cookie `viv_session` holds a random token (its SHA-256 is stored, `store/web_sessions.rs`)
//! and is `Secure; HttpOnly; SameSite=Strict`, so page scripts never see it and other sites'
//! requests never carry it. The key itself is never sent back to the browser.
//!
//! Invariants: a request authenticated by the cookie that can change state — any method but
//! GET/HEAD/OPTIONS, and every WebSocket upgrade (which browsers send cross-site without CORS)
//! — must carry an `Origin` equal to the server's own (`http(s)://` + the `Host` it was asked
//! for), else 403; so does a sign-in or sign-out that carries an `Origin`. Requests with an
//! `X-API-Key` header or key subprotocol are not browser sessions and are checked as before.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use crate::error::ApiError;
use crate::store::WebSession;
use crate::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "viv_session";

/// Routes that need no API key (they are how a browser gets a session).
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/auth/session", post(sign_in).get(session).delete(sign_out))
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SignIn {
    api_key: String,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct SessionInfo {
    /// RFC 3339.
    expires_at: String,
}

fn info(expires_at_ms: i64) -> SessionInfo {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(expires_at_ms).unwrap_or(0));
    SessionInfo {
        expires_at: humantime::format_rfc3339_seconds(at).to_string(),
    }
}

async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    uri: Uri,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    if headers.contains_key(header::ORIGIN) {
        check_origin(&headers, &uri)?;
    }
    let Json(body) = body?;
    let ttl = state.session_ttl;
    let session = state
        .store
        .create_web_session(&body.api_key, ttl)?
        .ok_or_else(|| ApiError::Unauthorized("invalid or revoked API key".into()))?;
    let cookie = format!(
        "{COOKIE}={}; Path=/; Max-Age={}; Secure; HttpOnly; SameSite=Strict",
        session.token,
        ttl.as_secs()
    );
    let mut response = (StatusCode::CREATED, Json(info(session.expires_at_ms))).into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&cookie).map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

async fn session(State(state): State<AppState>, headers: HeaderMap) -> Result<Response, ApiError> {
    let token = cookie_token(&headers).ok_or_else(signed_out)?;
    let session = state.store.web_session(&token)?.ok_or_else(signed_out)?;
    Ok(Json(info(session.expires_at_ms)).into_response())
}

async fn sign_out(State(state): State<AppState>, headers: HeaderMap, uri: Uri) -> Result<Response, ApiError> {
    if let Some(token) = cookie_token(&headers) {
        check_origin(&headers, &uri)?;
        state.store.delete_web_session(&token)?;
    }
    let mut response = StatusCode::NO_CONTENT.into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_str(&format!(
            "{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"
        ))
        .map_err(|e| ApiError::Internal(e.to_string()))?,
    );
    Ok(response)
}

fn signed_out() -> ApiError {
    ApiError::Unauthorized("not signed in, or the console session expired or ended; sign in again".into())
}

/// The session token of the request's `viv_session` cookie, if it carries one.
pub(super) fn cookie_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE && !value.is_empty()).then(|| value.to_owned())
        })
}

/// Whether a cookie-authenticated request must prove its origin: it may change state.
fn needs_origin(request: &Request) -> bool {
    let upgrade = request
        .headers()
        .get(header::UPGRADE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    upgrade || !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS)
}

/// 403 unless the request's `Origin` is this server's own origin: `http://` or `https://`
/// followed by exactly the authority the request was sent to (its `Host`, or the URI's for
/// HTTP/2).
pub(super) fn check_origin(headers: &HeaderMap, uri: &Uri) -> Result<(), ApiError> {
    let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok());
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()));
    let same = match (origin, host) {
        (Some(origin), Some(host)) => origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"))
            .is_some_and(|authority| !host.is_empty() && authority.eq_ignore_ascii_case(host)),
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "a request with the console's session must come from the console: Origin {} is not this server's",
            origin.unwrap_or("(none)")
        )))
    }
}

/// Checks a request that carries no API key against its session cookie: the session when it is
/// valid (and, for a state-changing request, its origin is this server's), `None` when the
/// request has no cookie.
pub(super) fn authorize(state: &AppState, request: &Request) -> Result<Option<WebSession>, ApiError> {
    let Some(token) = cookie_token(request.headers()) else {
        return Ok(None);
    };
    let session = state.store.web_session(&token)?.ok_or_else(signed_out)?;
    if needs_origin(request) {
        check_origin(request.headers(), request.uri())?;
    }
    Ok(Some(session))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn finds_the_session_cookie_among_others() {
        let h = headers(&[("cookie", "a=1; viv_session=abc; b=2")]);
        assert_eq!(cookie_token(&h).as_deref(), Some("abc"));
        let h = headers(&[("cookie", "a=1"), ("cookie", "viv_session=x")]);
        assert_eq!(cookie_token(&h).as_deref(), Some("x"));
        assert_eq!(cookie_token(&headers(&[("cookie", "viv_session=")])), None);
        assert_eq!(cookie_token(&headers(&[("cookie", "xviv_session=1")])), None);
        assert_eq!(cookie_token(&HeaderMap::new()), None);
    }

    #[test]
    fn only_the_servers_own_origin_passes() {
        let uri: Uri = "/sandboxes".parse().unwrap();
        let ok = |pairs: &[(&str, &str)]| check_origin(&headers(pairs), &uri).is_ok();
        assert!(ok(&[("origin", "http://127.0.0.1:3000"), ("host", "127.0.0.1:3000")]));
        assert!(ok(&[("origin", "https://viv.example"), ("host", "viv.example")]));
        assert!(!ok(&[("origin", "http://evil.example"), ("host", "127.0.0.1:3000")]));
        assert!(!ok(&[("origin", "http://127.0.0.1:3001"), ("host", "127.0.0.1:3000")]));
        assert!(!ok(&[
            ("origin", "http://127.0.0.1:3000.evil"),
            ("host", "127.0.0.1:3000")
        ]));
        assert!(!ok(&[("origin", "null"), ("host", "127.0.0.1:3000")]));
        assert!(!ok(&[("host", "127.0.0.1:3000")]));
        assert!(!ok(&[("origin", "ws://127.0.0.1:3000"), ("host", "127.0.0.1:3000")]));
        // HTTP/2 sends the authority in the URI.
        let h2: Uri = "http://127.0.0.1:3000/x".parse().unwrap();
        assert!(check_origin(&headers(&[("origin", "http://127.0.0.1:3000")]), &h2).is_ok());
    }
}
