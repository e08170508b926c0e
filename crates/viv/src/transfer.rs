//! Transfers of the storage commands (`viv disk`, `viv iso`): files streamed to and from the
//! server with progress bars, SHA-256 of local files, and following asynchronous operations.
//!
//! Invariants: files are streamed, never read whole into memory; a download is written to a
//! temporary file beside the destination and renamed into place only once complete; bars are
//! drawn only when stderr is a terminal.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::{StreamExt as _, TryStreamExt as _};
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::Method;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use viv_api::storage::{Operation, OperationState};

use crate::client::Client;

/// A byte-counting bar of `len` bytes (hidden off a terminal).
pub fn bytes_bar(len: u64, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what.to_owned());
    bar
}

/// A local file to send: its length, checked to be a regular file.
pub fn local_file(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a regular file", path.display());
    }
    Ok(meta.len())
}

/// Fails when `route` (a disk or ISO) exists already: the server would refuse the upload
/// before reading it, and a client still sending may then see only a closed connection.
pub async fn ensure_absent(client: &Client, route: &str, what: &str) -> Result<()> {
    let response = client
        .request(Method::GET, route)
        .send()
        .await
        .context("cannot reach the Vivarium server")?;
    if response.status().is_success() {
        bail!("{what} already exists; choose another name or delete it first");
    }
    Ok(())
}

/// The SHA-256 of a local file, in hex, with a bar.
pub async fn sha256_file(path: &Path) -> Result<String> {
    let len = local_file(path)?;
    let bar = bytes_bar(len, "checksum");
    let mut file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file
            .read(&mut buffer)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    Ok(hex::encode(hasher.finalize()))
}

/// Sends the file at `path` as the body of `method path_and_query` with the header
/// `X-Content-SHA256` when `sha256` is given; a bar follows the bytes sent.
pub async fn send_file(
    client: &Client,
    method: Method,
    route: &str,
    path: &Path,
    sha256: Option<&str>,
) -> Result<reqwest::Response> {
    let len = local_file(path)?;
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let bar = bytes_bar(len, "upload");
    let counted = bar.clone();
    let stream = tokio_util::io::ReaderStream::with_capacity(file, 1 << 20).inspect_ok(move |chunk| {
        counted.inc(chunk.len() as u64);
    });
    let mut request = client
        .request(method, route)
        .header(reqwest::header::CONTENT_LENGTH, len)
        .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
        .body(reqwest::Body::wrap_stream(stream));
    if let Some(sha256) = sha256 {
        request = request.header("X-Content-SHA256", sha256);
    }
    let response = client.send(request).await;
    bar.finish_and_clear();
    response
}

/// Downloads `route` into `dest` (a temporary file beside it, renamed when complete).
pub async fn download(client: &Client, route: &str, dest: &Path) -> Result<u64> {
    let response = client.send(client.request(Method::GET, route)).await?;
    let len = response.content_length();
    let bar = bytes_bar(len.unwrap_or(0), "download");
    let file_name = dest
        .file_name()
        .with_context(|| format!("{} names no file", dest.display()))?;
    let temp: PathBuf = dest.with_file_name(format!(".{}.part-{}", file_name.to_string_lossy(), std::process::id()));
    let result = async {
        let mut file = tokio::fs::File::create(&temp)
            .await
            .with_context(|| format!("cannot create {}", temp.display()))?;
        let mut stream = response.bytes_stream();
        let mut total = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.context("the download broke off")?;
            file.write_all(&chunk)
                .await
                .with_context(|| format!("writing {}", temp.display()))?;
            total += chunk.len() as u64;
            bar.inc(chunk.len() as u64);
        }
        file.sync_all()
            .await
            .with_context(|| format!("writing {}", temp.display()))?;
        if let Some(len) = len {
            if total != len {
                bail!("the download ended after {total} of {len} bytes; try again");
            }
        }
        std::fs::rename(&temp, dest).with_context(|| format!("cannot write {}", dest.display()))?;
        Ok(total)
    }
    .await;
    bar.finish_and_clear();
    if result.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Follows an operation to its end with a bar; an operation that failed is an error.
pub async fn follow(client: &Client, mut op: Operation) -> Result<Operation> {
    let bar = if std::io::stderr().is_terminal() {
        let bar = ProgressBar::new(1000);
        bar.set_style(
            ProgressStyle::with_template("{prefix:>10} [{bar:30}] {percent}% {elapsed}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(op.kind.as_str().to_owned());
        bar
    } else {
        ProgressBar::hidden()
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    while !op.is_done() {
        op = client
            .json(client.request(Method::GET, &format!("/operations/{}/wait?timeout=1", op.id)))
            .await?;
        bar.set_position((op.progress * 1000.0) as u64);
    }
    bar.finish_and_clear();
    if op.state == OperationState::Failed {
        bail!(
            "{} of '{}' failed: {}",
            op.kind.as_str(),
            op.target,
            op.error.as_deref().unwrap_or("no reason given")
        );
    }
    Ok(op)
}
