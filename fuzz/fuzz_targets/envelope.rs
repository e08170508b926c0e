//! Connect envelope codec (`viv_proto::envelope`), as the agent and the server read request and
//! answer streams from the other side.
//!
//! Checks, besides never panicking:
//! - arbitrary bytes pushed in arbitrary pieces decode to the same frames and the same error as
//!   the whole buffer pushed at once (split invariance), and re-encoding every decoded frame gives
//!   back exactly the bytes it was decoded from;
//! - `finish` fails exactly when bytes of an unfinished frame are left;
//! - frames encoded with `encode` decode to themselves (encode → decode = identity), however the
//!   encoded stream is cut;
//! - end-of-stream bodies never make the `EndOfStream` reader panic.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use viv_proto::envelope::{self, Decoder, EndOfStream, Frame};

/// Frames to encode, then decode from pieces of these sizes (cycled).
#[derive(Debug, Arbitrary)]
struct Frames {
    pieces: Vec<u8>,
    frames: Vec<(u8, Vec<u8>)>,
}

/// Decodes `bytes` pushed in pieces: the frames, and the error that stopped decoding, if any.
fn decode(bytes: &[u8], pieces: &[u8]) -> (Vec<Frame>, Option<envelope::EnvelopeError>, bool) {
    let mut decoder = Decoder::default();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut sizes = pieces.iter().map(|&p| usize::from(p) + 1).cycle();
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(err) => return (frames, Some(err), false),
            }
        }
        if at == bytes.len() {
            let finished = decoder.finish().is_ok();
            return (frames, None, finished);
        }
        let size = if pieces.is_empty() {
            bytes.len()
        } else {
            sizes.next().unwrap_or(1)
        };
        let end = (at + size).min(bytes.len());
        decoder.push(&bytes[at..end]);
        at = end;
    }
}

// The first byte chooses: even, then a byte for the size of the pieces and the bytes a peer
// sent; odd, frames built from the rest.
fuzz_target!(|data: &[u8]| {
    match data {
        [mode, piece, bytes @ ..] if mode % 2 == 0 => {
            let pieces = [*piece];
            let (whole, whole_err, whole_finished) = decode(bytes, &[]);
            let (split, split_err, split_finished) = decode(bytes, &pieces);
            assert_eq!(whole_err, split_err, "the error depends on how the bytes arrived");
            // An error is found at the header of the frame it is about, after every frame
            // before it, however the bytes arrived.
            assert_eq!(whole, split, "the frames depend on how the bytes arrived");
            assert_eq!(whole_finished, split_finished);
            let mut encoded = Vec::new();
            for frame in &whole {
                assert_eq!(frame.flags & envelope::FLAG_COMPRESSED, 0);
                assert!(frame.data.len() <= envelope::MAX_FRAME);
                encoded.extend_from_slice(&envelope::encode(frame.flags, &frame.data));
                if frame.is_end() {
                    let _ = serde_json::from_slice::<EndOfStream>(&frame.data);
                }
            }
            assert_eq!(encoded[..], bytes[..encoded.len()], "re-encoding changed the frames");
            if whole_err.is_none() {
                assert_eq!(whole_finished, encoded.len() == bytes.len());
            }
        }
        [_, rest @ ..] => {
            let Ok(Frames { frames, pieces }) = Frames::arbitrary_take_rest(Unstructured::new(rest)) else {
                return;
            };
            let frames: Vec<Frame> = frames
                .into_iter()
                .map(|(flags, data)| Frame {
                    flags: flags & !envelope::FLAG_COMPRESSED,
                    data: data.into(),
                })
                .collect();
            let mut wire = Vec::new();
            for frame in &frames {
                wire.extend_from_slice(&envelope::encode(frame.flags, &frame.data));
            }
            let (decoded, err, finished) = decode(&wire, &pieces);
            assert_eq!(err, None);
            assert!(finished);
            assert_eq!(decoded, frames);
        }
        [] => {}
    }
});
