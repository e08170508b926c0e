//! Template builds through E2B's SDK (`Template.build`): the build requests, the uploads of
//! `COPY` files by content hash, build status with logs, and tags, mapped onto the layer builder
//! ([`super::builds`]).
//!
//! A build of `name` with tags `t1, t2` (`default` when none) runs as a build of the template
//! row of its first tag and, once done, writes the same recipe to the rows of the other tags
//! (`name` for `default`, `name:tag` otherwise); `Sandbox.create("name:tag")` starts from that
//! row. Rows share layers and snapshots, so a tag costs a row.
//!
//! Invariants: uploaded files are written under a temporary name and renamed, so a file whose
//! hash is reported present is complete; an upload is accepted only with the token its link
//! carries; build records live in memory (the last [`MAX_RECORDS`], each with at most
//! [`MAX_LOG_ENTRIES`] log entries); which build made a row is in the store, so tags keep their
//! build ids across restarts; a tag row whose template has sandboxes keeps their layers when it
//! is replaced.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Serialize;
use viv_api::BuildEvent;
use viv_template::{ImageConfig, Instruction};

use super::builds::{valid_template_name, BuildJob, BuildLog, JobOptions};
use super::sdk_spec::{self, Base, StartBuild};
use super::Manager;
use crate::error::ApiError;
use crate::store::TemplateRow;

/// Build records kept in memory.
const MAX_RECORDS: usize = 256;
/// Log entries kept per build.
const MAX_LOG_ENTRIES: usize = 20_000;
/// Log entries one status call returns at most (E2B's page size).
const MAX_LOG_PAGE: usize = 100;
/// The largest upload of a `COPY` step's files.
const MAX_FILES_BYTES: usize = 1 << 30;

/// `POST /v3/templates` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildRequested {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    public: bool,
    names: Vec<String>,
    tags: Vec<String>,
    aliases: Vec<String>,
}

/// `GET /templates/{id}/files/{hash}` answer: where to upload, and whether it is needed.
#[derive(Debug, Serialize)]
pub struct FileUpload {
    present: bool,
    url: String,
}

/// One log entry of a build.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry {
    timestamp: String,
    level: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
}

/// Why a build failed.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct Reason {
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    step: Option<String>,
    log_entries: Vec<LogEntry>,
}

/// `GET /templates/{id}/builds/{build}/status` answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatus {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "buildID")]
    build_id: String,
    status: &'static str,
    logs: Vec<String>,
    log_entries: Vec<LogEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<Reason>,
}

/// The status call's query.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BuildStatusQuery {
    /// Entries to skip.
    #[serde(default)]
    pub logs_offset: Option<usize>,
    /// Entries to return at most.
    #[serde(default)]
    pub limit: Option<usize>,
    /// The lowest level to return (`debug`, `info`, `warn`, `error`).
    #[serde(default)]
    pub level: Option<String>,
}

/// A tag of a template.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TagInfo {
    tag: String,
    #[serde(rename = "buildID")]
    build_id: String,
    created_at: String,
}

/// `POST /templates/tags` answer.
#[derive(Debug, Serialize)]
pub struct AssignedTags {
    tags: Vec<String>,
    #[serde(rename = "buildID")]
    build_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Waiting,
    Building,
    Ready,
    Error,
}

struct Record {
    template: String,
    tags: Vec<String>,
    cpu_count: Option<u32>,
    memory_mb: Option<u32>,
    status: Status,
    logs: Vec<LogEntry>,
    reason: Option<Reason>,
}

/// The SDK's builds and upload links.
#[derive(Default)]
pub struct SdkBuilds {
    records: Mutex<(HashMap<String, Record>, VecDeque<String>)>,
    /// Upload token → (template, hash).
    uploads: Mutex<HashMap<String, (String, String)>>,
}

fn uuid_v4() -> String {
    let mut bytes = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut bytes);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// A stable build id for a row the SDK did not build (a Dockerfile build).
fn derived_build_id(row: &TemplateRow) -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(format!("{}\0{}\0{}", row.name, row.layer, row.created_at));
    let hex = hex::encode(&digest[..16]);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

