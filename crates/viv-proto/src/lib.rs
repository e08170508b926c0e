//! Wire types of the services the in-guest agent serves, modelled on E2B's envd.
//!
//! The agent speaks the [Connect protocol](https://connectrpc.com/docs/protocol) with the JSON
//! codec: unary calls are `POST /{service}/{method}` with a JSON body, server streams are
//! `application/connect+json` bodies made of [`envelope`] frames. Message and field names follow
//! envd's `process.Process` and `filesystem.Filesystem` services, using the canonical protobuf JSON
//! mapping (camelCase fields, `bytes` as base64, enums as their value names), so the same handlers
//! can later serve the E2B SDKs unchanged.

pub mod channel;
pub mod envelope;
pub mod filesystem;
pub mod process;
pub mod protobuf;
pub mod signing;

/// The version of the envd protocol the agent implements, reported to clients. The E2B SDKs
/// switch features on it: 0.3.0 stdin for commands, 0.4.0 a default user, 0.5.2 closing stdin,
/// 0.5.7 octet-stream (and gzip) uploads, 0.6.2 file metadata (`X-Metadata-*` upload headers,
/// kept as `user.e2b.*` extended attributes), 0.6.3 entry info in watch events, 0.6.4 watches of
/// directories on network mounts.
pub const ENVD_VERSION: &str = "0.6.4";

/// The port envd listens on inside an E2B sandbox; SDKs address the agent through it.
pub const ENVD_PORT: u16 = 49983;

/// Request header with which the host announces that an upload's body ends with the
/// [`UPLOAD_LENGTH_TRAILER`] trailer.
pub const UPLOAD_LENGTH_ANNOUNCE: &str = "viv-upload-length-trailer";

/// Trailer the host ends a forwarded upload with: the number of body bytes it sent. The agent
/// keeps the file only if it received exactly that many, so a body that stops early on the way
/// (even one that looks properly ended) never becomes a shorter file.
pub const UPLOAD_LENGTH_TRAILER: &str = "viv-upload-length";

/// A Connect error as sent in a unary error body or in a stream's end-of-stream message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ConnectError {
    /// One of the Connect error codes, such as `not_found` or `invalid_argument`.
    pub code: String,
    /// A message for a person.
    #[serde(default)]
    pub message: String,
}

impl ConnectError {
    /// Builds an error with the given Connect code.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
        }
    }

    /// The HTTP status a unary response with this error carries.
    pub fn http_status(&self) -> u16 {
        match self.code.as_str() {
            "canceled" => 499,
            "invalid_argument" | "failed_precondition" | "out_of_range" => 400,
            "deadline_exceeded" => 504,
            "not_found" => 404,
            "already_exists" | "aborted" => 409,
            "permission_denied" => 403,
            "resource_exhausted" => 429,
            "unimplemented" => 501,
            "unavailable" => 503,
            "unauthenticated" => 401,
            _ => 500,
        }
    }
}

/// Serde helpers for `bytes` fields, which the protobuf JSON mapping writes as base64.
pub mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// Serializes bytes as standard base64.
    pub fn serialize<S: Serializer>(data: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    /// Deserializes standard or URL-safe base64, padded or not.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(d)?;
        decode(&text).map_err(serde::de::Error::custom)
    }

    /// Decodes base64 in any of the alphabets the protobuf JSON mapping accepts.
    pub fn decode(text: &str) -> Result<Vec<u8>, base64::DecodeError> {
        let trimmed = text.trim_end_matches('=');
        if trimmed.contains(['-', '_']) {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(trimmed)
        } else {
            base64::engine::general_purpose::STANDARD_NO_PAD.decode(trimmed)
        }
    }

    /// The same, for optional fields.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes present bytes as base64.
        pub fn serialize<S: Serializer>(data: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match data {
                Some(bytes) => super::serialize(bytes, s),
                None => s.serialize_none(),
            }
        }

        /// Deserializes optional base64.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|text| super::decode(&text).map_err(serde::de::Error::custom))
                .transpose()
        }
    }
}
