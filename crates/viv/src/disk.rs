//! `viv disk`: the disks of the server's storage pool — create, list, get, resize, clone,
//! import, upload, download, wipe, delete.
//!
//! Sizes are written like `10G`, `512M` (binary units) or bytes. Upload and import send a local
//! file with its SHA-256, which the server checks; clone, import and wipe are operations on the
//! server, followed to their end with a bar unless `--detach` is given.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Subcommand;
use indicatif::HumanBytes;
use reqwest::Method;
use serde_json::json;
use viv_api::storage::{DiskInfo, Operation};

use crate::client::Client;
use crate::{output, transfer};

/// `viv disk ...`
#[derive(Debug, Subcommand)]
pub enum DiskCommand {
    /// Create an empty disk.
    Create {
        /// Name, unique in the pool.
        name: String,
        /// Virtual size: 10G, 512M, 1T or bytes.
        #[arg(long)]
        size: String,
        /// Format: qcow2 (thin, can be cloned linked) or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// List the disks of the pool.
    #[command(alias = "ls")]
    List,
    /// Show a disk.
    Get {
        /// Disk name.
        name: String,
    },
    /// Change a disk's virtual size (shrinking loses data and needs --force).
    Resize {
        /// Disk name.
        name: String,
        /// New virtual size: 20G, 512M or bytes.
        size: String,
        /// Allow shrinking, losing the data past the new end.
        #[arg(long)]
        force: bool,
    },
    /// Copy a disk: a full copy, or with --linked a thin qcow2 backed by the source.
    Clone {
        /// The disk to copy.
        source: String,
        /// The new disk's name.
        name: String,
        /// A linked clone (the source then cannot change until the clone is deleted).
        #[arg(long)]
        linked: bool,
        /// Print the operation and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Import a local image of any format qemu-img reads (vmdk, vdi, vhdx, qcow2, raw),
    /// converted on the server.
    Import {
        /// The new disk's name.
        name: String,
        /// The local image file.
        file: PathBuf,
        /// The disk's format: qcow2 or raw.
        #[arg(long, default_value = "qcow2")]
        format: String,
        /// Print the operation and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Upload a local raw or qcow2 image as it is (vmdk, vdi, vhdx become qcow2).
    Upload {
        /// The new disk's name.
        name: String,
        /// The local image file.
        file: PathBuf,
    },
    /// Download a disk's file (in its format) to a local file.
    Download {
        /// Disk name.
        name: String,
        /// The local file to write.
        file: PathBuf,
    },
    /// Download a disk converted to a standalone image: qcow2, raw or vmdk (streamOptimized).
    Export {
        /// Disk name.
        name: String,
        /// The local file to write.
        file: PathBuf,
        /// qcow2 (default), raw or vmdk.
        #[arg(long, default_value = "qcow2")]
        format: String,
    },
    /// Replace a disk's contents with zeros (keeps its name, format and size).
    Wipe {
        /// Disk name.
        name: String,
        /// Print the operation and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// Delete disks no VM attaches and no clone is backed by.
    #[command(alias = "rm")]
    Delete {
        /// Disk names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// A size written by a person, in bytes.
fn size(text: &str) -> Result<u64> {
    Ok(viv_storage::size::parse_disk_size(text)?)
}

fn format(text: &str) -> Result<&'static str> {
    match text {
        "qcow2" => Ok("qcow2"),
        "raw" => Ok("raw"),
        other => bail!("unknown disk format '{other}': use qcow2 or raw"),
    }
}

/// Prints a disk (or, detached, the operation making it); follows `op` unless `detach`.
async fn finish(client: &Client, op: Operation, detach: bool, json: bool) -> Result<()> {
    if detach {
        if json {
            output::json(&op);
        } else {
            println!("{}", op.id);
        }
        return Ok(());
    }
    let op = transfer::follow(client, op).await?;
    match op.result {
        Some(disk) => print_disk(&disk, json),
        None => bail!("operation {} ended without a disk", op.id),
    }
    Ok(())
}

fn print_disk(disk: &DiskInfo, json: bool) {
    if json {
        output::json(disk);
    } else {
        output::table(&HEADERS, &[row(disk)]);
    }
}

/// Runs `viv disk ...`.
pub async fn run(client: &Client, cmd: DiskCommand, json: bool) -> Result<i32> {
    match cmd {
        DiskCommand::Create {
            name,
            size: s,
            format: f,
        } => {
            let body = json!({"name": name, "size": size(&s)?, "format": format(&f)?});
            let disk: DiskInfo = client.json(client.request(Method::POST, "/disks").json(&body)).await?;
            print_disk(&disk, json);
        }
        DiskCommand::List => {
            let disks: Vec<DiskInfo> = client.json(client.request(Method::GET, "/disks")).await?;
            if json {
                output::json(&disks);
            } else {
                output::table(&HEADERS, &disks.iter().map(row).collect::<Vec<_>>());
            }
        }
        DiskCommand::Get { name } => {
            let disk: DiskInfo = client
                .json(client.request(Method::GET, &format!("/disks/{name}")))
                .await?;
            print_disk(&disk, json);
        }
        DiskCommand::Resize { name, size: s, force } => {
            let body = json!({"size": size(&s)?, "force": force});
            let disk: DiskInfo = client
                .json(
                    client
                        .request(Method::POST, &format!("/disks/{name}/resize"))
                        .json(&body),
                )
                .await?;
            print_disk(&disk, json);
        }
        DiskCommand::Clone {
            source,
            name,
            linked,
            detach,
        } => {
            let body = json!({"name": name, "linked": linked});
            let op: Operation = client
                .json(
                    client
                        .request(Method::POST, &format!("/disks/{source}/clone"))
                        .json(&body),
                )
                .await?;
            finish(client, op, detach, json).await?;
        }
        DiskCommand::Import {
            name,
            file,
            format: f,
            detach,
        } => {
            let f = format(&f)?;
            transfer::local_file(&file)?;
            transfer::ensure_absent(client, &format!("/disks/{name}"), &format!("a disk named '{name}'")).await?;
            let sha256 = transfer::sha256_file(&file).await?;
            let route = format!("/disks/{name}/import?format={f}");
            let response = transfer::send_file(client, Method::PUT, &route, &file, Some(&sha256)).await?;
            let op: Operation = response.json().await?;
            finish(client, op, detach, json).await?;
        }
        DiskCommand::Upload { name, file } => {
            transfer::local_file(&file)?;
            transfer::ensure_absent(client, &format!("/disks/{name}"), &format!("a disk named '{name}'")).await?;
            let sha256 = transfer::sha256_file(&file).await?;
            let route = format!("/disks/{name}/upload");
            let response = transfer::send_file(client, Method::PUT, &route, &file, Some(&sha256)).await?;
            let disk: DiskInfo = response.json().await?;
            print_disk(&disk, json);
        }
        DiskCommand::Export { name, file, format } => {
            let route = format!("/disks/{name}/export?format={format}");
            let bytes = transfer::download(client, &route, &file).await?;
            if json {
                output::json(&json!({"disk": name, "file": file, "format": format, "bytes": bytes}));
            } else {
                println!("exported {name} as {format} to {} ({bytes} bytes)", file.display());
            }
        }
        DiskCommand::Download { name, file } => {
            let bytes = transfer::download(client, &format!("/disks/{name}/download"), &file).await?;
            if json {
                output::json(&json!({"disk": name, "file": file, "bytes": bytes}));
            } else {
                println!("wrote {} ({}) to {}", name, HumanBytes(bytes), file.display());
            }
        }
        DiskCommand::Wipe { name, detach } => {
            let op: Operation = client
                .json(client.request(Method::POST, &format!("/disks/{name}/wipe")))
                .await?;
            finish(client, op, detach, json).await?;
        }
        DiskCommand::Delete { names } => {
            for name in names {
                client
                    .send(client.request(Method::DELETE, &format!("/disks/{name}")))
                    .await?;
                if !json {
                    println!("deleted {name}");
                }
            }
        }
    }
    Ok(0)
}

const HEADERS: [&str; 6] = ["NAME", "FORMAT", "SIZE", "ALLOCATED", "BACKING", "USED BY"];

fn row(disk: &DiskInfo) -> Vec<String> {
    vec![
        disk.name.clone(),
        disk.format.as_str().to_owned(),
        HumanBytes(disk.virtual_size).to_string(),
        disk.actual_size
            .map(|b| HumanBytes(b).to_string())
            .unwrap_or_else(|| "-".into()),
        disk.backing.clone().unwrap_or_else(|| "-".into()),
        if disk.used_by.is_empty() {
            "-".into()
        } else {
            disk.used_by.join(",")
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_formats_parse() {
        assert_eq!(size("10G").unwrap(), 10 << 30);
        assert_eq!(size("512M").unwrap(), 512 << 20);
        assert!(size("1.5G").is_err());
        assert!(size("0").is_err());
        assert_eq!(format("raw").unwrap(), "raw");
        assert!(format("vmdk").is_err());
    }
}
