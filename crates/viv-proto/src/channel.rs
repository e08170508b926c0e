//! The reset handshake that starts every host connection on the agent channel.
//!
//! The virtio-serial port is one byte stream that outlives connections, snapshots and restores:
//! a restored guest may still hold bytes of the connection that was open when it was saved, and
//! may not have noticed that its host changed. So each new host connection starts with a reset
//! marker, `\0viv-reset\0<key>\0<nonce>\0`, which the agent looks for in everything it reads, even
//! in the middle of a session. On seeing it the agent drops the session and every byte still
//! queued for the old host, and answers `\0viv-ready\0<nonce>\0`; the host discards what it reads
//! before that answer, then speaks HTTP/2. The key (set by the host at `/init`, empty before)
//! keeps data a user sends through the channel, such as an uploaded file, from ever looking like
//! a reset; the nonce keeps stale bytes from looking like the answer.

/// Start of the host's reset marker.
pub const RESET_PREFIX: &[u8] = b"\0viv-reset\0";
/// Start of the agent's answer.
pub const READY_PREFIX: &[u8] = b"\0viv-ready\0";
/// Length of a nonce (hex digits).
pub const NONCE_LEN: usize = 16;

/// The marker a host sends to open a connection.
pub fn reset_marker(key: &str, nonce: &str) -> Vec<u8> {
    let mut marker = RESET_PREFIX.to_vec();
    marker.extend_from_slice(key.as_bytes());
    marker.push(0);
    marker.extend_from_slice(nonce.as_bytes());
    marker.push(0);
    marker
}

/// The agent's answer to a reset with `nonce`.
pub fn ready_marker(nonce: &[u8]) -> Vec<u8> {
    let mut marker = READY_PREFIX.to_vec();
    marker.extend_from_slice(nonce);
    marker.push(0);
    marker
}

/// A reset marker found in a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundReset {
    /// Where the marker starts.
    pub start: usize,
    /// Where the bytes after it start.
    pub end: usize,
    /// The host's nonce.
    pub nonce: Vec<u8>,
}

/// Finds the last complete reset marker for `key` in `data`.
pub fn find_reset(data: &[u8], key: &str) -> Option<FoundReset> {
    let mut head = RESET_PREFIX.to_vec();
    head.extend_from_slice(key.as_bytes());
    head.push(0);
    let total = head.len() + NONCE_LEN + 1;
    let finder = memchr::memmem::FinderRev::new(&head);
    let mut within = data.len();
    while let Some(start) = finder.rfind(&data[..within]) {
        if start + total <= data.len() && data[start + total - 1] == 0 {
            return Some(FoundReset {
                start,
                end: start + total,
                nonce: data[start + head.len()..start + head.len() + NONCE_LEN].to_vec(),
            });
        }
        within = start + head.len() - 1;
    }
    None
}

/// Longest marker for `key`: how many trailing bytes to keep when a marker may span reads.
pub fn reset_len(key: &str) -> usize {
    RESET_PREFIX.len() + key.len() + 1 + NONCE_LEN + 1
}

/// A reset marker completed by one read of a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reset {
    /// The host's nonce.
    pub nonce: Vec<u8>,
    /// Where, in that read, the bytes after the marker start.
    pub after: usize,
}

/// Finds reset markers in a stream that arrives in reads of any size: a marker may span any
/// number of reads. Each read reports the last marker that ends in it.
#[derive(Debug, Default)]
pub struct ResetScanner {
    /// The key the tail was scanned for.
    key: String,
    /// The stream's last `reset_len(key) - 1` bytes (fewer at its start): the part of a marker
    /// that the next read may complete.
    tail: Vec<u8>,
}

impl ResetScanner {
    /// Scans the next read of the stream for markers carrying `key`. When the key changes, bytes
    /// read before are not searched for markers with the new key.
    pub fn scan(&mut self, key: &str, data: &[u8]) -> Option<Reset> {
        if self.key != key {
            self.key = key.to_owned();
            self.tail.clear();
        }
        let keep = reset_len(key) - 1;
        // A marker within this read, else one that started in earlier reads and ends in its
        // first `keep` bytes; a marker that ended before this read was reported then.
        let found = find_reset(data, key)
            .map(|f| Reset {
                nonce: f.nonce,
                after: f.end,
            })
            .or_else(|| {
                let carried = self.tail.len();
                let mut seam = self.tail.clone();
                seam.extend_from_slice(&data[..data.len().min(keep)]);
                find_reset(&seam, key).filter(|f| f.end > carried).map(|f| Reset {
                    nonce: f.nonce,
                    after: f.end - carried,
                })
            });
        if data.len() >= keep {
            self.tail.clear();
            self.tail.extend_from_slice(&data[data.len() - keep..]);
        } else {
            self.tail.extend_from_slice(data);
            let excess = self.tail.len().saturating_sub(keep);
            self.tail.drain(..excess);
        }
        found
    }

    /// Forgets the stream read so far (the host hung up).
    pub fn clear(&mut self) {
        self.tail.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reset_is_found_only_with_its_key() {
        let mut data = b"stale bytes".to_vec();
        data.extend(reset_marker("k1", "0123456789abcdef"));
        data.extend(b"PRI * HTTP/2.0");
        let found = find_reset(&data, "k1").unwrap();
        assert_eq!(found.nonce, b"0123456789abcdef");
        assert_eq!(&data[found.end..], b"PRI * HTTP/2.0");
        assert_eq!(found.start, 11);
        assert!(find_reset(&data, "k2").is_none());
        assert!(
            find_reset(&data[..data.len() - 20], "k1").is_none(),
            "a cut marker is not a reset"
        );
    }

    /// Found by the `channel` fuzz target: a marker arriving in reads shorter than itself, after
    /// the start of a cut one, was missed (the scanner kept only the previous read's bytes).
    #[test]
    fn a_marker_split_across_many_reads_is_found() {
        let marker = reset_marker("", "3dc2c3ff029f10ff");
        let mut stream = marker[..23].to_vec();
        stream.extend_from_slice(&marker);
        let mut scanner = ResetScanner::default();
        let mut found = Vec::new();
        for (i, read) in stream.chunks(4).enumerate() {
            if let Some(reset) = scanner.scan("", read) {
                found.push((i * 4 + reset.after, reset.nonce));
            }
        }
        assert_eq!(found, vec![(stream.len(), b"3dc2c3ff029f10ff".to_vec())]);
    }

    #[test]
    fn a_stream_without_markers_reports_none_and_markers_are_reported_once() {
        let mut scanner = ResetScanner::default();
        let marker = reset_marker("key", "0123456789abcdef");
        let mut stream = b"PRI * HTTP/2.0 \0viv-reset\0key\0".to_vec();
        stream.extend_from_slice(&marker);
        stream.extend_from_slice(b"after");
        let mut resets = 0;
        for byte in &stream {
            if let Some(reset) = scanner.scan("key", std::slice::from_ref(byte)) {
                assert_eq!(reset.after, 1);
                resets += 1;
            }
        }
        assert_eq!(resets, 1);
        // Once found, the marker's bytes kept for the next read do not count again.
        assert_eq!(scanner.scan("key", b""), None);
        assert_eq!(scanner.scan("key", b"more"), None);
    }
}
