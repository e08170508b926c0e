//! Template builds from specs, with a layer cache.
//!
//! A build boots one VM from the layer of what the spec is `FROM`, runs each step through the
//! agent, and freezes the disk after every step that changes it (`RUN`, `COPY`, `WORKDIR`) as a
//! qcow2 layer
//! `layers/<key>.qcow2`, backed by the previous one. A step's key hashes its parent's key, the
//! step (variables expanded), the configuration it runs with and, for `COPY`, the files copied;
//! so an unchanged spec rebuilds nothing and a changed step rebuilds from that step on (the VM
//! boots from the last cached layer). After the steps the start command runs, the ready command
//! is polled, and the VM is saved as the template's snapshot.
//!
//! Invariants:
//! - a build that fails, is cancelled or exceeds its time limit kills its VM and removes every
//!   file it created (layers included) from the data directory; with a host layer cache
//!   (`--layer-cache-dir`) the layers of its finished steps are copied there first, so a retry
//!   starts after them;
//! - a layer file exists only while a template row lists its key (or a build is running that
//!   made or uses it); others are collected after builds and deletes, at server start, and at
//!   each heartbeat (a template deleted through another node of the cluster);
//! - a template used by sandboxes or snapshot nodes keeps its layers when rebuilt or deleted
//!   is refused, since their disks are backed by those layers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use viv_api::{BuildEvent, TemplateInfo};
use viv_template::{ImageConfig, Instruction, PlannedStep, Spec};

use super::copy_archive::{copy_archive, CopyArchive};
use super::template_versions::same_recipe;
use super::templates::{build_user, process_request, Recipe};
use super::{LiveSandbox, Manager};
use crate::agent_client::OutputStream;
use crate::error::ApiError;
use crate::store::{now_rfc3339, TemplateRow};

/// Bumped when the layer format or the way steps run changes.
const LAYER_FORMAT: u32 = 1;

/// Bytes of a failing step's output quoted in the error.
const OUTPUT_TAIL: usize = 2000;

/// Where a build's events go (nowhere for the snapshot builds a create triggers), and what the
/// build is doing, for error messages.
#[derive(Clone, Default)]
pub struct BuildLog {
    events: Option<mpsc::UnboundedSender<BuildEvent>>,
    state: Arc<Mutex<LogState>>,
}

#[derive(Default)]
struct LogState {
    /// Line of the step running.
    line: Option<usize>,
    /// Exit code of the step that failed.
    exit_code: Option<i32>,
    /// The end of the running step's output.
    tail: Vec<u8>,
}

impl BuildLog {
    /// A log that sends its events to `events`.
    pub fn new(events: mpsc::UnboundedSender<BuildEvent>) -> Self {
        Self {
            events: Some(events),
            state: Arc::default(),
        }
    }

    /// Sends an event as it is (the SDK's builds end their logs with `done` or `error`).
    pub fn send_event(&self, event: BuildEvent) {
        self.send(event);
    }

    fn send(&self, event: BuildEvent) {
        if let Some(events) = &self.events {
            let _ = events.send(event);
        }
    }

    fn step(&self, index: usize, total: usize, step: &PlannedStep, cached: bool) {
        {
            let mut state = self.state.lock().expect("log lock");
            state.line = Some(step.step.line);
            state.tail.clear();
        }
        self.send(BuildEvent::Step {
            index,
            total,
            line: step.step.line,
            instruction: step.step.text.clone(),
            cached,
        });
    }

    /// A note from the builder.
    pub fn info(&self, text: &str) {
        self.send(BuildEvent::Log {
            stream: "info".into(),
            text: format!("{text}\n"),
        });
    }

