//! File access: the `filesystem.Filesystem` service and the `/files` upload/download routes.
//!
//! Paths come from users and are resolved inside the guest only: relative paths start at the
//! acting user's home, `..` is resolved lexically and cannot climb above `/`. Every operation runs
//! with the acting user's file-system identity, so the kernel enforces permissions and new files
//! belong to that user.
//!
//! Uploads are all or nothing: a file reaches its target (by rename) only once the whole
//! request body arrived and checked out ([`CheckedBody`]); a cut or malformed body is a 400 and
//! leaves the target as it was and no temporary file.

use std::fs;
use std::io;
use std::path::{Component, Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use futures::StreamExt as _;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use viv_proto::filesystem::{
    EntryInfo, EntryResponse, FileType, ListDirRequest, ListDirResponse, MoveRequest, PathRequest,
};
use viv_proto::process::Empty;
use viv_proto::ConnectError;

pub use crate::entry::entry_info;
use crate::server::{connect_error, decode_request, json_error, unary_ok, AgentState};
use crate::users::User;

/// Part of the name of the temporary file an upload is written to before it is renamed into
/// place.
const UPLOAD_TEMP_MARK: &str = ".viv-upload-";

/// Whether a file name is that of an upload's temporary file.
pub fn is_upload_temp(name: &str) -> bool {
    name.starts_with('.') && name.contains(UPLOAD_TEMP_MARK)
}

/// Resolves a user-supplied path to an absolute, normalized guest path.
pub fn resolve_path(user: &User, path: &str) -> PathBuf {
    let home = Path::new(&user.home);
    let joined = if path.is_empty() || path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else {
        home.join(path)
    };
    let mut out = PathBuf::from("/");
    for part in joined.components() {
        match part {
            Component::Normal(name) => out.push(name),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// Runs a blocking file operation on a worker thread as `user`.
pub async fn as_user<T: Send + 'static>(
    user: &User,
    op: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let who = user.fs_identity();
    tokio::task::spawn_blocking(move || crate::sys::with_fs_identity(&who, op)?)
        .await
        .map_err(io::Error::other)?
}

fn io_to_connect(err: &io::Error, path: &Path) -> ConnectError {
    let code = match err.kind() {
        io::ErrorKind::NotFound => "not_found",
        io::ErrorKind::PermissionDenied => "permission_denied",
        io::ErrorKind::AlreadyExists => "already_exists",
        io::ErrorKind::InvalidInput | io::ErrorKind::NotADirectory | io::ErrorKind::IsADirectory => "invalid_argument",
        _ => "internal",
    };
    ConnectError::new(code, format!("{}: {err}", path.display()))
}

fn io_status(err: &io::Error) -> StatusCode {
    match err.kind() {
        io::ErrorKind::NotFound => StatusCode::NOT_FOUND,
        io::ErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        io::ErrorKind::IsADirectory
        | io::ErrorKind::NotADirectory
        | io::ErrorKind::InvalidInput
        // A body that failed its checks or a gzip stream that does not decode.
        | io::ErrorKind::InvalidData
        | io::ErrorKind::UnexpectedEof => StatusCode::BAD_REQUEST,
        io::ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Routes of the `filesystem.Filesystem` service.
pub fn rpc_routes() -> Router<AgentState> {
    let s = viv_proto::filesystem::SERVICE;
    Router::new()
        .route(&format!("{s}/Stat"), post(stat))
        .route(&format!("{s}/MakeDir"), post(make_dir))
        .route(&format!("{s}/Move"), post(move_entry))
        .route(&format!("{s}/ListDir"), post(list_dir))
        .route(&format!("{s}/Remove"), post(remove))
}

/// Decodes the request, resolves the acting user and runs `op` as that user.
async fn fs_call<Req, Resp>(
    state: &AgentState,
    headers: &HeaderMap,
    body: &Bytes,
    op: impl FnOnce(&User, Req) -> Result<Resp, ConnectError> + Send + 'static,
) -> Response
where
    Req: serde::de::DeserializeOwned + Send + 'static,
    Resp: serde::Serialize + Send + 'static,
{
    let prepared = decode_request::<Req>(headers, body).and_then(|req| Ok((state.request_user(headers, None)?, req)));
    let (user, req) = match prepared {
        Ok(v) => v,
        Err(err) => return connect_error(err),
    };
    let acting = user.clone();
    let result = as_user(&acting, move || Ok(op(&user, req))).await;
    match result {
        Ok(Ok(resp)) => unary_ok(&resp),
        Ok(Err(err)) => connect_error(err),
        Err(err) => connect_error(ConnectError::new("internal", err.to_string())),
    }
}

async fn stat(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    fs_call(&state, &headers, &body, |user, req: PathRequest| {
        let path = resolve_path(user, &req.path);
        let entry = entry_info(&path).map_err(|e| io_to_connect(&e, &path))?;
        Ok(EntryResponse { entry })
    })
    .await
}

async fn make_dir(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    fs_call(&state, &headers, &body, |user, req: PathRequest| {
        let path = resolve_path(user, &req.path);
        if path.is_dir() {
            return Err(ConnectError::new(
                "already_exists",
                format!("{} already exists", path.display()),
            ));
        }
        fs::create_dir_all(&path).map_err(|e| io_to_connect(&e, &path))?;
        let entry = entry_info(&path).map_err(|e| io_to_connect(&e, &path))?;
        Ok(EntryResponse { entry })
    })
    .await
}

async fn move_entry(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    fs_call(&state, &headers, &body, |user, req: MoveRequest| {
        let from = resolve_path(user, &req.source);
        let to = resolve_path(user, &req.destination);
        fs::symlink_metadata(&from).map_err(|e| io_to_connect(&e, &from))?;
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent).map_err(|e| io_to_connect(&e, parent))?;
        }
        fs::rename(&from, &to).map_err(|e| io_to_connect(&e, &to))?;
        let entry = entry_info(&to).map_err(|e| io_to_connect(&e, &to))?;
        Ok(EntryResponse { entry })
    })
    .await
}

async fn list_dir(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    fs_call(&state, &headers, &body, |user, req: ListDirRequest| {
        let root = resolve_path(user, &req.path);
        let meta = fs::metadata(&root).map_err(|e| io_to_connect(&e, &root))?;
        if !meta.is_dir() {
            return Err(ConnectError::new(
                "invalid_argument",
                format!("{} is not a directory", root.display()),
            ));
        }
        let mut entries = Vec::new();
        walk(&root, req.depth.max(1), &mut entries).map_err(|e| io_to_connect(&e, &root))?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(ListDirResponse { entries })
    })
    .await
}

fn walk(dir: &Path, depth: u32, out: &mut Vec<EntryInfo>) -> io::Result<()> {
    for item in fs::read_dir(dir)? {
        let path = item?.path();
        let Ok(entry) = entry_info(&path) else {
            continue;
        };
        let descend = depth > 1 && entry.file_type == FileType::Directory && !entry.is_symlink;
        out.push(entry);
        if descend {
            // Unreadable subdirectories are listed but not entered.
            let _ = walk(&path, depth - 1, out);
        }
    }
    Ok(())
}

async fn remove(State(state): State<AgentState>, headers: HeaderMap, body: Bytes) -> Response {
    fs_call(&state, &headers, &body, |user, req: PathRequest| {
        let path = resolve_path(user, &req.path);
        if path == Path::new("/") {
            return Err(ConnectError::new("invalid_argument", "refusing to remove /"));
        }
        // As envd (Go's RemoveAll): a path that is already gone is removed.
        let meta = match fs::symlink_metadata(&path) {
            Ok(meta) => meta,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Empty {}),
            Err(err) => return Err(io_to_connect(&err, &path)),
        };
        let result = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match result {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(io_to_connect(&err, &path)),
            _ => {}
        }
        Ok(Empty {})
    })
    .await
}

/// Query of `/files`.
#[derive(Debug, Deserialize)]
pub struct FileQuery {
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    username: Option<String>,
}

/// `GET /files?path=`: the file's bytes.
pub async fn download(State(state): State<AgentState>, headers: HeaderMap, Query(q): Query<FileQuery>) -> Response {
    let user = match state.request_user(&headers, q.username.as_deref()) {
        Ok(user) => user,
        Err(err) => return json_error(StatusCode::BAD_REQUEST, err.message),
    };
    let Some(raw) = q.path.filter(|p| !p.is_empty()) else {
        return json_error(StatusCode::BAD_REQUEST, "the path query parameter is required");
    };
    let path = resolve_path(&user, &raw);
    let opened = {
        let path = path.clone();
        as_user(&user, move || {
            let file = fs::File::open(&path)?;
            let meta = file.metadata()?;
            if meta.is_dir() {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
            }
            let sized = meta.is_file() && !on_pseudo_fs(&file);
            Ok((file, sized.then_some(meta.len())))
        })
        .await
    };
    match opened {
        Ok((file, len)) => {
            use tokio::io::AsyncReadExt as _;
            // A regular file is sent as long as it was when opened (a file that grows meanwhile
            // is cut there, so the body always matches its Content-Length); procfs, sysfs and
            // device files, whose size says nothing, are read to their end.
            let reader = tokio::fs::File::from_std(file).take(len.unwrap_or(u64::MAX));
            let stream = tokio_util::io::ReaderStream::with_capacity(reader, 256 * 1024);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let mut response = Response::builder().header(header::CONTENT_TYPE, "application/octet-stream");
            if let Some(len) = len {
                response = response.header(header::CONTENT_LENGTH, len);
            }
            response
                .header(header::CONTENT_DISPOSITION, content_disposition(&name))
                .body(Body::from_stream(stream))
                .unwrap_or_else(|e| {
                    json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("building the response: {e}"))
                })
        }
        Err(err) => json_error(io_status(&err), format!("{}: {err}", path.display())),
    }
}

/// `Content-Disposition` for a file named `name`, whatever bytes the name holds (a file name may
/// carry control characters, quotes or any Unicode, none of which a header may carry as is): a
/// plain ASCII `filename` with every other character as `_`, and the exact name in `filename*`
/// (RFC 6266 / RFC 8187, UTF-8 percent-encoded).
fn content_disposition(name: &str) -> header::HeaderValue {
    let plain: String = name
        .chars()
        .map(|c| {
            if (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let mut exact = String::new();
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&byte) {
            exact.push(byte as char);
        } else {
            exact.push_str(&format!("%{byte:02X}"));
        }
    }
    header::HeaderValue::from_str(&format!("inline; filename=\"{plain}\"; filename*=UTF-8''{exact}"))
        .unwrap_or(header::HeaderValue::from_static("inline"))
}

/// Whether `file` lives on a file system whose sizes say nothing of the bytes a read returns
/// (procfs and sysfs report 0 or a page for files of any length).
fn on_pseudo_fs(file: &fs::File) -> bool {
    use std::os::fd::AsRawFd as _;
    const PROC_SUPER_MAGIC: i64 = 0x9fa0;
    const SYSFS_MAGIC: i64 = 0x6265_6572;
    const DEBUGFS_MAGIC: i64 = 0x6462_6720;
    const TRACEFS_MAGIC: i64 = 0x7472_6163;
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    const CGROUP_SUPER_MAGIC: i64 = 0x27e0eb;
    const SECURITYFS_MAGIC: i64 = 0x7363_6673;
    // SAFETY: an all-zero statfs is a valid value for the kernel to overwrite.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a descriptor `file` owns and a statfs buffer, both outliving the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut stat) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = stat.f_type as i64;
    [
        PROC_SUPER_MAGIC,
        SYSFS_MAGIC,
        DEBUGFS_MAGIC,
        TRACEFS_MAGIC,
        CGROUP2_SUPER_MAGIC,
        CGROUP_SUPER_MAGIC,
        SECURITYFS_MAGIC,
    ]
    .contains(&kind)
}

/// One written file, as envd reports uploads.
#[derive(Debug, serde::Serialize)]
struct WriteInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    metadata: std::collections::BTreeMap<String, String>,
}

/// Why an upload's body was refused: it ended early, carried more than it declared, or failed
/// on the way. Always the client's (or the connection's) fault, so a 400.
#[derive(Debug, thiserror::Error)]
enum BodyError {
    #[error("the upload ended after {got} of the {declared} bytes its Content-Length declares")]
    Short { got: u64, declared: u64 },
    #[error("the upload carried more than the {declared} bytes its Content-Length declares")]
    Long { declared: u64 },
    #[error("the upload ended after {got} bytes without the host's end-of-body length, so it was cut short")]
    NoTrailer { got: u64 },
    #[error("the upload ended after {got} of the {sent} bytes the host sent")]
    TrailerMismatch { got: u64, sent: u64 },
    #[error("the upload was cut short after {got} bytes: {reason}")]
    Broken { got: u64, reason: String },
}

/// The data of a request body as a stream that ends only if the body was complete: its byte
/// count matches `Content-Length` when one was given, and the host's
/// [`viv_proto::UPLOAD_LENGTH_TRAILER`] when it announced one. Anything else (a body error, a
/// short or long body, a missing or wrong trailer) ends the stream with an
/// [`io::ErrorKind::InvalidData`] error carrying a [`BodyError`].
struct CheckedBody {
    body: Body,
    received: u64,
    declared: Option<u64>,
    trailer_announced: bool,
    trailer: Option<u64>,
    finished: bool,
}

impl CheckedBody {
    fn new(body: Body, headers: &HeaderMap) -> Result<Self, String> {
        let declared = match headers.get(header::CONTENT_LENGTH) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .ok_or_else(|| format!("invalid Content-Length {value:?}"))?,
            ),
        };
        Ok(Self {
            body,
            received: 0,
            declared,
            trailer_announced: headers.contains_key(viv_proto::UPLOAD_LENGTH_ANNOUNCE),
            trailer: None,
            finished: false,
        })
    }

    fn fail(&mut self, err: BodyError) -> Option<io::Result<Bytes>> {
        self.finished = true;
        Some(Err(io::Error::new(io::ErrorKind::InvalidData, err)))
    }

    /// Checks a body that ended cleanly.
    fn at_end(&mut self) -> Option<io::Result<Bytes>> {
        let got = self.received;
        if let Some(declared) = self.declared.filter(|d| *d != got) {
            return self.fail(BodyError::Short { got, declared });
        }
        if self.trailer_announced {
            match self.trailer {
                None => return self.fail(BodyError::NoTrailer { got }),
                Some(sent) if sent != got => return self.fail(BodyError::TrailerMismatch { got, sent }),
                Some(_) => {}
            }
        }
        self.finished = true;
        None
    }
}

