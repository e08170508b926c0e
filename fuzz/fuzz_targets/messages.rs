//! The serde wire types of the envd services (`viv_proto::process`, `viv_proto::filesystem`,
//! the Connect error and end-of-stream bodies, `viv_proto::b64`): what the agent decodes from
//! clients' JSON requests and the server decodes from the agent's answers.
//!
//! Checks, besides never panicking: a message that decodes re-encodes to JSON that decodes to
//! the same value (decode → encode → decode = identity); base64 written in either alphabet,
//! padded or not, decodes to the bytes it was made from.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;
use serde::Serialize;
use viv_proto::{filesystem as fs, process as pr};

fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(json: &[u8]) {
    let Ok(message) = serde_json::from_slice::<T>(json) else {
        return;
    };
    let written = serde_json::to_vec(&message).expect("wire types serialize");
    let back: T = serde_json::from_slice(&written).unwrap_or_else(|e| {
        panic!(
            "{} written as {} does not decode: {e}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&written)
        )
    });
    assert_eq!(message, back);
}

// The first byte picks the message type (0 to 23; 24 and 25 are base64: the rest as bytes to
// encode, or as text to decode); the rest is its JSON.
fuzz_target!(|data: &[u8]| match data {
    [] => {}
    [kind, json @ ..] if kind % 26 < 24 => match kind % 26 {
        0 => round_trip::<pr::StartRequest>(json),
        1 => round_trip::<pr::SelectorRequest>(json),
        2 => round_trip::<pr::StreamInputRequest>(json),
        3 => round_trip::<pr::SendInputRequest>(json),
        4 => round_trip::<pr::SendSignalRequest>(json),
        5 => round_trip::<pr::UpdateRequest>(json),
        6 => round_trip::<pr::ProcessConfig>(json),
        7 => round_trip::<pr::ProcessInfo>(json),
        8 => round_trip::<pr::ListResponse>(json),
        9 => round_trip::<pr::StreamResponse>(json),
        10 => round_trip::<pr::ProcessEvent>(json),
        11 => round_trip::<pr::EndEvent>(json),
        12 => round_trip::<pr::Empty>(json),
        13 => round_trip::<fs::PathRequest>(json),
        14 => round_trip::<fs::MoveRequest>(json),
        15 => round_trip::<fs::ListDirRequest>(json),
        16 => round_trip::<fs::ListDirResponse>(json),
        17 => round_trip::<fs::EntryResponse>(json),
        18 => round_trip::<fs::EntryInfo>(json),
        19 => round_trip::<fs::WatchRequest>(json),
        20 => round_trip::<fs::WatcherId>(json),
        21 => round_trip::<fs::WatcherEvents>(json),
        22 => round_trip::<fs::WatchDirResponse>(json),
        _ => {
            round_trip::<viv_proto::ConnectError>(json);
            if let Ok(end) = serde_json::from_slice::<viv_proto::envelope::EndOfStream>(json) {
                let _ = end.error.map(|e| e.http_status());
            }
        }
    },
    [kind, bytes @ ..] if kind % 26 == 24 => {
        use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
        for engine in [&STANDARD, &STANDARD_NO_PAD, &URL_SAFE, &URL_SAFE_NO_PAD] {
            let text = engine.encode(bytes);
            assert_eq!(viv_proto::b64::decode(&text).as_deref(), Ok(bytes), "{text}");
        }
    }
    [_, text @ ..] => {
        if let Ok(bytes) = viv_proto::b64::decode(&String::from_utf8_lossy(text)) {
            let canonical = base64::engine::general_purpose::STANDARD.encode(&bytes);
            assert_eq!(viv_proto::b64::decode(&canonical).as_deref(), Ok(&bytes[..]));
        }
    }
});
