//! Client subcommands: images, keys, sandboxes, exec and files.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use clap::{Args, Subcommand};
use futures::StreamExt as _;
use reqwest::Method;
use viv_api::{CreatedSandbox, ExecEvent, ExecRequest, NewSandbox, SandboxInfo};

use crate::client::Client;
use crate::output::{self, TerminalProgress};
use crate::{Cli, Command, Dirs};

/// `viv image ...`
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Fetch the kernel and build the initramfs and the base root file system (cached).
    Build {
        #[command(flatten)]
        dirs: Dirs,
        /// The static agent binary (found beside `viv` by default).
        #[arg(long, env = "VIV_AGENT")]
        agent: Option<PathBuf>,
        /// Kernel package instead of the one linux-image-cloud-amd64 depends on.
        #[arg(long)]
        kernel_package: Option<String>,
    },
    /// Import a directory tree or an ext4 image as a named image, usable as a template id.
    Import {
        /// Name of the image.
        name: String,
        /// A directory holding a root file system.
        #[arg(long, conflicts_with = "ext4", required_unless_present = "ext4")]
        dir: Option<PathBuf>,
        /// An ext4 file system image.
        #[arg(long)]
        ext4: Option<PathBuf>,
        #[command(flatten)]
        dirs: Dirs,
    },
}

/// `viv keys ...`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print it (shown only this once).
    Create {
        /// A name to recognize the key by.
        #[arg(long, default_value = "default")]
        name: String,
        #[command(flatten)]
        dirs: Dirs,
    },
    /// List active keys.
    List {
        #[command(flatten)]
        dirs: Dirs,
    },
    /// Revoke a key by id or prefix.
    Revoke {
        /// Key id or prefix.
        id: String,
        #[command(flatten)]
        dirs: Dirs,
    },
    #[command(flatten)]
    Ssh(crate::ssh_keys::SshKeysCommand),
}