    /// Output of a command.
    pub fn output(&self, stream: OutputStream, bytes: &[u8]) {
        {
            let mut state = self.state.lock().expect("log lock");
            state.tail.extend_from_slice(bytes);
            let excess = state.tail.len().saturating_sub(OUTPUT_TAIL);
            state.tail.drain(..excess);
        }
        self.send(BuildEvent::Log {
            stream: match stream {
                OutputStream::Stdout => "stdout",
                OutputStream::Stderr => "stderr",
            }
            .into(),
            text: String::from_utf8_lossy(bytes).into_owned(),
        });
    }

    /// The error event for a failed build.
    pub fn failure(&self, err: &ApiError) -> BuildEvent {
        let state = self.state.lock().expect("log lock");
        BuildEvent::Error {
            message: err.to_string(),
            line: state.line,
            exit_code: state.exit_code,
        }
    }
}

/// Files and directories a build created, removed if it does not finish; and the layers it
/// froze completely, which a failed build still offers to the host's layer cache.
#[derive(Default)]
pub struct Scratch {
    paths: Mutex<Vec<PathBuf>>,
    frozen: Mutex<Vec<String>>,
}

impl Scratch {
    pub(super) fn add(&self, path: PathBuf) {
        self.paths.lock().expect("scratch lock").push(path);
    }

    /// Keys of the layers frozen whole (the VM paused while its disk was switched).
    fn frozen_keys(&self) -> Vec<String> {
        self.frozen.lock().expect("scratch lock").clone()
    }