fn level_rank(level: &str) -> u8 {
    match level {
        "debug" => 0,
        "info" => 1,
        "warn" => 2,
        _ => 3,
    }
}

fn valid_hash(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

fn not_found_build(build_id: &str, template: &str) -> ApiError {
    ApiError::NotFound(format!("build '{build_id}' of template '{template}' not found"))
}

impl Manager {
    fn files_dir(&self, template: &str) -> PathBuf {
        self.config.data_dir.join("template-files").join(template)
    }

    fn update_record(&self, build_id: &str, update: impl FnOnce(&mut Record)) {
        if let Some(record) = self
            .sdk_builds
            .records
            .lock()
            .expect("records lock")
            .0
            .get_mut(build_id)
        {
            update(record);
        }
    }

    /// `POST /v3/templates`: a build of `name` (`name:tag` adds a tag), waiting for its start.
    pub fn sdk_request_build(
        &self,
        name: &str,
        tags: Vec<String>,
        cpu_count: Option<u32>,
        memory_mb: Option<u32>,
    ) -> Result<BuildRequested, ApiError> {
        let (base, tag) = match name.split_once(':') {
            Some((base, tag)) => (base, Some(tag)),
            None => (name, None),
        };
        if !valid_template_name(base) {
            return Err(ApiError::BadRequest(format!(
                "template name '{base}' is invalid: use 1 to 63 lowercase letters, digits, '-' or '_', starting with a letter or digit (not tags or aliases)"
            )));
        }
        let mut all: Vec<String> = Vec::new();
        for tag in tag.into_iter().map(str::to_owned).chain(tags) {
            let tag = tag.rsplit_once(':').map(|(_, t)| t.to_owned()).unwrap_or(tag);
            if !sdk_spec::valid_tag(&tag) {
                return Err(ApiError::BadRequest(format!(
                    "tag '{tag}' is invalid: use up to 128 letters, digits, '.', '_' or '-', starting with a letter or digit"
                )));
            }
            if !all.contains(&tag) {
                all.push(tag);
            }
        }
        if all.is_empty() {
            all.push(sdk_spec::DEFAULT_TAG.to_owned());
        }
        if let (Some(cpus), Some(memory)) = (
            cpu_count.or(Some(self.config.vcpus)),
            memory_mb.or(Some(self.config.memory_mib)),
        ) {
            super::check_shape(cpus, memory)?;
        }
        let build_id = uuid_v4();
        let mut records = self.sdk_builds.records.lock().expect("records lock");
        let (map, order) = &mut *records;
        while order.len() >= MAX_RECORDS {
            let Some(oldest) = order.pop_front() else { break };
            if map.get(&oldest).is_some_and(|r| r.status == Status::Building) {
                order.push_back(oldest);
                break;
            }
            map.remove(&oldest);
        }
        map.insert(
            build_id.clone(),
            Record {
                template: base.to_owned(),
                tags: all.clone(),
                cpu_count,
                memory_mb,
                status: Status::Waiting,
                logs: Vec::new(),
                reason: None,
            },
        );
        order.push_back(build_id.clone());
        Ok(BuildRequested {
            template_id: base.to_owned(),
            build_id,
            public: false,
            names: vec![base.to_owned()],
            tags: all,
            aliases: vec![base.to_owned()],
        })
    }

    /// `GET /templates/{id}/files/{hash}`: an upload link for the files of a `COPY` step, and
    /// whether they are here already. `base_url` is how the client reaches this server.
    pub fn sdk_file_upload(&self, template: &str, hash: &str, base_url: &str) -> Result<FileUpload, ApiError> {
        if !valid_template_name(template) {
            return Err(ApiError::NotFound(format!("template '{template}' not found")));
        }
        if !valid_hash(hash) {
            return Err(ApiError::BadRequest(format!(
                "'{hash}' is not a files hash (64 hex digits of SHA-256)"
            )));
        }
        let hash = hash.to_ascii_lowercase();
        let present = self.files_dir(template).join(&hash).is_file();
        let token = super::random_id(32);
        self.sdk_builds
            .uploads
            .lock()
            .expect("uploads lock")
            .insert(token.clone(), (template.to_owned(), hash.clone()));
        Ok(FileUpload {
            present,
            url: format!("{base_url}/template-files/{template}/{hash}?token={token}"),
        })
    }

    /// `PUT /template-files/{template}/{hash}?token=`: stores the uploaded archive.
    pub async fn sdk_store_file(
        &self,
        template: &str,
        hash: &str,
        token: &str,
        body: axum::body::Body,
    ) -> Result<(), ApiError> {
        let known = self
            .sdk_builds
            .uploads
            .lock()
            .expect("uploads lock")
            .get(token)
            .cloned();
        if known.as_ref().map(|(t, h)| (t.as_str(), h.as_str())) != Some((template, hash)) {
            return Err(ApiError::Forbidden(
                "this upload link is not valid; ask for one with GET /templates/{id}/files/{hash}".into(),
            ));
        }
        let dir = self.files_dir(template);
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(|e| ApiError::Internal(format!("creating {}: {e}", dir.display())))?;
        let partial = dir.join(format!(".{hash}.{}", super::random_id(8)));
        let written = write_body(&partial, body).await;
        if let Err(err) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(err);
        }
        tokio::fs::rename(&partial, dir.join(hash))
            .await
            .map_err(|e| ApiError::Internal(format!("storing the upload: {e}")))?;
        self.sdk_builds.uploads.lock().expect("uploads lock").remove(token);
        Ok(())
    }

    /// `POST /v2/templates/{id}/builds/{build}`: starts a requested build in the background.
    /// A definition the server cannot build is refused here; an image to pull is pulled in the
    /// background, as part of the build.
    pub async fn sdk_start_build(
        self: &std::sync::Arc<Self>,
        template: &str,
        build_id: &str,
        start: StartBuild,
    ) -> Result<(), ApiError> {
        let (tags, cpu_count, memory_mb) = {
            let records = self.sdk_builds.records.lock().expect("records lock");
            let record = records
                .0
                .get(build_id)
                .filter(|r| r.template == template)
                .ok_or_else(|| not_found_build(build_id, template))?;
            if record.status != Status::Waiting {
                return Err(ApiError::Conflict(format!("build '{build_id}' was started already")));
            }
            (record.tags.clone(), record.cpu_count, record.memory_mb)
        };
        let rows: Vec<String> = tags.iter().map(|t| sdk_spec::row_name(template, t)).collect();
        let shape = (cpu_count, memory_mb, None);
        let base = sdk_spec::base_of(&start).map_err(ApiError::BadRequest)?;
        // The steps must convert whatever the base turns out to be.
        sdk_spec::convert(&start, "base", None).map_err(ApiError::BadRequest)?;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let log = BuildLog::new(tx);
        match base {
            Base::Image(image) => {
                let credentials = registry_credentials(&start)?;
                let reference = viv_oci::Reference::parse(&image).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                self.update_record(build_id, |r| r.status = Status::Building);
                self.record_events(build_id, rx);
                let manager = self.clone();
                let (template, build_id) = (template.to_owned(), build_id.to_owned());
                tokio::spawn(async move {
                    let prepared = async {
                        let (from, config) = manager.sdk_pull(&reference, credentials, &log).await?;
                        let options = JobOptions {
                            base_config: Some(config),
                            ..JobOptions::default()
                        };
                        manager
                            .sdk_prepare(&template, &rows[0], &start, from, options, shape)
                            .await
                    }
                    .await;
                    manager.sdk_run(prepared, rows, build_id, log).await;
                });
            }
            base => {
                let (from, options) = match base {
                    Base::Template(row) => {
                        if self.store.template(&row)?.is_none() {
                            return Err(ApiError::BadRequest(format!(
                                "fromTemplate: no template or tag '{row}'; build it first (Template.exists tells)"
                            )));
                        }
                        (row, JobOptions::default())
                    }
                    _ => (
                        viv_api::DEFAULT_TEMPLATE.to_owned(),
                        JobOptions {
                            base_config: Some(ImageConfig {
                                env: BTreeMap::new(),
                                workdir: Some(sdk_spec::DEFAULT_WORKDIR.into()),
                                user: Some(sdk_spec::DEFAULT_USER.into()),
                            }),
                            ..JobOptions::default()
                        },
                    ),
                };
                let prepared = self
                    .sdk_prepare(template, &rows[0], &start, from, options, shape)
                    .await?;
                self.update_record(build_id, |r| r.status = Status::Building);
                self.record_events(build_id, rx);
                let manager = self.clone();
                let build_id = build_id.to_owned();
                tokio::spawn(async move { manager.sdk_run(Ok(prepared), rows, build_id, log).await });
            }
        }
        Ok(())
    }

    /// Records a build's events in order; its last event (done or error) sets its status, so a
    /// status never turns terminal before the logs before it are in.
    fn record_events(
        self: &std::sync::Arc<Self>,
        build_id: &str,
        mut rx: tokio::sync::mpsc::UnboundedReceiver<BuildEvent>,
    ) {
        let manager = self.clone();
        let id = build_id.to_owned();
        tokio::spawn(async move {
            let mut step = None;
            while let Some(event) = rx.recv().await {
                let last = matches!(event, BuildEvent::Done { .. } | BuildEvent::Error { .. });
                manager.update_record(&id, |r| record_event(r, &event, &mut step));
                if last {
                    break;
                }
            }
        });
    }

    /// Converts the definition onto `from`, unpacks and matches its files, and checks the job.
    async fn sdk_prepare(
        &self,
        template: &str,
        row: &str,
        start: &StartBuild,
        from: String,
        mut options: JobOptions,
        shape: (Option<u32>, Option<u32>, Option<u64>),
    ) -> Result<(BuildJob, Option<PathBuf>), ApiError> {
        let user = match &options.base_config {
            Some(config) => config.user.clone(),
            None => self.store.template(&from)?.and_then(|row| row.config.user),
        };
        let mut converted = sdk_spec::convert(start, &from, user.as_deref()).map_err(ApiError::BadRequest)?;
        options.force_from = converted.force_from;
        options.follow_source_links = false;
        let context = if converted.copies.is_empty() {
            None
        } else {
            let dir = self.config.data_dir.join("builds").join(super::random_id(12));
            let files = self.files_dir(template);
            let copies = converted.copies.clone();
            let target = dir.clone();
            let matched = tokio::task::spawn_blocking(move || unpack_copies(&files, &target, &copies))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            match matched {
                Ok(sources) => {
                    for (copy, sources) in converted.copies.iter().zip(sources) {
                        let step = &mut converted.spec.steps[copy.step];
                        if let Instruction::Copy { sources: old, dest, .. } = &mut step.instruction {
                            if (sdk_spec::is_glob(&copy.pattern) || sources.len() > 1) && !dest.ends_with('/') {
                                dest.push('/');
                            }
                            *old = sources;
                        }
                    }
                    Some(dir)
                }
                Err(err) => {
                    let _ = std::fs::remove_dir_all(&dir);
                    return Err(err);
                }
            }
        };
        let spec_text = serde_json::to_string_pretty(&serde_json::json!({
            "fromImage": start.from_image,
            "fromTemplate": start.from_template,
            "steps": start.steps.iter().map(|s| serde_json::json!({"type": s.kind, "args": s.args})).collect::<Vec<_>>(),
            "startCmd": start.start_cmd,
            "readyCmd": start.ready_cmd,
        }))
        .unwrap_or_default();
        match self.prepare_job(row, spec_text, converted.spec, context.clone(), shape, options) {
            Ok(job) => Ok((job, context)),
            Err(err) => {
                if let Some(dir) = &context {
                    let _ = std::fs::remove_dir_all(dir);
                }
                Err(err)
            }
        }
    }

    /// Runs a prepared build to its end; its last event says how it ended.
    async fn sdk_run(
        self: std::sync::Arc<Self>,
        prepared: Result<(BuildJob, Option<PathBuf>), ApiError>,
        rows: Vec<String>,
        build_id: String,
        log: BuildLog,
    ) {
        let (outcome, context) = match prepared {
            Ok((job, context)) => {
                let outcome = match self.build_template(job, &log).await {
                    Ok(info) => self.sdk_finish(&build_id, &rows).await.map(|()| info),
                    Err(err) => Err(err),
                };
                (outcome, context)
            }
            Err(err) => (Err(err), None),
        };
        let event = match outcome {
            Ok(info) => BuildEvent::Done {
                build_ms: info.build_ms.unwrap_or_default(),
                template: Box::new(info),
            },
            Err(err) => log.failure(&err),
        };
        log.send_event(event);
        if let Some(dir) = context {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Pulls `reference` (through the mirrors) and imports it as an image template, unless an
    /// image of the same manifest is here already; returns its name and configuration.
    async fn sdk_pull(
        &self,
        reference: &viv_oci::Reference,
        credentials: Option<viv_oci::Credentials>,
        log: &BuildLog,
    ) -> Result<(String, ImageConfig), ApiError> {
        log.info(&format!("pulling {reference}"));
        let work = self.config.data_dir.join("oci").join(super::random_id(12));
        let puller = viv_oci::Puller::new(self.config.registry_mirrors.clone());
        let pulled = puller.pull(reference, credentials.as_ref(), &work.join("blobs")).await;
        let result = async {
            let pulled = pulled.map_err(|e| match e {
                viv_oci::OciError::Unauthorized(m) => ApiError::BadRequest(m),
                other => ApiError::BadRequest(other.to_string()),
            })?;
            let name = format!("oci-{}", &pulled.digest.trim_start_matches("sha256:")[..24]);
            log.info(&format!(
                "pulled {reference} ({}) from {}",
                pulled.digest, pulled.source
            ));
            if self.images.find_named(&name).is_err() {
                log.info(&format!(
                    "unpacking {} layers into a root file system",
                    pulled.layers.len()
                ));
                let (images, layers, tree, image) = (
                    self.images.clone(),
                    pulled.layers.clone(),
                    work.join("root"),
                    name.clone(),
                );
                tokio::task::spawn_blocking(move || -> Result<(), ApiError> {
                    viv_oci::unpack_layers(&layers, &tree).map_err(|e| ApiError::BadRequest(e.to_string()))?;
                    images
                        .import_dir(&image, &tree, &viv_image::LogProgress)
                        .map(drop)
                        .map_err(|e| ApiError::Internal(format!("importing the image: {e}")))
                })
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            }
            let config = ImageConfig {
                env: pulled.config.env,
                workdir: pulled.config.workdir,
                user: pulled.config.user,
            };
            Ok((name, config))
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }

    /// After the build wrote its first row: the other tags' rows and every row's build id.
    async fn sdk_finish(&self, build_id: &str, rows: &[String]) -> Result<(), ApiError> {
        let built = self
            .store
            .template(&rows[0])?
            .ok_or_else(|| ApiError::Internal("the built template row is missing".into()))?;
        self.store.put_template_build(&rows[0], build_id)?;
        for row in &rows[1..] {
            self.put_tag_row(&built, row, build_id).await?;
        }
        Ok(())
    }

    /// Writes `source`'s recipe as row `name`, keeping the layers the old row's users sit on.
    async fn put_tag_row(&self, source: &TemplateRow, name: &str, build_id: &str) -> Result<(), ApiError> {
        let mut row = source.clone();
        row.name = name.to_owned();
        if let Some(previous) = self.store.template(name)? {
            if self.template_users(name)?.is_some() {
                for key in previous.layers {
                    if !row.layers.contains(&key) {
                        row.layers.push(key);
                    }
                }
            }
        }
        self.store.put_template(&row)?;
        self.store.put_template_build(name, build_id)?;
        self.empty_pool(Some(name)).await;
        Ok(())
    }

    /// `GET /templates/{id}/builds/{build}/status`.
    pub fn sdk_build_status(
        &self,
        template: &str,
        build_id: &str,
        query: &BuildStatusQuery,
    ) -> Result<BuildStatus, ApiError> {
        let offset = query.logs_offset.unwrap_or(0);
        let limit = query.limit.unwrap_or(MAX_LOG_PAGE).min(MAX_LOG_PAGE);
        let min_level = match query.level.as_deref() {
            None => 0,
            Some(level @ ("debug" | "info" | "warn" | "error")) => level_rank(level),
            Some(other) => {
                return Err(ApiError::BadRequest(format!(
                    "level must be debug, info, warn or error, got '{other}'"
                )))
            }
        };
        let records = self.sdk_builds.records.lock().expect("records lock");
        if let Some(record) = records.0.get(build_id).filter(|r| r.template == template) {
            let entries: Vec<LogEntry> = record
                .logs
                .iter()
                .filter(|e| level_rank(e.level) >= min_level)
                .skip(offset)
                .take(limit)
                .cloned()
                .collect();
            return Ok(BuildStatus {
                template_id: template.to_owned(),
                build_id: build_id.to_owned(),
                status: match record.status {
                    Status::Waiting => "waiting",
                    Status::Building => "building",
                    Status::Ready => "ready",
                    Status::Error => "error",
                },
                logs: Vec::new(),
                log_entries: entries,
                reason: record.reason.clone(),
            });
        }
        drop(records);
        // A build from before a restart: ready if a row records it.
        let built = self
            .template_rows(template)?
            .iter()
            .any(|row| self.store.template_build(&row.name).ok().flatten().as_deref() == Some(build_id));
        if built {
            return Ok(BuildStatus {
                template_id: template.to_owned(),
                build_id: build_id.to_owned(),
                status: "ready",
                logs: Vec::new(),
                log_entries: Vec::new(),
                reason: None,
            });
        }
        Err(not_found_build(build_id, template))
    }

    /// The rows of template `name`: `name` and `name:*`.
    fn template_rows(&self, name: &str) -> Result<Vec<TemplateRow>, ApiError> {
        let prefix = format!("{name}:");
        Ok(self
            .store
            .templates()?
            .into_iter()
            .filter(|row| row.name == name || row.name.starts_with(&prefix))
            .collect())
    }

    /// `GET /templates/aliases/{alias}`: whether a template (or one of its tags) has that name.
    pub fn sdk_alias_exists(&self, alias: &str) -> Result<bool, ApiError> {
        let (name, tag) = sdk_spec::split_ref(alias);
        if name == viv_api::DEFAULT_TEMPLATE {
            return Ok(true);
        }
        if alias.contains(':') {
            return Ok(self.store.template(&sdk_spec::row_name(name, tag))?.is_some());
        }
        Ok(!self.template_rows(name)?.is_empty())
    }

    /// `GET /templates/{id}/tags`.
    pub fn sdk_tags(&self, template: &str) -> Result<Vec<TagInfo>, ApiError> {
        let rows = self.template_rows(template)?;
        if rows.is_empty() {
            return Err(ApiError::NotFound(format!("template '{template}' not found")));
        }
        rows.iter()
            .map(|row| {
                let tag = row
                    .name
                    .split_once(':')
                    .map(|(_, t)| t.to_owned())
                    .unwrap_or_else(|| sdk_spec::DEFAULT_TAG.to_owned());
                Ok(TagInfo {
                    tag,
                    build_id: self
                        .store
                        .template_build(&row.name)?
                        .unwrap_or_else(|| derived_build_id(row)),
                    created_at: row.created_at.clone(),
                })
            })
            .collect()
    }

    /// `POST /templates/tags`: points `tags` at the build `target` (`name:tag`) names.
    pub async fn sdk_assign_tags(&self, target: &str, tags: Vec<String>) -> Result<AssignedTags, ApiError> {
        let (name, tag) = sdk_spec::split_ref(target);
        let source = self
            .store
            .template(&sdk_spec::row_name(name, tag))?
            .ok_or_else(|| ApiError::NotFound(format!("template '{target}' not found")))?;
        if tags.is_empty() {
            return Err(ApiError::BadRequest("give at least one tag".into()));
        }
        let build_id = self
            .store
            .template_build(&source.name)?
            .unwrap_or_else(|| derived_build_id(&source));
        let mut assigned = Vec::new();
        for given in tags {
            let tag = given
                .rsplit_once(':')
                .map(|(_, t)| t.to_owned())
                .unwrap_or(given.clone());
            if !sdk_spec::valid_tag(&tag) {
                return Err(ApiError::BadRequest(format!("tag '{given}' is invalid")));
            }
            let row = sdk_spec::row_name(name, &tag);
            if row != source.name {
                if self.builds.running.lock().expect("builds lock").contains_key(&row) {
                    return Err(ApiError::Conflict(format!("tag '{tag}' of '{name}' is being built")));
                }
                self.put_tag_row(&source, &row, &build_id).await?;
            }
            assigned.push(given);
        }
        Ok(AssignedTags {
            tags: assigned,
            build_id,
        })
    }

    /// `DELETE /templates/tags`: removes tags of template `name` (refused while used).
    pub async fn sdk_delete_tags(&self, name: &str, tags: Vec<String>) -> Result<(), ApiError> {
        if tags.is_empty() {
            return Err(ApiError::BadRequest("give at least one tag".into()));
        }
        let name = sdk_spec::split_ref(name).0;
        let rows: Vec<String> = tags
            .iter()
            .map(|given| {
                let tag = given.rsplit_once(':').map(|(_, t)| t).unwrap_or(given);
                sdk_spec::row_name(name, tag)
            })
            .collect();
        for (row, given) in rows.iter().zip(&tags) {
            if self.store.template(row)?.is_none() {
                return Err(ApiError::NotFound(format!("template '{name}' has no tag '{given}'")));
            }
        }
        for row in rows {
            self.delete_template(&row).await?;
        }
        Ok(())
    }
}

/// `fromImageRegistry` as credentials (only the generic registry kind).
fn registry_credentials(start: &StartBuild) -> Result<Option<viv_oci::Credentials>, ApiError> {
    let Some(registry) = &start.from_image_registry else {
        return Ok(None);
    };
    match (registry.kind.as_str(), &registry.username, &registry.password) {
        ("registry", Some(username), Some(password)) => Ok(Some(viv_oci::Credentials {
            username: username.clone(),
            password: password.clone(),
        })),
        ("registry", _, _) => Err(ApiError::BadRequest(
            "fromImageRegistry of type registry needs username and password".into(),
        )),
        (other, _, _) => Err(ApiError::BadRequest(format!(
            "fromImageRegistry of type '{other}' is not supported (AWS and GCP registries need their \
             cloud's credentials exchange); use type registry with a user name and password or token"
        ))),
    }
}

/// Appends a build event to a record as log entries.
fn record_event(record: &mut Record, event: &BuildEvent, step: &mut Option<String>) {
    let push = |record: &mut Record, level: &'static str, message: String, step: Option<String>| {
        if record.logs.len() < MAX_LOG_ENTRIES {
            record.logs.push(LogEntry {
                timestamp: now(),
                level,
                message,
                step,
            });
        }
    };
    match event {
        BuildEvent::Step {
            index,
            total,
            line,
            instruction,
            cached,
        } => {
            *step = Some(line.to_string());
            let cached = if *cached { "CACHED " } else { "" };
            push(
                record,
                "info",
                format!("{cached}[{index}/{total}] {instruction}"),
                step.clone(),
            );
        }
        BuildEvent::Log { text, .. } => {
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                push(record, "info", line.to_owned(), step.clone());
            }
        }
        BuildEvent::Done { build_ms, .. } => {
            push(
                record,
                "info",
                format!("Template built in {:.1} s", *build_ms as f64 / 1000.0),
                None,
            );
            record.status = Status::Ready;
        }
        BuildEvent::Error { message, line, .. } => {
            // The SDK names steps itself; drop the spec builder's "line N: " prefix.
            let message = match line {
                Some(line) => message
                    .strip_prefix(&format!("line {line}: "))
                    .unwrap_or(message)
                    .to_owned(),
                None => message.clone(),
            };
            push(record, "error", message.clone(), line.map(|l| l.to_string()));
            let tail: Vec<LogEntry> = record.logs.iter().rev().take(20).rev().cloned().collect();
            record.status = Status::Error;
            record.reason = Some(Reason {
                message,
                step: line.map(|l| l.to_string()),
                log_entries: tail,
            });
        }
    }
}

async fn write_body(path: &Path, body: axum::body::Body) -> Result<(), ApiError> {
    use futures::StreamExt as _;
    use tokio::io::AsyncWriteExt as _;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(|e| ApiError::Internal(format!("creating {}: {e}", path.display())))?;
    let mut stream = body.into_data_stream();
    let mut size = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::BadRequest(format!("reading the upload: {e}")))?;
        size += chunk.len();
        if size > MAX_FILES_BYTES {
            return Err(ApiError::TooLarge(format!(
                "the files are larger than {} MiB",
                MAX_FILES_BYTES >> 20
            )));
        }
        file.write_all(&chunk)
            .await
            .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))?;
    }
    file.sync_all()
        .await
        .map_err(|e| ApiError::Internal(format!("writing the upload: {e}")))
}

