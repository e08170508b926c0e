//! `viv files`: copy files into and out of a sandbox and list its directories, through the
//! server's file routes (streamed both ways; nothing is held whole in memory).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use futures::StreamExt as _;
use reqwest::Method;

use crate::client::Client;
use crate::output;

/// `viv files ...`
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Copy a local file (or - for stdin) into the sandbox.
    Put {
        /// Sandbox id.
        id: String,
        /// Local file, or -.
        local: PathBuf,
        /// Path in the sandbox.
        remote: String,
        /// Act as this user.
        #[arg(long, short)]
        user: Option<String>,
    },
    /// Copy a file out of the sandbox (to stdout when no local path is given).
    Get {
        /// Sandbox id.
        id: String,
        /// Path in the sandbox.
        remote: String,
        /// Local file.
        local: Option<PathBuf>,
        /// Act as this user.
        #[arg(long, short)]
        user: Option<String>,
    },
    /// List a directory in the sandbox.
    Ls {
        /// Sandbox id.
        id: String,
        /// Directory (the user's home by default).
        #[arg(default_value = "")]
        path: String,
        /// Levels to descend.
        #[arg(long, default_value_t = 1)]
        depth: u32,
        /// Act as this user.
        #[arg(long, short)]
        user: Option<String>,
    },
}

pub async fn run(client: &Client, cmd: FilesCommand, json: bool) -> Result<()> {
    let query = |path: &str, user: &Option<String>| {
        let mut q = vec![("path", path.to_owned())];
        if let Some(u) = user {
            q.push(("user", u.clone()));
        }
        q
    };
    match cmd {
        FilesCommand::Put {
            id,
            local,
            remote,
            user,
        } => {
            let body = if local.as_os_str() == "-" {
                let mut buf = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)?;
                reqwest::Body::from(buf)
            } else {
                let file = tokio::fs::File::open(&local)
                    .await
                    .with_context(|| format!("opening {}", local.display()))?;
                reqwest::Body::wrap_stream(tokio_util_stream(file))
            };
            let request = client
                .request(Method::PUT, &format!("/sandboxes/{id}/files"))
                .query(&query(&remote, &user))
                .body(body);
            let written: serde_json::Value = client.json(request).await?;
            if json {
                output::json(&written);
            } else {
                let path = written[0]["path"].as_str().unwrap_or(&remote).to_owned();
                println!("wrote {path}");
            }
        }
        FilesCommand::Get {
            id,
            remote,
            local,
            user,
        } => {
            let request = client
                .request(Method::GET, &format!("/sandboxes/{id}/files"))
                .query(&query(&remote, &user));
            let response = client.send(request).await?;
            let mut stream = response.bytes_stream();
            let mut out: Box<dyn std::io::Write> = match &local {
                Some(path) => {
                    Box::new(std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?)
                }
                None => Box::new(std::io::stdout().lock()),
            };
            while let Some(chunk) = stream.next().await {
                out.write_all(&chunk.context("the download broke")?)?;
            }
            out.flush()?;
        }
        FilesCommand::Ls { id, path, depth, user } => {
            let mut q = query(&path, &user);
            if path.is_empty() {
                q[0].1 = "~".into();
            }
            q.push(("depth", depth.to_string()));
            let listing: serde_json::Value = client
                .json(
                    client
                        .request(Method::GET, &format!("/sandboxes/{id}/files/list"))
                        .query(&q),
                )
                .await?;
            if json {
                output::json(&listing["entries"]);
            } else {
                let rows: Vec<Vec<String>> = listing["entries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| {
                        vec![
                            e["permissions"].as_str().unwrap_or_default().to_owned(),
                            e["owner"].as_str().unwrap_or_default().to_owned(),
                            e["size"].as_str().unwrap_or_default().to_owned(),
                            e["modifiedTime"]
                                .as_str()
                                .unwrap_or_default()
                                .chars()
                                .take(19)
                                .collect(),
                            e["path"].as_str().unwrap_or_default().to_owned(),
                        ]
                    })
                    .collect();
                output::table(&["MODE", "OWNER", "SIZE", "MODIFIED", "PATH"], &rows);
            }
        }
    }
    Ok(())
}

/// Reads a file as a stream of chunks.
fn tokio_util_stream(file: tokio::fs::File) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>> {
    futures::stream::unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 256 * 1024];
        match tokio::io::AsyncReadExt::read(&mut file, &mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), file))
            }
            Err(e) => Some((Err(e), file)),
        }
    })
}