/// `viv sandbox ...`
#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Create a sandbox and print its id.
    Create {
        /// Template, tag (`NAME:TAG`), version id or image to start from (as --template).
        #[arg(conflicts_with = "template")]
        from: Option<String>,
        /// Template, tag (`NAME:TAG`), version id or image to start from.
        #[arg(long, short, default_value = viv_api::DEFAULT_TEMPLATE)]
        template: String,
        /// Seconds until the sandbox is killed.
        #[arg(long)]
        timeout: Option<u64>,
        /// Metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm', value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// Environment variables for every process, KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e', value_parser = parse_pair)]
        env: Vec<(String, String)>,
        /// vCPUs.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB.
        #[arg(long)]
        memory: Option<u32>,
        /// Boot the kernel instead of restoring the template snapshot.
        #[arg(long)]
        cold_boot: bool,
        /// Pause instead of kill when the timeout passes.
        #[arg(long)]
        auto_pause: bool,
        /// With --auto-pause: keep only the disk at the timeout (resuming boots it afresh).
        #[arg(long, requires = "auto_pause")]
        auto_pause_filesystem: bool,
        /// With --auto-pause: resume the paused sandbox when traffic for it arrives.
        #[arg(long, requires = "auto_pause", conflicts_with = "auto_pause_filesystem")]
        auto_resume: bool,
        /// In a cluster: copy each pause of the sandbox to N other nodes, so that it resumes
        /// elsewhere if its node dies (default: the server's --pause-replicas).
        #[arg(long, value_name = "N")]
        pause_replicas: Option<u32>,
        /// Cut the sandbox off from every network (commands and files still work).
        #[arg(long)]
        no_internet: bool,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Replace a sandbox's egress rules (all of them: what is not given is cleared). Takes
    /// effect at once in the isolated network mode, at resume for a paused sandbox.
    Net {
        /// Sandbox id.
        id: String,
        /// Deny every destination not allowed with --allow.
        #[arg(long)]
        no_internet: bool,
        #[command(flatten)]
        rules: RuleArgs,
    },
    /// Save a running sandbox's disk as a new version of a template (which NAME then starts);
    /// the sandbox goes on running.
    Commit {
        /// Sandbox id.
        id: String,
        /// The template (new or existing) the version belongs to.
        #[arg(long, short)]
        template: String,
    },
    /// Pause a sandbox: save it (disk, memory, processes) into a snapshot node and stop its VM.
    Pause {
        /// Sandbox id.
        id: String,
        /// Keep only the disk (no memory): resuming boots it afresh, processes are gone.
        #[arg(long)]
        filesystem: bool,
        /// Free the stopped VM now rather than keep it for the server's `--pause-keep-warm`
        /// time (a resume then restores the saved snapshot).
        #[arg(long)]
        release: bool,
    },
    /// Show a running sandbox's console log (kernel and boot messages, whatever the guest
    /// writes to /dev/console); -f follows it until the sandbox stops.
    Logs {
        /// Sandbox id.
        id: String,
        /// Keep printing lines as they come.
        #[arg(long, short)]
        follow: bool,
        /// Prefix each line with its timestamp.
        #[arg(long, short)]
        timestamps: bool,
    },
    /// Resume a paused sandbox (does nothing to a running one).
    Resume {
        /// Sandbox id.
        id: String,
        /// Seconds until it is killed (or paused again, with auto-pause).
        #[arg(long)]
        timeout: Option<u64>,
        /// Boot the saved disk afresh instead of restoring the saved memory.
        #[arg(long)]
        reboot: bool,
    },
    /// Fork a running sandbox: snapshot it once and start COUNT copies; it keeps running.
    Fork {
        /// Sandbox id.
        id: String,
        /// How many copies.
        #[arg(long, short = 'n', default_value_t = 1)]
        count: u32,
        /// Seconds until each copy is killed.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// Snapshot a running sandbox (it keeps running); start sandboxes from the snapshot with
    /// `sandbox create -t SNAPSHOT`.
    Snapshot {
        /// Sandbox id.
        id: String,
        /// A unique name for the snapshot.
        #[arg(long)]
        name: Option<String>,
        /// Keep only the disk (no memory): sandboxes started from it boot it afresh.
        #[arg(long)]
        filesystem: bool,
    },
    /// List sandboxes.
    #[command(alias = "ls")]
    List {
        /// Only sandboxes with this metadata, KEY=VALUE (repeatable).
        #[arg(long = "metadata", short = 'm', value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// Also those whose VM died (with the reason), until they are killed or time out.
        #[arg(long, short = 'a')]
        all: bool,
    },
    /// Show one sandbox.
    Get {
        /// Sandbox id.
        id: String,
    },
    /// Kill sandboxes.
    #[command(alias = "rm")]
    Kill {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// Allow and deny lists of a sandbox's egress rules.
#[derive(Debug, Args)]
pub struct RuleArgs {
    /// Allow an IPv4 address, CIDR block or domain (`example.com`, `*.example.com`), even when
    /// denied otherwise (repeatable; needs the isolated network mode).
    #[arg(long = "allow", value_name = "TARGET")]
    allow: Vec<String>,
    /// Deny an IPv4 address, CIDR block or domain (repeatable; needs the isolated network mode).
    #[arg(long = "deny", value_name = "TARGET")]
    deny: Vec<String>,
}

impl RuleArgs {
    fn network(&self) -> Option<viv_api::NetworkConfig> {
        (!self.allow.is_empty() || !self.deny.is_empty()).then(|| viv_api::NetworkConfig {
            allow_out: (!self.allow.is_empty()).then(|| self.allow.clone()),
            deny_out: (!self.deny.is_empty()).then(|| self.deny.clone()),
            ..viv_api::NetworkConfig::default()
        })
    }
}

/// One line about a sandbox's network access.
fn network_summary(info: &SandboxInfo) -> String {
    let mut summary = format!("internet {}", if info.allow_internet_access { "on" } else { "off" });
    if let Some(network) = &info.network {
        for (label, list) in [("allow", &network.allow_out), ("deny", &network.deny_out)] {
            if let Some(list) = list.as_ref().filter(|l| !l.is_empty()) {
                summary.push_str(&format!("; {label} {}", list.join(", ")));
            }
        }
    }
    summary
}

/// `viv exec ID -- CMD...`
#[derive(Debug, Args)]
pub struct ExecArgs {
    /// Sandbox id (under `viv vm exec`, the VM's id or name).
    pub id: String,
    /// Run as this user.
    #[arg(long, short)]
    pub user: Option<String>,
    /// Working directory.
    #[arg(long, short = 'w')]
    pub cwd: Option<String>,
    /// Environment variables, KEY=VALUE (repeatable).
    #[arg(long = "env", short = 'e', value_parser = parse_pair)]
    pub env: Vec<(String, String)>,
    /// Run the words as one shell command line (`bash -l -c`) instead of a program and arguments.
    #[arg(long, short)]
    pub shell: bool,
    /// Send this process's stdin to the command.
    #[arg(long, short)]
    pub interactive: bool,
    /// The command.
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, got '{s}'"))
}

/// Runs a parsed command line; returns the process exit code.
pub async fn run(cli: Cli) -> Result<i32> {
    let client = Client::new(&cli.api_url, cli.api_key.clone()).on_node(cli.on_node.clone());
    match cli.command {
        Command::Serve(args) => crate::serve::run(*args).await.map(|()| 0),
        Command::Image(cmd) => image(cmd, cli.json).map(|()| 0),
        Command::Keys(cmd) => keys(cmd, cli.json).map(|()| 0),
        Command::Sandbox(cmd) => sandbox(&client, cmd, cli.json).await.map(|()| 0),
        Command::Exec(args) => exec(&client, args).await,
        Command::Shell(args) => crate::shell::run(&client, args).await,
        Command::Files(cmd) => crate::files::run(&client, cmd, cli.json).await.map(|()| 0),
        Command::Snapshot(cmd) => snapshot(&client, cmd, cli.json).await.map(|()| 0),
        Command::Template(cmd) => crate::template::run(&client, cmd, cli.json).await,
        Command::Push(args) => crate::push::run(&client, args, cli.json).await,
        Command::Vm(cmd) => crate::vm::run(&client, cmd, cli.json).await,
        Command::Switch(cmd) => crate::switch::run(&client, cmd, cli.json).await,
        Command::Node(cmd) => crate::node::run(&client, cmd, cli.json).await,
        Command::Events(args) => crate::events::run(&client, args, cli.json).await,
        Command::Console(args) => crate::console::run(&client, args).await,
        Command::Top(args) => crate::top::run(&client, args).await,
        Command::Disk(cmd) => crate::disk::run(&client, cmd, cli.json).await,
        Command::Iso(cmd) => crate::iso::run(&client, cmd, cli.json).await,
        Command::Bench(args) => crate::bench::run(&client, args, cli.json).await.map(|()| 0),
    }
}

fn image(cmd: ImageCommand, json: bool) -> Result<()> {
    match cmd {
        ImageCommand::Build {
            dirs,
            agent,
            kernel_package,
        } => {
            let agent = crate::serve::find_agent(agent)?;
            let images = viv_image::ImageStore::open(&dirs.cache_dir)?;
            let progress = TerminalProgress::new();
            let kernel = images.kernel(kernel_package.as_deref(), &progress)?;
            let initramfs = images.initramfs(&kernel, &agent)?;
            let rootfs = images.debian_rootfs(&viv_image::rootfs::DebianRecipe::default(), &progress)?;
            drop(progress);
            let value = serde_json::json!({
                "kernel": kernel.image, "kernelPackage": kernel.package, "initramfs": initramfs, "rootfs": rootfs,
            });
            if json {
                output::json(&value);
            } else {
                output::table(
                    &["ARTIFACT", "PATH"],
                    &[
                        vec![
                            format!("kernel ({})", kernel.package),
                            kernel.image.display().to_string(),
                        ],
                        vec!["initramfs".into(), initramfs.display().to_string()],
                        vec!["rootfs (base)".into(), rootfs.display().to_string()],
                    ],
                );
            }
        }
        ImageCommand::Import { name, dir, ext4, dirs } => {
            let images = viv_image::ImageStore::open(&dirs.cache_dir)?;
            let progress = TerminalProgress::new();
            let path = match (dir, ext4) {
                (Some(dir), _) => images.import_dir(&name, &dir, &progress)?,
                (None, Some(file)) => images.import_ext4(&name, &file, &progress)?,
                (None, None) => bail!("give --dir or --ext4"),
            };
            drop(progress);
            if json {
                output::json(&serde_json::json!({ "name": name, "path": path }));
            } else {
                println!(
                    "imported image '{name}' ({}); create sandboxes with --template {name}",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// The state's store: PostgreSQL when `--database` names one, else SQLite in the data directory.
pub(crate) fn open_store(dirs: &Dirs) -> Result<viv_server::Store> {
    if let Some(url) = &dirs.database {
        // The URL may hold a password: it is never part of a message.
        return viv_server::Store::connect_postgres(url).context("connecting to the PostgreSQL database of --database");
    }
    std::fs::create_dir_all(&dirs.data_dir).with_context(|| format!("creating {}", dirs.data_dir.display()))?;
    Ok(viv_server::Store::open(&dirs.data_dir.join("vivarium.db"))?)
}

fn keys(cmd: KeysCommand, json: bool) -> Result<()> {
    match cmd {
        KeysCommand::Create { name, dirs } => {
            let key = viv_server::create_api_key(&open_store(&dirs)?, &name)?;
            if json {
                output::json(&key);
            } else {
                println!("{}", key.key);
                eprintln!("Store this key now; it cannot be shown again. Use it as VIV_API_KEY or E2B_API_KEY.");
            }
        }
        KeysCommand::List { dirs } => {
            let keys = open_store(&dirs)?.list_keys()?;
            if json {
                output::json(&keys);
            } else {
                let rows: Vec<Vec<String>> = keys
                    .into_iter()
                    .map(|k| vec![k.id, k.name, format!("{}…", k.prefix), k.created_at])
                    .collect();
                output::table(&["ID", "NAME", "PREFIX", "CREATED"], &rows);
            }
        }
        KeysCommand::Revoke { id, dirs } => {
            if !open_store(&dirs)?.revoke_key(&id)? {
                bail!("no active key with id or prefix '{id}' (see `viv keys list`)");
            }
            println!("revoked {id}");
        }
        KeysCommand::Ssh(cmd) => crate::ssh_keys::run(cmd, json)?,
    }
    Ok(())
}

/// `viv snapshot ...`
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// List snapshot nodes (with parent, size on disk and age).
    #[command(alias = "ls")]
    List {
        /// Only snapshots taken of this sandbox.
        #[arg(long)]
        sandbox: Option<String>,
    },
    /// Show one snapshot node.
    Get {
        /// Snapshot id or name.
        id: String,
    },
    /// Every snapshot of sandboxes and VMs as one tree (a VM made from a sandbox snapshot
    /// hangs under it).
    Tree,
    /// Delete snapshot nodes (refused while sandboxes or other snapshots depend on them).
    #[command(alias = "rm")]
    Delete {
        /// Snapshot ids or names.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

async fn snapshot(client: &Client, cmd: SnapshotCommand, json: bool) -> Result<()> {
    let headers = [
        "ID", "NAME", "KIND", "PARENT", "SANDBOX", "SIZE", "MEMORY", "CREATED", "USED BY",
    ];
    match cmd {
        SnapshotCommand::List { sandbox } => {
            let mut request = client.request(Method::GET, "/snapshots");
            if let Some(sandbox) = sandbox {
                request = request.query(&[("sandboxID", sandbox)]);
            }
            let list: Vec<viv_api::SnapshotInfo> = client.json(request).await?;
            if json {
                output::json(&list);
            } else {
                output::table(&headers, &list.iter().map(snapshot_row).collect::<Vec<_>>());
            }
        }
        SnapshotCommand::Tree => crate::vm::print_snapshot_tree(client, json).await?,
        SnapshotCommand::Get { id } => {
            let info: viv_api::SnapshotInfo = client
                .json(client.request(Method::GET, &format!("/snapshots/{id}")))
                .await?;
            if json {
                output::json(&info);
            } else {
                output::table(&headers, &[snapshot_row(&info)]);
            }
        }
        SnapshotCommand::Delete { ids } => {
            for id in ids {
                client
                    .send(client.request(Method::DELETE, &format!("/snapshots/{id}")))
                    .await?;
                if !json {
                    println!("deleted {id}");
                }
            }
        }
    }
    Ok(())
}

fn snapshot_row(s: &viv_api::SnapshotInfo) -> Vec<String> {
    let users: Vec<String> = s.children.iter().chain(&s.sandboxes).cloned().collect();
    vec![
        s.snapshot_id.clone(),
        s.names.get(1).cloned().unwrap_or_default(),
        s.kind.clone(),
        s.parent_id.clone().unwrap_or_else(|| format!("({})", s.template_id)),
        s.sandbox_id.clone(),
        format!("{:.1} MiB", s.size_bytes as f64 / (1 << 20) as f64),
        s.memory.clone(),
        s.created_at.clone(),
        users.join(","),
    ]
}

async fn sandbox(client: &Client, cmd: SandboxCommand, json: bool) -> Result<()> {
    match cmd {
        SandboxCommand::Commit { id, template } => {
            let version: viv_api::TemplateVersion = client
                .json(
                    client
                        .request(Method::POST, &format!("/sandboxes/{id}/commit"))
                        .json(&viv_api::CommitSandbox { template }),
                )
                .await?;
            if json {
                output::json(&version);
            } else {
                println!("{}", version.version_id);
            }
        }
        SandboxCommand::Create {
            from,
            template,
            timeout,
            metadata,
            env,
            cpus,
            memory,
            cold_boot,
            auto_pause,
            auto_pause_filesystem,
            auto_resume,
            pause_replicas,
            no_internet,
            rules,
        } => {
            let req = NewSandbox {
                template_id: Some(from.unwrap_or(template)),
                timeout,
                metadata: (!metadata.is_empty()).then(|| metadata.into_iter().collect()),
                env_vars: (!env.is_empty()).then(|| env.into_iter().collect()),
                secure: Some(true),
                cpu_count: cpus,
                memory_mb: memory,
                cold_boot: cold_boot.then_some(true),
                pooled: None,
                auto_pause: auto_pause.then_some(true),
                auto_pause_memory: auto_pause_filesystem.then_some(false),
                auto_resume: auto_resume.then_some(viv_api::AutoResume { enabled: true }),
                pause_replicas,
                allow_internet_access: no_internet.then_some(false),
                network: rules.network(),
                volume_mounts: None,
            };
            let created: CreatedSandbox = client
                .json(client.request(Method::POST, "/sandboxes").json(&req))
                .await?;
            if json {
                output::json(&created);
            } else {
                println!("{}", created.sandbox_id);
            }
        }
        SandboxCommand::List { metadata, all } => {
            let mut request = client.request(Method::GET, "/sandboxes");
            if all {
                request = request.query(&[("state", "starting,running,paused,failed")]);
            }
            if !metadata.is_empty() {
                let encoded = metadata
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("&");
                request = request.query(&[("metadata", encoded)]);
            }
            let list: Vec<SandboxInfo> = client.json(request).await?;
            if json {
                output::json(&list);
            } else {
                let rows: Vec<Vec<String>> = list.iter().map(sandbox_row).collect();
                output::table(
                    &[
                        "ID", "TEMPLATE", "STATE", "CPUS", "MEMORY", "STARTED", "ENDS", "METADATA",
                    ],
                    &rows,
                );
                for failed in list.iter().filter(|s| s.error.is_some()) {
                    println!(
                        "\n{}: {}",
                        failed.sandbox_id,
                        failed.error.as_deref().unwrap_or_default()
                    );
                }
            }
        }
        SandboxCommand::Get { id } => {
            let info = client.sandbox(&id).await?;
            if json {
                output::json(&info);
            } else {
                output::table(
                    &[
                        "ID", "TEMPLATE", "STATE", "CPUS", "MEMORY", "STARTED", "ENDS", "METADATA",
                    ],
                    &[sandbox_row(&info)],
                );
                println!("\nnetwork: {}", network_summary(&info));
                if let Some(err) = &info.error {
                    println!("error: {err}");
                }
            }
        }
        SandboxCommand::Net { id, no_internet, rules } => {
            let network = rules.network().unwrap_or_default();
            let body = viv_api::NetworkUpdate {
                allow_out: network.allow_out,
                deny_out: network.deny_out,
                allow_internet_access: Some(!no_internet),
                ..viv_api::NetworkUpdate::default()
            };
            client
                .send(
                    client
                        .request(Method::PUT, &format!("/sandboxes/{id}/network"))
                        .json(&body),
                )
                .await?;
            let info = client.sandbox(&id).await?;
            if json {
                output::json(&info);
            } else {
                println!("{id}: {}", network_summary(&info));
            }
        }
        SandboxCommand::Pause {
            id,
            filesystem,
            release,
        } => {
            let body = viv_api::PauseRequest {
                memory: filesystem.then_some(false),
                keep_warm: release.then_some(false),
                ..Default::default()
            };
            client
                .send(
                    client
                        .request(Method::POST, &format!("/sandboxes/{id}/pause"))
                        .json(&body),
                )
                .await?;
            if !json {
                println!("paused {id}");
            }
        }
        SandboxCommand::Logs { id, follow, timestamps } => {
            crate::logs::run(client, &id, follow, timestamps, json).await?
        }
        SandboxCommand::Resume { id, timeout, reboot } => {
            let body = viv_api::ConnectSandbox {
                timeout,
                memory: reboot.then_some(false),
            };
            let resumed: CreatedSandbox = client
                .json(
                    client
                        .request(Method::POST, &format!("/sandboxes/{id}/connect"))
                        .json(&body),
                )
                .await?;
            if json {
                output::json(&resumed);
            } else {
                println!("{}", resumed.sandbox_id);
            }
        }
        SandboxCommand::Fork { id, count, timeout } => {
            let body = viv_api::ForkRequest {
                timeout,
                count: Some(count),
            };
            let results: Vec<viv_api::ForkResult> = client
                .json(
                    client
                        .request(Method::POST, &format!("/sandboxes/{id}/fork"))
                        .json(&body),
                )
                .await?;
            if json {
                output::json(&results);
            } else {
                for result in &results {
                    match (&result.sandbox, &result.error) {
                        (Some(sandbox), _) => println!("{}", sandbox.sandbox_id),
                        (None, Some(err)) => eprintln!("a fork failed: {}", err.message),
                        (None, None) => {}
                    }
                }
            }
            if results.iter().any(|r| r.sandbox.is_none()) {
                anyhow::bail!(
                    "{} of {} forks failed",
                    results.iter().filter(|r| r.sandbox.is_none()).count(),
                    results.len()
                );
            }
        }
        SandboxCommand::Snapshot { id, name, filesystem } => {
            let body = viv_api::SnapshotRequest {
                name,
                memory: filesystem.then_some(false),
            };
            let info: viv_api::SnapshotInfo = client
                .json(
                    client
                        .request(Method::POST, &format!("/sandboxes/{id}/snapshots"))
                        .json(&body),
                )
                .await?;
            if json {
                output::json(&info);
            } else {
                println!("{}", info.snapshot_id);
            }
        }
        SandboxCommand::Kill { ids } => {
            for id in ids {
                client
                    .send(client.request(Method::DELETE, &format!("/sandboxes/{id}")))
                    .await?;
                if !json {
                    println!("killed {id}");
                }
            }
        }
    }
    Ok(())
}

fn sandbox_row(s: &SandboxInfo) -> Vec<String> {
    let meta = s
        .metadata
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    vec![
        s.sandbox_id.clone(),
        s.template_id.clone(),
        s.state.as_str().to_owned(),
        s.cpu_count.to_string(),
        format!("{} MiB", s.memory_mb),
        s.started_at.clone(),
        s.end_at.clone(),
        meta,
    ]
}

/// Runs a command in a sandbox and relays its output; returns its exit code.
pub async fn exec(client: &Client, args: ExecArgs) -> Result<i32> {
    let path = format!("/sandboxes/{}/exec", args.id);
    exec_at(client, args, &path).await
}

/// Runs a command through the exec route `path` and relays its output; returns its exit code.
pub async fn exec_at(client: &Client, args: ExecArgs, path: &str) -> Result<i32> {
    let stdin = if args.interactive {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf).context("reading stdin")?;
        Some(base64::engine::general_purpose::STANDARD.encode(buf))
    } else {
        None
    };
    let req = ExecRequest {
        argv: if args.shell { Vec::new() } else { args.command.clone() },
        command: args.shell.then(|| args.command.join(" ")),
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: args.cwd,
        user: args.user,
        stdin,
    };
    let response = client.send(client.request(Method::POST, path).json(&req)).await?;
    let mut stream = response.bytes_stream();
    let mut pending = Vec::new();
    let decode = |d: &str| base64::engine::general_purpose::STANDARD.decode(d).unwrap_or_default();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.context("the output stream broke")?);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let event: ExecEvent = serde_json::from_slice(&line).context("unexpected line in the output stream")?;
            match event {
                ExecEvent::Start { .. } => {}
                ExecEvent::Stdout { data } => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&decode(&data))?;
                    out.flush()?;
                }
                ExecEvent::Stderr { data } => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(&decode(&data))?;
                    err.flush()?;
                }
                ExecEvent::End { exit_code, status } => {
                    return Ok(match exit_code {
                        code if code >= 0 => code,
                        _ if status.contains("killed") => 137,
                        _ if status.contains("terminated") => 143,
                        _ => 1,
                    });
                }
                ExecEvent::Error { message } => {
                    eprintln!("error: {message}");
                    return Ok(127);
                }
            }
        }
    }
    bail!("the output stream ended before the command finished")
}
