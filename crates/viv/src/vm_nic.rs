//! `viv vm nic`: add, change and remove one network card of a VM. Each is an edit of the VM's
//! `nics` list (the pending definition's when there is one), sent as a JSON merge patch; a
//! running VM takes the change at its next start.

use anyhow::{bail, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Value};
use viv_api::vms::{VmEdit, VmInfo};

use crate::client::Client;
use crate::output;

/// `viv vm nic ...`
#[derive(Debug, Subcommand)]
pub enum NicCommand {
    /// Add a NIC (on a switch, or on QEMU's user-mode network without --switch).
    Add {
        /// VM id or name.
        vm: String,
        /// The switch it is on.
        #[arg(long)]
        switch: Option<String>,
        /// virtio-net or e1000.
        #[arg(long)]
        model: Option<String>,
        /// MAC address (generated when absent).
        #[arg(long)]
        mac: Option<String>,
    },
    /// Change NIC number INDEX (from 0, as `viv vm get` lists them).
    Edit {
        /// VM id or name.
        vm: String,
        /// The NIC's index.
        index: usize,
        /// Move it to this switch.
        #[arg(long, conflicts_with = "user")]
        switch: Option<String>,
        /// Move it to QEMU's user-mode network.
        #[arg(long)]
        user: bool,
        /// virtio-net or e1000.
        #[arg(long)]
        model: Option<String>,
        /// MAC address.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Remove NIC number INDEX.
    #[command(alias = "rm")]
    Remove {
        /// VM id or name.
        vm: String,
        /// The NIC's index.
        index: usize,
    },
}

/// Runs `viv vm nic ...`.
pub async fn run(client: &Client, cmd: NicCommand, json: bool) -> Result<()> {
    let vm = match &cmd {
        NicCommand::Add { vm, .. } | NicCommand::Edit { vm, .. } | NicCommand::Remove { vm, .. } => vm.clone(),
    };
    let info: VmInfo = client.json(client.request(Method::GET, &format!("/vms/{vm}"))).await?;
    let definition = info.pending_definition.as_ref().unwrap_or(&info.definition);
    let mut nics: Vec<Value> = definition.nics.iter().map(|n| json!(n)).collect();
    let set = |nic: &mut Value, key: &str, value: &Option<String>| {
        if let Some(v) = value {
            nic[key] = json!(v);
        }
    };
    match &cmd {
        NicCommand::Add { switch, model, mac, .. } => {
            let mut nic = json!({});
            set(&mut nic, "switch", switch);
            set(&mut nic, "model", model);
            set(&mut nic, "mac", mac);
            nics.push(nic);
        }
        NicCommand::Edit {
            index,
            switch,
            user,
            model,
            mac,
            ..
        } => {
            let count = nics.len();
            let Some(nic) = nics.get_mut(*index) else {
                bail!("VM {vm} has {count} NIC(s); there is no NIC {index}");
            };
            set(nic, "switch", switch);
            set(nic, "model", model);
            set(nic, "mac", mac);
            if *user {
                nic.as_object_mut().map(|o| o.remove("switch"));
            }
        }
        NicCommand::Remove { index, .. } => {
            if *index >= nics.len() {
                bail!("VM {vm} has {} NIC(s); there is no NIC {index}", nics.len());
            }
            nics.remove(*index);
        }
    }
    let edit: VmEdit = client
        .json(
            client
                .request(Method::PATCH, &format!("/vms/{vm}"))
                .json(&json!({ "nics": nics })),
        )
        .await?;
    if json {
        output::json(&edit);
    } else if edit.at_next_start.is_empty() {
        println!("NICs changed");
    } else {
        println!("NICs changed; the running VM takes them at its next start");
    }
    Ok(())
}
