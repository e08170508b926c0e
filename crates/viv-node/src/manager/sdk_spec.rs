//! The E2B SDK's template definitions (`TemplateBuildStartV2`: a base, steps of type `RUN`,
//! `COPY`, `ENV`, `WORKDIR` and `USER`, a start and a ready command) turned into Vivarium
//! [`Spec`]s, so the SDK's builds run on the same layer builder as Dockerfile specs.
//!
//! Invariants: conversion is pure (the files a `COPY` names are matched later, against the
//! archive the SDK uploaded); every spec step carries as its line the SDK's step number (1 for
//! the first step, as the SDK numbers its stack traces after the base), so a failure names the
//! step the SDK points at; `RUN` as another user becomes `USER`, `RUN`, `USER` back, all with the
//! same line.

use serde::Deserialize;
use viv_template::{Command, Instruction, Ready, Spec, Step};

/// The image `from_base_image()` names, which builds on Vivarium's `base`.
pub const E2B_BASE_IMAGE: &str = "e2bdev/base";

/// The user and working directory E2B's builds start with (not Docker's root and `/`).
pub const DEFAULT_USER: &str = "user";
/// See [`DEFAULT_USER`].
pub const DEFAULT_WORKDIR: &str = "/home/user";

/// The tag a name without one means.
pub const DEFAULT_TAG: &str = "default";

/// How ready commands are polled.
const READY_INTERVAL_MS: u64 = 200;

/// `POST /v2/templates/{id}/builds/{build}`: what to build.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StartBuild {
    /// An image to start from.
    #[serde(default)]
    pub from_image: Option<String>,
    /// A template (`name` or `name:tag`) to start from.
    #[serde(default)]
    pub from_template: Option<String>,
    /// Credentials for `from_image`'s registry.
    #[serde(default)]
    pub from_image_registry: Option<Registry>,
    /// Rebuild every step, whatever the cache holds.
    #[serde(default)]
    pub force: bool,
    /// The steps.
    #[serde(default)]
    pub steps: Vec<SdkStep>,
    /// Started before the snapshot; running in every sandbox.
    #[serde(default)]
    pub start_cmd: Option<String>,
    /// Polled until it succeeds before the snapshot.
    #[serde(default)]
    pub ready_cmd: Option<String>,
}

/// Registry credentials of `fromImageRegistry`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Registry {
    /// `registry`, `aws` or `gcp`.
    #[serde(rename = "type")]
    pub kind: String,
    /// User name (`registry`).
    #[serde(default)]
    pub username: Option<String>,
    /// Password (`registry`).
    #[serde(default)]
    pub password: Option<String>,
}

/// One step as the SDK sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SdkStep {
    /// `RUN`, `COPY`, `ENV`, `WORKDIR` or `USER`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// For `COPY`: the hash the files were uploaded under.
    #[serde(default)]
    pub files_hash: Option<String>,
    /// Rebuild this step (and so every later one).
    #[serde(default)]
    pub force: bool,
}

/// What a build starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Base {
    /// E2B's base image: Vivarium's `base`, with E2B's user and working directory.
    E2bImage,
    /// A template row (`name`, or `name:tag` for a tag other than the default).
    Template(String),
    /// An image in a registry.
    Image(String),
}

/// A `COPY` step's files, still to be matched in the archive uploaded under `files_hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyFiles {
    /// Index of the step in [`Converted::spec`]'s steps.
    pub step: usize,
    /// The hash the SDK uploaded the archive under.
    pub files_hash: String,
    /// The source pattern (a path or a glob, relative to the SDK's context directory).
    pub pattern: String,
    /// Permissions for the copied entries.
    pub mode: Option<u32>,
}

/// A converted definition.
#[derive(Debug, Clone)]
pub struct Converted {
    /// The spec; `COPY` sources are the patterns until matched.
    pub spec: Spec,
    /// The `COPY` steps' files.
    pub copies: Vec<CopyFiles>,
    /// The spec step from which the cache is skipped.
    pub force_from: Option<usize>,
}

/// A template row's name: `name` for the default tag, else `name:tag`.
pub fn row_name(name: &str, tag: &str) -> String {
    if tag == DEFAULT_TAG {
        name.to_owned()
    } else {
        format!("{name}:{tag}")
    }
}