impl futures::Stream for CheckedBody {
    type Item = io::Result<Bytes>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use http_body::Body as _;
        use std::task::Poll;
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            let frame = match std::pin::Pin::new(&mut this.body).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => return Poll::Ready(this.at_end()),
                Poll::Ready(Some(Err(err))) => {
                    let got = this.received;
                    return Poll::Ready(this.fail(BodyError::Broken {
                        got,
                        reason: err.to_string(),
                    }));
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    this.received += data.len() as u64;
                    if let Some(declared) = this.declared.filter(|d| this.received > *d) {
                        return Poll::Ready(this.fail(BodyError::Long { declared }));
                    }
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(data)));
                    }
                }
                Err(frame) => {
                    if let Some(trailers) = frame.trailers_ref() {
                        this.trailer = trailers
                            .get(viv_proto::UPLOAD_LENGTH_TRAILER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.parse().ok());
                    }
                }
            }
        }
    }
}

/// What hands out an upload's bytes: a plain body, or one part of a multipart body.
trait Chunks {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>>;
}

/// A stream of chunks (a plain or decompressed body).
struct StreamChunks<S>(S);

impl<S: futures::Stream<Item = io::Result<Bytes>> + Unpin> Chunks for StreamChunks<S> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        self.0.next().await.transpose()
    }
}

