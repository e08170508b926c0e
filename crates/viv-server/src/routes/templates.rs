//! Template routes: build from a spec (streaming the build's events), list, get, delete; the
//! versions of a template, its tags, and commits of sandboxes into new versions.

use std::path::PathBuf;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use futures::StreamExt as _;
use viv_api::{BuildEvent, TemplateBuildRequest};

use super::{ApiPath, ApiQuery};
use crate::error::ApiError;
use crate::manager::BuildLog;
use crate::AppState;

/// Largest build context accepted.
const MAX_CONTEXT_BYTES: usize = 1 << 30;

/// `POST /templates`: a tar archive of the build context (the spec inside it, at `dockerfile`),
/// or a JSON body carrying the spec when there is no context. Answers with NDJSON
/// [`BuildEvent`]s; the build goes on if the client goes away.
pub(super) async fn build(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<std::collections::HashMap<String, String>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body = axum::body::to_bytes(body, MAX_CONTEXT_BYTES).await.map_err(|_| {
        ApiError::TooLarge(format!(
            "the build context is larger than {} MiB; leave large files out of the directory",
            MAX_CONTEXT_BYTES >> 20
        ))
    })?;
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/json"));
    let (request, spec_text, context, spec_name) = if json {
        let request: TemplateBuildRequest = super::json_object(&body)?;
        let spec = request
            .spec
            .clone()
            .ok_or_else(|| ApiError::BadRequest("the JSON body needs `spec`, the template spec's text".into()))?;
        (request, spec, None, "spec".to_owned())
    } else {
        let request = request_from_query(&query)?;
        let dockerfile = request.dockerfile.clone().unwrap_or_else(|| "Dockerfile".into());
        let context = state.manager.unpack_context(body).await?;
        match read_spec(&context, &dockerfile) {
            Ok(text) => (request, text, Some(context), dockerfile),
            Err(err) => {
                let _ = std::fs::remove_dir_all(&context);
                return Err(err);
            }
        }
    };
    let cleanup = |context: &Option<PathBuf>| {
        if let Some(dir) = context {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    let prepared = viv_template::parse(&spec_text)
        .map_err(|e| ApiError::BadRequest(format!("{spec_name} {e}")))
        .and_then(|spec| {
            state.manager.prepare_build(
                &request.name,
                spec_text.clone(),
                spec,
                context.clone(),
                request.cpu_count,
                request.memory_mb,
                request.timeout,
            )
        });
    let job = match prepared {
        Ok(job) => job,
        Err(err) => {
            cleanup(&context);
            return Err(err);
        }
    };
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let manager = state.manager.clone();
    tokio::spawn(async move {
        let log = BuildLog::new(tx.clone());
        let event = match manager.build_template(job, &log).await {
            Ok(template) => BuildEvent::Done {
                build_ms: template.build_ms.unwrap_or_default(),
                template: Box::new(template),
            },
            Err(err) => log.failure(&err),
        };
        let _ = tx.send(event);
        cleanup(&context);
    });
    Ok(ndjson_response(tokio_stream::wrappers::UnboundedReceiverStream::new(
        rx,
    )))
}

fn request_from_query(query: &std::collections::HashMap<String, String>) -> Result<TemplateBuildRequest, ApiError> {
    fn number<N: std::str::FromStr>(
        query: &std::collections::HashMap<String, String>,
        key: &str,
    ) -> Result<Option<N>, ApiError> {
        query
            .get(key)
            .map(|v| {
                v.parse().map_err(|_| {
                    ApiError::BadRequest(format!(
                        "query parameter {key} must be a whole number in range, got '{v}'"
                    ))
                })
            })
            .transpose()
    }
    let name = query
        .get("name")
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::BadRequest("the name query parameter is required".into()))?;
    Ok(TemplateBuildRequest {
        name: name.clone(),
        spec: None,
        dockerfile: query.get("dockerfile").cloned(),
        cpu_count: number(query, "cpuCount")?,
        memory_mb: number(query, "memoryMB")?,
        timeout: number(query, "timeout")?,
    })
}

/// `POST /templates/builtin/{key}`: builds a built-in template (the code interpreter) from the
/// context inside the binary, or follows its build when one runs (a first create may have
/// started it); NDJSON [`BuildEvent`]s from the build's first to its `done` or `error`.
pub(super) async fn build_builtin(
    State(state): State<AppState>,
    ApiPath(key): ApiPath<String>,
) -> Result<Response, ApiError> {
    let events = state.manager.follow_builtin_build(&key)?;
    Ok(ndjson_response(events))
}

fn ndjson_response(events: impl futures::Stream<Item = BuildEvent> + Send + 'static) -> Response {
    let lines = events.map(|event| {
        let mut line = serde_json::to_vec(&event).expect("events serialize");
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(Bytes::from(line))
    });
    (
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response()
}

/// Reads the spec from the unpacked context; `name` must stay inside it.
fn read_spec(context: &std::path::Path, name: &str) -> Result<String, ApiError> {
    let relative = std::path::Path::new(name);
    if relative.is_absolute() || relative.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(ApiError::BadRequest(format!(
            "dockerfile '{name}' must be a path inside the build context"
        )));
    }
    std::fs::read_to_string(context.join(relative)).map_err(|e| {
        ApiError::BadRequest(format!(
            "the build context has no readable spec '{name}' ({e}); pass dockerfile=PATH"
        ))
    })
}

pub(super) async fn list(State(state): State<AppState>) -> Result<Response, ApiError> {
    Ok(Json(state.manager.list_templates()?).into_response())
}

pub(super) async fn get(State(state): State<AppState>, ApiPath(name): ApiPath<String>) -> Result<Response, ApiError> {
    Ok(Json(
        state
            .manager
            .get_template(crate::manager::canonical_template_name(&name))?,
    )
    .into_response())
}

pub(super) async fn delete(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    // E2B's SDKs delete snapshots through this route.
    if state.manager.get_snapshot(&name).is_ok_and(|s| s.kind == "snapshot") {
        state.manager.delete_snapshot(&name)?;
        return Ok(StatusCode::NO_CONTENT.into_response());
    }
    state.manager.delete_template(&name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `GET /templates/{name}/versions`: the template's versions, oldest first.
pub(super) async fn versions(
    State(state): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.template_history(&name)?).into_response())
}

/// `PUT /templates/{name}/tags/{tag}`: points a tag (`default`: the plain name) at a version.
pub(super) async fn tag_version(
    State(state): State<AppState>,
    ApiPath((name, tag)): ApiPath<(String, String)>,
    super::JsonBody(req): super::JsonBody<viv_api::TagVersion>,
) -> Result<Response, ApiError> {
    Ok(Json(state.manager.tag_version(&name, &tag, &req.version_id).await?).into_response())
}

/// `DELETE /templates/{name}/versions/{version}`: 409 while a tag points at it or it is used.
pub(super) async fn delete_version(
    State(state): State<AppState>,
    ApiPath((name, version)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    state.manager.delete_version(&name, &version).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// `POST /sandboxes/{id}/commit`: saves a running sandbox's disk as a new version of a template.
pub(super) async fn commit(
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    super::JsonBody(req): super::JsonBody<viv_api::CommitSandbox>,
) -> Result<Response, ApiError> {
    let version = state.manager.commit_sandbox(&id, &req.template).await?;
    Ok((StatusCode::CREATED, Json(version)).into_response())
}
