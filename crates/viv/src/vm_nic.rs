//! `viv vm nic`: add, change and remove one network card of a VM through `POST /vms/{id}/nics`
//! and `PATCH`/`DELETE /vms/{id}/nics/{index}`. A running VM takes what it can at once (a NIC
//! hot-added on q35, a move to another switch, new rate limits, a hot-added last NIC removed)
//! and the rest at its next start; the output says which.

use anyhow::{bail, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Map, Value};
use viv_api::vms::VmEdit;

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
        /// Most kbit/s the guest receives (a NIC on a switch).
        #[arg(long, value_name = "KBPS")]
        rate_in: Option<u32>,
        /// Most kbit/s the guest sends (a NIC on a switch).
        #[arg(long, value_name = "KBPS")]
        rate_out: Option<u32>,
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
        /// Most kbit/s the guest receives (0: no limit).
        #[arg(long, value_name = "KBPS")]
        rate_in: Option<u32>,
        /// Most kbit/s the guest sends (0: no limit).
        #[arg(long, value_name = "KBPS")]
        rate_out: Option<u32>,
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
    let (method, path, body) = match &cmd {
        NicCommand::Add {
            switch,
            model,
            mac,
            rate_in,
            rate_out,
            ..
        } => {
            let mut nic = Map::new();
            put(&mut nic, "switch", switch.as_ref().map(|v| json!(v)));
            put(&mut nic, "model", model.as_ref().map(|v| json!(v)));
            put(&mut nic, "mac", mac.as_ref().map(|v| json!(v)));
            put(&mut nic, "rateInKbps", rate_in.map(|v| json!(v)));
            put(&mut nic, "rateOutKbps", rate_out.map(|v| json!(v)));
            (Method::POST, format!("/vms/{vm}/nics"), Some(Value::Object(nic)))
        }
        NicCommand::Edit {
            index,
            switch,
            user,
            model,
            mac,
            rate_in,
            rate_out,
            ..
        } => {
            let mut patch = Map::new();
            put(&mut patch, "switch", switch.as_ref().map(|v| json!(v)));
            if *user {
                patch.insert("switch".into(), Value::Null);
            }
            put(&mut patch, "model", model.as_ref().map(|v| json!(v)));
            put(&mut patch, "mac", mac.as_ref().map(|v| json!(v)));
            // 0 lifts a limit: null in a merge patch.
            let limit = |kbps: &Option<u32>| kbps.map(|k| if k == 0 { Value::Null } else { json!(k) });
            put(&mut patch, "rateInKbps", limit(rate_in));
            put(&mut patch, "rateOutKbps", limit(rate_out));
            if patch.is_empty() {
                bail!("nothing to change: give --switch, --user, --model, --mac, --rate-in or --rate-out");
            }
            (
                Method::PATCH,
                format!("/vms/{vm}/nics/{index}"),
                Some(Value::Object(patch)),
            )
        }
        NicCommand::Remove { index, .. } => (Method::DELETE, format!("/vms/{vm}/nics/{index}"), None),
    };
    let mut request = client.request(method, &path);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let edit: VmEdit = client.json(request).await?;
    if json {
        output::json(&edit);
    } else if edit.at_next_start.is_empty() {
        println!("NIC changed (at once when the VM runs)");
    } else {
        println!("NIC changed; the running VM takes the change at its next start");
    }
    Ok(())
}

fn put(map: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    if let Some(value) = value {
        map.insert(key.into(), value);
    }
}
