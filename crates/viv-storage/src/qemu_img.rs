//! Running `qemu-img` and reading what it says, treating every image as possibly hostile.
//!
//! Invariants: `qemu-img` gets absolute paths only (so a file name is never read as a protocol
//! such as `nbd:` or `json:`); probing a format happens only in [`probe`], for images entering
//! the pool, whose result must pass [`check_foreign`] before anything else reads the image; the
//! JSON of `qemu-img info` is parsed with bounds and type checks ([`parse_info`]) and never
//! trusted to be well formed. Child processes die with the future that runs them.

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::process::Command;

use crate::size::MAX_DISK_SIZE;

/// Formats accepted for images entering the pool (import, upload).
pub const FOREIGN_FORMATS: [&str; 6] = ["raw", "qcow2", "vmdk", "vdi", "vhdx", "vpc"];

/// The longest `qemu-img info` output read, in bytes.
pub const MAX_INFO_JSON: usize = 1 << 20;

/// How long `qemu-img info` may take on one image.
const INFO_TIMEOUT: Duration = Duration::from_secs(60);

/// `qemu-img` could not be run or failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Not installed.
    #[error("`qemu-img` is not installed; install the Debian package `qemu-utils`")]
    Missing,
    /// It could not be started.
    #[error("starting `{command}`: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The end of its error output.
        stderr: String,
    },
    /// It ran too long and was killed.
    #[error("`{command}` took longer than {seconds} s and was stopped")]
    TimedOut {
        /// The command line.
        command: String,
        /// The limit.
        seconds: u64,
    },
}

impl ToolError {
    /// Whether `qemu-img` failed because another process (a running VM) holds the image's lock.
    pub fn is_lock_conflict(&self) -> bool {
        matches!(self, ToolError::Failed { stderr, .. } if stderr.contains("lock"))
    }
}

/// `qemu-img info` output that is not what a sane image produces.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InfoParseError {
    /// Longer than [`MAX_INFO_JSON`].
    #[error("qemu-img info printed more than {MAX_INFO_JSON} bytes")]
    TooLarge,
    /// Not a JSON object.
    #[error("qemu-img info printed something that is not a JSON object: {0}")]
    NotJson(String),
    /// A required field is missing or has the wrong type.
    #[error("qemu-img info gave no valid '{0}'")]
    Field(&'static str),
}

/// Why an image cannot enter the pool or be used from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageCheckError {
    /// A format outside [`FOREIGN_FORMATS`].
    #[error("images in the format '{0}' are not accepted; convert it to qcow2, raw, vmdk, vdi or vhdx first")]
    UnsupportedFormat(String),
    /// It refers to a backing file.
    #[error("the image refers to the backing file '{0}'; upload or import a standalone image (qemu-img convert flattens it)")]
    Backing(String),
    /// A qcow2 with an external data file.
    #[error("the image keeps its data in the external file '{0}'; convert it to a standalone image first")]
    DataFile(String),
    /// A VMDK extent in another file.
    #[error("the image reads the extent file '{0}'; only single-file (monolithic) VMDKs are accepted")]
    Extent(String),
    /// Encrypted.
    #[error("the image is encrypted; decrypt it first")]
    Encrypted,
    /// Marked corrupt by QEMU.
    #[error("the image is marked corrupt; repair it with `qemu-img check -r all` first")]
    Corrupt,
    /// Virtual size zero or above the maximum.
    #[error("the image's virtual size {0} bytes is zero or larger than {MAX_DISK_SIZE} bytes")]
    Size(u64),
    /// `qemu-img info` output was unusable.
    #[error(transparent)]
    Info(#[from] InfoParseError),
}

/// What `qemu-img info` reports about an image, the fields this crate uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The format driver (`qcow2`, `raw`, `vmdk`, ...).
    pub format: String,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on the host, when reported.
    pub actual_size: Option<u64>,
    /// The backing file as written in the image.
    pub backing_filename: Option<String>,
    /// The backing file's format as written in the image.
    pub backing_format: Option<String>,
    /// A qcow2's external data file.
    pub data_file: Option<String>,
    /// A VMDK's extent file names.
    pub extents: Vec<String>,
    /// Encrypted (top-level `encrypted`).
    pub encrypted: bool,
    /// Marked corrupt (qcow2).
    pub corrupt: bool,
}

