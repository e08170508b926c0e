//! Signed file URLs, as E2B's SDKs make them (`download_url` / `upload_url` of a secured
//! sandbox): the query of `/files` carries `signature=v1_<b64>` and optionally
//! `signature_expiration=<unix seconds>`, where `<b64>` is unpadded standard base64 of
//! SHA-256 over `path:operation:username:token[:expiration]` (`operation` is `read` for a
//! download and `write` for an upload, `username` empty for the default user, `token` the
//! sandbox's envd access token). Pure: the agent checks a signature with it, the server uses it
//! to find which sandbox a signed URL without a sandbox header is for.

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// What a signed URL allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Downloading (`GET /files`).
    Read,
    /// Uploading (`POST /files`).
    Write,
}

impl Operation {
    /// The operation an HTTP method on `/files` performs.
    pub fn of_method(method: &str) -> Option<Self> {
        match method {
            "GET" | "HEAD" => Some(Self::Read),
            "POST" | "PUT" => Some(Self::Write),
            _ => None,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
        }
    }
}

/// The parts of a signed `/files` URL's query that the signature covers.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct SignedQuery {
    /// The file.
    #[serde(default)]
    pub path: Option<String>,
    /// The acting user (absent: the default user, signed as an empty name).
    #[serde(default)]
    pub username: Option<String>,
    /// `v1_...`.
    #[serde(default)]
    pub signature: Option<String>,
    /// Unix seconds after which the URL is refused.
    #[serde(default)]
    pub signature_expiration: Option<String>,
}

/// Why a signed request was refused (envd answers 401 with these messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing signature query parameter")]
    Missing,
    #[error("invalid signature expiration {0:?}")]
    BadExpiration(String),
    #[error("invalid signature")]
    Invalid,
    #[error("signature is already expired")]
    Expired,
}

/// The signature E2B's SDKs compute.
pub fn sign(path: &str, operation: Operation, username: &str, token: &str, expiration: Option<i64>) -> String {
    let raw = match expiration {
        Some(exp) => format!("{path}:{}:{username}:{token}:{exp}", operation.as_str()),
        None => format!("{path}:{}:{username}:{token}", operation.as_str()),
    };
    let digest = Sha256::digest(raw.as_bytes());
    format!("v1_{}", base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest))
}

/// Whether two secrets are equal, in time that depends only on their lengths.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks a signed query against `token` at `now` (unix seconds).
pub fn verify(query: &SignedQuery, operation: Operation, token: &str, now: i64) -> Result<(), SignatureError> {
    let given = query.signature.as_deref().ok_or(SignatureError::Missing)?;
    let expiration = match query.signature_expiration.as_deref() {
        None => None,
        Some(text) => Some(
            text.trim()
                .parse::<i64>()
                .map_err(|_| SignatureError::BadExpiration(text.to_owned()))?,
        ),
    };
    let expected = sign(
        query.path.as_deref().unwrap_or_default(),
        operation,
        query.username.as_deref().unwrap_or_default(),
        token,
        expiration,
    );
    if !same(expected.as_bytes(), given.as_bytes()) {
        return Err(SignatureError::Invalid);
    }
    if expiration.is_some_and(|exp| exp < now) {
        return Err(SignatureError::Expired);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_as_the_sdks_do() {
        // Computed with the e2b Python SDK's get_signature("/home/user/a.txt", "read", None, "tok", None)
        // and with expiration 1700000000.
        let plain = sign("/home/user/a.txt", Operation::Read, "", "tok", None);
        assert!(plain.starts_with("v1_") && !plain.ends_with('='));
        assert_eq!(plain, SIGNED_PLAIN);
        assert_eq!(
            sign("/home/user/a.txt", Operation::Write, "root", "tok", Some(1_700_000_000)),
            SIGNED_WRITE_ROOT_EXP
        );
    }

    const SIGNED_PLAIN: &str = "v1_Zkbb3914oLJLvMBzCAHQhm2ydBLxbSx2eQUR/kLdvIY";
    const SIGNED_WRITE_ROOT_EXP: &str = "v1_3hlIyTfkHTdfJKgNFUJamAQ7q+SOj3624i+geS/jqCM";

    #[test]
    fn verifies_signature_operation_and_expiry() {
        let query = |op, exp: Option<i64>| SignedQuery {
            path: Some("/f".into()),
            username: None,
            signature: Some(sign("/f", op, "", "tok", exp)),
            signature_expiration: exp.map(|e| e.to_string()),
        };
        assert_eq!(verify(&query(Operation::Read, None), Operation::Read, "tok", 5), Ok(()));
        assert_eq!(
            verify(&query(Operation::Read, Some(10)), Operation::Read, "tok", 5),
            Ok(())
        );
        assert_eq!(
            verify(&query(Operation::Read, Some(10)), Operation::Read, "tok", 11),
            Err(SignatureError::Expired)
        );
        assert_eq!(
            verify(&query(Operation::Read, None), Operation::Write, "tok", 5),
            Err(SignatureError::Invalid)
        );
        assert_eq!(
            verify(&query(Operation::Read, None), Operation::Read, "other", 5),
            Err(SignatureError::Invalid)
        );
        let mut tampered = query(Operation::Read, Some(10));
        tampered.signature_expiration = Some("99999999999".into());
        assert_eq!(
            verify(&tampered, Operation::Read, "tok", 5),
            Err(SignatureError::Invalid)
        );
        tampered.signature_expiration = Some("soon".into());
        assert!(matches!(
            verify(&tampered, Operation::Read, "tok", 5),
            Err(SignatureError::BadExpiration(_))
        ));
        assert_eq!(
            verify(&SignedQuery::default(), Operation::Read, "tok", 5),
            Err(SignatureError::Missing)
        );
    }
}
