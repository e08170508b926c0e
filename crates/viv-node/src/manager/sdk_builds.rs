//! Template builds through E2B's SDK (`Template.build`): the build requests, their start and
//! build status with logs, mapped onto the layer builder ([`super::builds`]); the uploads of
//! `COPY` files and image pulls are in [`super::sdk_files`], tags in [`super::sdk_tags`].
//!
//! A build of `name` with tags `t1, t2` (`default` when none) runs as a build of the template
//! row of its first tag and, once done, writes the same recipe to the rows of the other tags
//! (`name` for `default`, `name:tag` otherwise); `Sandbox.create("name:tag")` starts from that
//! row. Rows share layers and snapshots, so a tag costs a row.
//!
//! Invariants: build records live in memory (the last [`MAX_RECORDS`], each with at most
//! [`MAX_LOG_ENTRIES`] log entries); which build made a row is in the store, so tags keep their
//! build ids across restarts; a tag row whose template has sandboxes keeps their layers when it
//! is replaced.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::Serialize;
use viv_api::BuildEvent;
use viv_template::{ImageConfig, Instruction};

use super::builds::{valid_template_name, BuildJob, BuildLog, JobOptions};
use super::sdk_files::{registry_credentials, unpack_copies};
use super::sdk_spec::{self, Base, StartBuild};
use super::Manager;
use crate::error::ApiError;

/// Build records kept in memory.
const MAX_RECORDS: usize = 256;
/// Log entries kept per build.
const MAX_LOG_ENTRIES: usize = 20_000;
/// Log entries one status call returns at most (E2B's page size).
const MAX_LOG_PAGE: usize = 100;

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
    pub(super) uploads: Mutex<HashMap<String, (String, String)>>,
}

fn uuid_v4() -> String {
    super::random_uuid()
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

fn not_found_build(build_id: &str, template: &str) -> ApiError {
    ApiError::NotFound(format!("build '{build_id}' of template '{template}' not found"))
}

impl Manager {
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
