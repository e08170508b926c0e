//! Sandbox listing (`GET /sandboxes` and E2B's paginated `GET /v2/sandboxes`): filters by
//! metadata, state, template and start time, ordering by start time, and the page cursor.
//!
//! Invariants: sandboxes are ordered by (start time, id), a total order that does not depend on
//! a sandbox's state, so running and paused sandboxes are walked together. A page token is the
//! (start time, id) key of the last sandbox of the previous page, not a position: the next page
//! starts strictly after that key in the requested order, so sandboxes created, paused, resumed
//! or killed between two pages (the one that ended a page included) never make a walk skip or
//! repeat another one. Tokens are opaque to clients (base64url) and a malformed one is a 400.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;
use viv_api::{SandboxInfo, SandboxState};

use super::{metadata_filter, parse_states, ApiQuery};
use crate::error::ApiError;
use crate::AppState;

/// Largest page `GET /v2/sandboxes` serves.
const MAX_LIMIT: usize = 1000;

/// Query of `GET /sandboxes` and `GET /v2/sandboxes`.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(super) struct ListQuery {
    /// `k1=v1&k2=v2`, URL-encoded.
    metadata: Option<String>,
    /// Comma-separated states (`running`, `paused`; `starting` and `failed` too).
    state: Option<String>,
    /// `asc` (oldest first, the default) or `desc` (newest first), by start time.
    order: Option<String>,
    /// Only sandboxes started at or after this time (RFC 3339).
    started_after: Option<String>,
    /// Only sandboxes started at or before this time (RFC 3339).
    started_before: Option<String>,
    /// Only sandboxes of this template (its id or name).
    template: Option<String>,
    /// Page size (default 100), `/v2` only.
    limit: Option<usize>,
    /// Where the previous page ended, `/v2` only.
    next_token: Option<String>,
}

/// A checked [`ListQuery`].
struct Filter {
    metadata: BTreeMap<String, String>,
    states: Vec<SandboxState>,
    descending: bool,
    after_ms: Option<i64>,
    before_ms: Option<i64>,
    template: Option<String>,
}

impl Filter {
    fn parse(query: &ListQuery, default_states: &[SandboxState]) -> Result<Self, ApiError> {
        let states = match query.state.as_deref().filter(|s| !s.is_empty()) {
            Some(list) => parse_states(list)?,
            None => default_states.to_vec(),
        };
        let descending = match query.order.as_deref().unwrap_or("asc") {
            "asc" | "" => false,
            "desc" => true,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "order must be 'asc' (oldest first) or 'desc' (newest first), got '{other}'"
                )))
            }
        };
        let time = |name: &str, value: &Option<String>| {
            value
                .as_deref()
                .filter(|v| !v.is_empty())
                .map(|v| {
                    parse_rfc3339_ms(v).ok_or_else(|| {
                        ApiError::BadRequest(format!(
                            "{name} must be an RFC 3339 time such as 2025-01-31T12:00:00Z, got '{v}'"
                        ))
                    })
                })
                .transpose()
        };
        Ok(Self {
            metadata: metadata_filter(query.metadata.as_ref())?,
            states,
            descending,
            after_ms: time("startedAfter", &query.started_after)?,
            before_ms: time("startedBefore", &query.started_before)?,
            template: query.template.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The matching sandboxes with their keys, in the requested order.
    fn apply(&self, state: &AppState) -> Result<Vec<(Key, SandboxInfo)>, ApiError> {
        let mut listed: Vec<(Key, SandboxInfo)> = state
            .manager
            .list(&self.metadata)?
            .into_iter()
            .filter(|s| self.states.contains(&s.state))
            .filter(|s| self.template.as_ref().is_none_or(|t| &s.template_id == t))
            .map(|s| (Key::of(&s), s))
            .filter(|(key, _)| self.after_ms.is_none_or(|after| key.started_ms >= after))
            .filter(|(key, _)| self.before_ms.is_none_or(|before| key.started_ms <= before))
            .collect();
        listed.sort_by(|(a, _), (b, _)| a.cmp(b));
        if self.descending {
            listed.reverse();
        }
        Ok(listed)
    }
}

/// A sandbox's place in the order: its start time (Unix milliseconds), then its id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    started_ms: i64,
    id: String,
}

impl Key {
    fn of(sandbox: &SandboxInfo) -> Self {
        Self {
            started_ms: parse_rfc3339_ms(&sandbox.started_at).unwrap_or(0),
            id: sandbox.sandbox_id.clone(),
        }
    }

    fn token(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{}.{}", self.started_ms, self.id))
    }

    fn from_token(token: &str) -> Option<Self> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).ok()?;
        let text = String::from_utf8(bytes).ok()?;
        let (ms, id) = text.split_once('.')?;
        Some(Self {
            started_ms: ms.parse().ok()?,
            id: id.to_owned(),
        })
    }
}

