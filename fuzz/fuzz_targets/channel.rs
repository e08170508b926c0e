//! The agent channel's reset handshake (`viv_proto::channel`): `find_reset` on a buffer and the
//! `ResetScanner` the agent runs over every read of the virtio-serial port.
//!
//! A stream is built from pieces (arbitrary bytes, reset markers with the key, markers with
//! another key, cut markers) and read in reads of arbitrary sizes. A marker is any place where
//! `\0viv-reset\0KEY\0` is followed by 16 bytes and a `\0` (a naive search over the whole stream
//! finds them). Checks:
//! - `find_reset` on the whole stream finds the marker that starts last, with its nonce;
//! - for every read, the scanner reports exactly the marker that ends last within that read (so a
//!   marker split across any number of reads is found, in the read that completes it), with its
//!   nonce and the offset right after it; a read that completes no marker reports none, so a
//!   stream without markers passes through unchanged.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use viv_proto::channel::{find_reset, reset_marker, ResetScanner, NONCE_LEN, RESET_PREFIX};

#[derive(Debug, Arbitrary)]
enum Piece {
    Bytes(Vec<u8>),
    /// A marker with the stream's key and a nonce made of these bytes (hex, as hosts send).
    Marker([u8; 8]),
    /// A marker with arbitrary nonce bytes.
    RawMarker([u8; NONCE_LEN]),
    /// A marker with another key.
    OtherKey([u8; 8]),
    /// The first bytes of a marker.
    Cut(u8),
}

#[derive(Debug, Arbitrary)]
struct Input {
    key: String,
    pieces: Vec<Piece>,
    /// Sizes of the reads (cycled; 0 is an empty read).
    reads: Vec<u8>,
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Every marker in `stream`: (start, end, nonce), by start.
fn markers(stream: &[u8], key: &str) -> Vec<(usize, usize, Vec<u8>)> {
    let mut head = RESET_PREFIX.to_vec();
    head.extend_from_slice(key.as_bytes());
    head.push(0);
    let total = head.len() + NONCE_LEN + 1;
    (0..stream.len())
        .filter(|&s| s + total <= stream.len() && stream[s..].starts_with(&head) && stream[s + total - 1] == 0)
        .map(|s| {
            (
                s,
                s + total,
                stream[s + head.len()..s + head.len() + NONCE_LEN].to_vec(),
            )
        })
        .collect()
}

fuzz_target!(|input: Input| {
    let key = input.key;
    let other = format!("{key}x");
    let mut stream = Vec::new();
    for piece in input.pieces {
        match piece {
            Piece::Bytes(bytes) => stream.extend_from_slice(&bytes),
            Piece::Marker(nonce) => stream.extend(reset_marker(&key, &hex(&nonce))),
            Piece::RawMarker(nonce) => {
                let mut marker = reset_marker(&key, "");
                marker.pop();
                marker.extend_from_slice(&nonce);
                marker.push(0);
                stream.extend(marker);
            }
            Piece::OtherKey(nonce) => stream.extend(reset_marker(&other, &hex(&nonce))),
            Piece::Cut(len) => {
                let marker = reset_marker(&key, "0123456789abcdef");
                stream.extend_from_slice(&marker[..usize::from(len) % marker.len()]);
            }
        }
    }
    let all = markers(&stream, &key);

    let found = find_reset(&stream, &key);
    let last = all.last().map(|(start, end, nonce)| (*start, *end, nonce.clone()));
    assert_eq!(
        found.map(|f| (f.start, f.end, f.nonce)),
        last,
        "find_reset missed the last marker"
    );

    let mut scanner = ResetScanner::default();
    let mut sizes = input.reads.iter().map(|&r| usize::from(r)).cycle();
    let mut at = 0;
    let mut reads = 0;
    while at < stream.len() && reads < 100_000 {
        reads += 1;
        let size = if input.reads.iter().all(|&r| r == 0) {
            stream.len()
        } else {
            sizes.next().unwrap_or(1)
        };
        let end = (at + size).min(stream.len());
        let read = &stream[at..end];
        let reported = scanner.scan(&key, read);
        let expected = all.iter().filter(|(_, e, _)| *e > at && *e <= end).last();
        match (reported, expected) {
            (None, None) => {}
            (Some(reset), Some((_, e, nonce))) => {
                assert_eq!(&reset.nonce, nonce, "wrong nonce for the marker ending at {e}");
                assert_eq!(at + reset.after, *e, "the bytes after the marker start elsewhere");
            }
            (reported, expected) => {
                panic!("read {at}..{end}: reported {reported:?}, expected the marker {expected:?}")
            }
        }
        at = end;
    }
});