/// Parses `qemu-img info --output=json` output defensively.
pub fn parse_info(json: &[u8]) -> Result<ImageInfo, InfoParseError> {
    if json.len() > MAX_INFO_JSON {
        return Err(InfoParseError::TooLarge);
    }
    let value: Value = serde_json::from_slice(json).map_err(|e| InfoParseError::NotJson(e.to_string()))?;
    let object = value
        .as_object()
        .ok_or_else(|| InfoParseError::NotJson("not an object".into()))?;
    let text = |key: &'static str| -> Result<Option<String>, InfoParseError> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(_) => Err(InfoParseError::Field(key)),
        }
    };
    let format = text("format")?.ok_or(InfoParseError::Field("format"))?;
    let virtual_size = object
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or(InfoParseError::Field("virtual-size"))?;
    let actual_size = match object.get("actual-size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_u64().ok_or(InfoParseError::Field("actual-size"))?),
    };
    let encrypted = match object.get("encrypted") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or(InfoParseError::Field("encrypted"))?,
    };
    let mut info = ImageInfo {
        format,
        virtual_size,
        actual_size,
        backing_filename: text("backing-filename")?,
        backing_format: text("backing-filename-format")?,
        data_file: None,
        extents: Vec::new(),
        encrypted,
        corrupt: false,
    };
    // `full-backing-filename` without `backing-filename` would still mean a backing file.
    if info.backing_filename.is_none() {
        info.backing_filename = text("full-backing-filename")?;
    }
    if let Some(specific) = object.get("format-specific") {
        let data = specific.get("data").ok_or(InfoParseError::Field("format-specific"))?;
        match data.get("data-file") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) => info.data_file = Some(s.clone()),
            Some(_) => return Err(InfoParseError::Field("data-file")),
        }
        match data.get("corrupt") {
            None | Some(Value::Null) => {}
            Some(v) => info.corrupt = v.as_bool().ok_or(InfoParseError::Field("corrupt"))?,
        }
        if let Some(extents) = data.get("extents") {
            let extents = extents.as_array().ok_or(InfoParseError::Field("extents"))?;
            for extent in extents {
                let name = extent
                    .get("filename")
                    .and_then(Value::as_str)
                    .ok_or(InfoParseError::Field("extents"))?;
                info.extents.push(name.to_owned());
            }
        }
    }
    Ok(info)
}

/// Checks an image from outside the pool (probed at `path`) before it is read as a disk: an
/// accepted format, no backing file, no external data file, no extent in another file, not
/// encrypted or corrupt, a possible size.
pub fn check_foreign(info: &ImageInfo, path: &Path) -> Result<(), ImageCheckError> {
    if !FOREIGN_FORMATS.contains(&info.format.as_str()) {
        return Err(ImageCheckError::UnsupportedFormat(info.format.clone()));
    }
    if let Some(backing) = &info.backing_filename {
        return Err(ImageCheckError::Backing(backing.clone()));
    }
    if let Some(data_file) = &info.data_file {
        return Err(ImageCheckError::DataFile(data_file.clone()));
    }
    let own = path.to_string_lossy();
    if let Some(extent) = info.extents.iter().find(|e| **e != own) {
        return Err(ImageCheckError::Extent(extent.clone()));
    }
    if info.encrypted {
        return Err(ImageCheckError::Encrypted);
    }
    if info.corrupt {
        return Err(ImageCheckError::Corrupt);
    }
    if info.virtual_size == 0 || info.virtual_size > MAX_DISK_SIZE {
        return Err(ImageCheckError::Size(info.virtual_size));
    }
    Ok(())
}

