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
/// an offset for UTC), years 0000 to 9999 and leap seconds included. A `+` of the offset that a
/// query string turned into a space is taken as `+`.
pub(crate) fn parse_rfc3339_ms(text: &str) -> Option<i64> {
    let b = text.trim_end().as_bytes();
    let digits = |range: std::ops::Range<usize>| -> Option<i64> {
        let part = b.get(range)?;
        if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    if b.len() < 19
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let (year, month, day) = (digits(0..4)?, digits(5..7)?, digits(8..10)?);
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    if !(1..=12).contains(&month) || day < 1 || day > month_days[(month - 1) as usize] {
        return None;
    }
    if hour > 23 || minute > 59 || second > 60 {
        return None;
    }
    let mut at = 19;
    let mut millis = 0;
    if b.get(at) == Some(&b'.') {
        let start = at + 1;
        at = start;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            at += 1;
        }
        if at == start {
            return None;
        }
        let frac = &b[start..at.min(start + 3)];
        millis = frac.iter().fold(0, |acc, d| acc * 10 + i64::from(d - b'0')) * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset_secs = match &b[at..] {
        [] | [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-' | b' '), _, _, b':', _, _] => {
            let (h, m) = (digits(at + 1..at + 3)?, digits(at + 4..at + 6)?);
            if h > 23 || m > 59 {
                return None;
            }
            let secs = h * 3600 + m * 60;
            if *sign == b'-' {
                -secs
            } else {
                secs
            }
        }
        _ => return None,
    };
    // Days from 1970-01-01 to the date (proleptic Gregorian; Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000 + millis)
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
