//! A streaming reader for `multipart/form-data` upload bodies (RFC 7578, RFC 2046 §5.1).
//!
//! The agent reads uploads part by part without holding a whole part in memory. Every byte
//! comes from a client and is treated as hostile: the header block of a part is bounded
//! ([`MAX_HEADER_BYTES`]), the number of parts too ([`MAX_PARTS`]), and a body that ends before
//! the closing delimiter `--BOUNDARY--` is an error ([`MultipartError::Truncated`]), never a
//! shorter part. Part data is handed out only once it is known not to be the start of a
//! delimiter: the last `delimiter length - 1` bytes of the buffer stay behind until more data
//! or the delimiter arrives, so how the body is chunked never changes what is read.
//!
//! This replaces `multer`, whose 3.1 release reports a complete body as an "incomplete multipart
//! stream" when the whole body arrives (and ends) between its two first polls of the body
//! stream: with a multi-threaded runtime that happens when a small upload arrives in one piece
//! right after the request head (rwf2/multer#70).

use bytes::{Buf as _, Bytes, BytesMut};
use futures::{Stream, StreamExt as _};

/// Longest header block of one part.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// Most parts one body may carry.
pub const MAX_PARTS: usize = 1000;
/// Longest boundary RFC 2046 allows.
const MAX_BOUNDARY: usize = 70;

/// Why a multipart body was refused.
#[derive(Debug, thiserror::Error)]
pub enum MultipartError {
    /// The content type names no usable boundary.
    #[error("invalid multipart boundary: {0}")]
    Boundary(String),
    /// The body ended before its closing delimiter.
    #[error("the multipart body ended early: {0}")]
    Truncated(&'static str),
    /// The body does not follow the multipart syntax.
    #[error("malformed multipart body: {0}")]
    Malformed(String),
    /// Reading the body failed.
    #[error("reading the upload failed: {0}")]
    Read(std::io::Error),
}

/// The headers of one part that matter for an upload.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Part {
    /// The form field name (`name=`).
    pub name: Option<String>,
    /// The file name (`filename=`).
    pub file_name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Before the first delimiter (a preamble is skipped).
    Preamble,
    /// Right after a delimiter: `--` ends the body, otherwise padding and CRLF start a part.
    AfterDelimiter,
    /// In a part's data.
    Data,
    /// After the closing delimiter.
    Done,
}

/// A multipart body being read.
pub struct Multipart<S> {
    stream: S,
    /// `\r\n--BOUNDARY`: what ends every part's data.
    delimiter: Vec<u8>,
    buf: BytesMut,
    state: State,
    eof: bool,
    parts: usize,
}

/// The boundary parameter of a `multipart/form-data` content type.
pub fn boundary(content_type: &str) -> Result<String, MultipartError> {
    let mut params = content_type.split(';');
    let essence = params.next().unwrap_or_default().trim();
    if !essence.eq_ignore_ascii_case("multipart/form-data") {
        return Err(MultipartError::Boundary(format!(
            "{essence} is not multipart/form-data"
        )));
    }
    for param in params {
        let Some((key, value)) = param.split_once('=') else {
            continue;
        };
        if !key.trim().eq_ignore_ascii_case("boundary") {
            continue;
        }
        let value = value.trim();
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        if value.is_empty() || value.len() > MAX_BOUNDARY || value.bytes().any(|b| b == b'\r' || b == b'\n') {
            return Err(MultipartError::Boundary(format!("{value:?}")));
        }
        return Ok(value.to_owned());
    }
    Err(MultipartError::Boundary("the content type has no boundary".into()))
}

