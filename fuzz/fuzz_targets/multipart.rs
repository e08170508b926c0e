//! The agent's upload route (`POST /files`, `viv-agent`'s `files::upload` behind the agent's real
//! router): multipart bodies (our streaming parser, `multipart.rs`), raw and gzip-encoded bodies,
//! with fuzzed boundaries and content types, arriving in pieces of a fuzzed size.
//!
//! Every upload targets a file in a scratch directory (`?path=`; a part's own file name is never
//! used, so nothing is written outside it). Checks, besides never panicking:
//! - no upload, accepted or rejected, leaves a temporary file behind;
//! - a rejected upload leaves no file at the target (it did not exist before);
//! - an accepted upload reports the files it wrote, and the target exists exactly when it did;
//! - a well-formed form (built from parts) is accepted and the file holds the last part's bytes;
//!   the same form cut anywhere before its closing boundary is rejected;
//! - a raw body is stored as sent; a gzip body built from bytes is stored as those bytes, and cut
//!   short it is rejected.
#![no_main]

use std::convert::Infallible;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::Router;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt as _;
use viv_agent::fuzzing::is_upload_temp;

/// A form built from parts.
#[derive(Debug, Arbitrary)]
struct Form {
    boundary: Vec<u8>,
    parts: Vec<Part>,
    /// Where to cut the body (a fraction of it), if at all.
    cut: Option<u16>,
}

#[derive(Debug, Arbitrary)]
struct Part {
    name: Vec<u8>,
    file_name: Option<Vec<u8>>,
    content_type: bool,
    content: Vec<u8>,
}

/// Content of a gzip upload, and where to cut the compressed body.
#[derive(Debug, Arbitrary)]
struct Gzip {
    content: Vec<u8>,
    cut: Option<u16>,
}

struct Fixture {
    runtime: tokio::runtime::Runtime,
    app: Router,
    dir: PathBuf,
    target: PathBuf,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("viv-fuzz-multipart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let target = dir.join("up").join("file.bin");
        let runtime = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let app = viv_agent::server::router(viv_agent::server::AgentState::new());
        Fixture {
            runtime,
            app,
            dir,
            target,
        }
    })
}

/// Every temporary upload file under `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(temp_files(&path));
        } else if is_upload_temp(&entry.file_name().to_string_lossy()) {
            found.push(path);
        }
    }
    found
}

/// Uploads `body` in pieces of `piece + 1` bytes; the status and the number of files reported.
fn upload(content_type: Option<&[u8]>, gzip: bool, body: Vec<u8>, piece: u8) -> (StatusCode, usize) {
    let fixture = fixture();
    let _ = std::fs::remove_file(&fixture.target);
    let uri = format!("/files?username=root&path={}", fixture.target.display());
    let mut request = Request::post(uri);
    if let Some(content_type) = content_type {
        let Ok(value) = header::HeaderValue::from_bytes(content_type) else {
            return (StatusCode::OK, usize::MAX);
        };
        request = request.header(header::CONTENT_TYPE, value);
    }
    if gzip {
        request = request.header(header::CONTENT_ENCODING, "gzip");
    }
    let chunks: Vec<Bytes> = body
        .chunks(usize::from(piece) + 1)
        .map(Bytes::copy_from_slice)
        .collect();
    let body = Body::from_stream(futures::stream::iter(chunks.into_iter().map(Ok::<_, Infallible>)));
    let request = request.body(body).expect("valid request");
    let (status, answer) = fixture.runtime.block_on(async {
        let response = fixture.app.clone().oneshot(request).await.expect("infallible");
        let status = response.status();
        (
            status,
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .expect("the answer reads"),
        )
    });
    let temps = temp_files(&fixture.dir);
    assert!(temps.is_empty(), "temporary files left behind: {temps:?}");
    let exists = fixture.target.exists();
    if status != StatusCode::OK {
        assert!(
            !exists,
            "a rejected upload ({status}) left {}",
            fixture.target.display()
        );
        return (status, 0);
    }
    let written: Vec<serde_json::Value> = serde_json::from_slice(&answer).expect("a list of written files");
    assert_eq!(
        exists,
        !written.is_empty(),
        "the answer does not tell what was written: {written:?}"
    );
    (status, written.len())
}

fn content() -> Vec<u8> {
    std::fs::read(&fixture().target).expect("the uploaded file")
}

/// Keeps bytes that may stand in a header line (no quotes, CR or LF).
fn header_safe(bytes: &[u8]) -> Vec<u8> {
    bytes
        .iter()
        .copied()
        .filter(|b| b.is_ascii_alphanumeric() || b"-_. ".contains(b))
        .collect()
}

