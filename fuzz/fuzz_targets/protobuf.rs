//! Binary protobuf ⇄ JSON conversion of the envd messages (`viv_proto::protobuf`), which the
//! agent applies to every `application/proto` and `application/connect+proto` request and answer.
//!
//! For every input and output message of every RPC, checks, besides never panicking:
//! - binary → JSON: whatever converts gives JSON that converts back to binary, and that binary
//!   converts to the same JSON (binary → JSON → binary → JSON is stable after one round; unknown
//!   fields are dropped on the way, as the JSON mapping has no place for them);
//! - JSON → binary: likewise, JSON that converts gives binary that converts to JSON and back to
//!   the same message.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use prost_reflect::MessageDescriptor;
use viv_proto::protobuf::{binary_to_json, json_to_binary, pool};

/// The input and output messages of every method of every service.
fn messages() -> &'static [MessageDescriptor] {
    static MESSAGES: OnceLock<Vec<MessageDescriptor>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        let mut all = Vec::new();
        for service in pool().services() {
            for method in service.methods() {
                all.push(method.input());
                all.push(method.output());
            }
        }
        all
    })
}

fn value(json: &[u8]) -> serde_json::Value {
    serde_json::from_slice(json).expect("the converter writes JSON")
}

// The first byte picks the message type (modulo their number), the second whether the rest is
// JSON (odd) or binary protobuf (even).
fuzz_target!(|data: &[u8]| {
    let [message, json, data @ ..] = data else { return };
    let json = json % 2 == 1;
    let messages = messages();
    let descriptor = &messages[usize::from(*message) % messages.len()];
    let binary = if json {
        match json_to_binary(descriptor, data) {
            Ok(binary) => binary,
            Err(_) => return,
        }
    } else {
        data.to_vec()
    };
    let Ok(json) = binary_to_json(descriptor, &binary) else {
        assert!(
            !json,
            "binary written by json_to_binary did not convert back: {binary:?}"
        );
        return;
    };
    let again = json_to_binary(descriptor, &json).expect("JSON written by binary_to_json converts back");
    let json_again = binary_to_json(descriptor, &again).expect("binary written by json_to_binary converts back");
    assert_eq!(value(&json), value(&json_again), "the message changed in a round trip");
});
