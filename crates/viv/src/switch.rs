//! `viv switch`: create, list, show, edit and delete VM switches (Linux bridges of the server
//! that VM NICs attach to: `viv vm create --nic switch=NAME`).

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use serde_json::{json, Map, Value};
use viv_api::switches::SwitchInfo;

use crate::client::Client;
use crate::output;

/// `viv switch ...`
#[derive(Debug, Subcommand)]
pub enum SwitchCommand {
    /// Create a switch.
    Create {
        /// Name, unique on the server.
        name: String,
        /// nat (DHCP, DNS, masqueraded out of the host), isolated (VMs reach only each other),
        /// routed (DHCP, DNS, routed in and out without translation) or bridged (NICs on the
        /// host bridge --uplink, on the operator's network).
        #[arg(long, default_value = "nat")]
        kind: String,
        /// IPv4 subnet (e.g. 10.250.1.0/24); allocated from the server's --switch-range if absent
        /// (not for bridged).
        #[arg(long)]
        subnet: Option<String>,
        /// A bridged switch's Linux bridge on the host (it must exist).
        #[arg(long)]
        uplink: Option<String>,
        /// Keep VMs on the switch from reaching each other.
        #[arg(long)]
        port_isolation: bool,
    },
    /// List switches.
    #[command(alias = "ls")]
    List,
    /// Show a switch.
    Get {
        /// Switch name.
        name: String,
    },
    /// Change a switch (at once, also while VMs use it).
    Edit {
        /// Switch name.
        name: String,
        /// nat, isolated or routed.
        #[arg(long)]
        kind: Option<String>,
        /// IPv4 subnet.
        #[arg(long)]
        subnet: Option<String>,
        /// Keep VMs on the switch from reaching each other (true or false).
        #[arg(long)]
        port_isolation: Option<bool>,
    },
    /// Delete switches no VM uses.
    #[command(alias = "rm")]
    Delete {
        /// Switch names.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

const HEADERS: [&str; 6] = ["NAME", "KIND", "SUBNET", "PORT ISOLATION", "BRIDGE", "VMS"];

fn row(s: &SwitchInfo) -> Vec<String> {
    vec![
        s.name.clone(),
        s.kind.as_str().to_owned(),
        s.subnet.clone().unwrap_or_else(|| "-".to_owned()),
        if s.port_isolation { "yes" } else { "no" }.to_owned(),
        s.bridge.clone(),
        if s.vms.is_empty() {
            "-".to_owned()
        } else {
            s.vms.join(",")
        },
    ]
}

/// Runs `viv switch ...`.
pub async fn run(client: &Client, cmd: SwitchCommand, json: bool) -> Result<i32> {
    let show = |switches: &[SwitchInfo]| {
        if json {
            output::json(&switches);
        } else {
            output::table(&HEADERS, &switches.iter().map(row).collect::<Vec<_>>());
        }
    };
    match cmd {
        SwitchCommand::Create {
            name,
            kind,
            subnet,
            uplink,
            port_isolation,
        } => {
            let mut body = json!({"name": name, "kind": kind, "portIsolation": port_isolation});
            if let Some(subnet) = subnet {
                body["subnet"] = json!(subnet);
            }
            if let Some(uplink) = uplink {
                body["uplink"] = json!(uplink);
            }
            let made: SwitchInfo = client
                .json(client.request(Method::POST, "/switches").json(&body))
                .await?;
            if json {
                output::json(&made);
            } else {
                show(&[made]);
            }
        }
        SwitchCommand::List => {
            let all: Vec<SwitchInfo> = client.json(client.request(Method::GET, "/switches")).await?;
            if json {
                output::json(&all);
            } else {
                show(&all);
            }
        }
        SwitchCommand::Get { name } => {
            let one: SwitchInfo = client
                .json(client.request(Method::GET, &format!("/switches/{name}")))
                .await?;
            if json {
                output::json(&one);
            } else {
                show(&[one]);
            }
        }
        SwitchCommand::Edit {
            name,
            kind,
            subnet,
            port_isolation,
        } => {
            let mut patch = Map::new();
            if let Some(kind) = kind {
                patch.insert("kind".into(), json!(kind));
            }
            if let Some(subnet) = subnet {
                patch.insert("subnet".into(), json!(subnet));
            }
            if let Some(p) = port_isolation {
                patch.insert("portIsolation".into(), json!(p));
            }
            if patch.is_empty() {
                anyhow::bail!("nothing to change: give --kind, --subnet or --port-isolation");
            }
            let one: SwitchInfo = client
                .json(
                    client
                        .request(Method::PATCH, &format!("/switches/{name}"))
                        .json(&Value::Object(patch)),
                )
                .await?;
            if json {
                output::json(&one);
            } else {
                show(&[one]);
            }
        }
        SwitchCommand::Delete { names } => {
            let mut failed = 0;
            for name in names {
                match client
                    .send(client.request(Method::DELETE, &format!("/switches/{name}")))
                    .await
                {
                    Ok(_) => {
                        if !json {
                            println!("{name}");
                        }
                    }
                    Err(err) => {
                        eprintln!("{name}: {err:#}");
                        failed += 1;
                    }
                }
            }
            return Ok(i32::from(failed > 0));
        }
    }
    Ok(0)
}
