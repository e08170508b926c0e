//! `viv vm backup create|list|delete|restore`: full and incremental backups of a VM's disks,
//! through the server's `/vms/{id}/backups` routes (operations followed with a progress bar
//! unless `--detach`).

use anyhow::{bail, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;
use viv_api::backups::VmBackup;
use viv_api::storage::Operation;

use crate::client::Client;
use crate::{output, transfer};

/// `viv vm backup ...`
#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Back up a VM's writable disks (incremental when its last backup allows, else full).
    Create {
        /// VM id or name.
        vm: String,
        /// Copy every block, even if an incremental backup is possible.
        #[arg(long, conflicts_with = "incremental")]
        full: bool,
        /// Copy only what changed since the last backup; fail if that cannot be done.
        #[arg(long)]
        incremental: bool,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
    /// List a VM's backups, oldest first.
    #[command(alias = "ls")]
    List {
        /// VM id or name.
        vm: String,
    },
    /// Delete backups (a later backup based on one is merged with it first).
    #[command(alias = "rm")]
    Delete {
        /// VM id or name.
        vm: String,
        /// Backup ids.
        #[arg(required = true)]
        backups: Vec<String>,
    },
    /// Restore a backup over the VM's own disks (VM stopped) or into new disks.
    Restore {
        /// VM id or name.
        vm: String,
        /// Backup id.
        backup: String,
        /// Restore into a new pool disk of this name instead (repeat once per disk, in order).
        #[arg(long = "new-disk", value_name = "NAME")]
        new_disks: Vec<String>,
        /// Format of the new disks: qcow2 (default) or raw.
        #[arg(long, requires = "new_disks")]
        format: Option<String>,
        /// Print the operation id and return at once.
        #[arg(long)]
        detach: bool,
    },
}

/// Runs `viv vm backup ...`.
pub async fn run(client: &Client, cmd: BackupCommand, json: bool) -> Result<()> {
    match cmd {
        BackupCommand::Create {
            vm,
            full,
            incremental,
            detach,
        } => {
            let kind = if full {
                "full"
            } else if incremental {
                "incremental"
            } else {
                "auto"
            };
            let op: Operation = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/backups"))
                        .json(&json!({"kind": kind})),
                )
                .await?;
            if detach {
                return print_op(&op, json);
            }
            let op = transfer::follow(client, op).await?;
            let Some(backup) = op.backup else {
                bail!("operation {} ended without a backup", op.id);
            };
            if json {
                output::json(&backup);
            } else {
                table(&[backup]);
            }
        }
        BackupCommand::List { vm } => {
            let backups: Vec<VmBackup> = client
                .json(client.request(Method::GET, &format!("/vms/{vm}/backups")))
                .await?;
            if json {
                output::json(&backups);
            } else {
                table(&backups);
            }
        }
        BackupCommand::Delete { vm, backups } => {
            for backup in backups {
                client
                    .send(client.request(Method::DELETE, &format!("/vms/{vm}/backups/{backup}")))
                    .await?;
                if !json {
                    println!("deleted {backup}");
                }
            }
        }
        BackupCommand::Restore {
            vm,
            backup,
            new_disks,
            format,
            detach,
        } => {
            let mut body = json!({});
            if !new_disks.is_empty() {
                body["newDisks"] = json!(new_disks);
            }
            if let Some(format) = format {
                if format != "qcow2" && format != "raw" {
                    bail!("--format must be qcow2 or raw, not '{format}'");
                }
                body["format"] = json!(format);
            }
            let op: Operation = client
                .json(
                    client
                        .request(Method::POST, &format!("/vms/{vm}/backups/{backup}/restore"))
                        .json(&body),
                )
                .await?;
            if detach {
                return print_op(&op, json);
            }
            let op = transfer::follow(client, op).await?;
            let disks = op.disks.clone().unwrap_or_default();
            if json {
                output::json(&op);
            } else {
                println!("restored {backup} into {}", disks.join(", "));
            }
        }
    }
    Ok(())
}

fn print_op(op: &Operation, json: bool) -> Result<()> {
    if json {
        output::json(op);
    } else {
        println!("{}", op.id);
    }
    Ok(())
}

fn table(backups: &[VmBackup]) {
    let rows: Vec<Vec<String>> = backups
        .iter()
        .map(|b| {
            vec![
                b.id.clone(),
                b.kind.as_str().to_owned(),
                b.parent_id.clone().unwrap_or_else(|| "-".into()),
                b.disks.iter().map(|d| d.disk.as_str()).collect::<Vec<_>>().join(","),
                mib(b.disks.iter().map(|d| d.file_size).sum()),
                if b.live { "running" } else { "stopped" }.to_owned(),
                b.created_at.clone(),
            ]
        })
        .collect();
    output::table(&["ID", "KIND", "PARENT", "DISKS", "SIZE", "VM WAS", "CREATED"], &rows);
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}
