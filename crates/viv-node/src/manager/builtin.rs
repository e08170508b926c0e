//! Built-in templates: specs shipped inside the binary (the code interpreter, E2B's
//! `code-interpreter-v1`), built on first use or on request, with every caller following one
//! build.
//!
//! A built-in template is an ordinary built template once built (a row in the store, layers in
//! the cache, deletable); what is built in is its build context, packed from `templates/<dir>/`
//! of the repository by `build.rs`, and its names.
//!
//! Invariants:
//! - at most one build of a built-in template runs at a time; a request to build it while it
//!   builds follows that build from its first event (the events so far are replayed, then the
//!   live ones), so every follower sees the whole build and its `done` or `error` end;
//! - a sandbox create that names a built-in template not built yet starts its build (once) and
//!   is answered 503 with the build's progress, never left waiting for a build of many minutes;
//! - aliases resolve to the template's one name before anything else looks the name up.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::stream::{BoxStream, StreamExt as _};
use tokio::sync::broadcast;
use tokio::sync::mpsc;
use viv_api::BuildEvent;

use super::builds::BuildLog;
use super::Manager;
use crate::error::ApiError;

/// A template whose spec and context ship with the binary.
pub struct BuiltinTemplate {
    /// The template's name once built.
    pub name: &'static str,
    /// Other names a create may use for it.
    pub aliases: &'static [&'static str],
    /// The name `viv template build --builtin` takes (its directory under `templates/`).
    pub key: &'static str,
    /// The build context: a tar archive with the spec at `Dockerfile`.
    archive: &'static [u8],
    /// vCPUs and MiB of the build VM and of the template's sandboxes.
    pub cpu_count: u32,
    pub memory_mb: u32,
    /// Longest the build may take, in seconds (package downloads under emulation are slow).
    timeout_secs: u64,
}

/// Every built-in template.
pub const BUILTINS: &[BuiltinTemplate] = &[BuiltinTemplate {
    name: "code-interpreter-v1",
    aliases: &["code-interpreter"],
    key: "code-interpreter",
    archive: include_bytes!(concat!(env!("OUT_DIR"), "/code-interpreter.tar")),
    cpu_count: 2,
    memory_mb: 1024,
    timeout_secs: 4 * 3600,
}];

/// The built-in template a name, an alias or a `--builtin` key names.
pub fn builtin_named(name: &str) -> Option<&'static BuiltinTemplate> {
    BUILTINS
        .iter()
        .find(|b| b.name == name || b.key == name || b.aliases.contains(&name))
}

/// The name a create's template id stands for: a built-in's alias becomes its name.
pub fn canonical_template_name(name: &str) -> &str {
    builtin_named(name).map_or(name, |b| b.name)
}

/// The builds of built-in templates running now, by template name.
#[derive(Default)]
pub struct BuiltinBuilds {
    running: Mutex<HashMap<&'static str, Arc<BuildFeed>>>,
}

/// One running build's events: those so far, and a channel for the ones to come.
struct BuildFeed {
    history: Mutex<FeedState>,
    live: broadcast::Sender<BuildEvent>,
}

#[derive(Default)]
struct FeedState {
    events: Vec<BuildEvent>,
    /// Where the build is: `step i/n: INSTRUCTION`, for 503 messages.
    progress: Option<String>,
}

impl BuildFeed {
    /// Its events from the first one: a replay of the history, then the live ones until `done`
    /// or `error`. Taken under the history lock, which every new event also takes, so nothing
    /// is missed or repeated.
    fn follow(&self) -> BoxStream<'static, BuildEvent> {
        let state = self.history.lock().expect("feed lock");
        let replayed = futures::stream::iter(state.events.clone());
        if state.events.last().is_some_and(ends_build) {
            return replayed.boxed();
        }
        let live = self.live.subscribe();
        drop(state);
        let live = futures::stream::unfold(Some(live), |receiver| async move {
            let mut receiver = receiver?;
            match receiver.recv().await {
                Ok(event) => {
                    let more = !ends_build(&event);
                    Some((event, more.then_some(receiver)))
                }
                // A follower slower than the build loses output lines, not the build's end.
                Err(broadcast::error::RecvError::Lagged(skipped)) => Some((
                    BuildEvent::Log {
                        stream: "info".into(),
                        text: format!("({skipped} lines of output skipped: this client fell behind)\n"),
                    },
                    Some(receiver),
                )),
                Err(broadcast::error::RecvError::Closed) => None,
            }
        });
        replayed.chain(live).boxed()
    }

    fn publish(&self, event: BuildEvent) {
        let mut state = self.history.lock().expect("feed lock");
        if let BuildEvent::Step {
            index,
            total,
            instruction,
            ..
        } = &event
        {
            state.progress = Some(format!("step {index}/{total}: {instruction}"));
        }
        state.events.push(event.clone());
        // No receivers is fine: followers come and go.
        let _ = self.live.send(event);
    }
}