    /// Removes everything registered.
    pub(super) fn remove_all(&self) {
        for path in self.paths.lock().expect("scratch lock").drain(..) {
            if path.is_dir() {
                let _ = std::fs::remove_dir_all(&path);
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
}

/// A step still to run, with its key and, for `COPY`, the archive to unpack.
pub struct PendingStep {
    planned: PlannedStep,
    index: usize,
    total: usize,
    /// The layer this step freezes, for steps that change the disk.
    layer: Option<PathBuf>,
    copy: Option<CopyArchive>,
}

/// A validated build, ready to run.
pub struct BuildJob {
    name: String,
    spec_text: String,
    spec: Spec,
    context: Option<PathBuf>,
    cpu_count: u32,
    memory_mb: u32,
    limit: Duration,
    from_layer: PathBuf,
    plan: Vec<PlannedStep>,
    base_config: ImageConfig,
    options: JobOptions,
}

/// How a build differs from a spec build (the SDK's builds set these).
#[derive(Debug, Clone)]
pub struct JobOptions {
    /// The configuration the first step starts from, instead of the `FROM` template's.
    pub base_config: Option<ImageConfig>,
    /// The plan step from which the cache is skipped (that step and every later one rebuild).
    pub force_from: Option<usize>,
    /// Whether a `COPY` source that is itself a symlink is followed (Docker) or copied as a link.
    pub follow_source_links: bool,
}

impl Default for JobOptions {
    fn default() -> Self {
        Self {
            base_config: None,
            force_from: None,
            follow_source_links: true,
        }
    }
}

/// The builds running, by template name, and the layer keys they use (kept from collection).
#[derive(Default)]
pub struct Builds {
    pub(super) running: Mutex<BTreeMap<String, Vec<String>>>,
}

/// Releases a build's name and layers when the build ends.
pub(super) struct BuildSlot<'a> {
    pub(super) builds: &'a Builds,
    pub(super) name: String,
}

impl Drop for BuildSlot<'_> {
    fn drop(&mut self) {
        self.builds.running.lock().expect("builds lock").remove(&self.name);
    }
}

/// Names the routes of E2B's tags and aliases take (`/templates/tags`, `/templates/aliases/..`)
/// and the built-in templates' route (`/templates/builtin/..`).
const RESERVED_NAMES: &[&str] = &["tags", "aliases", "builtin"];

/// The key of a layer file (`layers/<key>.qcow2`).
fn layer_key_of(layer: &Path) -> String {
    layer
        .file_stem()
        .map(|stem| stem.to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub(super) fn valid_template_name(name: &str) -> bool {
    !RESERVED_NAMES.contains(&name)
        && !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
}

impl Manager {
    pub(super) fn layer_path(&self, key: &str) -> PathBuf {
        self.config.data_dir.join("layers").join(format!("{key}.qcow2"))
    }

    /// This node's file of a template row's layer: rows name a layer by the path it had on the
    /// node that made it; every node keeps its copy under the same file name in its own
    /// `layers/` (see `layer_fetch.rs`).
    pub(super) fn local_layer(&self, stored: &str) -> PathBuf {
        match Path::new(stored).file_name() {
            Some(name) => self.config.data_dir.join("layers").join(name),
            None => PathBuf::from(stored),
        }
    }

    /// What a spec's `FROM` names: its disk layer and the configuration it hands down.
    fn resolve_from(&self, from: &str) -> Result<(PathBuf, ImageConfig), ApiError> {
        if from == viv_api::DEFAULT_TEMPLATE {
            return Ok((self.boot.rootfs.clone(), ImageConfig::default()));
        }
        if let Some(row) = self.store.template(from)? {
            return Ok((self.local_layer(&row.layer), row.config));
        }
        if let Ok(path) = self.images.find_named(from) {
            return Ok((path, ImageConfig::default()));
        }
        Err(ApiError::BadRequest(format!(
            "line 1: FROM '{from}': no template or image has that name. Build FROM 'base', a template built \
             earlier (`viv template list`) or an image imported with `viv image import`; Vivarium does not pull \
             from registries"
        )))
    }

    /// The recipe of a template name: `base`, a built template or an imported image.
    pub(super) fn recipe(&self, template: &str) -> Result<Recipe, ApiError> {
        let plain = |layer: PathBuf| Recipe {
            name: template.to_owned(),
            layer,
            config: ImageConfig::default(),
            start: None,
            ready: None,
            cpu_count: self.config.vcpus,
            memory_mb: self.config.memory_mib,
        };
        if template == viv_api::DEFAULT_TEMPLATE {
            return Ok(plain(self.boot.rootfs.clone()));
        }
        if let Some(row) = self.store.template(template)? {
            return Ok(Recipe {
                name: row.name,
                layer: self.local_layer(&row.layer),
                config: row.config,
                start: row.start,
                ready: row.ready,
                cpu_count: row.cpu_count,
                memory_mb: row.memory_mb,
            });
        }
        match self.images.find_named(template) {
            Ok(layer) => Ok(plain(layer)),
            // A name no image could have names no template either.
            Err(viv_image::ImageError::NotFound(_) | viv_image::ImageError::Invalid(_)) => {
                Err(ApiError::NotFound(format!(
                    "template '{template}' not found; `viv template list` shows the templates (build one with \
                 `viv template build`)"
                )))
            }
            Err(other) => Err(ApiError::BadRequest(other.to_string())),
        }
    }

    /// Checks a build request completely (name, `FROM`, limits, variables) before anything runs.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_build(
        &self,
        name: &str,
        spec_text: String,
        spec: Spec,
        context: Option<PathBuf>,
        cpu_count: Option<u32>,
        memory_mb: Option<u32>,
        timeout: Option<u64>,
    ) -> Result<BuildJob, ApiError> {
        if !valid_template_name(name) {
            return Err(ApiError::BadRequest(format!(
                "template name '{name}' is invalid: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit{}",
                if RESERVED_NAMES.contains(&name) { " (and not tags, aliases or builtin)" } else { "" }
            )));
        }
        self.prepare_job(
            name,
            spec_text,
            spec,
            context,
            (cpu_count, memory_mb, timeout),
            JobOptions::default(),
        )
    }

    /// [`Manager::prepare_build`] for a name already checked (a template row name, which for
    /// the SDK's tagged builds is `name:tag`), with `options`.
    pub(super) fn prepare_job(
        &self,
        name: &str,
        spec_text: String,
        spec: Spec,
        context: Option<PathBuf>,
        (cpu_count, memory_mb, timeout): (Option<u32>, Option<u32>, Option<u64>),
        options: JobOptions,
    ) -> Result<BuildJob, ApiError> {
        self.require_template_snapshots()?;
        if self.builds.running.lock().expect("builds lock").contains_key(name) {
            return Err(ApiError::Conflict(format!(
                "template '{name}' is being built already; wait for that build to end"
            )));
        }
        if name == viv_api::DEFAULT_TEMPLATE {
            return Err(ApiError::Conflict(format!(
                "'{name}' is the built-in template; choose another name (and build FROM {name})"
            )));
        }
        if self.store.snapshot(name)?.is_some() || self.images.find_named(name).is_ok() {
            return Err(ApiError::Conflict(format!(
                "a snapshot or imported image is already named '{name}'; choose another name"
            )));
        }
        if self.store.version(name)?.is_some() {
            return Err(ApiError::Conflict(format!(
                "'{name}' is a version of a template (`viv template history`); choose another name"
            )));
        }
        let cpu_count = cpu_count.unwrap_or(self.config.vcpus);
        let memory_mb = memory_mb.unwrap_or(self.config.memory_mib);
        super::check_shape(cpu_count, memory_mb)?;
        let timeout = timeout.unwrap_or(viv_api::DEFAULT_BUILD_TIMEOUT_SECS);
        if !(1..=viv_api::MAX_BUILD_TIMEOUT_SECS).contains(&timeout) {
            return Err(ApiError::BadRequest(format!(
                "timeout must be between 1 and {} seconds, got {timeout}",
                viv_api::MAX_BUILD_TIMEOUT_SECS
            )));
        }
        if spec.from == name {
            return Err(ApiError::BadRequest(format!(
                "line 1: template '{name}' cannot be built FROM itself"
            )));
        }
        let (from_layer, mut base_config) = self.resolve_from(&spec.from)?;
        if let Some(config) = &options.base_config {
            base_config = config.clone();
        }
        let plan = spec
            .plan(&base_config)
            .map_err(|e| ApiError::BadRequest(e.to_string()))?;
        if context.is_none() {
            if let Some(copy) = plan.iter().find(|p| matches!(p.instruction, Instruction::Copy { .. })) {
                return Err(ApiError::BadRequest(format!(
                    "line {}: COPY needs a build context; send the spec with its directory (`viv template build DIR`)",
                    copy.step.line
                )));
            }
        }
        Ok(BuildJob {
            name: name.to_owned(),
            spec_text,
            spec,
            context,
            cpu_count,
            memory_mb,
            limit: Duration::from_secs(timeout),
            from_layer,
            plan,
            base_config,
            options,
        })
    }

    /// Unpacks an uploaded build context into a directory of its own (removed after the build,
    /// or at the next server start).
    pub async fn unpack_context(&self, archive: bytes::Bytes) -> Result<PathBuf, ApiError> {
        let dir = self.config.data_dir.join("builds").join(super::random_id(12));
        let target = dir.clone();
        let unpacked = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&target)?;
            let mut reader = tar::Archive::new(archive.as_ref());
            reader.set_preserve_permissions(true);
            // Entries that would land outside the directory are refused by `unpack`.
            reader.unpack(&target)
        })
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(err) = unpacked {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(ApiError::BadRequest(format!(
                "the request body is not a usable tar archive of the build context: {err}"
            )));
        }
        Ok(dir)
    }

    fn require_template_snapshots(&self) -> Result<(), ApiError> {
        if self.config.snapshots {
            Ok(())
        } else {
            Err(ApiError::BadRequest(
                "this server runs without snapshots (--snapshots=false); template builds need them".into(),
            ))
        }
    }

    /// Runs a build to its end. On failure everything it created is gone.
    pub async fn build_template(&self, job: BuildJob, log: &BuildLog) -> Result<TemplateInfo, ApiError> {
        let _slot = {
            let mut running = self.builds.running.lock().expect("builds lock");
            if running.contains_key(&job.name) {
                return Err(ApiError::Conflict(format!(
                    "template '{}' is being built already; wait for that build to end",
                    job.name
                )));
            }
            running.insert(job.name.clone(), Vec::new());
            BuildSlot {
                builds: &self.builds,
                name: job.name.clone(),
            }
        };
        let started = Instant::now();
        let scratch = Scratch::default();
        let result = match tokio::time::timeout(job.limit, self.run_build(&job, log, &scratch)).await {
            Ok(result) => result,
            Err(_) => Err(ApiError::BadRequest(format!(
                "the build exceeded its time limit of {} s",
                job.limit.as_secs()
            ))),
        };
        let (recipe, layers) = match result {
            Ok(done) => done,
            Err(err) => {
                // Steps that finished are valid cache entries (their keys name all they are
                // made of): the next attempt, here or on another server, starts after them.
                self.offer_layers(scratch.frozen_keys()).await;
                scratch.remove_all();
                tracing::warn!(template = %job.name, error = %err, "template build failed");
                return Err(err);
            }
        };
        let build_ms = started.elapsed().as_millis() as u64;
        let built_layers = layers.clone();
        let mut keep = layers;
        if let Some(previous) = self.store.template(&job.name)? {
            if self.template_users(&job.name)?.is_some() {
                keep.extend(
                    previous
                        .layers
                        .into_iter()
                        .filter(|k| !keep.contains(k))
                        .collect::<Vec<_>>(),
                );
            }
        }
        let row = TemplateRow {
            name: job.name.clone(),
            from: job.spec.from.clone(),
            layer: recipe.layer.to_string_lossy().into_owned(),
            config: recipe.config,
            start: recipe.start,
            ready: recipe.ready,
            cpu_count: job.cpu_count,
            memory_mb: job.memory_mb,
            spec: job.spec_text.clone(),
            layers: keep,
            created_at: now_rfc3339(),
            build_ms,
        };
        let unchanged = self
            .store
            .template(&job.name)?
            .is_some_and(|old| same_recipe(&old, &row));
        let (version, created) = self.record_version(&row, &built_layers)?;
        if !unchanged {
            self.store.put_template(&row)?;
            self.empty_pool(Some(&job.name)).await;
        }
        self.offer_layers(row.layers.clone()).await;
        drop(_slot);
        if let Err(err) = self.apply_retention(super::sdk_spec::split_ref(&job.name).0).await {
            tracing::warn!(template = %job.name, error = %err, "applying the version retention policy");
        }
        self.collect_layers();
        tracing::info!(template = %job.name, ms = build_ms, version = %version, created, "template built");
        let mut info = self.template_info_of(row);
        info.version_id = Some(version);
        info.version_created = Some(created);
        Ok(info)
    }

    /// The build proper: keys, cache lookup, steps and snapshot. Returns the recipe and the keys
    /// of its layers.
    async fn run_build(
        &self,
        job: &BuildJob,
        log: &BuildLog,
        scratch: &Scratch,
    ) -> Result<(Recipe, Vec<String>), ApiError> {
        for (line, warning) in &job.spec.warnings {
            log.info(&format!("line {line}: {warning}"));
        }
        let total = job.plan.len();
        let mut key = {
            let mut hash = Sha256::new();
            hash.update(job.from_layer.to_string_lossy().as_bytes());
            // Which file is there too: a base image rebuilt in place gets new keys, so no layer
            // built on the old one (here or in the host's layer cache) is taken for it.
            if let Ok(meta) = std::fs::metadata(&job.from_layer) {
                let modified = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
                hash.update(format!("{}:{:?}", meta.len(), modified).as_bytes());
            }
            hash.update(serde_json::to_vec(&job.base_config).expect("config serializes"));
            hash.update(LAYER_FORMAT.to_le_bytes());
            hex::encode(&hash.finalize()[..16])
        };
        let mut pending = Vec::new();
        let mut layer_keys = Vec::new();
        for (index, planned) in job.plan.iter().enumerate() {
            let copy =
                match &planned.instruction {
                    Instruction::Copy { sources, dest, .. } => {
                        let context = job.context.as_deref().expect("checked: COPY has a context");
                        let follow = job.options.follow_source_links;
                        Some(copy_archive(context, sources, dest, follow).map_err(|message| {
                            ApiError::BadRequest(format!("line {}: {message}", planned.step.line))
                        })?)
                    }
                    _ => None,
                };
            let mut hash = Sha256::new();
            hash.update(key.as_bytes());
            hash.update(format!("{:?}", planned.instruction).as_bytes());
            hash.update(serde_json::to_vec(&planned.config).expect("config serializes"));
            if let Some(copy) = &copy {
                hash.update(copy.digest.as_bytes());
            }
            if job.options.force_from == Some(index) {
                // A key no earlier build had: this step and every later one rebuild.
                hash.update(super::random_id(32).as_bytes());
            }
            key = hex::encode(&hash.finalize()[..16]);
            let changes_disk = matches!(
                planned.instruction,
                Instruction::Run(_) | Instruction::Copy { .. } | Instruction::Workdir(_)
            );
            if changes_disk {
                layer_keys.push(key.clone());
            }
            pending.push(PendingStep {
                planned: planned.clone(),
                index: index + 1,
                total,
                layer: changes_disk.then(|| self.layer_path(&key)),
                copy,
            });
        }
        self.builds
            .running
            .lock()
            .expect("builds lock")
            .insert(job.name.clone(), layer_keys.clone());
        // The longest prefix of steps whose layers exist is taken from the cache.
        let mut boot_layer = job.from_layer.clone();
        let mut first_pending = 0;
        for (i, step) in pending.iter().enumerate() {
            match &step.layer {
                Some(layer) if layer.is_file() || self.fetch_cached_layer(&layer_key_of(layer), layer) => {
                    boot_layer = layer.clone();
                    first_pending = i + 1;
                }
                Some(_) => break,
                // `ENV` and `USER` change nothing on disk; later steps carry their effect.
                None => first_pending = i + 1,
            }
        }
        for step in &pending[..first_pending] {
            log.step(step.index, step.total, &step.planned, true);
        }
        let final_layer = pending
            .iter()
            .rev()
            .find_map(|s| s.layer.clone())
            .unwrap_or_else(|| job.from_layer.clone());
        let config = job
            .plan
            .last()
            .map(|p| p.config.clone())
            .unwrap_or_else(|| job.base_config.clone());
        let recipe = Recipe {
            name: job.name.clone(),
            layer: final_layer,
            config,
            start: job.spec.start.clone(),
            ready: job.spec.ready.clone(),
            cpu_count: job.cpu_count,
            memory_mb: job.memory_mb,
        };
        let snapshot_key = self.template_key(&recipe, job.cpu_count, job.memory_mb);
        let _building = self.templates.build.lock().await;
        if first_pending == pending.len()
            && job.options.force_from.is_none()
            && self.snapshot_usable(&snapshot_key, job.memory_mb)
        {
            log.info("every step and the snapshot are cached; nothing to rebuild");
            return Ok((recipe, layer_keys));
        }
        self.templates.forget(std::slice::from_ref(&snapshot_key));
        self.build_snapshot(
            &snapshot_key,
            &recipe,
            &boot_layer,
            &pending[first_pending..],
            job.cpu_count,
            job.memory_mb,
            log,
            scratch,
        )
        .await?;
        Ok((recipe, layer_keys))
    }

    /// Runs build steps in a build VM; each step that changes the disk ends with its layer
    /// frozen.
    pub(super) async fn run_steps(
        &self,
        live: &LiveSandbox,
        steps: &[PendingStep],
        log: &BuildLog,
        scratch: &Scratch,
    ) -> Result<(), ApiError> {
        for step in steps {
            log.step(step.index, step.total, &step.planned, false);
            let line = step.planned.step.line;
            let config = &step.planned.config;
            match &step.planned.instruction {
                Instruction::Run(command) => {
                    if let Some(dir) = &config.workdir {
                        self.ensure_dir(live, dir).await?;
                    }
                    let user = build_user(config);
                    let code = live
                        .agent
                        .run(&process_request(command, config), Some(&user), |stream, bytes| {
                            log.output(stream, bytes)
                        })
                        .await
                        .map_err(|e| ApiError::BadRequest(format!("line {line}: RUN {command}: {e}")))?;
                    if code != 0 {
                        let tail = {
                            let mut state = log.state.lock().expect("log lock");
                            state.exit_code = Some(code);
                            String::from_utf8_lossy(&state.tail).trim_end().to_owned()
                        };
                        return Err(ApiError::BadRequest(format!(
                            "line {line}: RUN {command} failed with exit code {code}; its output ended with:\n{tail}"
                        )));
                    }
                }
                Instruction::Copy { chown, .. } => {
                    let archive = step.copy.as_ref().expect("COPY steps carry their archive");
                    self.unpack_in_guest(live, &archive.target, chown.as_deref(), archive.tar.clone())
                        .await
                        .map_err(|e| ApiError::BadRequest(format!("line {line}: COPY: {e}")))?;
                }
                Instruction::Workdir(dir) => self.ensure_dir(live, dir).await?,
                Instruction::Env(_) | Instruction::User(_) => {}
            }
            if let Some(layer) = &step.layer {
                self.freeze_layer(live, layer, scratch).await?;
            }
        }
        Ok(())
    }

    /// Creates a directory in the guest (as root), with its parents.
    pub(super) async fn ensure_dir(&self, live: &LiveSandbox, dir: &str) -> Result<(), ApiError> {
        // An archive with no entries: the agent creates the target and unpacks nothing.
        self.unpack_in_guest(live, dir, None, vec![0; 1024])
            .await
            .map_err(|e| ApiError::BadRequest(format!("creating directory {dir}: {e}")))
    }

    async fn unpack_in_guest(
        &self,
        live: &LiveSandbox,
        target: &str,
        owner: Option<&str>,
        tar: Vec<u8>,
    ) -> Result<(), String> {
        let mut query = vec![("path", target)];
        if let Some(owner) = owner {
            query.push(("owner", owner));
        }
        let query = serde_urlencoded::to_string(query).map_err(|e| e.to_string())?;
        let request = hyper::Request::post(format!("http://agent/build/copy?{query}"))
            .header("content-type", "application/x-tar")
            .body(axum::body::Body::from(tar))
            .map_err(|e| e.to_string())?;
        live.agent.send_ok(request).await.map(drop).map_err(|e| e.to_string())
    }

    /// Flushes the guest's writes and freezes the VM's disk overlay as `layer`; the VM goes on
    /// writing to a new overlay backed by it.
    async fn freeze_layer(&self, live: &LiveSandbox, layer: &Path, scratch: &Scratch) -> Result<(), ApiError> {
        let synced = live
            .agent
            .call::<_, serde_json::Value>("/build/sync", &serde_json::json!({}))
            .await;
        synced.map_err(|e| ApiError::Sandbox(format!("flushing the guest's disk: {e}")))?;
        std::fs::create_dir_all(layer.parent().expect("layers have a directory"))
            .map_err(|e| ApiError::Internal(format!("creating the layer directory: {e}")))?;
        live.vm
            .pause()
            .await
            .map_err(|e| ApiError::Sandbox(format!("pausing the build VM: {e}")))?;
        scratch.add(layer.to_path_buf());
        let swapped = self.swap_disk(live, layer, layer).await;
        let resumed = live.vm.resume().await;
        swapped?;
        scratch.frozen.lock().expect("scratch lock").push(layer_key_of(layer));
        resumed.map_err(|e| ApiError::Sandbox(format!("resuming the build VM: {e}")))
    }
}