/// Splits `name[:tag]`; the tag defaults to [`DEFAULT_TAG`].
pub fn split_ref(reference: &str) -> (&str, &str) {
    match reference.split_once(':') {
        Some((name, tag)) => (name, tag),
        None => (reference, DEFAULT_TAG),
    }
}

/// Whether `tag` is a usable tag: 1 to 128 letters, digits, `.`, `_` or `-`, starting with a
/// letter or digit.
pub fn valid_tag(tag: &str) -> bool {
    tag.len() <= 128
        && tag.starts_with(|c: char| c.is_ascii_alphanumeric())
        && tag
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// What the definition builds on.
pub fn base_of(start: &StartBuild) -> Result<Base, String> {
    let image = start.from_image.as_deref().filter(|s| !s.is_empty());
    let template = start.from_template.as_deref().filter(|s| !s.is_empty());
    match (image, template) {
        (Some(_), Some(_)) | (None, None) => Err("give exactly one of fromImage and fromTemplate".into()),
        (None, Some(template)) => {
            let (name, tag) = split_ref(template);
            if name.is_empty() || !valid_tag(tag) {
                return Err(format!(
                    "fromTemplate '{template}' is not a template name (name or name:tag)"
                ));
            }
            Ok(Base::Template(row_name(name, tag)))
        }
        (Some(image), None) => {
            let short = image.strip_prefix("docker.io/").unwrap_or(image);
            let short = short.strip_prefix("library/").unwrap_or(short);
            if short == E2B_BASE_IMAGE || short == format!("{E2B_BASE_IMAGE}:latest") {
                Ok(Base::E2bImage)
            } else {
                Ok(Base::Image(image.to_owned()))
            }
        }
    }
}

/// Converts the steps; `user` is the user in force at the start (the base's).
pub fn convert(start: &StartBuild, from: &str, user: Option<&str>) -> Result<Converted, String> {
    let mut steps = Vec::new();
    let mut copies = Vec::new();
    let mut force_from = start.force.then_some(0);
    let mut current_user = user.map(str::to_owned);
    for (index, step) in start.steps.iter().enumerate() {
        let line = index + 1;
        let fail = |message: String| format!("step {line} ({}): {message}", step.kind);
        if step.force && force_from.is_none() {
            force_from = Some(steps.len());
        }
        let arg = |i: usize| step.args.get(i).map(String::as_str).unwrap_or_default();
        let push = |steps: &mut Vec<Step>, text: String, instruction: Instruction| {
            steps.push(Step {
                line,
                text,
                instruction,
            })
        };
        match step.kind.as_str() {
            "RUN" => {
                let command = arg(0);
                if command.trim().is_empty() {
                    return Err(fail("needs a command".into()));
                }
                let as_user = Some(arg(1)).filter(|u| !u.is_empty());
                let switch = as_user.filter(|u| current_user.as_deref().unwrap_or("root") != *u);
                if let Some(other) = switch {
                    push(&mut steps, format!("USER {other}"), Instruction::User(other.to_owned()));
                }
                push(
                    &mut steps,
                    format!("RUN {command}"),
                    Instruction::Run(Command::Shell(command.to_owned())),
                );
                if switch.is_some() {
                    let back = current_user.clone().unwrap_or_else(|| "root".into());
                    push(&mut steps, format!("USER {back}"), Instruction::User(back));
                }
            }
            "COPY" => {
                let (pattern, dest) = (arg(0), arg(1));
                if pattern.is_empty() || dest.is_empty() {
                    return Err(fail("needs a source and a destination".into()));
                }
                if pattern.starts_with('/') || pattern.split('/').any(|p| p == "..") {
                    return Err(fail(format!("source '{pattern}' must be relative, without '..'")));
                }
                let files_hash = step
                    .files_hash
                    .clone()
                    .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                    .ok_or_else(|| fail("needs filesHash, the SHA-256 of its files (64 hex digits)".into()))?;
                let mode = match arg(3) {
                    "" => None,
                    text => Some(
                        u32::from_str_radix(text, 8)
                            .ok()
                            .filter(|m| *m <= 0o7777)
                            .ok_or_else(|| fail(format!("mode '{text}' is not an octal file mode")))?,
                    ),
                };
                let owner = Some(arg(2))
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .or_else(|| current_user.clone().filter(|u| u != "root"));
                copies.push(CopyFiles {
                    step: steps.len(),
                    files_hash,
                    pattern: pattern.to_owned(),
                    mode,
                });
                push(
                    &mut steps,
                    format!("COPY {pattern} {dest}"),
                    Instruction::Copy {
                        sources: vec![pattern.to_owned()],
                        dest: dest.to_owned(),
                        chown: owner,
                    },
                );
            }
            "ENV" => {
                if step.args.is_empty() || step.args.len() % 2 != 0 {
                    return Err(fail("needs name and value pairs".into()));
                }
                let pairs: Vec<(String, String)> = step
                    .args
                    .chunks(2)
                    .map(|pair| (pair[0].clone(), pair[1].clone()))
                    .collect();
                for (name, _) in &pairs {
                    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                    if !valid {
                        return Err(fail(format!("'{name}' is not a valid environment variable name")));
                    }
                }
                let text = pairs
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                push(&mut steps, format!("ENV {text}"), Instruction::Env(pairs));
            }
            "WORKDIR" => {
                let dir = arg(0);
                if dir.is_empty() {
                    return Err(fail("needs a directory".into()));
                }
                push(
                    &mut steps,
                    format!("WORKDIR {dir}"),
                    Instruction::Workdir(dir.to_owned()),
                );
            }
            "USER" => {
                let user = arg(0);
                if user.is_empty() || user.contains(char::is_whitespace) {
                    return Err(fail("needs one user name".into()));
                }
                current_user = Some(user.to_owned());
                push(&mut steps, format!("USER {user}"), Instruction::User(user.to_owned()));
            }
            other => {
                return Err(format!(
                    "step {line}: unknown step type '{other}' (RUN, COPY, ENV, WORKDIR and USER are known)"
                ))
            }
        }
    }
    if steps.len() > viv_template::MAX_STEPS {
        return Err(format!("a template has at most {} steps", viv_template::MAX_STEPS));
    }
    let nonempty = |c: &Option<String>| c.as_deref().filter(|c| !c.trim().is_empty()).map(str::to_owned);
    Ok(Converted {
        spec: Spec {
            from: from.to_owned(),
            steps,
            start: nonempty(&start.start_cmd).map(Command::Shell),
            ready: nonempty(&start.ready_cmd).map(|command| Ready {
                command: Command::Shell(command),
                interval: std::time::Duration::from_millis(READY_INTERVAL_MS),
            }),
            warnings: Vec::new(),
        },
        copies,
        force_from,
    })
}

/// Whether `path` matches the glob `pattern` segment by segment (`*` and `?` within a segment,
/// `[...]` classes, `**` across segments), as the SDK expands copy sources.
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let pattern: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty() && *s != ".").collect();
    let path: Vec<&str> = path.split('/').filter(|s| !s.is_empty() && *s != ".").collect();
    match_segments(&pattern, &path)
}

