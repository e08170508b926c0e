//! The one error type of the REST API and its mapping to HTTP statuses.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use viv_api::ErrorBody;

/// Everything a route can fail with.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No key, or a key that is not valid.
    #[error("{0}")]
    Unauthorized(String),
    /// The caller may not do this (such as a guest user reading a file it has no right to).
    #[error("{0}")]
    Forbidden(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// The route exists, but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The request body is of a media type the route does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// The request conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// The sandbox's VM or agent failed or could not be reached.
    #[error("{0}")]
    Sandbox(String),
    /// The request body is larger than the route accepts.
    #[error("{0}")]
    TooLarge(String),
    /// The host has no room for this now (memory, network slots); retrying later may work.
    #[error("{0}")]
    NoRoom(String),
    /// The server is short of a resource.
    #[error("{0}")]
    Unavailable(String),
    /// This server does not answer such requests (a `--role node` server asked by a client
    /// directly): the message names where to send it.
    #[error("{0}")]
    Misdirected(String),
    /// A bug or an unexpected failure on the server.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Sandbox(_) => StatusCode::BAD_GATEWAY,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::NoRoom(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Misdirected(_) => StatusCode::MISDIRECTED_REQUEST,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A 404 for a sandbox id.
    pub fn sandbox_not_found(id: &str) -> Self {
        Self::NotFound(format!(
            "sandbox '{id}' not found (it may have been killed or timed out)"
        ))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        }
        let mut response = (
            status,
            Json(ErrorBody {
                code: status.as_u16(),
                message: self.to_string(),
            }),
        )
            .into_response();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            // Refused before its body was read to the end: the connection cannot carry another
            // request, and a client must not send one on it (HTTP/2 drops the header).
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
        }
        response
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(err: crate::store::StoreError) -> Self {
        if err.is_unavailable() {
            return Self::Unavailable(format!(
                "the state database cannot be reached now ({err}); retry shortly"
            ));
        }
        Self::Internal(err.to_string())
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(err: axum::extract::rejection::JsonRejection) -> Self {
        Self::BadRequest(format!("invalid JSON body: {}", err.body_text()))
    }
}

impl From<axum::extract::rejection::QueryRejection> for ApiError {
    fn from(err: axum::extract::rejection::QueryRejection) -> Self {
        Self::BadRequest(format!("invalid query: {}", err.body_text()))
    }
}

impl From<axum::extract::rejection::PathRejection> for ApiError {
    fn from(err: axum::extract::rejection::PathRejection) -> Self {
        Self::BadRequest(format!("invalid path: {}", err.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_body_closes_its_connection_and_other_errors_do_not() {
        let refused = ApiError::TooLarge("too big".into()).into_response();
        assert_eq!(refused.status(), StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(refused.headers()[axum::http::header::CONNECTION], "close");
        let other = ApiError::NotFound("gone".into()).into_response();
        assert!(!other.headers().contains_key(axum::http::header::CONNECTION));
    }
}
