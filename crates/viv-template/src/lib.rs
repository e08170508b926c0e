//! Template specs: the Dockerfile subset Vivarium builds templates from.
//!
//! A spec names what to start from (`FROM`), the build steps (`RUN`, `COPY`, `ENV`, `WORKDIR`,
//! `USER`), the command a sandbox starts with (`CMD`) and the command that says it is ready
//! (`HEALTHCHECK CMD`). [`parse`] turns the text into a [`Spec`] or a [`SpecError`] naming the
//! line; [`Spec::plan`] walks the steps from the configuration the base template had and yields
//! each step with variables expanded and the environment, directory and user it runs with.
//!
//! Invariant: parsing is pure (no file system, no network), so a spec is checked completely
//! before any VM starts.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

mod words;

pub use words::expand;

/// `PATH` of a process whose template sets none (the agent's default).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The most instructions a spec may have (Docker stops at 127 layers; every plan step carries a
/// copy of the configuration, so this bounds a plan's size).
pub const MAX_STEPS: usize = 500;

/// The most bytes of environment (names and values) a plan may build up: more than a process
/// could be started with (Linux takes at most 128 KiB per string).
pub const MAX_ENV_BYTES: usize = 256 << 10;

/// A parse error, with the 1-based line of the instruction it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct SpecError {
    /// The line the instruction starts on.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// A command as the spec gives it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Command {
    /// Shell form: run with `/bin/sh -c`.
    Shell(String),
    /// Exec form (a JSON array): run directly.
    Exec(Vec<String>),
}

impl Command {
    /// The program and its arguments.
    pub fn argv(&self) -> Vec<String> {
        match self {
            Command::Shell(script) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
            Command::Exec(argv) => argv.clone(),
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::Shell(script) => f.write_str(script),
            Command::Exec(argv) => write!(f, "{}", serde_json::to_string(argv).map_err(|_| fmt::Error)?),
        }
    }
}

/// One build instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    /// Run a command; its changes to the disk become a layer.
    Run(Command),
    /// Copy files from the build context; they become a layer.
    Copy {
        /// Paths relative to the context root.
        sources: Vec<String>,
        /// Destination in the guest (relative to the working directory when not absolute).
        dest: String,
        /// `--chown=user[:group]`.
        chown: Option<String>,
    },
    /// Set environment variables for later steps, the start command and every sandbox.
    Env(Vec<(String, String)>),
    /// Set the working directory of later steps and the start command (created when missing).
    Workdir(String),
    /// Set the user later steps and the start command run as.
    User(String),
}

/// An instruction and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// 1-based line the instruction starts on.
    pub line: usize,
    /// The instruction as written, continuations joined, for logs and cache keys.
    pub text: String,
    /// What it does.
    pub instruction: Instruction,
}

/// How readiness is probed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    /// Succeeds (exit 0) once the template is ready.
    pub command: Command,
    /// Pause between attempts.
    pub interval: Duration,
}

/// A parsed template spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The template or image to start from.
    pub from: String,
    /// Build steps in order.
    pub steps: Vec<Step>,
    /// Started in the background before the snapshot (`CMD`).
    pub start: Option<Command>,
    /// Polled until it succeeds before the snapshot (`HEALTHCHECK CMD`).
    pub ready: Option<Ready>,
    /// Instructions that were accepted but have no effect here, as (line, message).
    pub warnings: Vec<(usize, String)>,
}

/// What a template hands down to sandboxes and to templates built `FROM` it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    /// Environment variables.
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute), if set.
    pub workdir: Option<String>,
    /// User, if set.
    pub user: Option<String>,
}

/// A step ready to run: variables expanded, with the configuration in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedStep {
    /// The step as parsed.
    pub step: Step,
    /// The instruction with variables expanded and the destination made absolute.
    pub instruction: Instruction,
    /// Configuration after the step.
    pub config: ImageConfig,
}