impl<S: futures::Stream<Item = io::Result<Bytes>> + Unpin> Chunks for crate::multipart::Multipart<S> {
    async fn next_chunk(&mut self) -> io::Result<Option<Bytes>> {
        crate::multipart::Multipart::next_chunk(self)
            .await
            .map_err(multipart_io)
    }
}

fn multipart_io(err: crate::multipart::MultipartError) -> io::Error {
    match err {
        crate::multipart::MultipartError::Read(err) => err,
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

/// `POST /files?path=`: writes the body (raw bytes, or each part of a multipart form) to `path`.
/// Every file is written to a temporary name beside its target, and all of them are renamed
/// into place only once the whole body has arrived and checked out (see [`CheckedBody`]; a
/// multipart body must also end with its closing delimiter). So a failed or cut upload leaves
/// the targets as they were and no temporary file behind, and answers 400 when the body was at
/// fault. The work runs in a task of its own: hyper drops a handler whose request stream the
/// host resets, and the temporary files must go even then.
pub async fn upload(
    State(state): State<AgentState>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
    request: Request,
) -> Response {
    let user = match state.request_user(&headers, q.username.as_deref()) {
        Ok(user) => user,
        Err(err) => return json_error(StatusCode::BAD_REQUEST, err.message),
    };
    let metadata = match crate::metadata::from_headers(&headers) {
        Ok(metadata) => metadata,
        Err(err) => return json_error(StatusCode::BAD_REQUEST, err.to_string()),
    };
    let body = match CheckedBody::new(request.into_body(), &headers) {
        Ok(body) => body,
        Err(err) => return json_error(StatusCode::BAD_REQUEST, err),
    };
    let received = tokio::spawn(async move {
        let mut temps: Vec<TempFile> = Vec::new();
        let written = match receive(&user, q.path.as_deref(), &headers, body, &mut temps).await {
            Ok(()) => commit(&user, &temps, &metadata).await,
            Err(err) => Err(err),
        };
        if written.is_err() {
            discard(&user, &temps).await;
        }
        written
    })
    .await;
    match received {
        Ok(Ok(written)) => Json(written).into_response(),
        Ok(Err((status, message))) => json_error(status, message),
        Err(err) => json_error(StatusCode::INTERNAL_SERVER_ERROR, format!("the upload failed: {err}")),
    }
}

/// Receives an upload's body into temporary files (listed in `temps`).
async fn receive(
    user: &User,
    path: Option<&str>,
    headers: &HeaderMap,
    body: CheckedBody,
    temps: &mut Vec<TempFile>,
) -> Result<(), (StatusCode, String)> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let is_multipart = content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/form-data");
    if is_multipart {
        let boundary =
            crate::multipart::boundary(content_type).map_err(|err| (StatusCode::BAD_REQUEST, err.to_string()))?;
        let mut form = crate::multipart::Multipart::new(body, &boundary);
        return receive_parts(user, path, &mut form, temps).await;
    }
    let Some(raw) = path.filter(|p| !p.is_empty()) else {
        return Err((
            StatusCode::BAD_REQUEST,
            "the path query parameter is required".to_owned(),
        ));
    };
    let path = resolve_path(user, raw);
    let gzipped = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|e| e.eq_ignore_ascii_case("gzip"));
    // A gzip-encoded upload (envd 0.5.7) is stored decompressed; the decoder refuses a gzip
    // stream that ends early, and reads the body to its end (and so to its checks) because it
    // looks for further members.
    let chunks: std::pin::Pin<Box<dyn futures::Stream<Item = io::Result<Bytes>> + Send>> = if gzipped {
        let reader = tokio_util::io::StreamReader::new(body);
        let mut decoder = async_compression::tokio::bufread::GzipDecoder::new(reader);
        decoder.multiple_members(true);
        Box::pin(tokio_util::io::ReaderStream::new(decoder))
    } else {
        Box::pin(body)
    };
    write_temp(user, &path, &mut StreamChunks(chunks), temps)
        .await
        .map_err(|err| (io_status(&err), format!("{}: {err}", path.display())))
}