/// Reads a progress figure (percent, 0 to 100) from one `\r`-separated piece of
/// `qemu-img convert -p` output, such as `    (42.17/100%)`.
pub fn parse_progress(piece: &str) -> Option<f64> {
    let inner = piece.trim().strip_prefix('(')?.strip_suffix("/100%)")?;
    let percent: f64 = inner.parse().ok()?;
    (percent.is_finite() && (0.0..=100.0).contains(&percent)).then_some(percent)
}

/// Runs `qemu-img info` on `path`: with `format` the driver is fixed (a pool disk), without it
/// the format is probed (an image entering the pool). `--force-share` lets it read images a
/// running VM holds.
pub async fn info(path: &Path, format: Option<&str>) -> Result<Vec<u8>, ToolError> {
    let mut args: Vec<OsString> = vec!["info".into(), "--output=json".into(), "--force-share".into()];
    if let Some(format) = format {
        args.extend(["-f".into(), format.into()]);
    }
    args.push(path.into());
    match tokio::time::timeout(INFO_TIMEOUT, run(&args)).await {
        Ok(result) => result,
        Err(_) => Err(ToolError::TimedOut {
            command: command_line(&args),
            seconds: INFO_TIMEOUT.as_secs(),
        }),
    }
}

/// Probes an image from outside the pool and checks it ([`check_foreign`]).
pub async fn probe(path: &Path) -> Result<Result<ImageInfo, ImageCheckError>, ToolError> {
    let json = info(path, None).await?;
    Ok(parse_info(&json)
        .map_err(ImageCheckError::from)
        .and_then(|info| check_foreign(&info, path).map(|()| info)))
}

/// Runs `qemu-img ARGS`, returning its standard output.
pub async fn run(args: &[OsString]) -> Result<Vec<u8>, ToolError> {
    let output = command(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| spawn_error(args, e))?;
    if output.status.success() {
        Ok(output.stdout)
    } else {
        Err(failed(args, output.status, &output.stderr))
    }
}

/// Runs `qemu-img convert -p` from `source` (format `from`) to `target` (format `to`),
/// reporting progress in percent.
pub async fn convert(
    source: &Path,
    from: &str,
    target: &Path,
    to: &str,
    progress: &mut (dyn FnMut(f64) + Send),
) -> Result<(), ToolError> {
    convert_with(source, from, &[], target, to, progress).await
}

/// [`convert`] with options about the source (`-U`, `-l snapshot.name=TAG`) before it.
pub async fn convert_with(
    source: &Path,
    from: &str,
    source_options: &[&str],
    target: &Path,
    to: &str,
    progress: &mut (dyn FnMut(f64) + Send),
) -> Result<(), ToolError> {
    let mut args: Vec<OsString> = vec!["convert".into(), "-p".into(), "-f".into(), from.into()];
    args.extend(source_options.iter().map(OsString::from));
    args.extend(["-O".into(), to.into(), source.into(), target.into()]);
    let mut child = command(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(&args, e))?;
    let mut stdout = child.stdout.take().expect("stdout is piped");
    let mut stderr = child.stderr.take().expect("stderr is piped");
    let read_progress = async {
        let mut pending = Vec::new();
        let mut buffer = [0u8; 512];
        while let Ok(n) = stdout.read(&mut buffer).await {
            if n == 0 {
                break;
            }
            pending.extend_from_slice(&buffer[..n]);
            while let Some(end) = pending.iter().position(|b| *b == b'\r' || *b == b'\n') {
                let piece: Vec<u8> = pending.drain(..=end).collect();
                if let Some(percent) = parse_progress(&String::from_utf8_lossy(&piece)) {
                    progress(percent);
                }
            }
            if pending.len() > 4096 {
                pending.clear();
            }
        }
    };
    let read_errors = async {
        let mut errors = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut errors).await;
        errors
    };
    let ((), errors) = tokio::join!(read_progress, read_errors);
    let status = child.wait().await.map_err(|e| spawn_error(&args, e))?;
    if status.success() {
        Ok(())
    } else {
        Err(failed(&args, status, &errors))
    }
}

fn command(args: &[OsString]) -> Command {
    let mut command = Command::new("qemu-img");
    command.args(args).kill_on_drop(true).env("LC_ALL", "C");
    command
}

