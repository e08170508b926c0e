//! Template snapshots: a template is booted once (running its build steps and its start command,
//! waiting for its ready command), snapshotted (device state in a file, guest memory in a file on
//! tmpfs, the disk frozen as a qcow2 layer), and every sandbox of it is a restore of that
//! snapshot.
//!
//! Invariants: a snapshot directory is used only once it has a `ready` marker and its memory file
//! exists; it is built under a temporary name and renamed into place, so an interrupted build is
//! never used and is removed at the next build. The key covers everything the restored state
//! depends on (root layer, start and ready commands, environment, kernel, initramfs, vCPUs,
//! memory, accelerator and CPU model, QEMU version), so a change to any of them builds a new
//! snapshot. Each snapshot directory names the layer it was booted from in a `layer` file, so it
//! is collected with that layer.
//!
//! Memory files stay on tmpfs, so they are a cache with a budget (an eighth of the host's RAM):
//! when a new snapshot is saved, the memory of the least recently used others that no start
//! holds is dropped until the rest fits. Such a snapshot is saved again on its next use, as a
//! snapshot whose memory was lost is (a client asking for many VM shapes would otherwise fill
//! the host's memory with one template snapshot per shape). A new memory file is backed by
//! 2 MiB pages before any clone maps it (`viv_vmm::huge_pages`): each clone's first save reads
//! all of it, several times faster through 2 MiB mappings; the file then takes its whole size
//! of tmpfs at once, as it did before after the first save of any clone (a read of a hole
//! through a private mapping allocates it).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use viv_proto::process::{ProcessConfig, StartRequest};
use viv_template::{Command, ImageConfig, Ready};

use super::builds::{BuildLog, PendingStep, Scratch};
use super::{Manager, Origin};
use crate::error::ApiError;

/// Bumped when the snapshot layout or the steps before it change.
const SNAPSHOT_FORMAT: u32 = 6;

/// What a template's sandboxes start from.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// The template's name.
    pub name: String,
    /// The disk layer its snapshot's VM boots from (its last build step's layer).
    pub layer: PathBuf,
    /// Environment, working directory and user of the start command; sandboxes get the env.
    pub config: ImageConfig,
    /// Started in the background before the snapshot.
    pub start: Option<Command>,
    /// Polled until it succeeds before the snapshot.
    pub ready: Option<Ready>,
    /// Default vCPUs of its sandboxes.
    pub cpu_count: u32,
    /// Default memory of its sandboxes in MiB.
    pub memory_mb: u32,
}

/// A ready template snapshot.
#[derive(Debug)]
pub struct TemplateSnapshot {
    /// The frozen disk layer clones' overlays sit on.
    pub disk: PathBuf,
    /// Device state.
    pub state: PathBuf,
    /// Guest memory, mapped privately by clones.
    pub memory_file: PathBuf,
}

/// Known snapshots, and the lock that serializes builds.
pub struct TemplateCache {
    ready: Mutex<HashMap<String, Arc<TemplateSnapshot>>>,
    /// When each snapshot was last used, for the memory budget.
    last_used: Mutex<HashMap<String, std::time::Instant>>,
    pub(super) build: tokio::sync::Mutex<()>,
    qemu_version: String,
}

impl TemplateCache {
    /// An empty cache for snapshots made with this QEMU version.
    pub fn new(qemu_version: String) -> Self {
        Self {
            ready: Mutex::new(HashMap::new()),
            last_used: Mutex::new(HashMap::new()),
            build: tokio::sync::Mutex::new(()),
            qemu_version,
        }
    }

    /// Forgets snapshots (their files are being removed).
    pub(super) fn forget(&self, keys: &[String]) {
        let mut ready = self.ready.lock().expect("template lock");
        for key in keys {
            ready.remove(key);
        }
    }
}

/// The user build steps and the start command run as when the spec sets none (as Docker does).
pub(super) fn build_user(config: &ImageConfig) -> String {
    config.user.clone().unwrap_or_else(|| "root".into())
}

/// A process request for `command` with the environment and working directory of `config`.
pub(super) fn process_request(command: &Command, config: &ImageConfig) -> StartRequest {
    let mut argv = command.argv();
    let cmd = argv.remove(0);
    StartRequest {
        process: ProcessConfig {
            cmd,
            args: argv,
            envs: config.env.clone(),
            cwd: Some(config.workdir.clone().unwrap_or_else(|| "/".into())),
        },
        pty: None,
        tag: None,
        stdin: Some(false),
    }
}

