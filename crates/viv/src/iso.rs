//! `viv iso`: the server's ISO library — add (or upload) a local ISO file, list, delete.
//!
//! The CLI computes a file's SHA-256 before sending it and the server checks it; a server path
//! is never sent.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Subcommand;
use indicatif::HumanBytes;
use reqwest::Method;
use viv_api::storage::IsoInfo;

use crate::client::Client;
use crate::{output, transfer};

/// `viv iso ...`
#[derive(Debug, Subcommand)]
pub enum IsoCommand {
    /// Add a local ISO file to the library (named after the file unless --name is given).
    Add {
        /// The local ISO file.
        file: PathBuf,
        /// The name in the library (default: the file name without `.iso`).
        #[arg(long)]
        name: Option<String>,
    },
    /// Upload a local ISO file under a name.
    Upload {
        /// The name in the library.
        name: String,
        /// The local ISO file.
        file: PathBuf,
    },
    /// List the library's ISOs.
    #[command(alias = "ls")]
    List,
    /// Show an ISO.
    Get {
        /// ISO name.
        name: String,
    },
    /// Delete ISOs no VM's CD-ROM drive names.
    #[command(alias = "rm")]
    Delete {
        /// ISO names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// The library name of a file: its name without `.iso`.
fn name_of(file: &std::path::Path) -> Result<String> {
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no usable file name; give --name", file.display()))?;
    Ok(name.strip_suffix(".iso").unwrap_or(name).to_owned())
}

async fn upload(client: &Client, name: &str, file: &std::path::Path, json: bool) -> Result<()> {
    transfer::local_file(file)?;
    transfer::ensure_absent(client, &format!("/isos/{name}"), &format!("an ISO named '{name}'")).await?;
    let sha256 = transfer::sha256_file(file).await?;
    let response = transfer::send_file(client, Method::PUT, &format!("/isos/{name}"), file, Some(&sha256)).await?;
    let iso: IsoInfo = response.json().await?;
    print(&[iso], json);
    Ok(())
}

fn print(isos: &[IsoInfo], json: bool) {
    if json {
        if let [one] = isos {
            output::json(one);
        } else {
            output::json(&isos);
        }
        return;
    }
    let rows: Vec<Vec<String>> = isos
        .iter()
        .map(|iso| {
            vec![
                iso.name.clone(),
                HumanBytes(iso.size).to_string(),
                iso.sha256.clone(),
                iso.added_at.clone().unwrap_or_else(|| "-".into()),
                if iso.used_by.is_empty() {
                    "-".into()
                } else {
                    iso.used_by.join(",")
                },
            ]
        })
        .collect();
    output::table(&["NAME", "SIZE", "SHA256", "ADDED", "USED BY"], &rows);
}

/// Runs `viv iso ...`.
pub async fn run(client: &Client, cmd: IsoCommand, json: bool) -> Result<i32> {
    match cmd {
        IsoCommand::Add { file, name } => {
            let name = match name {
                Some(name) => name,
                None => name_of(&file)?,
            };
            upload(client, &name, &file, json).await?;
        }
        IsoCommand::Upload { name, file } => upload(client, &name, &file, json).await?,
        IsoCommand::List => {
            let isos: Vec<IsoInfo> = client.json(client.request(Method::GET, "/isos")).await?;
            if json {
                output::json(&isos);
            } else {
                print(&isos, false);
            }
        }
        IsoCommand::Get { name } => {
            let iso: IsoInfo = client
                .json(client.request(Method::GET, &format!("/isos/{name}")))
                .await?;
            print(&[iso], json);
        }
        IsoCommand::Delete { names } => {
            for name in names {
                client
                    .send(client.request(Method::DELETE, &format!("/isos/{name}")))
                    .await?;
                if !json {
                    println!("deleted {name}");
                }
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso_names_come_from_file_names() {
        assert_eq!(
            name_of(std::path::Path::new("/tmp/debian-12.iso")).unwrap(),
            "debian-12"
        );
        assert_eq!(name_of(std::path::Path::new("installer")).unwrap(), "installer");
    }
}
