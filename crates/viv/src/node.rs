//! `viv node`: the cluster's nodes (the servers sharing one store): list, show, drain,
//! undrain and remove them.

use anyhow::Result;
use clap::Subcommand;
use reqwest::Method;
use viv_api::nodes::{NodeDrain, NodeInfo};

use crate::client::Client;
use crate::output;

/// `viv node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List nodes with their state, capacity and use.
    #[command(alias = "ls")]
    List,
    /// Show a node.
    Get {
        /// Node id or name.
        node: String,
    },
    /// Place nothing new on a node, pause its running sandboxes and move its paused ones, with
    /// their files, to other nodes (they resume there).
    Drain {
        /// Node id or name.
        node: String,
        /// Keep paused sandboxes on the node (a resume still moves each where placement puts it).
        #[arg(long)]
        keep_paused: bool,
    },
    /// Place sandboxes on a drained node again.
    Undrain {
        /// Node id or name.
        node: String,
    },
    /// Forget a node that is down and holds no sandboxes.
    #[command(alias = "rm")]
    Remove {
        /// Node id or name.
        node: String,
    },
}

const HEADERS: [&str; 10] = [
    "NAME",
    "ID",
    "ROLE",
    "STATE",
    "URL",
    "ACCEL",
    "VCPUS",
    "MEMORY",
    "SANDBOXES",
    "HEARTBEAT",
];

fn row(n: &NodeInfo) -> Vec<String> {
    let c = &n.capacity;
    vec![
        if n.local {
            format!("{} *", n.name)
        } else {
            n.name.clone()
        },
        n.id.clone(),
        n.role.clone(),
        n.state.as_str().to_owned(),
        n.url.clone(),
        c.accel.clone(),
        format!("{}/{}", c.vcpus_used, c.vcpus),
        format!("{}/{} MiB", c.memory_used_mib, c.memory_mib),
        n.sandboxes.to_string(),
        n.heartbeat_at.clone(),
    ]
}

/// Runs `viv node ...`.
pub async fn run(client: &Client, cmd: NodeCommand, json: bool) -> Result<i32> {
    let show = |nodes: &[NodeInfo]| {
        if json {
            output::json(&nodes);
        } else {
            output::table(&HEADERS, &nodes.iter().map(row).collect::<Vec<_>>());
        }
    };
    // One node: an object in JSON, a one-row table otherwise.
    let show_one = |node: NodeInfo| {
        if json {
            output::json(&node);
        } else {
            show(&[node]);
        }
    };
    match cmd {
        NodeCommand::List => {
            let all: Vec<NodeInfo> = client.json(client.request(Method::GET, "/nodes")).await?;
            show(&all);
        }
        NodeCommand::Get { node } => {
            let one: NodeInfo = client
                .json(client.request(Method::GET, &format!("/nodes/{node}")))
                .await?;
            show_one(one);
        }
        NodeCommand::Drain { node, keep_paused } => {
            let path = format!("/nodes/{node}/drain{}", if keep_paused { "?move=false" } else { "" });
            let done: NodeDrain = client.json(client.request(Method::POST, &path)).await?;
            if json {
                output::json(&done);
            } else {
                println!(
                    "{} is draining; paused {} sandbox(es), moved {} to other nodes",
                    done.node.name,
                    done.paused.len(),
                    done.moved.len()
                );
                for moved in &done.moved {
                    println!("{} -> {}", moved.id, moved.node);
                }
                for failure in &done.failed {
                    eprintln!("{}: {}", failure.id, failure.error);
                }
            }
            return Ok(i32::from(!done.failed.is_empty()));
        }
        NodeCommand::Undrain { node } => {
            let one: NodeInfo = client
                .json(client.request(Method::POST, &format!("/nodes/{node}/undrain")))
                .await?;
            show_one(one);
        }
        NodeCommand::Remove { node } => {
            client
                .send(client.request(Method::DELETE, &format!("/nodes/{node}")))
                .await?;
            if !json {
                println!("{node}");
            }
        }
    }
    Ok(0)
}