fn command_line(args: &[OsString]) -> String {
    let mut line = String::from("qemu-img");
    for arg in args {
        line.push(' ');
        line.push_str(&arg.to_string_lossy());
    }
    line
}

fn spawn_error(args: &[OsString], source: std::io::Error) -> ToolError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ToolError::Missing
    } else {
        ToolError::Spawn {
            command: command_line(args),
            source,
        }
    }
}

fn failed(args: &[OsString], status: std::process::ExitStatus, stderr: &[u8]) -> ToolError {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|i| text.is_char_boundary(*i))
        .unwrap_or(text.len());
    ToolError::Failed {
        command: command_line(args),
        status: status.to_string(),
        stderr: text[start..].to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHILD: &str = r#"{"virtual-size": 1048576, "filename": "c.qcow2", "format": "qcow2",
        "actual-size": 200704, "backing-filename": "base.qcow2", "backing-filename-format": "qcow2",
        "format-specific": {"type": "qcow2", "data": {"compat": "1.1", "corrupt": false}}}"#;

    #[test]
    fn parses_a_linked_qcow2() {
        let info = parse_info(CHILD.as_bytes()).unwrap();
        assert_eq!(info.format, "qcow2");
        assert_eq!(info.virtual_size, 1 << 20);
        assert_eq!(info.actual_size, Some(200704));
        assert_eq!(info.backing_filename.as_deref(), Some("base.qcow2"));
        assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(
            check_foreign(&info, Path::new("/x/c.qcow2")),
            Err(ImageCheckError::Backing("base.qcow2".into()))
        );
    }

    #[test]
    fn refuses_external_files() {
        let vmdk = r#"{"virtual-size": 1048576, "format": "vmdk", "format-specific": {"type": "vmdk",
            "data": {"extents": [{"filename": "/tmp/x.vmdk"}, {"filename": "/etc/shadow"}]}}}"#;
        let info = parse_info(vmdk.as_bytes()).unwrap();
        assert_eq!(
            check_foreign(&info, Path::new("/tmp/x.vmdk")),
            Err(ImageCheckError::Extent("/etc/shadow".into()))
        );
        let data = r#"{"virtual-size": 512, "format": "qcow2", "format-specific": {"type": "qcow2",
            "data": {"data-file": "/dev/sda"}}}"#;
        let info = parse_info(data.as_bytes()).unwrap();
        assert!(matches!(
            check_foreign(&info, Path::new("/a")),
            Err(ImageCheckError::DataFile(_))
        ));
        let luks = r#"{"virtual-size": 512, "format": "luks"}"#;
        let info = parse_info(luks.as_bytes()).unwrap();
        assert!(matches!(
            check_foreign(&info, Path::new("/a")),
            Err(ImageCheckError::UnsupportedFormat(_))
        ));
    }

    #[test]
    fn refuses_malformed_json() {
        for bad in [
            "",
            "[]",
            "null",
            r#"{"format": "raw"}"#,
            r#"{"format": 1, "virtual-size": 1}"#,
            r#"{"format": "raw", "virtual-size": -1}"#,
            r#"{"format": "raw", "virtual-size": 1.5}"#,
            r#"{"format": "raw", "virtual-size": 1, "backing-filename": 7}"#,
            r#"{"format": "raw", "virtual-size": 1, "format-specific": {"data": {"extents": [{}]}}}"#,
        ] {
            assert!(parse_info(bad.as_bytes()).is_err(), "{bad}");
        }
        assert_eq!(
            parse_info(&vec![b' '; MAX_INFO_JSON + 1]),
            Err(InfoParseError::TooLarge)
        );
    }

    #[test]
    fn reads_convert_progress() {
        assert_eq!(parse_progress("    (42.17/100%)"), Some(42.17));
        assert_eq!(parse_progress("(100.00/100%)\r"), Some(100.0));
        assert_eq!(parse_progress("(101/100%)"), None);
        assert_eq!(parse_progress("(NaN/100%)"), None);
        assert_eq!(parse_progress("garbage"), None);
    }
}