impl<S> Multipart<S>
where
    S: Stream<Item = Result<Bytes, std::io::Error>> + Unpin,
{
    /// Reads `stream` as a multipart body with `boundary`.
    pub fn new(stream: S, boundary: &str) -> Self {
        let mut delimiter = b"\r\n--".to_vec();
        delimiter.extend_from_slice(boundary.as_bytes());
        Self {
            stream,
            delimiter,
            buf: BytesMut::new(),
            state: State::Preamble,
            eof: false,
            parts: 0,
        }
    }

    /// Reads more of the body into the buffer; false at its end.
    async fn fill(&mut self) -> Result<bool, MultipartError> {
        if self.eof {
            return Ok(false);
        }
        loop {
            match self.stream.next().await {
                Some(Ok(chunk)) if chunk.is_empty() => continue,
                Some(Ok(chunk)) => {
                    self.buf.extend_from_slice(&chunk);
                    return Ok(true);
                }
                Some(Err(err)) => return Err(MultipartError::Read(err)),
                None => {
                    self.eof = true;
                    return Ok(false);
                }
            }
        }
    }

    /// Fills until the buffer holds at least `n` bytes; false if the body ends first.
    async fn fill_to(&mut self, n: usize) -> Result<bool, MultipartError> {
        while self.buf.len() < n {
            if !self.fill().await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The next part, skipping whatever is left of the current one; `None` after the closing
    /// delimiter.
    pub async fn next_part(&mut self) -> Result<Option<Part>, MultipartError> {
        while self.state == State::Data {
            self.next_chunk().await?;
        }
        if self.state == State::Preamble {
            self.skip_preamble().await?;
        }
        if self.state == State::Done {
            return Ok(None);
        }
        // After a delimiter: `--` closes the body, else optional padding and CRLF.
        if !self.fill_to(2).await? {
            return Err(MultipartError::Truncated("no line end after a delimiter"));
        }
        if self.buf.starts_with(b"--") {
            self.buf.advance(2);
            self.state = State::Done;
            return Ok(None);
        }
        loop {
            let padding = self.buf.iter().take_while(|b| **b == b' ' || **b == b'\t').count();
            self.buf.advance(padding);
            if padding > 0 && self.buf.len() < 2 {
                if !self.fill_to(2).await? {
                    return Err(MultipartError::Truncated("no line end after a delimiter"));
                }
                continue;
            }
            break;
        }
        if !self.fill_to(2).await? {
            return Err(MultipartError::Truncated("no line end after a delimiter"));
        }
        if !self.buf.starts_with(b"\r\n") {
            return Err(MultipartError::Malformed(
                "a delimiter is followed by something other than a line end".into(),
            ));
        }
        self.buf.advance(2);
        self.parts += 1;
        if self.parts > MAX_PARTS {
            return Err(MultipartError::Malformed(format!("more than {MAX_PARTS} parts")));
        }
        let part = self.read_headers().await?;
        self.state = State::Data;
        Ok(Some(part))
    }

    /// Skips everything up to and including the first delimiter (which may open the body
    /// without the CRLF that precedes later ones).
    async fn skip_preamble(&mut self) -> Result<(), MultipartError> {
        let first = self.delimiter[2..].to_vec();
        let first = first.as_slice();
        loop {
            if self.buf.len() >= first.len() && self.buf.starts_with(first) {
                self.buf.advance(first.len());
                self.state = State::AfterDelimiter;
                return Ok(());
            }
            if let Some(at) = memchr::memmem::find(&self.buf, &self.delimiter) {
                self.buf.advance(at + self.delimiter.len());
                self.state = State::AfterDelimiter;
                return Ok(());
            }
            // Only the end of the buffer may still become a delimiter; the start may still be
            // the opening one while it is shorter than that.
            let could_open = self.buf.len() < first.len() && first.starts_with(&self.buf);
            if !could_open {
                let keep = self.buf.len().min(self.delimiter.len() - 1);
                let drop = self.buf.len() - keep;
                self.buf.advance(drop);
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated("no multipart delimiter in the body"));
            }
        }
    }

    /// Reads a part's header block (up to the empty line) and picks out its disposition.
    async fn read_headers(&mut self) -> Result<Part, MultipartError> {
        let end = loop {
            if self.buf.starts_with(b"\r\n") {
                break 0;
            }
            if let Some(at) = memchr::memmem::find(&self.buf, b"\r\n\r\n") {
                break at + 2;
            }
            if self.buf.len() > MAX_HEADER_BYTES {
                return Err(MultipartError::Malformed(format!(
                    "a part's headers are longer than {MAX_HEADER_BYTES} bytes"
                )));
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated("inside a part's headers"));
            }
        };
        if end > MAX_HEADER_BYTES {
            return Err(MultipartError::Malformed(format!(
                "a part's headers are longer than {MAX_HEADER_BYTES} bytes"
            )));
        }
        let block = self.buf.split_to(end);
        self.buf.advance(2);
        let mut part = Part::default();
        for line in block[..].split(|b| *b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() {
                continue;
            }
            let line = std::str::from_utf8(line)
                .map_err(|_| MultipartError::Malformed("a part header is not UTF-8".into()))?;
            let Some((name, value)) = line.split_once(':') else {
                return Err(MultipartError::Malformed(format!(
                    "a part header without a colon: {line:?}"
                )));
            };
            if name.trim().eq_ignore_ascii_case("content-disposition") {
                part = disposition(value)?;
            }
        }
        Ok(part)
    }

    /// The next piece of the current part's data; `None` at the part's end.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, MultipartError> {
        if self.state != State::Data {
            return Ok(None);
        }
        loop {
            if let Some(at) = memchr::memmem::find(&self.buf, &self.delimiter) {
                if at > 0 {
                    return Ok(Some(self.buf.split_to(at).freeze()));
                }
                self.buf.advance(self.delimiter.len());
                self.state = State::AfterDelimiter;
                return Ok(None);
            }
            // No delimiter yet: everything but a possible delimiter start is data.
            let keep = self.buf.len().min(self.delimiter.len() - 1);
            let ready = self.buf.len() - keep;
            if ready > 0 {
                return Ok(Some(self.buf.split_to(ready).freeze()));
            }
            if !self.fill().await? {
                return Err(MultipartError::Truncated("inside a part, before its closing delimiter"));
            }
        }
    }

    /// Reads the rest of the body after the closing delimiter (the epilogue, ignored), so that
    /// the whole body has been received and its length can be checked.
    pub async fn finish(&mut self) -> Result<(), MultipartError> {
        if self.state != State::Done {
            return Err(MultipartError::Malformed("the body is not complete".into()));
        }
        self.buf.clear();
        while self.fill().await? {
            self.buf.clear();
        }
        Ok(())
    }
}

