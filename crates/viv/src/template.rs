//! `viv template`: build templates from specs (streaming the build), list, show and delete them;
//! the history of a template's versions and its tags.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use futures::StreamExt as _;
use reqwest::Method;
use viv_api::{BuildEvent, TemplateInfo, TemplateVersion};

use crate::client::Client;
use crate::output;

/// Name the spec travels under inside the context archive.
const SPEC_ENTRY: &str = ".vivarium-spec";

/// `viv template ...`
#[derive(Debug, Subcommand)]
pub enum TemplateCommand {
    /// Build a template from a spec (a Dockerfile subset) and a context directory.
    Build {
        /// The build context: COPY sources are relative to it.
        #[arg(default_value = ".")]
        dir: PathBuf,
        /// The template's name (sandboxes start from it with `--template NAME`).
        #[arg(long, short, required_unless_present = "builtin")]
        name: Option<String>,
        /// Build a template that ships with Vivarium instead (`code-interpreter`: E2B's
        /// `code-interpreter-v1`), or follow its build if one runs.
        #[arg(long, conflicts_with_all = ["name", "file", "cpus", "memory", "timeout"])]
        builtin: Option<String>,
        /// The spec file (default: DIR/Dockerfile).
        #[arg(long = "file", short = 'f')]
        file: Option<PathBuf>,
        /// vCPUs of the build VM and of the template's sandboxes.
        #[arg(long)]
        cpus: Option<u32>,
        /// Memory in MiB of the build VM and of the template's sandboxes.
        #[arg(long)]
        memory: Option<u32>,
        /// Longest the build may take, in seconds.
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List templates.
    #[command(alias = "ls")]
    List,
    /// Show one template.
    Get {
        /// Template name.
        name: String,
    },
    /// Delete built templates or versions (refused while sandboxes or snapshots use them, and
    /// for a version while a tag points at it).
    #[command(alias = "rm")]
    Delete {
        /// Template names or version ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// The versions of a template, oldest first: id, creation time, tags, own size, parent.
    History {
        /// Template name.
        name: String,
    },
    /// Point a tag at a version (`NAME` alone is the tag `default`, what `NAME` starts).
    Tag {
        /// `NAME` or `NAME:TAG`.
        reference: String,
        /// The version id (`viv template history NAME` lists them).
        version: String,
    },
}

/// Runs a template command; returns the exit code.
pub async fn run(client: &Client, cmd: TemplateCommand, json: bool) -> Result<i32> {
    let headers = [
        "NAME", "KIND", "FROM", "CPUS", "MEMORY", "LAYERS", "SIZE", "START", "CREATED",
    ];
    match cmd {
        TemplateCommand::Build { builtin: Some(key), .. } => {
            if !json {
                eprintln!("Building the built-in template '{key}' (or following its build)");
            }
            let response = client
                .send(client.request(Method::POST, &format!("/templates/builtin/{key}")))
                .await?;
            return follow_build(response, json).await;
        }
        TemplateCommand::Build {
            dir,
            name,
            file,
            cpus,
            memory,
            timeout,
            builtin: None,
        } => {
            let name = name.context("--name is required")?;
            return build(client, &dir, &name, file, cpus, memory, timeout, json).await;
        }
        TemplateCommand::List => {
            let list: Vec<TemplateInfo> = client.json(client.request(Method::GET, "/templates")).await?;
            if json {
                output::json(&list);
            } else {
                output::table(&headers, &list.iter().map(template_row).collect::<Vec<_>>());
            }
        }
        TemplateCommand::Get { name } => {
            let info: TemplateInfo = client
                .json(client.request(Method::GET, &format!("/templates/{name}")))
                .await?;
            if json {
                output::json(&info);
            } else {
                output::table(&headers, &[template_row(&info)]);
            }
        }
        TemplateCommand::History { name } => {
            let versions: Vec<TemplateVersion> = client
                .json(client.request(Method::GET, &format!("/templates/{name}/versions")))
                .await?;
            if json {
                output::json(&versions);
            } else {
                print_versions(&versions);
            }
        }
        TemplateCommand::Tag { reference, version } => {
            let (name, tag) = reference.split_once(':').unwrap_or((&reference, "default"));
            let tagged: TemplateVersion = client
                .json(
                    client
                        .request(Method::PUT, &format!("/templates/{name}/tags/{tag}"))
                        .json(&viv_api::TagVersion { version_id: version }),
                )
                .await?;
            if json {
                output::json(&tagged);
            } else {
                println!("{reference} -> {}", tagged.version_id);
            }
        }
        TemplateCommand::Delete { names } => {
            for name in names {
                client
                    .send(client.request(Method::DELETE, &format!("/templates/{name}")))
                    .await?;
                if !json {
                    println!("deleted {name}");
                }
            }
        }
    }
    Ok(0)
}

/// The table of `viv template history`.
pub fn print_versions(versions: &[TemplateVersion]) {
    let rows: Vec<Vec<String>> = versions
        .iter()
        .map(|v| {
            vec![
                v.version_id.clone(),
                v.created_at.clone(),
                v.tags.join(","),
                format!("{:.1} MiB", v.size_bytes as f64 / (1 << 20) as f64),
                v.parent.clone().unwrap_or_default(),
                v.from.clone(),
            ]
        })
        .collect();
    output::table(&["VERSION", "CREATED", "TAGS", "SIZE", "PARENT", "FROM"], &rows);
}

fn template_row(t: &TemplateInfo) -> Vec<String> {
    vec![
        t.template_id.clone(),
        t.kind.clone(),
        t.from.clone().unwrap_or_default(),
        t.cpu_count.to_string(),
        format!("{} MiB", t.memory_mb),
        t.layers.to_string(),
        format!("{:.1} MiB", t.size_bytes as f64 / (1 << 20) as f64),
        t.start_cmd.clone().unwrap_or_default(),
        t.created_at.clone().unwrap_or_default(),
    ]
}

/// Packs `dir` (symlinks as symlinks) except the entry `skip`, with `spec` added under
/// [`SPEC_ENTRY`] if given.
fn pack_context(dir: &Path, spec: Option<&[u8]>, skip: Option<&Path>) -> Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    builder.follow_symlinks(false);
    match skip {
        None => builder
            .append_dir_all(".", dir)
            .with_context(|| format!("packing the build context {}", dir.display()))?,
        Some(skip) => {
            let mut entries: Vec<_> = std::fs::read_dir(dir)
                .with_context(|| format!("reading the build context {}", dir.display()))?
                .collect::<std::io::Result<_>>()
                .with_context(|| format!("reading the build context {}", dir.display()))?;
            entries.sort_by_key(|e| e.file_name());
            for entry in entries {
                let name = PathBuf::from(entry.file_name());
                if name == skip {
                    continue;
                }
                let path = entry.path();
                let packed = if entry.file_type()?.is_dir() {
                    builder.append_dir_all(&name, &path)
                } else {
                    builder.append_path_with_name(&path, &name)
                };
                packed.with_context(|| format!("packing {}", path.display()))?;
            }
        }
    }
    if let Some(spec) = spec {
        let mut header = tar::Header::new_gnu();
        header.set_size(spec.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        builder
            .append_data(&mut header, SPEC_ENTRY, spec)
            .context("packing the spec")?;
    }
    builder.into_inner().context("packing the build context")
}

#[allow(clippy::too_many_arguments)]
async fn build(
    client: &Client,
    dir: &Path,
    name: &str,
    file: Option<PathBuf>,
    cpus: Option<u32>,
    memory: Option<u32>,
    timeout: Option<u64>,
    json: bool,
) -> Result<i32> {
    let spec_path = file.unwrap_or_else(|| dir.join("Dockerfile"));
    let spec = std::fs::read(&spec_path).with_context(|| format!("reading the spec {}", spec_path.display()))?;
    let response = send_build(
        client,
        &BuildSource {
            dir,
            spec_path: &spec_path,
            spec: &spec,
            skip: None,
        },
        name,
        (cpus, memory, timeout),
        json,
    )
    .await?;
    follow_build(response, json).await
}

/// What a build sends: the context directory and the spec (from `spec_path` inside or outside
/// the directory), leaving out the entry `skip` (a path relative to `dir`).
pub struct BuildSource<'a> {
    pub dir: &'a Path,
    pub spec_path: &'a Path,
    pub spec: &'a [u8],
    pub skip: Option<&'a Path>,
}

/// Starts a build on the server and returns its NDJSON event stream.
pub async fn send_build(
    client: &Client,
    source: &BuildSource<'_>,
    name: &str,
    (cpus, memory, timeout): (Option<u32>, Option<u32>, Option<u64>),
    json: bool,
) -> Result<reqwest::Response> {
    let BuildSource {
        dir,
        spec_path,
        spec,
        skip,
    } = *source;
    if !dir.is_dir() {
        bail!("the build context {} is not a directory", dir.display());
    }
    // A spec inside the context travels as itself (errors then name it); one from elsewhere is
    // added to the archive.
    let inside = spec_path
        .canonicalize()
        .ok()
        .zip(dir.canonicalize().ok())
        .and_then(|(spec, dir)| spec.strip_prefix(dir).ok().map(Path::to_path_buf));
    let (context, dockerfile) = match inside {
        Some(relative) => (pack_context(dir, None, skip)?, relative.to_string_lossy().into_owned()),
        None => (pack_context(dir, Some(spec), skip)?, SPEC_ENTRY.to_owned()),
    };
    if !json {
        eprintln!(
            "Sending the build context ({:.1} MiB) and {}",
            context.len() as f64 / (1 << 20) as f64,
            spec_path.display()
        );
    }
    let mut query = vec![("name", name.to_owned()), ("dockerfile", dockerfile)];
    query.extend(cpus.map(|c| ("cpuCount", c.to_string())));
    query.extend(memory.map(|m| ("memoryMB", m.to_string())));
    query.extend(timeout.map(|t| ("timeout", t.to_string())));
    let response = client
        .send(
            client
                .request(Method::POST, "/templates")
                .query(&query)
                .header("content-type", "application/x-tar")
                .body(context),
        )
        .await?;
    Ok(response)
}

/// Prints a build's NDJSON events as they come (steps, output, the end); the exit code is 0 for
/// `done`, 1 for `error`.
async fn follow_build(response: reqwest::Response, json: bool) -> Result<i32> {
    Ok(match follow_build_events(response, json).await? {
        Some(_) => 0,
        None => 1,
    })
}

/// [`follow_build`], returning the built template (`None` when the build failed).
pub async fn follow_build_events(response: reqwest::Response, json: bool) -> Result<Option<TemplateInfo>> {
    let mut stream = response.bytes_stream();
    let mut pending = Vec::new();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk.context("the build stream broke")?);
        while let Some(pos) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=pos).collect();
            let event: BuildEvent = serde_json::from_slice(&line).context("unexpected line in the build stream")?;
            if json {
                std::io::stdout().write_all(&line)?;
            }
            match event {
                BuildEvent::Done { template, build_ms } => {
                    if !json {
                        eprintln!(
                            "Built template {} in {:.1} s ({} layers, {:.1} MiB)",
                            template.template_id,
                            build_ms as f64 / 1000.0,
                            template.layers,
                            template.size_bytes as f64 / (1 << 20) as f64
                        );
                    }
                    return Ok(Some(*template));
                }
                BuildEvent::Error { message, .. } => {
                    if !json {
                        eprintln!("error: {message}");
                    }
                    return Ok(None);
                }
                _ if json => {}
                BuildEvent::Step {
                    index,
                    total,
                    line,
                    instruction,
                    cached,
                } => {
                    let cached = if cached { " (cached)" } else { "" };
                    eprintln!("Step {index}/{total} (line {line}): {instruction}{cached}");
                }
                BuildEvent::Log { stream, text } => match stream.as_str() {
                    "stderr" => {
                        let mut err = std::io::stderr().lock();
                        err.write_all(text.as_bytes())?;
                        err.flush()?;
                    }
                    "info" => eprint!("--> {text}"),
                    _ => {
                        let mut out = std::io::stdout().lock();
                        out.write_all(text.as_bytes())?;
                        out.flush()?;
                    }
                },
            }
        }
    }
    bail!("the build stream ended before the build finished")
}