fn form(form: Form, piece: u8) {
    // RFC 2046 boundaries: 1 to 70 characters.
    let mut boundary: Vec<u8> = header_safe(&form.boundary).into_iter().filter(|b| *b != b' ').collect();
    boundary.truncate(70);
    if boundary.is_empty() {
        boundary = b"b".to_vec();
    }
    let delimiter = [b"\r\n--".as_slice(), &boundary].concat();
    let mut body = Vec::new();
    for part in &form.parts {
        if part.content.windows(delimiter.len()).any(|w| w == delimiter) {
            return;
        }
        body.extend_from_slice(b"--");
        body.extend_from_slice(&boundary);
        body.extend_from_slice(b"\r\nContent-Disposition: form-data; name=\"");
        body.extend_from_slice(&header_safe(&part.name));
        body.push(b'"');
        if let Some(file_name) = &part.file_name {
            body.extend_from_slice(b"; filename=\"");
            body.extend_from_slice(&header_safe(file_name));
            body.push(b'"');
        }
        if part.content_type {
            body.extend_from_slice(b"\r\nContent-Type: application/octet-stream");
        }
        body.extend_from_slice(b"\r\n\r\n");
        body.extend_from_slice(&part.content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"--");
    body.extend_from_slice(&boundary);
    let closed = body.len();
    body.extend_from_slice(b"--\r\n");
    let content_type = [b"multipart/form-data; boundary=".as_slice(), &boundary].concat();
    match form.cut {
        Some(cut) => {
            // Anywhere before the closing boundary is complete.
            let at = usize::from(cut) * closed / 65536;
            body.truncate(at);
            let (status, _) = upload(Some(&content_type), false, body, piece);
            assert_ne!(
                status,
                StatusCode::OK,
                "a form cut at {at} of {closed} bytes was accepted"
            );
        }
        None => {
            let (status, written) = upload(Some(&content_type), false, body, piece);
            assert_eq!(status, StatusCode::OK);
            assert_eq!(written, form.parts.len());
            if let Some(last) = form.parts.last() {
                assert_eq!(content(), last.content);
            }
        }
    }
}

fn gzip(input: Gzip, piece: u8) {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(&input.content).expect("in memory");
    let mut body = encoder.finish().expect("in memory");
    let cut = input.cut.map(|cut| usize::from(cut) * body.len() / 65536);
    if let Some(at) = cut {
        body.truncate(at);
    }
    let (status, _) = upload(Some(b"application/octet-stream"), true, body, piece);
    match cut {
        Some(at) => assert_ne!(status, StatusCode::OK, "a gzip body cut at {at} was accepted"),
        None => {
            assert_eq!(status, StatusCode::OK);
            assert_eq!(content(), input.content);
        }
    }
}

// The first byte chooses what the rest is, the second how big the pieces of the body are:
// 0: a multipart body; the third byte is the length of the boundary that follows, then the body;
// 1: a content type header (up to the first NUL) and a body; 2: a raw body; 3: raw bytes sent as
// gzip; 4: a form built from parts; 5: a gzip body built from bytes.
fuzz_target!(|data: &[u8]| {
    let [mode, piece, rest @ ..] = data else { return };
    match mode % 6 {
        0 => {
            let [len, rest @ ..] = rest else { return };
            let (boundary, body) = rest.split_at(usize::from(*len).min(rest.len()));
            let content_type = [b"multipart/form-data; boundary=".as_slice(), boundary].concat();
            upload(Some(&content_type), false, body.to_vec(), *piece);
        }
        1 => {
            let (content_type, body) = rest.split_at(rest.iter().position(|b| *b == 0).unwrap_or(rest.len()));
            upload(
                Some(content_type),
                false,
                body.get(1..).unwrap_or_default().to_vec(),
                *piece,
            );
        }
        2 => {
            let (status, _) = upload(Some(b"application/octet-stream"), false, rest.to_vec(), *piece);
            assert_eq!(status, StatusCode::OK);
            assert_eq!(content(), rest);
        }
        3 => {
            upload(None, true, rest.to_vec(), *piece);
        }
        4 => {
            if let Ok(built) = Form::arbitrary_take_rest(Unstructured::new(rest)) {
                form(built, *piece);
            }
        }
        _ => {
            if let Ok(built) = Gzip::arbitrary_take_rest(Unstructured::new(rest)) {
                gzip(built, *piece);
            }
        }
    }
});