/// Receives every part of a multipart body into temporary files, then the rest of the body.
async fn receive_parts<S>(
    user: &User,
    path: Option<&str>,
    form: &mut crate::multipart::Multipart<S>,
    temps: &mut Vec<TempFile>,
) -> Result<(), (StatusCode, String)>
where
    S: futures::Stream<Item = io::Result<Bytes>> + Unpin,
{
    let refused = |err: io::Error| (io_status(&err), err.to_string());
    loop {
        let part = match form.next_part().await {
            Ok(Some(part)) => part,
            Ok(None) => break,
            Err(err) => return Err(refused(multipart_io(err))),
        };
        let target = match (path, part.file_name.as_deref()) {
            (Some(p), _) if !p.is_empty() => p.to_owned(),
            (_, Some(name)) if !name.is_empty() => name.to_owned(),
            _ => return Err((StatusCode::BAD_REQUEST, "a path or a file name is required".to_owned())),
        };
        let path = resolve_path(user, &target);
        write_temp(user, &path, form, temps)
            .await
            .map_err(|err| (io_status(&err), format!("{}: {err}", path.display())))?;
    }
    // The closing delimiter is not the end: the length checks run when the body ends.
    form.finish().await.map_err(|err| refused(multipart_io(err)))
}

/// A complete upload waiting in a temporary file beside its target.
struct TempFile {
    temp: PathBuf,
    target: PathBuf,
}

