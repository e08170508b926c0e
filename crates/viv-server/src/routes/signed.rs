//! Signed file URLs on the server's own address. An SDK pointed at a single sandbox URL
//! (`E2B_SANDBOX_URL`) makes `download_url` / `upload_url` as `URL/files?path=...&signature=...`
//! with no sandbox header and no sandbox host name; the signature is made with the sandbox's
//! envd access token (`viv_proto::signing`), so the server finds the sandbox whose token it
//! matches and forwards the request there unchanged. The agent checks the signature and its
//! expiry again, as envd does, and answers 401 for an expired one; a signature that matches no
//! sandbox's token is a 401 here ("invalid signature", envd's words).
//!
//! Invariants: only `/files` requests that carry a `signature` are looked at (everything else
//! goes on to the API routes); tokens never leave the server; comparing costs one SHA-256 per
//! sandbox that has a token.

use axum::extract::{Query, Request};
use viv_api::SandboxState;
use viv_proto::signing::{verify, Operation, SignatureError, SignedQuery};

use crate::error::ApiError;
use crate::AppState;

/// The sandbox a signed `/files` request is for: `None` if it is not one, an error if its
/// signature fits no sandbox.
pub(super) fn sandbox_for(state: &AppState, request: &Request) -> Option<Result<String, ApiError>> {
    if request.uri().path() != "/files" {
        return None;
    }
    let Query(query) = Query::<SignedQuery>::try_from_uri(request.uri()).ok()?;
    query.signature.as_ref()?;
    let Some(operation) = Operation::of_method(request.method().as_str()) else {
        return Some(Err(ApiError::MethodNotAllowed(format!(
            "{} is not allowed on a signed file URL",
            request.method()
        ))));
    };
    let rows = match state.store.sandboxes() {
        Ok(rows) => rows,
        Err(err) => return Some(Err(err.into())),
    };
    // The expiry is checked by the agent (which answers as envd does); here a signature only
    // has to be the sandbox's, so any time within the expiry's range is "now".
    let found = rows
        .into_iter()
        .filter(|row| row.state != SandboxState::Failed)
        .find(|row| {
            row.access_token.as_deref().is_some_and(|token| {
                matches!(
                    verify(&query, operation, token, i64::MIN),
                    Ok(()) | Err(SignatureError::Expired)
                )
            })
        });
    Some(match found {
        Some(row) => Ok(row.id),
        None => Err(ApiError::Unauthorized(SignatureError::Invalid.to_string())),
    })
}
