//! `viv keys ssh-add`, `ssh-list` and `ssh-remove`: the SSH public keys that sign in to the SSH
//! gateway (`viv serve --ssh-listen`), each registered to one API key. Like the other `keys`
//! commands they work on the server's database directly, so they need no API key.

use std::io::Read as _;

use anyhow::{bail, Context, Result};
use clap::Subcommand;

use crate::commands::open_store;
use crate::{output, Dirs};

/// The SSH key subcommands of `viv keys`.
#[derive(Debug, Subcommand)]
pub enum SshKeysCommand {
    /// Register SSH public keys for an API key: `ssh -p PORT SANDBOXID@HOST` then reaches the
    /// sandboxes that API key creates.
    #[command(name = "ssh-add")]
    Add {
        /// The API key (id or prefix) the SSH keys sign in as; may be left out while only one
        /// key is active.
        #[arg(long)]
        key_id: Option<String>,
        /// A public key file (such as ~/.ssh/id_ed25519.pub, or an authorized_keys file), or
        /// `-` for standard input.
        file: String,
        #[command(flatten)]
        dirs: Dirs,
    },
    /// List registered SSH keys.
    #[command(name = "ssh-list")]
    List {
        /// Only the SSH keys of this API key (id or prefix).
        #[arg(long)]
        key_id: Option<String>,
        #[command(flatten)]
        dirs: Dirs,
    },
    /// Remove a registered SSH key by its id or fingerprint (SHA256:...).
    #[command(name = "ssh-remove")]
    Remove {
        /// SSH key id or fingerprint.
        id: String,
        #[command(flatten)]
        dirs: Dirs,
    },
}

/// The one active API key `given` names, or the only active key when none is given.
fn api_key(store: &viv_server::Store, given: Option<&str>) -> Result<String> {
    let ids = match given {
        Some(given) => store.active_key_ids(given)?,
        None => store.list_keys()?.into_iter().map(|k| k.id).collect(),
    };
    match (ids.as_slice(), given) {
        ([id], _) => Ok(id.clone()),
        ([], Some(given)) => bail!("no active API key with id or prefix '{given}' (see `viv keys list`)"),
        ([], None) => bail!("there is no active API key; create one with `viv keys create`"),
        (_, Some(given)) => bail!("'{given}' names several API keys; give the key's id (see `viv keys list`)"),
        (_, None) => bail!("there are several API keys; say which with --key-id (see `viv keys list`)"),
    }
}

/// Runs an SSH key subcommand.
pub fn run(cmd: SshKeysCommand, json: bool) -> Result<()> {
    match cmd {
        SshKeysCommand::Add { key_id, file, dirs } => {
            let text = if file == "-" {
                let mut text = String::new();
                std::io::stdin()
                    .take(1 << 20)
                    .read_to_string(&mut text)
                    .context("reading the public key from standard input")?;
                text
            } else {
                let meta = std::fs::metadata(&file).with_context(|| format!("reading {file}"))?;
                if meta.len() > 1 << 20 {
                    bail!("{file} is {} bytes; a public key file is a few hundred", meta.len());
                }
                std::fs::read_to_string(&file).with_context(|| format!("reading {file}"))?
            };
            let keys = viv_ssh::public_key::parse_keys(&text).with_context(|| format!("in {file}"))?;
            let store = open_store(&dirs)?;
            let owner = api_key(&store, key_id.as_deref())?;
            let mut added = Vec::new();
            for key in &keys {
                match store.add_ssh_key(&viv_server::manager::random_id(12), &owner, key)? {
                    Ok(row) => added.push(row),
                    Err(existing) => bail!(
                        "{} is already registered (SSH key {}, API key {}); remove it first with `viv keys ssh-remove {}`{}",
                        existing.fingerprint,
                        existing.id,
                        existing.api_key_id,
                        existing.id,
                        if added.is_empty() {
                            String::new()
                        } else {
                            format!(" ({} key(s) before it were added)", added.len())
                        }
                    ),
                }
            }
            if json {
                output::json(&added);
            } else {
                for row in &added {
                    println!(
                        "added {} {} ({}{}) for API key {}",
                        row.id,
                        row.fingerprint,
                        row.algorithm,
                        if row.comment.is_empty() {
                            String::new()
                        } else {
                            format!(", {}", row.comment)
                        },
                        row.api_key_id
                    );
                }
            }
        }
        SshKeysCommand::List { key_id, dirs } => {
            let store = open_store(&dirs)?;
            let owner = key_id.map(|k| api_key(&store, Some(&k))).transpose()?;
            let rows = store.ssh_keys(owner.as_deref())?;
            if json {
                output::json(&rows);
            } else {
                let table: Vec<Vec<String>> = rows
                    .into_iter()
                    .map(|r| {
                        vec![
                            r.id,
                            r.fingerprint,
                            r.algorithm,
                            r.comment,
                            format!("{} ({})", r.api_key_id, r.api_key_name),
                            r.created_at,
                        ]
                    })
                    .collect();
                output::table(&["ID", "FINGERPRINT", "TYPE", "COMMENT", "API KEY", "ADDED"], &table);
            }
        }
        SshKeysCommand::Remove { id, dirs } => {
            if !open_store(&dirs)?.remove_ssh_key(&id)? {
                bail!("no SSH key with id or fingerprint '{id}' (see `viv keys ssh-list`)");
            }
            println!("removed {id}");
        }
    }
    Ok(())
}