impl Spec {
    /// Walks the steps from `base` (the configuration of the `FROM` template). Relative `COPY`
    /// destinations and `WORKDIR`s are resolved against the working directory in force.
    pub fn plan(&self, base: &ImageConfig) -> Result<Vec<PlannedStep>, SpecError> {
        let mut config = base.clone();
        config
            .env
            .entry("PATH".into())
            .or_insert_with(|| DEFAULT_PATH.to_owned());
        let mut planned = Vec::with_capacity(self.steps.len());
        for step in &self.steps {
            let fail = |message: String| SpecError {
                line: step.line,
                message,
            };
            let instruction = match &step.instruction {
                Instruction::Run(command) => Instruction::Run(command.clone()),
                Instruction::Copy { sources, dest, chown } => {
                    let dest = expand(dest, &config.env).map_err(fail)?;
                    let sources = sources
                        .iter()
                        .map(|s| expand(s, &config.env))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(fail)?;
                    let mut dest_abs = absolute(&dest, config.workdir.as_deref());
                    if dest.ends_with('/') && !dest_abs.ends_with('/') {
                        dest_abs.push('/');
                    }
                    Instruction::Copy {
                        sources,
                        dest: dest_abs,
                        chown: chown
                            .as_deref()
                            .map(|c| expand(c, &config.env))
                            .transpose()
                            .map_err(fail)?,
                    }
                }
                Instruction::Env(pairs) => {
                    let mut expanded = Vec::new();
                    for (key, value) in pairs {
                        let value = expand(value, &config.env).map_err(fail)?;
                        config.env.insert(key.clone(), value.clone());
                        expanded.push((key.clone(), value));
                    }
                    let size: usize = config.env.iter().map(|(k, v)| k.len() + v.len()).sum();
                    if size > MAX_ENV_BYTES {
                        return Err(fail(format!(
                            "the environment grows to {size} bytes, more than the {MAX_ENV_BYTES} a template may set"
                        )));
                    }
                    Instruction::Env(expanded)
                }
                Instruction::Workdir(dir) => {
                    let dir = absolute(&expand(dir, &config.env).map_err(fail)?, config.workdir.as_deref());
                    config.workdir = Some(dir.clone());
                    Instruction::Workdir(dir)
                }
                Instruction::User(user) => {
                    let user = expand(user, &config.env).map_err(fail)?;
                    config.user = Some(user.clone());
                    Instruction::User(user)
                }
            };
            planned.push(PlannedStep {
                step: step.clone(),
                instruction,
                config: config.clone(),
            });
        }
        Ok(planned)
    }
}

/// `path` made absolute against `workdir` (or `/`), with `.` and `..` segments resolved.
fn absolute(path: &str, workdir: Option<&str>) -> String {
    let joined = if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("{}/{path}", workdir.unwrap_or("/"))
    };
    let mut parts: Vec<&str> = Vec::new();
    for part in joined.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            other => parts.push(other),
        }
    }
    format!("/{}", parts.join("/"))
}

