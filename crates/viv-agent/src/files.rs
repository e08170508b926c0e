//! File access: the `filesystem.Filesystem` service and the `/files` upload/download routes.
//!
//! Paths come from users and are resolved inside the guest only: relative paths start at the
//! acting user's home, `..` is resolved lexically and cannot climb above `/`. Every operation runs
//! with the acting user's file-system identity, so the kernel enforces permissions and new files
//! belong to that user.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Query, Request, State};
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

use crate::server::{connect_error, decode_request, json_error, unary_ok, AgentState};
use crate::users::{self, User};

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
        | io::ErrorKind::InvalidData
        | io::ErrorKind::UnexpectedEof => StatusCode::BAD_REQUEST,
        io::ErrorKind::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// Describes one path, following nothing (a symlink is described as itself, with its target).
pub fn entry_info(path: &Path) -> io::Result<EntryInfo> {
    let meta = fs::symlink_metadata(path)?;
    let symlink_target = meta
        .file_type()
        .is_symlink()
        .then(|| fs::read_link(path).ok().map(|t| t.to_string_lossy().into_owned()))
        .flatten();
    let target_meta = if meta.file_type().is_symlink() {
        fs::metadata(path).ok()
    } else {
        None
    };
    let kind_meta = target_meta.as_ref().unwrap_or(&meta);
    let file_type = if kind_meta.is_dir() {
        FileType::Directory
    } else if kind_meta.is_file() {
        FileType::File
    } else if kind_meta.file_type().is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    };
    Ok(EntryInfo {
        name: path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "/".into()),
        file_type,
        path: path.to_string_lossy().into_owned(),
        size: meta.len() as i64,
        mode: meta.permissions().mode() & 0o7777,
        permissions: permissions_string(meta.mode()),
        owner: users::user_name(meta.uid()),
        group: users::group_name(meta.gid()),
        modified_time: meta
            .modified()
            .ok()
            .map(|t| humantime::format_rfc3339_nanos(t).to_string()),
        is_symlink: meta.file_type().is_symlink(),
        symlink_target,
    })
}

fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        _ => '-',
    };
    let mut out = String::with_capacity(10);
    out.push(kind);
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        out.push(if bits & 4 != 0 { 'r' } else { '-' });
        out.push(if bits & 2 != 0 { 'w' } else { '-' });
        out.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    out
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
        let meta = fs::symlink_metadata(&path).map_err(|e| io_to_connect(&e, &path))?;
        let result = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| io_to_connect(&e, &path))?;
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
            Ok((file, meta.len()))
        })
        .await
    };
    match opened {
        Ok((file, len)) => {
            let stream = tokio_util::io::ReaderStream::with_capacity(tokio::fs::File::from_std(file), 256 * 1024);
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Response::builder()
                .header(header::CONTENT_TYPE, "application/octet-stream")
                .header(header::CONTENT_LENGTH, len)
                .header(
                    header::CONTENT_DISPOSITION,
                    format!("inline; filename=\"{}\"", name.replace('"', "")),
                )
                .body(Body::from_stream(stream))
                .expect("static response parts")
        }
        Err(err) => json_error(io_status(&err), format!("{}: {err}", path.display())),
    }
}

/// One written file, as envd reports uploads.
#[derive(Debug, serde::Serialize)]
struct WriteInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
}