fn match_segments(pattern: &[&str], path: &[&str]) -> bool {
    match pattern.split_first() {
        None => path.is_empty(),
        Some((&"**", rest)) => (0..=path.len()).any(|skip| match_segments(rest, &path[skip..])),
        Some((first, rest)) => {
            !path.is_empty() && match_segment(first.as_bytes(), path[0].as_bytes()) && match_segments(rest, &path[1..])
        }
    }
}

fn match_segment(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|skip| match_segment(rest, &name[skip..])),
        Some((b'?', rest)) => !name.is_empty() && match_segment(rest, &name[1..]),
        Some((b'[', rest)) => {
            let Some(end) = rest.iter().skip(1).position(|&b| b == b']').map(|p| p + 1) else {
                return name.first() == Some(&b'[') && match_segment(rest, &name[1..]);
            };
            let Some((&c, name_rest)) = name.split_first() else {
                return false;
            };
            let (negate, class) = match rest[..end].split_first() {
                Some((b'!' | b'^', class)) => (true, class),
                _ => (false, &rest[..end]),
            };
            let mut found = false;
            let mut i = 0;
            while i < class.len() {
                if i + 2 < class.len() && class[i + 1] == b'-' {
                    found |= class[i] <= c && c <= class[i + 2];
                    i += 3;
                } else {
                    found |= class[i] == c;
                    i += 1;
                }
            }
            found != negate && match_segment(&rest[end + 1..], name_rest)
        }
        Some((&b, rest)) => name.first() == Some(&b) && match_segment(rest, &name[1..]),
    }
}

