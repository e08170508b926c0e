//! The node API: what the nodes of a cluster ask each other, under `/internal`, authenticated
//! by the cluster's secret (`X-Viv-Cluster-Secret`, kept in the shared store) instead of an API
//! key. Not part of the public API (absent from `/openapi.yaml`); keep node addresses on a
//! private network.
//!
//! - `GET /internal/layers/{key}`: a template layer this node has, for a node that has to start
//!   the template (`manager/layer_fetch.rs`).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::manager::CLUSTER_SECRET_HEADER;
use crate::AppState;

/// The node API's routes.
pub(super) fn routes() -> Router<AppState> {
    Router::new().route("/internal/layers/{key}", get(layer))
}

fn check_secret(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get(CLUSTER_SECRET_HEADER)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if given.is_empty() || !viv_proto::signing::same(given, state.cluster.secret().as_bytes()) {
        return Err(ApiError::Unauthorized(
            "the node API takes the cluster's secret in X-Viv-Cluster-Secret".into(),
        ));
    }
    Ok(())
}

async fn layer(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    check_secret(&state, &headers)?;
    let path = state
        .manager
        .layer_file(&key)
        .ok_or_else(|| ApiError::NotFound(format!("this node has no layer '{key}'")))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("opening {}: {e}", path.display())))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::Internal(format!("reading {}: {e}", path.display())))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}