fn ends_build(event: &BuildEvent) -> bool {
    matches!(event, BuildEvent::Done { .. } | BuildEvent::Error { .. })
}

impl Manager {
    /// Starts the build of `builtin` unless it runs already; returns its feed.
    fn start_builtin_build(self: &Arc<Self>, builtin: &'static BuiltinTemplate) -> Result<Arc<BuildFeed>, ApiError> {
        let mut running = self.builtin_builds.running.lock().expect("builtin builds lock");
        if let Some(feed) = running.get(builtin.name) {
            return Ok(feed.clone());
        }
        let (live, _) = broadcast::channel(4096);
        let feed = Arc::new(BuildFeed {
            history: Mutex::default(),
            live,
        });
        running.insert(builtin.name, feed.clone());
        drop(running);
        let manager = self.clone();
        let task_feed = feed.clone();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::unbounded_channel();
            let log = BuildLog::new(tx.clone());
            let relay_feed = task_feed.clone();
            let relay = tokio::spawn(async move {
                while let Some(event) = rx.recv().await {
                    relay_feed.publish(event);
                }
            });
            let end = match manager.build_builtin(builtin, &log).await {
                Ok(template) => BuildEvent::Done {
                    build_ms: template.build_ms.unwrap_or_default(),
                    template: Box::new(template),
                },
                Err(err) => log.failure(&err),
            };
            let _ = tx.send(end);
            drop(tx);
            drop(log);
            let _ = relay.await;
            manager
                .builtin_builds
                .running
                .lock()
                .expect("builtin builds lock")
                .remove(builtin.name);
        });
        Ok(feed)
    }

    /// The build proper: the embedded context unpacked, then an ordinary spec build.
    async fn build_builtin(
        &self,
        builtin: &'static BuiltinTemplate,
        log: &BuildLog,
    ) -> Result<viv_api::TemplateInfo, ApiError> {
        let context = self.unpack_context(bytes::Bytes::from_static(builtin.archive)).await?;
        let result = async {
            let spec_text = std::fs::read_to_string(context.join("Dockerfile"))
                .map_err(|e| ApiError::Internal(format!("the built-in template has no Dockerfile: {e}")))?;
            let spec = viv_template::parse(&spec_text)
                .map_err(|e| ApiError::Internal(format!("the built-in template's Dockerfile {e}")))?;
            log.info(&format!(
                "building the built-in template {} (first use; later sandboxes start from its snapshot)",
                builtin.name
            ));
            let job = self.prepare_build(
                builtin.name,
                spec_text,
                spec,
                Some(context.clone()),
                Some(builtin.cpu_count),
                Some(builtin.memory_mb),
                Some(builtin.timeout_secs),
            )?;
            self.build_template(job, log).await
        }
        .await;
        let _ = std::fs::remove_dir_all(&context);
        result
    }

    /// `POST /templates/builtin/{key}`: builds a built-in template (or follows the build running)
    /// and streams its events to the end.
    pub fn follow_builtin_build(self: &Arc<Self>, key: &str) -> Result<BoxStream<'static, BuildEvent>, ApiError> {
        let builtin = builtin_named(key).ok_or_else(|| {
            ApiError::NotFound(format!(
                "there is no built-in template '{key}'; the built-in templates are: {}",
                BUILTINS.iter().map(|b| b.key).collect::<Vec<_>>().join(", ")
            ))
        })?;
        Ok(self.start_builtin_build(builtin)?.follow())
    }

    /// For a create naming `template` that does not exist: when it is a built-in template, starts
    /// its build and returns the 503 to answer with; otherwise `None`.
    pub(super) fn build_missing_builtin(self: &Arc<Self>, template: &str) -> Option<ApiError> {
        let builtin = builtin_named(template)?;
        let feed = match self.start_builtin_build(builtin) {
            Ok(feed) => feed,
            Err(err) => return Some(err),
        };
        let progress = feed
            .history
            .lock()
            .expect("feed lock")
            .progress
            .clone()
            .unwrap_or_else(|| "starting".into());
        Some(ApiError::Unavailable(format!(
            "template '{}' is Vivarium's built-in {} template and is being built for its first use ({progress}); \
             this takes minutes: retry then, or follow the build with `viv template build --builtin {}`",
            builtin.name, builtin.key, builtin.key
        )))
    }
}
