//! Binary protobuf for the envd services: the descriptors compiled from `proto/` at build time,
//! and conversion of single messages between the binary encoding and the JSON mapping that the
//! rest of the crate's types speak. Clients choose the codec by content type
//! (`application/proto`, `application/connect+proto`); the agent converts at its edge.

use std::sync::OnceLock;

use prost::Message as _;
use prost_reflect::{DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, SerializeOptions};

static DESCRIPTORS: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/envd.descriptors"));

/// Why a message could not be converted.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(String);

/// The descriptors of the `process` and `filesystem` packages.
pub fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| DescriptorPool::decode(DESCRIPTORS).expect("the embedded descriptors decode"))
}

/// The input and output message types of an RPC path such as `/process.Process/Start`.
pub fn method_types(path: &str) -> Option<(MessageDescriptor, MessageDescriptor)> {
    let (service, method) = path.trim_start_matches('/').split_once('/')?;
    let method = pool()
        .get_service_by_name(service)?
        .methods()
        .find(|m| m.name() == method)?;
    Some((method.input(), method.output()))
}

/// A binary message as JSON (canonical mapping, camelCase names, defaults left out).
pub fn binary_to_json(descriptor: &MessageDescriptor, binary: &[u8]) -> Result<Vec<u8>, CodecError> {
    let message = DynamicMessage::decode(descriptor.clone(), binary)
        .map_err(|e| CodecError(format!("malformed {} message: {e}", descriptor.full_name())))?;
    let mut out = serde_json::Serializer::new(Vec::new());
    message
        .serialize_with_options(&mut out, &SerializeOptions::new())
        .map_err(|e| CodecError(e.to_string()))?;
    Ok(out.into_inner())
}

/// A JSON message as binary protobuf (unknown fields are ignored).
pub fn json_to_binary(descriptor: &MessageDescriptor, json: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut input = serde_json::Deserializer::from_slice(json);
    let message = DynamicMessage::deserialize_with_options(
        descriptor.clone(),
        &mut input,
        &DeserializeOptions::new().deny_unknown_fields(false),
    )
    .map_err(|e| CodecError(format!("cannot encode {}: {e}", descriptor.full_name())))?;
    Ok(message.encode_to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_events_round_trip_between_json_and_binary() {
        let (_, output) = method_types("/process.Process/Start").unwrap();
        let json = br#"{"event":{"data":{"stdout":"aGk="}}}"#;
        let binary = json_to_binary(&output, json).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&binary_to_json(&output, &binary).unwrap()).unwrap();
        assert_eq!(back, serde_json::json!({ "event": { "data": { "stdout": "aGk=" } } }));
        let end = br#"{"event":{"end":{"exitCode":-1,"exited":false,"status":"signal: killed"}}}"#;
        let binary = json_to_binary(&output, end).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&binary_to_json(&output, &binary).unwrap()).unwrap();
        assert_eq!(back["event"]["end"]["exitCode"], -1);
    }

    #[test]
    fn entry_info_keeps_int64_timestamps_and_enums() {
        let (input, output) = method_types("/filesystem.Filesystem/Stat").unwrap();
        assert_eq!(input.full_name(), "filesystem.StatRequest");
        let json = br#"{"entry":{"name":"etc","type":"FILE_TYPE_DIRECTORY","path":"/etc","size":"4096","mode":493,"modifiedTime":"2026-11-22T03:34:04Z","isSymlink":false}}"#;
        let binary = json_to_binary(&output, json).unwrap();
        let back: serde_json::Value = serde_json::from_slice(&binary_to_json(&output, &binary).unwrap()).unwrap();
        assert_eq!(back["entry"]["size"], "4096");
        assert_eq!(back["entry"]["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(back["entry"]["modifiedTime"], "2026-11-22T03:34:04Z");
        assert!(method_types("/process.Process/Nope").is_none());
    }
}