impl Manager {
    pub(super) fn template_key(&self, recipe: &Recipe, vcpus: u32, memory_mib: u32) -> String {
        let mut hash = Sha256::new();
        for part in [
            recipe.layer.to_string_lossy().into_owned(),
            json(&recipe.config),
            json(&recipe.start),
            json(&recipe.ready),
            self.boot.kernel.to_string_lossy().into_owned(),
            self.boot.initramfs.to_string_lossy().into_owned(),
            self.accel.to_string(),
            // The guest kernel picks its copy routines from the CPU's flags at boot.
            self.accel.qemu_accel_and_cpu().1.to_owned(),
            self.templates.qemu_version.clone(),
            // The network card and its backend are part of the saved state (QEMU's user-mode
            // stack saves a section of its own), so each mode has its own snapshots.
            self.config.network.to_string(),
        ] {
            hash.update(part.as_bytes());
            hash.update([0]);
        }
        hash.update(vcpus.to_le_bytes());
        hash.update(memory_mib.to_le_bytes());
        hash.update(SNAPSHOT_FORMAT.to_le_bytes());
        hex::encode(&hash.finalize()[..10])
    }

    /// The files of generation `generation` of snapshot `key`. A snapshot whose memory was lost
    /// (tmpfs does not survive a reboot) is saved again as the next generation beside the old
    /// one, whose disk layer sandboxes and nodes may still sit on.
    fn snapshot_files(&self, key: &str, generation: u32) -> TemplateSnapshot {
        let dir = self.config.data_dir.join("templates").join(key);
        let suffix = if generation == 0 {
            String::new()
        } else {
            format!("-{generation}")
        };
        TemplateSnapshot {
            disk: dir.join(format!("disk{suffix}.qcow2")),
            state: dir.join(format!("state{suffix}")),
            memory_file: self.shm_dir.join("templates").join(format!("{key}{suffix}.mem")),
        }
    }

    /// The complete generation of snapshot `key`, from its `ready` marker.
    fn snapshot_generation(&self, key: &str) -> Option<u32> {
        let ready = self.config.data_dir.join("templates").join(key).join("ready");
        let text = std::fs::read_to_string(ready).ok()?;
        Some(text.trim().parse().unwrap_or(0))
    }

    fn snapshot_paths(&self, key: &str) -> (PathBuf, TemplateSnapshot) {
        let dir = self.config.data_dir.join("templates").join(key);
        let generation = self.snapshot_generation(key).unwrap_or(0);
        (dir, self.snapshot_files(key, generation))
    }

    /// Whether the snapshot with this key is complete on disk.
    pub(super) fn snapshot_usable(&self, key: &str, memory_mib: u32) -> bool {
        let (dir, snapshot) = self.snapshot_paths(key);
        dir.join("ready").is_file()
            && std::fs::metadata(&snapshot.memory_file).is_ok_and(|m| m.len() == u64::from(memory_mib) << 20)
    }

