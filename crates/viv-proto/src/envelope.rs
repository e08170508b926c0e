//! Connect streaming envelopes: a flags byte, a 4-byte big-endian length, then the message.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Flag bit of a compressed message (Vivarium never compresses, and rejects such frames).
pub const FLAG_COMPRESSED: u8 = 0x01;
/// Flag bit of the end-of-stream message, which carries an optional error and trailers.
pub const FLAG_END_STREAM: u8 = 0x02;

/// Largest message accepted in one frame.
pub const MAX_FRAME: usize = 64 << 20;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The flags byte.
    pub flags: u8,
    /// The message bytes.
    pub data: Bytes,
}

impl Frame {
    /// Whether this is the end-of-stream frame.
    pub fn is_end(&self) -> bool {
        self.flags & FLAG_END_STREAM != 0
    }
}

/// Why a byte stream is not a valid sequence of envelopes.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    /// The frame announces more bytes than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    /// The frame is compressed, which this implementation does not negotiate.
    #[error("compressed frames are not supported")]
    Compressed,
    /// The stream ended inside a frame.
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Encodes one frame.
pub fn encode(flags: u8, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + data.len());
    out.put_u8(flags);
    out.put_u32(u32::try_from(data.len()).expect("frame length fits u32"));
    out.put_slice(data);
    out.freeze()
}

/// Encodes a JSON message frame.
pub fn encode_json<T: serde::Serialize>(message: &T) -> Bytes {
    encode(0, &serde_json::to_vec(message).expect("wire types serialize"))
}

/// Encodes the end-of-stream frame, with an error if the stream failed.
pub fn encode_end(error: Option<&crate::ConnectError>) -> Bytes {
    let body = match error {
        Some(err) => serde_json::json!({ "error": err }),
        None => serde_json::json!({}),
    };
    encode(FLAG_END_STREAM, body.to_string().as_bytes())
}

/// Incremental decoder: push bytes as they arrive, pop whole frames.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
}

impl Decoder {
    /// Appends received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Returns the next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, EnvelopeError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if len > MAX_FRAME {
            return Err(EnvelopeError::TooLarge(len));
        }
        if flags & FLAG_COMPRESSED != 0 {
            return Err(EnvelopeError::Compressed);
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        self.buf.advance(5);
        let data = self.buf.split_to(len).freeze();
        Ok(Some(Frame { flags, data }))
    }

    /// Checks that no partial frame is left once the stream has ended.
    pub fn finish(&self) -> Result<(), EnvelopeError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(EnvelopeError::Truncated)
        }
    }
}

/// The end-of-stream message body.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EndOfStream {
    /// The error that ended the stream, if any.
    #[serde(default)]
    pub error: Option<crate::ConnectError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_frames_split_at_every_byte() {
        let mut wire = Vec::new();
        wire.extend_from_slice(&encode(0, b"hello"));
        wire.extend_from_slice(&encode(0, b""));
        wire.extend_from_slice(&encode_end(None));
        let mut decoder = Decoder::default();
        let mut frames = Vec::new();
        for byte in wire {
            decoder.push(&[byte]);
            while let Some(frame) = decoder.next_frame().unwrap() {
                frames.push(frame);
            }
        }
        decoder.finish().unwrap();
        assert_eq!(frames.len(), 3);
        assert_eq!(&frames[0].data[..], b"hello");
        assert!(frames[1].data.is_empty());
        assert!(frames[2].is_end());
    }

    #[test]
    fn rejects_oversized_and_compressed_frames() {
        let mut decoder = Decoder::default();
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(decoder.next_frame(), Err(EnvelopeError::TooLarge(0xffff_ffff)));
        let mut decoder = Decoder::default();
        decoder.push(&encode(FLAG_COMPRESSED, b"x"));
        assert_eq!(decoder.next_frame(), Err(EnvelopeError::Compressed));
    }

    #[test]
    fn reports_truncated_stream() {
        let mut decoder = Decoder::default();
        decoder.push(&encode(0, b"hello")[..4]);
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Err(EnvelopeError::Truncated));
    }
}