/// `POST /files?path=`: writes the body (raw bytes, or each part of a multipart form) to `path`.
/// Each file is written to a temporary name beside its target, and all are renamed over their
/// targets only once the whole body has arrived, so a body that is cut or malformed anywhere
/// changes no file (and never leaves a truncated one in place of a good one).
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
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    let mut staged = Vec::new();
    if is_multipart {
        let mut form = match Multipart::from_request(request, &()).await {
            Ok(form) => form,
            Err(err) => return json_error(StatusCode::BAD_REQUEST, err.body_text()),
        };
        loop {
            let field = match form.next_field().await {
                Ok(Some(field)) => field,
                Ok(None) => break,
                Err(err) => return discard(&user, staged, json_error(StatusCode::BAD_REQUEST, err.body_text())).await,
            };
            let target = match (&q.path, field.file_name()) {
                (Some(p), _) if !p.is_empty() => p.clone(),
                (_, Some(name)) => name.to_owned(),
                _ => {
                    let error = json_error(StatusCode::BAD_REQUEST, "a path or a file name is required");
                    return discard(&user, staged, error).await;
                }
            };
            let path = resolve_path(&user, &target);
            // A broken body is the client's error.
            let chunks = field.map(|c| c.map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)));
            match write_file(&user, &path, chunks).await {
                Ok(file) => staged.push(file),
                Err(err) => {
                    let error = json_error(io_status(&err), format!("{}: {err}", path.display()));
                    return discard(&user, staged, error).await;
                }
            }
        }
    } else {
        let Some(raw) = q.path.filter(|p| !p.is_empty()) else {
            return json_error(StatusCode::BAD_REQUEST, "the path query parameter is required");
        };
        let path = resolve_path(&user, &raw);
        let gzipped = headers
            .get(header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|e| e.eq_ignore_ascii_case("gzip"));
        let chunks = request
            .into_body()
            .into_data_stream()
            .map(|c| c.map_err(io::Error::other));
        // A gzip-encoded upload (envd 0.5.7) is stored decompressed.
        let chunks: std::pin::Pin<Box<dyn futures::Stream<Item = io::Result<Bytes>> + Send>> = if gzipped {
            let reader = tokio_util::io::StreamReader::new(chunks);
            let decoder = async_compression::tokio::bufread::GzipDecoder::new(reader);
            Box::pin(tokio_util::io::ReaderStream::new(decoder))
        } else {
            Box::pin(chunks)
        };
        match write_file(&user, &path, chunks).await {
            Ok(file) => staged.push(file),
            Err(err) => return json_error(io_status(&err), format!("{}: {err}", path.display())),
        }
    }
    let mut written = Vec::new();
    let mut staged = staged.into_iter();
    while let Some(file) = staged.next() {
        let (temp, target) = (file.temp.clone(), file.target.clone());
        if let Err(err) = as_user(&user, move || fs::rename(&temp, &target)).await {
            let error = json_error(io_status(&err), format!("{}: {err}", file.target.display()));
            return discard(&user, std::iter::once(file).chain(staged).collect(), error).await;
        }
        written.push(file.info);
    }
    Json(written).into_response()
}

/// A file of an upload, written under a temporary name.
struct Staged {
    temp: PathBuf,
    target: PathBuf,
    info: WriteInfo,
}

/// Removes the temporary files of a failed upload; answers `error`.
async fn discard(user: &User, staged: Vec<Staged>, error: Response) -> Response {
    for file in staged {
        let _ = as_user(user, move || fs::remove_file(&file.temp)).await;
    }
    error
}

/// Writes `chunks` to a temporary file beside `path` (removed again if that fails).
async fn write_file<S>(user: &User, path: &Path, mut chunks: S) -> io::Result<Staged>
where
    S: futures::Stream<Item = io::Result<Bytes>> + Unpin,
{
    let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?
        .to_string_lossy()
        .into_owned();
    // Unique among the files of one upload, which may all target the same path.
    static SEQUENCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let sequence = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let temp = dir.join(format!(
        ".{name}{UPLOAD_TEMP_MARK}{}-{sequence}",
        std::process::id() ^ rand_u32()
    ));
    let (file, temp_path) = {
        let (dir, temp, target) = (dir.clone(), temp.clone(), path.to_path_buf());
        as_user(user, move || {
            fs::create_dir_all(&dir)?;
            if target.is_dir() {
                return Err(io::Error::new(io::ErrorKind::IsADirectory, "is a directory"));
            }
            let file = fs::OpenOptions::new().write(true).create_new(true).open(&temp)?;
            Ok((file, temp))
        })
        .await?
    };
    let mut file = tokio::fs::File::from_std(file);
    let copied = async {
        while let Some(chunk) = chunks.next().await {
            file.write_all(&chunk?).await?;
        }
        file.flush().await
    }
    .await;
    drop(file);
    if let Err(err) = copied {
        let temp = temp_path.clone();
        let _ = as_user(user, move || fs::remove_file(&temp)).await;
        return Err(err);
    }
    Ok(Staged {
        temp: temp_path,
        target: path.to_path_buf(),
        info: WriteInfo {
            name,
            kind: "file",
            path: path.to_string_lossy().into_owned(),
        },
    })
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
        fs::write(&target, "old").unwrap();
        let form = |second: &str| {
            format!(
                "--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a\"\r\n\r\nfirst\r\n\
                 --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"b\"\r\n\r\n{second}"
            )
        };
        let upload_form = |body: String| {
            let request = Request::post("/files")
                .header(header::CONTENT_TYPE, "multipart/form-data; boundary=b")
                .body(Body::from(body))
                .unwrap();
            let query = FileQuery {
                path: Some(target.display().to_string()),
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
        let whole = upload_form(form("second\r\n--b--\r\n")).await;
        assert_eq!(whole.status(), StatusCode::OK);
        assert_eq!(fs::read_to_string(&target).unwrap(), "second");
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1, "a temporary file was left");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn formats_permissions_like_ls() {
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFREG | 0o640), "-rw-r-----");
    }
}