    /// The snapshot of `recipe` for this VM shape, built on first use (its layers must exist).
    pub(super) async fn template(
        &self,
        recipe: &Recipe,
        vcpus: u32,
        memory_mib: u32,
    ) -> Result<Arc<TemplateSnapshot>, ApiError> {
        let key = self.template_key(recipe, vcpus, memory_mib);
        let now = std::time::Instant::now();
        self.templates
            .last_used
            .lock()
            .expect("template lock")
            .insert(key.clone(), now);
        if let Some(found) = self.templates.ready.lock().expect("template lock").get(&key) {
            return Ok(found.clone());
        }
        let _building = self.templates.build.lock().await;
        if let Some(found) = self.templates.ready.lock().expect("template lock").get(&key) {
            return Ok(found.clone());
        }
        let saved_now = !self.snapshot_usable(&key, memory_mib);
        if saved_now {
            if !recipe.layer.is_file() {
                return Err(ApiError::NotFound(format!(
                    "the disk layer of template '{}' is missing ({}); build the template again",
                    recipe.name,
                    recipe.layer.display()
                )));
            }
            let started = std::time::Instant::now();
            tracing::info!(template = %recipe.name, vcpus, memory_mib, "building the template snapshot");
            let scratch = Scratch::default();
            let limit = Duration::from_secs(viv_api::DEFAULT_BUILD_TIMEOUT_SECS);
            let built = tokio::time::timeout(
                limit,
                self.build_snapshot(
                    &key,
                    recipe,
                    &recipe.layer,
                    &[],
                    vcpus,
                    memory_mib,
                    &BuildLog::default(),
                    &scratch,
                ),
            )
            .await
            .unwrap_or_else(|_| {
                Err(ApiError::Sandbox(format!(
                    "template '{}' was not ready within {limit:?}",
                    recipe.name
                )))
            });
            if let Err(err) = built {
                scratch.remove_all();
                return Err(err);
            }
            tracing::info!(template = %recipe.name, ms = started.elapsed().as_millis() as u64, "template snapshot ready");
            self.trim_template_memory(&key);
        }
        let (_, snapshot) = self.snapshot_paths(&key);
        let snapshot = Arc::new(snapshot);
        if !saved_now {
            // Saved by an earlier server, perhaps one that left it in 4 KiB pages: collapsed in
            // the background (clones mapping it run on; collapsing moves pages, never changes
            // them), quickly when it is in 2 MiB pages already.
            let memory = snapshot.memory_file.clone();
            drop(tokio::spawn(async move { collapse_memory(&memory).await }));
        }
        self.templates
            .ready
            .lock()
            .expect("template lock")
            .insert(key, snapshot.clone());
        Ok(snapshot)
    }

