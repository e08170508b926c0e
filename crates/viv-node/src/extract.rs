//! Request extractors whose rejections are [`ApiError`]s (a JSON `{code, message}` body with
//! the right status), shared by the public routes and the node API.
//!
//! Invariant: a JSON body is read only when sent as JSON and only when it holds an object.

use axum::extract::{Path, Query, Request};
use axum::http::header;
use bytes::Bytes;

use crate::error::ApiError;

/// A JSON body extractor whose rejection is an [`ApiError`]. The body must be a JSON object
/// (serde would also read a struct from an array of its fields, which no client means).
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let essence = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
            .unwrap_or_default();
        let json = essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"));
        if !json {
            return Err(ApiError::BadRequest(
                "the body must be JSON, sent with Content-Type: application/json".into(),
            ));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        json_object(&bytes).map(Self)
    }
}

/// `T` from a body that must hold a JSON object.
pub fn json_object<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(
            "invalid JSON body: expected an object ({...})".into(),
        ));
    }
    serde_json::from_value(value).map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// A query extractor whose rejection is an [`ApiError`] (a JSON `{code, message}` body).
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> axum::extract::FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let Query(value) = Query::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// A path extractor whose rejection is an [`ApiError`] (a JSON `{code, message}` body).
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Send> axum::extract::FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, ApiError> {
        let Path(value) = Path::<T>::from_request_parts(parts, state).await?;
        Ok(Self(value))
    }
}

/// Like [`JsonBody`], but no body means `T::default()` (for routes whose body is optional).
pub struct OptionalJsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned + Default> axum::extract::FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::BadRequest(format!("reading the request body: {e}")))?;
        // No body at all; whitespace is not JSON.
        if bytes.is_empty() {
            return Ok(Self(T::default()));
        }
        json_object(&bytes).map(Self)
    }
}