/// Parses a spec.
pub fn parse(text: &str) -> Result<Spec, SpecError> {
    let mut from = None;
    let mut steps = Vec::new();
    let mut start = None;
    let mut ready = None;
    let mut warnings = Vec::new();
    for (line, raw) in logical_lines(text) {
        let fail = |message: String| SpecError { line, message };
        if steps.len() == MAX_STEPS {
            return Err(fail(format!("a spec has at most {MAX_STEPS} build steps")));
        }
        let (keyword, rest) = match raw.split_once(char::is_whitespace) {
            Some((k, r)) => (k, r.trim()),
            None => (raw.as_str(), ""),
        };
        let keyword = keyword.to_ascii_uppercase();
        if from.is_none() && keyword != "FROM" {
            return Err(fail(format!(
                "the spec must start with FROM (a template or image name), found {keyword}"
            )));
        }
        let needs_argument = |what: &str| -> Result<(), SpecError> {
            if rest.is_empty() {
                Err(fail(format!("{keyword} needs {what}")))
            } else {
                Ok(())
            }
        };
        let mut push = |instruction| {
            steps.push(Step {
                line,
                text: format!("{keyword} {rest}"),
                instruction,
            })
        };
        match keyword.as_str() {
            "FROM" => {
                if from.is_some() {
                    return Err(fail(
                        "multi-stage builds are not supported: a spec has exactly one FROM".into(),
                    ));
                }
                needs_argument("a template or image name")?;
                let words: Vec<&str> = rest.split_whitespace().collect();
                if words[0].starts_with("--") {
                    return Err(fail(format!("FROM options such as {} are not supported", words[0])));
                }
                if words.len() > 1 {
                    return Err(fail(format!(
                        "FROM takes one name, got '{rest}' (stages with AS are not supported)"
                    )));
                }
                from = Some(words[0].to_owned());
            }
            "RUN" => {
                needs_argument("a command")?;
                if rest.starts_with("--") {
                    return Err(fail(format!(
                        "RUN options such as {} are not supported",
                        rest.split_whitespace().next().unwrap_or_default()
                    )));
                }
                push(Instruction::Run(command(rest).map_err(fail)?));
            }
            "COPY" => {
                needs_argument("sources and a destination")?;
                let mut words = if rest.starts_with('[') {
                    json_array(rest).map_err(fail)?
                } else {
                    words::split(rest).map_err(fail)?
                };
                let mut chown = None;
                while words.first().is_some_and(|w| w.starts_with("--")) {
                    let flag = words.remove(0);
                    match flag.strip_prefix("--chown=") {
                        Some(owner) if !owner.is_empty() => chown = Some(owner.to_owned()),
                        _ => {
                            return Err(fail(format!(
                                "COPY option {flag} is not supported (only --chown=USER[:GROUP])"
                            )))
                        }
                    }
                }
                if words.len() < 2 {
                    return Err(fail("COPY needs at least one source and a destination".into()));
                }
                let dest = words.pop().expect("two or more words");
                if words.len() > 1 && !dest.ends_with('/') {
                    return Err(fail(format!(
                        "COPY with several sources needs a directory destination ending in '/', got '{dest}'"
                    )));
                }
                for source in &words {
                    if source.starts_with('/') || source.split('/').any(|p| p == "..") {
                        return Err(fail(format!(
                            "COPY source '{source}' must be a path inside the build context (relative, without '..')"
                        )));
                    }
                    if source.contains(['*', '?', '[']) {
                        return Err(fail(format!("COPY source '{source}': wildcards are not supported")));
                    }
                }
                push(Instruction::Copy {
                    sources: words,
                    dest,
                    chown,
                });
            }
            "ENV" => {
                needs_argument("NAME=value pairs")?;
                push(Instruction::Env(env_pairs(rest).map_err(fail)?));
            }
            "WORKDIR" => {
                needs_argument("a directory")?;
                push(Instruction::Workdir(rest.to_owned()));
            }
            "USER" => {
                needs_argument("a user name")?;
                if rest.split_whitespace().count() > 1 {
                    return Err(fail(format!("USER takes one name, got '{rest}'")));
                }
                push(Instruction::User(rest.to_owned()));
            }
            "CMD" => {
                needs_argument("a command")?;
                start = Some(command(rest).map_err(fail)?);
            }
            "HEALTHCHECK" => {
                needs_argument("CMD and a command, or NONE")?;
                ready = healthcheck(rest).map_err(fail)?;
            }
            "LABEL" | "EXPOSE" | "MAINTAINER" | "STOPSIGNAL" | "VOLUME" => {
                warnings.push((line, format!("{keyword} has no effect in a Vivarium template; ignored")));
            }
            "ADD" => {
                return Err(fail(
                    "ADD is not supported (no downloads or archive extraction); use COPY, or RUN curl/tar".into(),
                ))
            }
            "ENTRYPOINT" => {
                return Err(fail(
                    "ENTRYPOINT is not supported; use CMD for the command the template starts with".into(),
                ))
            }
            "ARG" | "SHELL" | "ONBUILD" => return Err(fail(format!("{keyword} is not supported"))),
            other => {
                return Err(fail(format!(
                    "unknown instruction '{other}'; supported: FROM, RUN, COPY, ENV, WORKDIR, USER, CMD, HEALTHCHECK"
                )))
            }
        }
    }
    let from = from.ok_or_else(|| SpecError {
        line: text.lines().count().max(1),
        message: "the spec is empty: it needs at least a FROM line".into(),
    })?;
    Ok(Spec {
        from,
        steps,
        start,
        ready,
        warnings,
    })
}

