//! The web console's pages: `GET /` is the app (`web/`, embedded by `viv-web`), `GET
//! /assets/{file}` its scripts and styles. No API key is needed to load them; the app signs in
//! through `/auth/session` and then calls the API with its session cookie.
//!
//! Invariants: every response carries a strict Content-Security-Policy (scripts and connections
//! only from this origin, WebSockets included; no inline script; no framing), `X-Frame-Options:
//! DENY` and `nosniff`; a client's path is only looked up in the embedded table, never joined to
//! a file system path. Inline styles are allowed because xterm.js and uPlot style the elements
//! they create.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::ApiPath;
use crate::error::ApiError;
use crate::AppState;

/// The console's Content-Security-Policy.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data: blob:; font-src 'self'; connect-src 'self'; manifest-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes (no API key).
pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(index))
        .route("/assets/{*file}", get(asset))
}

async fn index() -> Response {
    serve("index.html").unwrap_or_else(|e| e.into_response())
}

async fn asset(ApiPath(file): ApiPath<String>) -> Response {
    serve(&format!("assets/{file}")).unwrap_or_else(|e| e.into_response())
}

fn serve(name: &str) -> Result<Response, ApiError> {
    let asset = viv_web::asset(name).ok_or_else(|| ApiError::NotFound(format!("the console has no file {name}")))?;
    let mut response = (StatusCode::OK, asset.bytes).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if asset.immutable {
            "public, max-age=31536000, immutable"
        } else {
            "no-cache"
        }),
    );
    Ok(response)
}
