//! Request deadlines as Connect clients send them: `Connect-Timeout-Ms`, the milliseconds a
//! call may take (at most 10 digits, per the Connect protocol). envd honours them on its
//! process streams, and so does the agent: a `Start` whose deadline passes has its process
//! group killed (as envd's process context times out) and its stream ended with
//! `deadline_exceeded`; a `Connect` stream ends with `deadline_exceeded` and leaves the process
//! running.
//!
//! Invariants: a missing header (or 0) means no deadline; a malformed one is an
//! `invalid_argument` error, never a panic; deadlines are measured on the monotonic clock from
//! when the request arrived.

use std::time::Duration;

use axum::http::HeaderMap;
use tokio::time::Instant;
use viv_proto::ConnectError;

/// The header Connect clients put a call's timeout in.
pub const HEADER: &str = "connect-timeout-ms";

/// The deadline a request's headers ask for, if any.
pub fn from_headers(headers: &HeaderMap) -> Result<Option<Instant>, ConnectError> {
    let Some(value) = headers.get(HEADER) else {
        return Ok(None);
    };
    let ms = parse(value.as_bytes()).ok_or_else(|| {
        ConnectError::new(
            "invalid_argument",
            format!(
                "{HEADER} must be 1 to 10 digits, got {:?}",
                String::from_utf8_lossy(value.as_bytes())
            ),
        )
    })?;
    Ok((ms > 0).then(|| Instant::now() + Duration::from_millis(ms)))
}

/// Milliseconds of a header value: 1 to 10 ASCII digits.
fn parse(value: &[u8]) -> Option<u64> {
    if value.is_empty() || value.len() > 10 || !value.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(value).ok()?.parse().ok()
}

/// The error a stream ends with when its deadline passes.
pub fn exceeded(what: &str) -> ConnectError {
    ConnectError::new(
        "deadline_exceeded",
        format!("{what}: the request's deadline ({HEADER}) passed"),
    )
}

#[cfg(test)]
mod tests {
    use super::{from_headers, parse};
    use axum::http::HeaderMap;

    #[test]
    fn only_one_to_ten_digits_are_a_timeout() {
        assert_eq!(parse(b"2000"), Some(2000));
        assert_eq!(parse(b"0"), Some(0));
        assert_eq!(parse(b"9999999999"), Some(9_999_999_999));
        for bad in [&b""[..], b"-1", b"1.5", b" 10", b"12345678901", b"10s", "١٢".as_bytes()] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn headers_give_a_deadline_or_none_or_an_error() {
        let mut headers = HeaderMap::new();
        assert!(from_headers(&headers).unwrap().is_none());
        headers.insert(super::HEADER, "0".parse().unwrap());
        assert!(from_headers(&headers).unwrap().is_none());
        headers.insert(super::HEADER, "1500".parse().unwrap());
        assert!(from_headers(&headers).unwrap().is_some());
        headers.insert(super::HEADER, "soon".parse().unwrap());
        assert_eq!(from_headers(&headers).unwrap_err().code, "invalid_argument");
    }
}