    /// Drops the memory files of the least recently used template snapshots (never `keep`'s,
    /// nor one a start holds) while all of them take more tmpfs than the budget.
    fn trim_template_memory(&self, keep: &str) {
        let budget = crate::capacity::template_memory_budget();
        let dir = self.shm_dir.join("templates");
        let mut files: Vec<(PathBuf, String, u64)> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "mem"))
            .filter_map(|e| {
                use std::os::unix::fs::MetadataExt as _;
                let bytes = e.metadata().ok()?.blocks() * 512;
                let name = e.path().file_stem()?.to_string_lossy().into_owned();
                // `KEY.mem`, or `KEY-GENERATION.mem`.
                let key = name.split('-').next().unwrap_or_default().to_owned();
                Some((e.path(), key, bytes))
            })
            .collect();
        let mut total: u64 = files.iter().map(|(_, _, bytes)| bytes).sum();
        let last_used = self.templates.last_used.lock().expect("template lock").clone();
        // Oldest first; snapshots of earlier server processes count as oldest.
        files.sort_by_key(|(_, key, _)| last_used.get(key).copied());
        for (path, key, bytes) in files {
            if total <= budget {
                break;
            }
            if key == keep {
                continue;
            }
            let mut ready = self.templates.ready.lock().expect("template lock");
            if ready.get(&key).is_some_and(|s| Arc::strong_count(s) > 1) {
                continue;
            }
            ready.remove(&key);
            drop(ready);
            if std::fs::remove_file(&path).is_ok() {
                tracing::info!(snapshot = %key, mib = bytes >> 20, "dropped the memory of a template snapshot not used lately");
                total = total.saturating_sub(bytes);
            }
        }
    }

    /// Boots `boot_layer`, runs `steps` (freezing a layer after each that changes the disk),
    /// starts the recipe's start command, waits for its ready command and saves the snapshot
    /// `key`. The caller holds the build lock; everything created is registered in `scratch`,
    /// for the caller to remove if this fails or is cancelled.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn build_snapshot(
        &self,
        key: &str,
        recipe: &Recipe,
        boot_layer: &Path,
        steps: &[PendingStep],
        vcpus: u32,
        memory_mib: u32,
        log: &BuildLog,
        scratch: &Scratch,
    ) -> Result<(), ApiError> {
        let dir = self.config.data_dir.join("templates").join(key);
        let previous = self.snapshot_generation(key);
        let snapshot = self.snapshot_files(key, previous.map_or(0, |g| g + 1));
        let parent = self.config.data_dir.join("templates");
        let building = parent.join(format!("{key}.building"));
        let memory_building = snapshot.memory_file.with_extension("building");
        // A complete snapshot directory is never removed: disks of sandboxes and snapshot nodes
        // may be backed by its layers.
        if previous.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_dir_all(&building);
        let _ = std::fs::remove_file(&memory_building);
        let mkdir = |d: &Path| {
            std::fs::create_dir_all(d).map_err(|e| ApiError::Internal(format!("creating {}: {e}", d.display())))
        };
        scratch.add(building.clone());
        scratch.add(memory_building.clone());
        mkdir(&building)?;
        mkdir(snapshot.memory_file.parent().expect("memory file has a directory"))?;
        let id = format!("template-{key}");
        let origin = Origin::Boot {
            layer: boot_layer,
            memory_file: memory_building.clone(),
        };
        // Build steps may download (apt-get, pip); the snapshot's device set includes the card.
        let live = self
            .start_sandbox_vm(&id, &building, origin, vcpus, memory_mib, &viv_net::PolicySpec::open())
            .await?;
        let prepared = async {
            // Gives the agent the channel key that every restore of this snapshot will use.
            self.init_agent(&live, None, None).await?;
            self.run_steps(&live, steps, log, scratch).await?;
            self.start_template(&live, recipe, log).await
        }
        .await;
        if let Err(err) = prepared {
            let _ = live.vm.kill().await;
            return Err(err);
        }
        // The host hangs up first, so nothing of its connection is in flight when the VM is
        // saved; a restored agent ends that session at the next host's reset.
        live.agent.close().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        let state = building.join("state");
        let saved = live.vm.snapshot(&state, viv_vmm::SnapshotMemory::External).await;
        let _ = live.vm.kill().await;
        saved.map_err(|e| ApiError::Internal(format!("snapshotting the template: {e}")))?;
        viv_vmm::sync_file(&state)
            .await
            .map_err(|e| ApiError::Internal(format!("writing the template's state: {e}")))?;
        let disk = live.root_disk.lock().expect("disk lock").clone();
        std::fs::rename(&disk, building.join("disk.qcow2"))
            .map_err(|e| ApiError::Internal(format!("keeping the template's disk: {e}")))?;
        collapse_memory(&memory_building).await;
        // The disk and memory every clone shares: root's, read-only to VMs.
        super::snapshots::seal(&building.join("disk.qcow2"))?;
        super::snapshots::seal(&memory_building)?;
        // Earlier overlays of the build are hard links of step layers; sockets and logs go too.
        for entry in std::fs::read_dir(&building).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name != "disk.qcow2" && name != "state" {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let stored = match previous {
            None => std::fs::write(building.join("layer"), recipe.layer.to_string_lossy().as_bytes())
                .and_then(|()| std::fs::rename(&memory_building, &snapshot.memory_file))
                .and_then(|()| std::fs::write(building.join("ready"), b"0"))
                .and_then(|()| std::fs::rename(&building, &dir))
                .map(|()| vec![dir, snapshot.memory_file]),
            Some(generation) => std::fs::rename(building.join("disk.qcow2"), &snapshot.disk)
                .and_then(|()| std::fs::rename(building.join("state"), &snapshot.state))
                .and_then(|()| std::fs::rename(&memory_building, &snapshot.memory_file))
                .and_then(|()| std::fs::write(dir.join("ready.new"), (generation + 1).to_string()))
                .and_then(|()| std::fs::rename(dir.join("ready.new"), dir.join("ready")))
                .map(|()| vec![snapshot.disk, snapshot.state, snapshot.memory_file]),
        };
        let stored = stored.map_err(|e| ApiError::Internal(format!("storing the template snapshot: {e}")))?;
        let _ = std::fs::remove_dir_all(&building);
        for path in stored {
            scratch.add(path);
        }
        Ok(())
    }

    /// Starts the recipe's start command in the background and waits until its ready command
    /// succeeds (without one, until the start command has run for a moment without failing).
    pub(super) async fn start_template(
        &self,
        live: &super::LiveSandbox,
        recipe: &Recipe,
        log: &BuildLog,
    ) -> Result<(), ApiError> {
        let user = build_user(&recipe.config);
        if let Some(dir) = &recipe.config.workdir {
            self.ensure_dir(live, dir).await?;
        }
        if recipe.config.user.is_some() || recipe.config.workdir.is_some() {
            // The last USER and WORKDIR are the sandboxes' defaults; the agent keeps them in
            // the snapshot's memory.
            let defaults = serde_json::json!({
                "defaultUser": recipe.config.user,
                "defaultWorkdir": recipe.config.workdir,
            });
            live.agent
                .call::<_, serde_json::Value>("/init", &defaults)
                .await
                .map_err(|e| ApiError::Sandbox(format!("setting the default user and directory: {e}")))?;
        }
        let Some(start) = &recipe.start else {
            return Ok(());
        };
        log.info(&format!("starting: {start}"));
        let request = process_request(start, &recipe.config);
        // Dropping the start command's event stream leaves the command running.
        let start_run = live
            .agent
            .run(&request, Some(&user), |stream, bytes| log.output(stream, bytes));
        tokio::pin!(start_run);
        let ready_wait = async {
            let Some(ready) = &recipe.ready else {
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            };
            log.info(&format!("waiting for: {}", ready.command));
            let probe = process_request(&ready.command, &recipe.config);
            let waiting_since = std::time::Instant::now();
            let mut last_note = waiting_since;
            loop {
                // The probe's own output (the last 2 KiB) explains a refusal: a health endpoint
                // that says why it is not ready, a connection refused.
                // stdout and stderr apart: their chunks interleave on the way.
                let mut output = [Vec::<u8>::new(), Vec::<u8>::new()];
                let code = live
                    .agent
                    .run(&probe, Some(&user), |stream, bytes| {
                        let kept = &mut output[usize::from(stream != crate::agent_client::OutputStream::Stdout)];
                        kept.extend_from_slice(bytes);
                        let excess = kept.len().saturating_sub(1024);
                        kept.drain(..excess);
                    })
                    .await
                    .map_err(|e| ApiError::BadRequest(format!("running the ready command ({}): {e}", ready.command)))?;
                if code == 0 {
                    log.info("ready");
                    return Ok(());
                }
                let said = output
                    .iter()
                    .map(|bytes| {
                        String::from_utf8_lossy(bytes)
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ")
                    })
                    .filter(|text| !text.is_empty())
                    .collect::<Vec<_>>()
                    .join(" | ");
                let said = if said.is_empty() {
                    String::new()
                } else {
                    format!(": {said}")
                };
                if waiting_since.elapsed() >= READY_DEADLINE {
                    return Err(ApiError::BadRequest(format!(
                        "the template was not ready within {} s: the ready command ({}) still exits with {code}{said}",
                        READY_DEADLINE.as_secs(),
                        ready.command
                    )));
                }
                if last_note.elapsed() >= Duration::from_secs(10) {
                    log.info(&format!(
                        "not ready yet (the ready command exits with {code}{said}); still waiting"
                    ));
                    last_note = std::time::Instant::now();
                }
                tokio::time::sleep(ready.interval).await;
            }
        };
        tokio::pin!(ready_wait);
        let mut start_ended = false;
        loop {
            tokio::select! {
                exit = &mut start_run, if !start_ended => match exit {
                    // A start command that daemonizes ends successfully; readiness decides.
                    Ok(0) => start_ended = true,
                    Ok(code) => {
                        return Err(ApiError::BadRequest(format!(
                            "the start command ({start}) exited with code {code} before the template was ready"
                        )))
                    }
                    Err(err) => return Err(ApiError::BadRequest(format!("the start command ({start}) failed: {err}"))),
                },
                ready = &mut ready_wait => return ready,
            }
        }
    }
}

