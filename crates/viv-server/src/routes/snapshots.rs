//! Snapshot routes as E2B's SDKs call them: `GET /snapshots` filtered by sandbox or name and
//! paginated (`limit`, `nextToken`, `x-next-token`), `GET`/`DELETE /snapshots/{id}`, and
//! `DELETE /templates/{id}` for a snapshot (the SDKs delete snapshots through E2B's template
//! route: 204 when deleted, 404 when there is no such snapshot).
//!
//! Invariants: snapshots are listed oldest first by (creation time, id) and a page token is the
//! id of the last node of the previous page, so nodes deleted between pages never make a walk
//! skip or repeat another; a snapshot is named as E2B names it, `NAME:default` (or
//! `ID:default` without a name), and every lookup also takes the bare id or name.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;

use super::{ApiPath, ApiQuery};
use crate::error::ApiError;
use crate::AppState;

/// Largest page `GET /snapshots` serves.
const MAX_LIMIT: usize = 1000;

/// Query of `GET /snapshots`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct SnapshotQuery {
    /// Only snapshots taken of this sandbox.
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    /// Only the snapshot of this name (`NAME` or `NAME:default`).
    name: Option<String>,
    /// Page size (default 100).
    limit: Option<usize>,
    /// Where the previous page ended.
    next_token: Option<String>,
}

pub(super) async fn list_snapshots(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<SnapshotQuery>,
) -> Result<Response, ApiError> {
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    let after = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => Some(decode_token(token).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "nextToken '{token}' is not a token this server gave (take it from x-next-token)"
            ))
        })?),
        None => None,
    };
    let sandbox = query.sandbox_id.as_deref().filter(|s| !s.is_empty());
    let name = query.name.as_deref().filter(|s| !s.is_empty());
    // Oldest first; the page starts after the key that ended the previous one (that node may
    // be gone since).
    let rest: Vec<_> = state
        .manager
        .snapshot_nodes(sandbox, name)?
        .into_iter()
        .filter(|(row, _)| {
            after
                .as_ref()
                .is_none_or(|(created, id)| (&row.created_at, &row.id) > (created, id))
        })
        .collect();
    let more = rest.len() > limit;
    let page: Vec<_> = rest.into_iter().take(limit).collect();
    let next = more
        .then(|| page.last().map(|(row, _)| encode_token(&row.created_at, &row.id)))
        .flatten();
    let infos: Vec<viv_api::SnapshotInfo> = page.into_iter().map(|(_, info)| info).collect();
    let mut response = Json(infos).into_response();
    if let Some(value) = next.and_then(|t| t.parse().ok()) {
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

pub(super) async fn get_snapshot(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.get_snapshot(&id)?).into_response())
}

pub(super) async fn delete_snapshot(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.manager.delete_snapshot(&id)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A page token: the (creation time, id) of the last node of a page.
fn encode_token(created_at: &str, id: &str) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{created_at}\n{id}"))
}

fn decode_token(token: &str) -> Option<(String, String)> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
    let text = String::from_utf8(bytes).ok()?;
    let (created, id) = text.split_once('\n')?;
    Some((created.to_owned(), id.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::{decode_token, encode_token};

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let token = encode_token("2026-01-01T00:00:00Z", "abc");
        assert_eq!(
            decode_token(&token),
            Some(("2026-01-01T00:00:00Z".into(), "abc".into()))
        );
        for bad in ["%%%", "", "bm90aGluZw"] {
            assert_eq!(decode_token(bad), None, "{bad}");
        }
    }
}