/// Lines with comments and blank lines dropped and `\` continuations joined, each with the
/// number of the line it starts on.
fn logical_lines(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (body, continues) = match trimmed.strip_suffix('\\') {
            Some(body) => (body.trim_end(), true),
            None => (trimmed, false),
        };
        let entry = current.get_or_insert_with(|| (index + 1, String::new()));
        if !entry.1.is_empty() && !body.is_empty() {
            entry.1.push(' ');
        }
        entry.1.push_str(body);
        if !continues {
            out.extend(current.take().filter(|(_, text)| !text.is_empty()));
        }
    }
    out.extend(current.filter(|(_, text)| !text.is_empty()));
    out
}

fn command(rest: &str) -> Result<Command, String> {
    if rest.starts_with('[') {
        let argv = json_array(rest)?;
        if argv.is_empty() || argv[0].is_empty() {
            return Err("the command's JSON array is empty".into());
        }
        Ok(Command::Exec(argv))
    } else {
        Ok(Command::Shell(rest.to_owned()))
    }
}

fn json_array(rest: &str) -> Result<Vec<String>, String> {
    serde_json::from_str(rest).map_err(|e| format!("not a JSON array of strings ({e}): {rest}"))
}

fn env_pairs(rest: &str) -> Result<Vec<(String, String)>, String> {
    let first = rest.split_whitespace().next().unwrap_or_default();
    if !first.contains('=') {
        // Legacy form: `ENV NAME value with spaces`.
        let (name, value) = rest.split_once(char::is_whitespace).ok_or("ENV NAME needs a value")?;
        check_env_name(name)?;
        return Ok(vec![(name.to_owned(), value.trim().to_owned())]);
    }
    let mut pairs = Vec::new();
    for word in words::split(rest)? {
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| format!("'{word}' is not NAME=value"))?;
        check_env_name(name)?;
        pairs.push((name.to_owned(), value.to_owned()));
    }
    Ok(pairs)
}

fn check_env_name(name: &str) -> Result<(), String> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(format!("'{name}' is not a valid environment variable name"))
    }
}

fn healthcheck(rest: &str) -> Result<Option<Ready>, String> {
    if rest.eq_ignore_ascii_case("NONE") {
        return Ok(None);
    }
    let mut interval = Duration::from_millis(500);
    let mut remaining = rest;
    while let Some(option) = remaining.strip_prefix("--") {
        let (option, after) = option
            .split_once(char::is_whitespace)
            .ok_or("HEALTHCHECK needs CMD after its options")?;
        let (name, value) = option
            .split_once('=')
            .ok_or_else(|| format!("HEALTHCHECK option --{option} needs a value"))?;
        match name {
            "interval" => interval = duration(value)?,
            "timeout" | "start-period" | "start-interval" | "retries" => {}
            other => return Err(format!("unknown HEALTHCHECK option --{other}")),
        }
        remaining = after.trim_start();
    }
    let (keyword, command_text) = remaining
        .split_once(char::is_whitespace)
        .ok_or("HEALTHCHECK needs CMD and a command")?;
    if !keyword.eq_ignore_ascii_case("CMD") {
        return Err(format!("HEALTHCHECK needs CMD before the command, found '{keyword}'"));
    }
    Ok(Some(Ready {
        command: command(command_text.trim())?,
        interval,
    }))
}

fn duration(text: &str) -> Result<Duration, String> {
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("'{text}' is not a duration like 500ms, 2s or 1m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(number)),
        "s" | "" => Ok(Duration::from_secs(number)),
        "m" => number
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(|| format!("'{text}' is too long a duration")),
        _ => Err(format!("'{text}' is not a duration like 500ms, 2s or 1m")),
    }
}

#[cfg(test)]
mod tests;