/// Whether a copy source is a glob (several matches then go into a directory).
pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(kind: &str, args: &[&str]) -> SdkStep {
        SdkStep {
            kind: kind.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            files_hash: (kind == "COPY").then(|| "a".repeat(64)),
            force: false,
        }
    }

    #[test]
    fn bases_map_e2b_images_and_tags() {
        let from = |image: Option<&str>, template: Option<&str>| {
            base_of(&StartBuild {
                from_image: image.map(Into::into),
                from_template: template.map(Into::into),
                ..Default::default()
            })
        };
        assert_eq!(from(Some("e2bdev/base"), None), Ok(Base::E2bImage));
        assert_eq!(from(Some("docker.io/e2bdev/base:latest"), None), Ok(Base::E2bImage));
        assert_eq!(from(Some("debian:12"), None), Ok(Base::Image("debian:12".into())));
        assert_eq!(from(None, Some("web")), Ok(Base::Template("web".into())));
        assert_eq!(from(None, Some("web:default")), Ok(Base::Template("web".into())));
        assert_eq!(from(None, Some("web:v1")), Ok(Base::Template("web:v1".into())));
        assert!(from(None, None).is_err());
        assert!(from(Some("x"), Some("y")).is_err());
        assert!(from(None, Some("web:bad tag")).is_err());
    }

    #[test]
    fn steps_convert_with_their_sdk_numbers() {
        let start = StartBuild {
            from_image: Some(E2B_BASE_IMAGE.into()),
            steps: vec![
                step("ENV", &["A", "1", "B", "two"]),
                step("RUN", &["whoami", "root"]),
                step("COPY", &["dir/*.txt", "out", "", "0755"]),
                step("WORKDIR", &["/app"]),
                SdkStep {
                    force: true,
                    ..step("RUN", &["true"])
                },
                step("USER", &["root"]),
                step("RUN", &["id", "root"]),
            ],
            start_cmd: Some("sleep 100".into()),
            ready_cmd: Some("true".into()),
            ..Default::default()
        };
        let converted = convert(&start, "base", Some("user")).unwrap();
        let lines: Vec<usize> = converted.spec.steps.iter().map(|s| s.line).collect();
        assert_eq!(lines, [1, 2, 2, 2, 3, 4, 5, 6, 7]);
        assert_eq!(converted.spec.steps[1].instruction, Instruction::User("root".into()));
        assert_eq!(converted.spec.steps[3].instruction, Instruction::User("user".into()));
        assert_eq!(
            converted.spec.steps[4].instruction,
            Instruction::Copy {
                sources: vec!["dir/*.txt".into()],
                dest: "out".into(),
                chown: Some("user".into())
            }
        );
        assert_eq!(converted.copies[0].step, 4);
        assert_eq!(converted.copies[0].mode, Some(0o755));
        assert_eq!(converted.force_from, Some(6));
        // Already root: no switch around the last RUN.
        assert_eq!(converted.spec.steps.len(), 9);
        assert_eq!(converted.spec.start, Some(Command::Shell("sleep 100".into())));

        let forced = convert(
            &StartBuild {
                force: true,
                ..start.clone()
            },
            "base",
            None,
        )
        .unwrap();
        assert_eq!(forced.force_from, Some(0));

        for bad in [
            step("RUN", &[]),
            step("ENV", &["A"]),
            step("ENV", &["1A", "x"]),
            step("COPY", &["../x", "/y"]),
            step("COPY", &["x", "/y", "", "9"]),
            step("HEALTHCHECK", &["x"]),
        ] {
            let start = StartBuild {
                steps: vec![bad.clone()],
                ..Default::default()
            };
            assert!(convert(&start, "base", None).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn globs_match_like_the_sdk() {
        assert!(glob_match("folder/*.txt", "folder/a.txt"));
        assert!(!glob_match("folder/*.txt", "folder/sub/a.txt"));
        assert!(glob_match("folder/**/*.txt", "folder/sub/a.txt"));
        assert!(glob_match("**", "x/y"));
        assert!(glob_match("./app", "app"));
        assert!(glob_match("f?le[0-9].py", "file7.py"));
        assert!(!glob_match("f?le[!0-9].py", "file7.py"));
        assert!(!glob_match("app", "app/x"));
        assert!(is_glob("a/*.txt") && !is_glob("a/b.txt"));
    }
}