/// Writes all of `chunks` to a new temporary file beside `path` (recorded in `temps` as soon
/// as it exists, so that the caller removes it on any error).
async fn write_temp(user: &User, path: &Path, chunks: &mut impl Chunks, temps: &mut Vec<TempFile>) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    // Unique among the agent's uploads (a counter), and unlikely to meet a user's file.
    static UPLOADS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let serial = UPLOADS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(".{name}{UPLOAD_TEMP_MARK}{:08x}-{serial}", rand_u32()));
    crate::parents::ensure(user, &dir).await?;
    let file = {
        let (temp, target) = (temp.clone(), path.to_path_buf());
        as_user(user, move || {
            if target.is_dir() {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
            }
            fs::OpenOptions::new().write(true).create_new(true).open(&temp)
        })
        .await?
    };
    temps.push(TempFile {
        temp,
        target: path.to_path_buf(),
    });
    let mut file = tokio::fs::File::from_std(file);
    while let Some(chunk) = chunks.next_chunk().await? {
        file.write_all(&chunk).await?;
    }
    file.flush().await
}

/// Stores the upload's metadata on every complete upload and renames it into place.
async fn commit(
    user: &User,
    temps: &[TempFile],
    metadata: &std::collections::BTreeMap<String, String>,
) -> Result<Vec<WriteInfo>, (StatusCode, String)> {
    // Metadata first, on every file, so that a refusal leaves all the targets as they were.
    if !metadata.is_empty() {
        let (paths, stored) = (
            temps.iter().map(|t| t.temp.clone()).collect::<Vec<_>>(),
            metadata.clone(),
        );
        as_user(user, move || {
            paths.iter().try_for_each(|p| crate::metadata::write(p, &stored))
        })
        .await
        .map_err(|err| (io_status(&err), err.to_string()))?;
    }
    let mut written = Vec::new();
    for file in temps {
        let (temp, target) = (file.temp.clone(), file.target.clone());
        as_user(user, move || fs::rename(&temp, &target))
            .await
            .map_err(|err| (io_status(&err), format!("{}: {err}", file.target.display())))?;
        written.push(WriteInfo {
            name: file
                .target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            kind: "file",
            path: file.target.to_string_lossy().into_owned(),
            metadata: metadata.clone(),
        });
    }
    Ok(written)
}