/// How long a build waits for its ready command to succeed once the start command runs.
const READY_DEADLINE: Duration = Duration::from_secs(600);

/// A value as the JSON text hashed into a key.
fn json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).expect("key parts serialize")
}

/// Backs a template's memory file with 2 MiB pages (`viv_vmm::huge_pages`): a new one before
/// any clone maps it, one of an earlier server when first used. A refusal only logs: the file
/// is correct either way, its clones' first saves are slower. `VIV_TEMPLATE_HUGE_PAGES=0`
/// leaves it in 4 KiB pages.
async fn collapse_memory(memory_file: &Path) {
    if std::env::var("VIV_TEMPLATE_HUGE_PAGES").is_ok_and(|v| v == "0") {
        return;
    }
    let path = memory_file.to_path_buf();
    let started = std::time::Instant::now();
    match tokio::task::spawn_blocking(move || viv_vmm::huge_pages::collapse_file(&path)).await {
        Ok(Ok(())) => {
            tracing::debug!(
                ms = started.elapsed().as_millis() as u64,
                "template memory in 2 MiB pages"
            )
        }
        Ok(Err(err)) => {
            tracing::info!(%err, "template memory stays in 4 KiB pages (its sandboxes' first saves read it slower)")
        }
        Err(err) => tracing::warn!(%err, "collapsing template memory"),
    }
}
