//! `viv push [DIR]`: builds the template a project directory describes in `DIR/vivarium.toml`
//! and records the resulting version id back into that file.
//!
//! The server's layer cache builds only the steps whose inputs changed, and a version's id is the
//! hash of its inputs, so pushing an unchanged directory makes no new version ("up to date").
//! Invariants: every path in `vivarium.toml` is relative to `DIR` and must stay inside it (no
//! absolute paths, no `..`, no symlink leading out); `vivarium.toml` itself is never part of the
//! build context (recording the version must not change the next build's inputs); the file is
//! edited with `toml_edit`, so the user's comments and formatting survive.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml_edit::DocumentMut;

use crate::client::Client;
use crate::template::{follow_build_events, send_build, BuildSource};

/// The project file `viv push` reads.
pub const PROJECT_FILE: &str = "vivarium.toml";

/// Shown when a directory has no project file.
const EXAMPLE: &str = r#"name = "myapp"            # the template's name
spec = "Dockerfile"        # the spec file, relative to this directory
# spec_text = """          # or the spec inline instead of `spec`
# FROM base
# RUN apt-get install -y python3
# """
context = "."              # the build context (COPY sources), relative to this directory
[resources]
vcpus = 1
memory_mb = 512"#;

/// `viv push`
#[derive(Debug, clap::Args)]
pub struct PushArgs {
    /// The project directory (holding vivarium.toml).
    #[arg(default_value = ".")]
    pub dir: PathBuf,
    /// Longest the build may take, in seconds.
    #[arg(long)]
    pub timeout: Option<u64>,
}

/// What `vivarium.toml` asks for.
struct Project {
    name: String,
    spec_path: PathBuf,
    spec: Vec<u8>,
    context: PathBuf,
    vcpus: Option<u32>,
    memory_mb: Option<u32>,
    recorded: Option<String>,
}

/// `rel`, a path from the project file, joined to `dir` if it stays inside `dir`.
fn inside(dir: &Path, rel: &str, what: &str) -> Result<PathBuf> {
    let path = Path::new(rel);
    if path.is_absolute()
        || path
            .components()
            .any(|c| matches!(c, Component::ParentDir | Component::Prefix(_)))
    {
        bail!("{PROJECT_FILE}: {what} '{rel}' must be a path inside the project directory (relative, without '..')");
    }
    let joined = dir.join(path);
    let real = joined
        .canonicalize()
        .with_context(|| format!("{PROJECT_FILE}: {what} '{rel}' ({})", joined.display()))?;
    if !real.starts_with(dir) {
        bail!("{PROJECT_FILE}: {what} '{rel}' leads out of the project directory (through a symlink)");
    }
    Ok(real)
}

fn read_project(dir: &Path, doc: &DocumentMut) -> Result<Project> {
    let text = |key: &str| -> Result<Option<String>> {
        match doc.get(key) {
            None => Ok(None),
            Some(item) => item
                .as_str()
                .map(|s| Some(s.to_owned()))
                .with_context(|| format!("{PROJECT_FILE}: `{key}` must be a string")),
        }
    };
    let name = text("name")?
        .with_context(|| format!("{PROJECT_FILE} has no `name` (the template's name); for example:\n\n{EXAMPLE}\n"))?;
    let (spec_path, spec) = match (text("spec")?, text("spec_text")?) {
        (Some(_), Some(_)) => {
            bail!("{PROJECT_FILE}: give either `spec` (a file) or `spec_text` (the spec inline), not both")
        }
        // A name no file has: the spec travels as an entry of its own.
        (None, Some(inline)) => (dir.join(format!("{PROJECT_FILE}#spec_text")), inline.into_bytes()),
        (file, None) => {
            let path = inside(dir, file.as_deref().unwrap_or("Dockerfile"), "spec")?;
            let spec = std::fs::read(&path).with_context(|| format!("reading the spec {}", path.display()))?;
            (path, spec)
        }
    };
    let context = inside(dir, text("context")?.as_deref().unwrap_or("."), "context")?;
    if !context.is_dir() {
        bail!("{PROJECT_FILE}: context {} is not a directory", context.display());
    }
    let resource = |key: &str| -> Result<Option<u32>> {
        let Some(item) = doc.get("resources").and_then(|r| r.get(key)) else {
            return Ok(None);
        };
        let value = item
            .as_integer()
            .with_context(|| format!("{PROJECT_FILE}: resources.{key} must be a whole number"))?;
        u32::try_from(value)
            .map(Some)
            .with_context(|| format!("{PROJECT_FILE}: resources.{key} = {value} is out of range"))
    };
    Ok(Project {
        name,
        spec_path,
        spec,
        context,
        vcpus: resource("vcpus")?,
        memory_mb: resource("memory_mb")?,
        recorded: text("version")?,
    })
}

/// Runs `viv push`; returns the exit code.
pub async fn run(client: &Client, args: PushArgs, json: bool) -> Result<i32> {
    let dir = args
        .dir
        .canonicalize()
        .with_context(|| format!("the project directory {}", args.dir.display()))?;
    let file = dir.join(PROJECT_FILE);
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => bail!(
            "{} has no {PROJECT_FILE}, which says what to build; create one, for example:\n\n{EXAMPLE}\n\nthen run `viv push {}` again",
            dir.display(),
            args.dir.display()
        ),
        Err(err) => return Err(err).with_context(|| format!("reading {}", file.display())),
    };
    let mut doc: DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not valid TOML", file.display()))?;
    let project = read_project(&dir, &doc)?;
    let skip = (project.context == dir).then(|| Path::new(PROJECT_FILE));
    let response = send_build(
        client,
        &BuildSource {
            dir: &project.context,
            spec_path: &project.spec_path,
            spec: &project.spec,
            skip,
        },
        &project.name,
        (project.vcpus, project.memory_mb, args.timeout),
        json,
    )
    .await?;
    let Some(template) = follow_build_events(response, json).await? else {
        return Ok(1);
    };
    let version = template
        .version_id
        .context("the server did not name the version it built (is it older than this viv?)")?;
    let unchanged = template.version_created == Some(false) && project.recorded.as_deref() == Some(&version);
    if !unchanged {
        doc["version"] = toml_edit::value(version.as_str());
        let partial = dir.join(format!(".{PROJECT_FILE}.partial"));
        std::fs::write(&partial, doc.to_string()).with_context(|| format!("writing {}", partial.display()))?;
        std::fs::rename(&partial, &file).with_context(|| format!("replacing {}", file.display()))?;
    }
    if json {
        return Ok(0);
    }
    if unchanged {
        println!("up to date: {version}");
    } else {
        println!("{version}");
    }
    Ok(0)
}