/// Removes the temporary files of a failed upload (those already renamed are gone).
async fn discard(user: &User, temps: &[TempFile]) {
    let paths: Vec<PathBuf> = temps.iter().map(|t| t.temp.clone()).collect();
    let _ = as_user(user, move || {
        for path in paths {
            let _ = fs::remove_file(path);
        }
        Ok(())
    })
    .await;
}

fn rand_u32() -> u32 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_file_name_makes_a_valid_content_disposition() {
        for name in [
            "a.txt",
            "qu\"ote",
            "\u{e3}\u{6}\u{dd}\u{f0da6}\u{b7}\u{11}<\u{12}",
            "back\\slash",
            "new\nline",
            "",
        ] {
            let value = content_disposition(name);
            let text = value.to_str().expect("visible ASCII");
            assert!(text.starts_with("inline; filename=\""), "{text}");
            assert!(!text.contains('\n'));
        }
        assert_eq!(
            content_disposition("a b\u{e9}.txt").to_str().unwrap(),
            "inline; filename=\"a b_.txt\"; filename*=UTF-8''a%20b%C3%A9.txt"
        );
    }

    /// A body of `chunks`, then `trailer` (the host's length trailer) if given, then `error`.
    fn body(chunks: &[&[u8]], trailer: Option<&str>, error: bool) -> Body {
        let mut frames: Vec<Result<http_body::Frame<Bytes>, io::Error>> = chunks
            .iter()
            .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        if let Some(value) = trailer {
            let mut map = HeaderMap::new();
            map.insert(viv_proto::UPLOAD_LENGTH_TRAILER, value.parse().unwrap());
            frames.push(Ok(http_body::Frame::trailers(map)));
        }
        if error {
            frames.push(Err(io::Error::other("stream reset")));
        }
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(frames)))
    }

    fn headers(length: Option<&str>, announced: bool) -> HeaderMap {
        let mut map = HeaderMap::new();
        if let Some(length) = length {
            map.insert(header::CONTENT_LENGTH, length.parse().unwrap());
        }
        if announced {
            map.insert(viv_proto::UPLOAD_LENGTH_ANNOUNCE, "1".parse().unwrap());
        }
        map
    }

    /// Reads a checked body: its bytes, or the message of the error that ended it.
    fn read(body: Body, headers: &HeaderMap) -> Result<Vec<u8>, String> {
        let mut checked = CheckedBody::new(body, headers)?;
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async {
                let mut out = Vec::new();
                while let Some(chunk) = checked.next().await {
                    let chunk = chunk.map_err(|e| {
                        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
                        e.to_string()
                    })?;
                    out.extend_from_slice(&chunk);
                }
                // Once ended (well or not), it stays ended.
                assert!(checked.next().await.is_none());
                Ok(out)
            })
    }

    #[test]
    fn a_checked_body_ends_only_when_it_is_whole() {
        let parts: &[&[u8]] = &[b"hello ", b"", b"world"];
        assert_eq!(
            read(body(parts, None, false), &headers(Some("11"), false)).unwrap(),
            b"hello world"
        );
        assert_eq!(
            read(body(parts, None, false), &headers(None, false)).unwrap(),
            b"hello world"
        );
        assert_eq!(
            read(body(parts, Some("11"), false), &headers(Some("11"), true)).unwrap(),
            b"hello world"
        );
        assert_eq!(
            read(body(parts, Some("11"), false), &headers(None, true)).unwrap(),
            b"hello world"
        );
        assert_eq!(
            read(body(&[], Some("0"), false), &headers(Some("0"), true)).unwrap(),
            b""
        );

        let short = read(body(parts, None, false), &headers(Some("12"), false)).unwrap_err();
        assert!(short.contains("after 11 of the 12 bytes"), "{short}");
        let long = read(body(parts, None, false), &headers(Some("10"), false)).unwrap_err();
        assert!(long.contains("more than the 10 bytes"), "{long}");
        let no_trailer = read(body(parts, None, false), &headers(None, true)).unwrap_err();
        assert!(no_trailer.contains("cut short"), "{no_trailer}");
        let mismatch = read(body(parts, Some("20"), false), &headers(None, true)).unwrap_err();
        assert!(mismatch.contains("11 of the 20 bytes the host sent"), "{mismatch}");
        let broken = read(body(parts, None, true), &headers(None, false)).unwrap_err();
        assert!(broken.contains("cut short after 11 bytes: stream reset"), "{broken}");
        assert!(read(body(parts, None, false), &headers(Some("eleven"), false)).is_err());
    }

    fn user() -> User {
        User {
            name: "user".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn resolves_paths_inside_the_guest_root() {
        let u = user();
        assert_eq!(resolve_path(&u, "a.txt"), PathBuf::from("/home/user/a.txt"));
        assert_eq!(resolve_path(&u, "~/x/../y"), PathBuf::from("/home/user/y"));
        assert_eq!(resolve_path(&u, "/../../etc/passwd"), PathBuf::from("/etc/passwd"));
        assert_eq!(resolve_path(&u, "../../../../tmp"), PathBuf::from("/tmp"));
        assert_eq!(resolve_path(&u, ""), PathBuf::from("/home/user"));
    }

    /// Found by the `multipart` fuzz target: a form whose second part was cut short was refused
    /// (with a 500), but its first part had already replaced the target file.
    #[tokio::test]
    async fn a_form_cut_in_its_second_part_changes_no_file() {
        let dir = std::env::temp_dir().join(format!("viv-agent-upload-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let target = dir.join("file.bin");
        let other = dir.join("other.bin");
        fs::write(&target, "old").unwrap();
        // Each part names its own target, as the SDKs' multi-file uploads do.
        let form = |second: &str| {
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\nfirst\r\n\
                 --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}\"\r\n\r\n{second}",
                target.display(),
                other.display()
            )
        };
        let upload_form = |body: String| {
            let request = Request::post("/files")
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
                .body(Body::from(body))
                .unwrap();
            let query = FileQuery {
                path: None,
                username: Some("root".into()),
            };
            upload(
                State(AgentState::new()),
                request.headers().clone(),
                Query(query),
                request,
            )
        };
        let cut = upload_form(form("second\r\x01--b--\r\n")).await;
        assert_eq!(cut.status(), StatusCode::BAD_REQUEST);
        assert_eq!(fs::read_to_string(&target).unwrap(), "old");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "a temporary file was left");
        assert!(!other.exists());
        let whole = upload_form(form("second\r\n--b--\r\n")).await;
        assert_eq!(whole.status(), StatusCode::OK);
        assert_eq!(fs::read_to_string(&target).unwrap(), "first");
        assert_eq!(fs::read_to_string(&other).unwrap(), "second");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 2, "a temporary file was left");
        fs::remove_dir_all(&dir).unwrap();
    }
}