/// Unpacks each `COPY` step's archive into `<dir>/<n>/` and matches its pattern there; returns
/// each step's sources (relative to `dir`), entries that match the pattern but not those only
/// under a matching directory.
fn unpack_copies(files: &Path, dir: &Path, copies: &[sdk_spec::CopyFiles]) -> Result<Vec<Vec<String>>, ApiError> {
    let mut all = Vec::new();
    for (n, copy) in copies.iter().enumerate() {
        let line = n + 1;
        let archive = files.join(copy.files_hash.to_ascii_lowercase());
        let bytes = std::fs::read(&archive).map_err(|_| {
            ApiError::BadRequest(format!(
                "COPY {}: its files (hash {}) were not uploaded; upload them first",
                copy.pattern, copy.files_hash
            ))
        })?;
        let target = dir.join(n.to_string());
        std::fs::create_dir_all(&target).map_err(|e| ApiError::Internal(format!("creating the context: {e}")))?;
        let unpacked = if bytes.starts_with(&[0x1f, 0x8b]) {
            unpack(flate2::read::GzDecoder::new(bytes.as_slice()), &target)
        } else {
            unpack(bytes.as_slice(), &target)
        };
        unpacked.map_err(|e| {
            ApiError::BadRequest(format!(
                "COPY {}: the uploaded files are not a usable tar archive: {e}",
                copy.pattern
            ))
        })?;
        let mut entries = Vec::new();
        walk(&target, "", &mut entries);
        let mut sources: Vec<String> = entries
            .iter()
            .filter(|(path, _)| sdk_spec::glob_match(&copy.pattern, path))
            .map(|(path, _)| path.clone())
            .collect();
        // Nothing under a match is a source of its own.
        let matched = sources.clone();
        sources.retain(|s| !matched.iter().any(|m| s.starts_with(&format!("{m}/"))));
        if sources.is_empty() {
            return Err(ApiError::BadRequest(format!(
                "COPY {} (step {line} of the copies): no uploaded file matches",
                copy.pattern
            )));
        }
        if let Some(mode) = copy.mode {
            use std::os::unix::fs::PermissionsExt as _;
            for (path, is_link) in &entries {
                let under = sources.iter().any(|s| path == s || path.starts_with(&format!("{s}/")));
                if under && !is_link {
                    let _ = std::fs::set_permissions(target.join(path), std::fs::Permissions::from_mode(mode));
                }
            }
        }
        all.push(sources.into_iter().map(|s| format!("{n}/{s}")).collect());
    }
    Ok(all)
}

fn unpack(reader: impl std::io::Read, target: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    // `unpack` refuses entries that would land outside `target`.
    archive.unpack(target)
}

/// Every entry under `dir` (not following symlinks), as paths relative to it, with whether it
/// is a symlink.
fn walk(dir: &Path, prefix: &str, out: &mut Vec<(String, bool)>) {
    let Ok(read) = std::fs::read_dir(dir) else { return };
    let mut entries: Vec<_> = read.flatten().collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let kind = entry.file_type();
        let is_link = kind.as_ref().is_ok_and(|k| k.is_symlink());
        let is_dir = kind.as_ref().is_ok_and(|k| k.is_dir());
        out.push((path.clone(), is_link));
        if is_dir {
            walk(&entry.path(), &path, out);
        }
    }
}