/// Every sandbox but those whose VM died (gone, as E2B has it), or those of the states in
/// `?state=` (comma-separated; `failed` lists the dead with their reasons), filtered and
/// ordered as [`ListQuery`] says.
pub(super) async fn list_sandboxes(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(
        &query,
        &[SandboxState::Starting, SandboxState::Running, SandboxState::Paused],
    )?;
    let listed: Vec<SandboxInfo> = filter.apply(&state)?.into_iter().map(|(_, s)| s).collect();
    Ok(Json(listed).into_response())
}

/// E2B's paginated list: sandboxes with the given states (running and paused by default),
/// `limit` at a time; the `x-next-token` header carries the next page's token.
pub(super) async fn list_sandboxes_v2(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Response, ApiError> {
    let filter = Filter::parse(&query, &[SandboxState::Running, SandboxState::Paused])?;
    let limit = query.limit.unwrap_or(100);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit must be between 1 and {MAX_LIMIT}, got {limit}"
        )));
    }
    let after = match query.next_token.as_deref().filter(|t| !t.is_empty()) {
        Some(token) => Some(Key::from_token(token).ok_or_else(|| {
            ApiError::BadRequest(format!(
                "nextToken '{token}' is not a token this server gave (take it from x-next-token)"
            ))
        })?),
        None => None,
    };
    let descending = filter.descending;
    let rest: Vec<(Key, SandboxInfo)> = filter
        .apply(&state)?
        .into_iter()
        .filter(|(key, _)| match &after {
            None => true,
            Some(after) if descending => key < after,
            Some(after) => key > after,
        })
        .collect();
    let more = rest.len() > limit;
    let page: Vec<(Key, SandboxInfo)> = rest.into_iter().take(limit).collect();
    let next = more.then(|| page.last().map(|(key, _)| key.token())).flatten();
    let page: Vec<SandboxInfo> = page.into_iter().map(|(_, s)| s).collect();
    let mut response = Json(page).into_response();
    if let Some(value) = next.and_then(|t| t.parse().ok()) {
        response.headers_mut().insert("x-next-token", value);
    }
    Ok(response)
}

/// Unix milliseconds of an RFC 3339 time (`2025-01-31T12:00:00.123+02:00`, `...Z`, or without
/// an offset for UTC). A `+` of the offset that a query string turned into a space is taken as
/// `+`.
pub(crate) fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let text = text.trim_end();
    let (local, offset_secs) = if let Some(local) = text.strip_suffix(['Z', 'z']) {
        (local, 0)
    } else if text.len() > 19 && text.is_char_boundary(text.len() - 6) {
        let (local, offset) = text.split_at(text.len() - 6);
        match offset.as_bytes() {
            [sign @ (b'+' | b'-' | b' '), h1, h2, b':', m1, m2]
                if [h1, h2, m1, m2].iter().all(|b| b.is_ascii_digit()) =>
            {
                let hours = i64::from((h1 - b'0') * 10 + (h2 - b'0'));
                let minutes = i64::from((m1 - b'0') * 10 + (m2 - b'0'));
                if hours > 23 || minutes > 59 {
                    return None;
                }
                let secs = hours * 3600 + minutes * 60;
                (local, if *sign == b'-' { -secs } else { secs })
            }
            _ => (text, 0),
        }
    } else {
        (text, 0)
    };
    // humantime takes `YYYY-MM-DDTHH:MM:SS[.frac]` as UTC.
    if local.len() < 19 || !matches!(local.as_bytes().get(10), Some(b'T' | b't')) {
        return None;
    }
    let time = humantime::parse_rfc3339_weak(local).ok()?;
    let ms = match time.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).ok()?,
        Err(e) => -i64::try_from(e.duration().as_millis()).ok()?,
    };
    Some(ms - offset_secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::{parse_rfc3339_ms, Key};

    #[test]
    fn rfc3339_times_with_offsets_and_fractions() {
        let base = parse_rfc3339_ms("2025-01-31T12:00:00Z").unwrap();
        assert_eq!(base, 1_738_324_800_000);
        assert_eq!(parse_rfc3339_ms("2025-01-31T12:00:00.250Z"), Some(base + 250));
        assert_eq!(parse_rfc3339_ms("2025-01-31T12:00:00.250123+00:00"), Some(base + 250));
        assert_eq!(parse_rfc3339_ms("2025-01-31T14:00:00+02:00"), Some(base));
        assert_eq!(parse_rfc3339_ms("2025-01-31T14:00:00 02:00"), Some(base));
        assert_eq!(parse_rfc3339_ms("2025-01-31T11:30:00-00:30"), Some(base));
        assert_eq!(parse_rfc3339_ms("2025-01-31T12:00:00"), Some(base));
        for bad in [
            "",
            "yesterday",
            "2025-01-31",
            "2025-01-31T12:00:00+25:00",
            "2025-13-01T00:00:00Z",
            "é2025-01-31T12:00:00+02:00",
        ] {
            assert_eq!(parse_rfc3339_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn tokens_round_trip_and_garbage_is_refused() {
        let key = Key {
            started_ms: 1_738_324_800_123,
            id: "abc.def".into(),
        };
        assert_eq!(Key::from_token(&key.token()), Some(key));
        for bad in ["%%%", "", "bm90aGluZw", "eC55"] {
            assert_eq!(Key::from_token(bad), None, "{bad}");
        }
    }
}