/// Parses a `Content-Disposition` value: `form-data; name="file"; filename="a.txt"`.
fn disposition(value: &str) -> Result<Part, MultipartError> {
    let mut part = Part::default();
    let mut rest = value.trim();
    // The disposition type.
    let end = rest.find(';').unwrap_or(rest.len());
    rest = &rest[end..];
    while let Some(after) = rest.strip_prefix(';') {
        let after = after.trim_start();
        let eq = after
            .find('=')
            .ok_or_else(|| MultipartError::Malformed(format!("a disposition parameter without a value: {value:?}")))?;
        let key = after[..eq].trim().to_ascii_lowercase();
        let raw = after[eq + 1..].trim_start();
        let (param, remaining) = if let Some(quoted) = raw.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = quoted.char_indices();
            let mut close = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => match chars.next() {
                        Some((_, escaped)) => out.push(escaped),
                        None => break,
                    },
                    '"' => {
                        close = Some(i);
                        break;
                    }
                    c => out.push(c),
                }
            }
            let close = close.ok_or_else(|| MultipartError::Malformed(format!("an unclosed quote in {value:?}")))?;
            (out, quoted[close + 1..].trim_start())
        } else {
            let end = raw.find(';').unwrap_or(raw.len());
            (raw[..end].trim().to_owned(), &raw[end..])
        };
        match key.as_str() {
            "name" => part.name = Some(param),
            "filename" => part.file_name = Some(param),
            _ => {}
        }
        rest = remaining;
        if !rest.is_empty() && !rest.starts_with(';') {
            return Err(MultipartError::Malformed(format!("unexpected text in {value:?}")));
        }
    }
    Ok(part)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    const B: &str = "9f54f08e5b7584075600153ef5fe46c5";

    fn form(parts: &[(&str, &[u8])]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, data) in parts {
            body.extend_from_slice(format!("--{B}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
            body.extend_from_slice(data);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{B}--\r\n").as_bytes());
        body
    }

    /// A body stream that yields `chunks`, returning Pending (and waking itself) before the
    /// chunks `pending` marks, the way a body arriving over a connection does.
    struct Chunks {
        chunks: Vec<Bytes>,
        pending: Vec<bool>,
        next: usize,
        waited: bool,
    }

    impl Stream for Chunks {
        type Item = Result<Bytes, std::io::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let i = self.next;
            if self.pending.get(i).copied().unwrap_or(false) && !self.waited {
                self.waited = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.waited = false;
            if i >= self.chunks.len() {
                return Poll::Ready(None);
            }
            self.next += 1;
            Poll::Ready(Some(Ok(self.chunks[i].clone())))
        }
    }

    fn split(body: &[u8], cuts: &[usize]) -> Vec<Bytes> {
        let mut out = Vec::new();
        let mut at = 0;
        for &cut in cuts {
            out.push(Bytes::copy_from_slice(&body[at..cut]));
            at = cut;
        }
        out.push(Bytes::copy_from_slice(&body[at..]));
        out
    }

    async fn read_all(chunks: Vec<Bytes>, pending: Vec<bool>) -> Result<Vec<(Part, Vec<u8>)>, MultipartError> {
        let stream = Chunks {
            chunks,
            pending,
            next: 0,
            waited: false,
        };
        let mut form = Multipart::new(stream, B);
        let mut parts = Vec::new();
        while let Some(part) = form.next_part().await? {
            let mut data = Vec::new();
            while let Some(chunk) = form.next_chunk().await? {
                assert!(!chunk.is_empty());
                data.extend_from_slice(&chunk);
            }
            parts.push((part, data));
        }
        form.finish().await?;
        Ok(parts)
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_body_that_arrives_whole_after_a_pending_poll_is_read() {
        // What multer 3.1 got wrong: nothing at first, then the whole body and its end at once.
        let body = form(&[("a.txt", b"still here")]);
        let parts = block_on(read_all(vec![Bytes::from(body)], vec![true, false])).unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!(parts[0].0.file_name.as_deref(), Some("a.txt"));
        assert_eq!(parts[0].1, b"still here");
    }

    #[test]
    fn every_split_and_pending_pattern_reads_the_same_parts() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 13) as u8).collect();
        // Data that holds delimiter look-alikes: CRLF, "--" and a prefix of the boundary.
        let mut tricky = b"\r\n--9f54\r\n-".to_vec();
        tricky.extend_from_slice(&data);
        tricky.extend_from_slice(b"\r\n--9f54f08e5b75840756\r");
        let body = form(&[("one", &tricky), ("two", b""), ("three", &data[..17])]);
        for cut in 0..=body.len() {
            for second in [cut, (cut + 1).min(body.len()), (cut + 37).min(body.len())] {
                for pending in [
                    [false, false, false, false],
                    [true, false, true, false],
                    [true, true, true, true],
                ] {
                    let chunks = split(&body, &[cut, second]);
                    let parts = block_on(read_all(chunks, pending.to_vec()))
                        .unwrap_or_else(|e| panic!("cut {cut}/{second} {pending:?}: {e}"));
                    let names: Vec<_> = parts.iter().map(|(p, _)| p.file_name.clone().unwrap()).collect();
                    assert_eq!(names, ["one", "two", "three"]);
                    assert_eq!(parts[0].1, tricky, "cut {cut}/{second}");
                    assert!(parts[1].1.is_empty());
                    assert_eq!(parts[2].1, &data[..17]);
                }
            }
        }
    }

    #[test]
    fn one_byte_at_a_time() {
        let body = form(&[("x", b"0123456789\r\n--")]);
        let chunks: Vec<Bytes> = body.iter().map(|b| Bytes::copy_from_slice(&[*b])).collect();
        let pending = vec![true; chunks.len() + 1];
        let parts = block_on(read_all(chunks, pending)).unwrap();
        assert_eq!(parts[0].1, b"0123456789\r\n--");
    }

    #[test]
    fn a_body_cut_anywhere_is_an_error_never_a_shorter_part() {
        let body = form(&[("a.bin", &[7u8; 200])]);
        // The closing delimiter ends at len - 2 (the final CRLF is optional).
        for len in 0..body.len() - 2 {
            let result = block_on(read_all(vec![Bytes::copy_from_slice(&body[..len])], vec![false]));
            assert!(
                matches!(result, Err(MultipartError::Truncated(_))),
                "cut at {len}: {result:?}"
            );
        }
        assert!(block_on(read_all(
            vec![Bytes::copy_from_slice(&body[..body.len() - 2])],
            vec![false]
        ))
        .is_ok());
    }

    #[test]
    fn preamble_padding_and_epilogue_are_allowed() {
        let body = format!("preamble\r\n--{B}  \t\r\nContent-Disposition: form-data; name=f; filename=\"q\\\"uote\"\r\n\r\nhi\r\n--{B}--\r\nepilogue");
        let parts = block_on(read_all(vec![Bytes::from(body)], vec![false])).unwrap();
        assert_eq!(parts[0].0.name.as_deref(), Some("f"));
        assert_eq!(parts[0].0.file_name.as_deref(), Some("q\"uote"));
        assert_eq!(parts[0].1, b"hi");
    }

    #[test]
    fn hostile_bodies_get_errors() {
        let cases: Vec<Vec<u8>> = vec![
            b"no delimiter at all".to_vec(),
            format!("--{B}garbage\r\n\r\nx\r\n--{B}--").into_bytes(),
            format!("--{B}\r\nContent-Disposition form-data\r\n\r\nx\r\n--{B}--").into_bytes(),
            format!("--{B}\r\nContent-Disposition: form-data; name=\"open\r\n\r\nx\r\n--{B}--").into_bytes(),
            format!("--{B}\r\nX: {}\r\n\r\nx\r\n--{B}--", "y".repeat(MAX_HEADER_BYTES)).into_bytes(),
            format!("--{B}\r\n{}", "z".repeat(3 * MAX_HEADER_BYTES)).into_bytes(),
        ];
        for body in cases {
            let result = block_on(read_all(vec![Bytes::from(body.clone())], vec![false]));
            assert!(
                result.is_err(),
                "{:?}",
                String::from_utf8_lossy(&body[..body.len().min(80)])
            );
        }
        let many = format!("--{B}\r\n\r\n\r\n").repeat(MAX_PARTS + 1) + &format!("--{B}--");
        assert!(matches!(
            block_on(read_all(vec![Bytes::from(many)], vec![false])),
            Err(MultipartError::Malformed(_))
        ));
    }

    #[test]
    fn boundaries_come_from_the_content_type() {
        assert_eq!(boundary("multipart/form-data; boundary=abc").unwrap(), "abc");
        assert_eq!(
            boundary("Multipart/Form-Data; charset=x; BOUNDARY=\"a b\"").unwrap(),
            "a b"
        );
        assert!(boundary("multipart/form-data").is_err());
        assert!(boundary("multipart/form-data; boundary=").is_err());
        assert!(boundary(&format!("multipart/form-data; boundary={}", "x".repeat(71))).is_err());
        assert!(boundary("text/plain; boundary=abc").is_err());
    }
}
