//! The cache directory, its locks, atomic publishing and the external commands builds run.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::ImageError;

/// Receives progress of long operations: a stage title, then lines of detail.
pub trait Progress: Sync {
    /// A new stage begins.
    fn stage(&self, title: &str);
    /// A line of detail within the current stage.
    fn detail(&self, line: &str);
    /// The stage finished.
    fn done(&self, summary: &str);
}

/// Progress that goes to `tracing`.
#[derive(Debug, Default)]
pub struct LogProgress;

impl Progress for LogProgress {
    fn stage(&self, title: &str) {
        tracing::info!("{title}");
    }
    fn detail(&self, line: &str) {
        tracing::debug!("{line}");
    }
    fn done(&self, summary: &str) {
        tracing::info!("{summary}");
    }
}

/// The image cache: `kernels/`, `initramfs/`, `rootfs/`, and `tmp/` for builds in progress.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// Suffix of files and directories still being built.
pub(crate) const PARTIAL: &str = ".partial";

impl ImageStore {
    /// Opens (creating) the store and removes what interrupted builds left behind.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, ImageError> {
        let root = root.into();
        for sub in ["kernels", "initramfs", "rootfs", "tmp", "locks"] {
            fs::create_dir_all(root.join(sub))
                .map_err(ImageError::io(format!("creating {}", root.join(sub).display())))?;
        }
        let store = Self { root };
        store.clean_partials();
        Ok(store)
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Removes leftovers of builds whose lock nobody holds any more.
    fn clean_partials(&self) {
        let Ok(_guard) = self.try_lock("clean") else { return };
        let tmp = self.dir("tmp");
        for entry in fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // Each temporary is named after the lock of its build; skip builds still running.
            // (`LOCK.WHAT.PID`; lock names may hold dots, as kernel package names do.)
            let lock_name = name.rsplitn(3, '.').nth(2).unwrap_or_default().to_owned();
            if let Ok(Some(_held)) = self.try_lock_nowait(&lock_name) {
                remove_any(&entry.path());
            }
        }
        for sub in ["kernels", "initramfs", "rootfs"] {
            for entry in fs::read_dir(self.dir(sub)).into_iter().flatten().flatten() {
                if entry.file_name().to_string_lossy().contains(PARTIAL) {
                    remove_any(&entry.path());
                }
            }
        }
    }

    /// Takes the build lock named `name`, waiting for another builder to finish.
    pub(crate) fn lock(&self, name: &str) -> Result<Lock, ImageError> {
        let path = self.dir("locks").join(format!("{name}.lock"));
        let file = fs::File::create(&path).map_err(ImageError::io(format!("creating {}", path.display())))?;
        // SAFETY: flock on an fd we own; blocks until the lock is free.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(ImageError::io(format!("locking {}", path.display()))(
                std::io::Error::last_os_error(),
            ));
        }
        Ok(Lock { _file: file })
    }

    fn try_lock(&self, name: &str) -> Result<Lock, ImageError> {
        self.try_lock_nowait(name)?
            .ok_or_else(|| ImageError::Invalid(format!("{name} is locked")))
    }

    fn try_lock_nowait(&self, name: &str) -> Result<Option<Lock>, ImageError> {
        let path = self.dir("locks").join(format!("{name}.lock"));
        let file = fs::File::create(&path).map_err(ImageError::io(format!("creating {}", path.display())))?;
        // SAFETY: flock on an fd we own; LOCK_NB never blocks.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        Ok((ret == 0).then_some(Lock { _file: file }))
    }

    /// A fresh temporary path for a build holding lock `lock_name`.
    pub(crate) fn temp_path(&self, lock_name: &str, what: &str) -> PathBuf {
        let path = self
            .dir("tmp")
            .join(format!("{lock_name}.{what}.{}", std::process::id()));
        remove_any(&path);
        path
    }
}

/// A held build lock; released on drop.
#[derive(Debug)]
pub struct Lock {
    _file: fs::File,
}

pub(crate) fn remove_any(path: &Path) {
    if path.is_dir() && !path.is_symlink() {
        let _ = fs::remove_dir_all(path);
    } else {
        let _ = fs::remove_file(path);
    }
}

/// Moves a finished artifact into place.
pub(crate) fn publish(temp: &Path, dest: &Path) -> Result<(), ImageError> {
    fs::rename(temp, dest).map_err(ImageError::io(format!(
        "moving {} to {}",
        temp.display(),
        dest.display()
    )))
}

/// Checks that a tool is installed.
pub(crate) fn require_tool(tool: &str, package: &str) -> Result<(), ImageError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if found {
        Ok(())
    } else {
        Err(ImageError::MissingTool {
            tool: tool.into(),
            package: package.into(),
        })
    }
}

/// Runs a command, passing each output line to `progress`; fails with the output's tail.
pub(crate) fn run(command: &mut Command, progress: &dyn Progress) -> Result<String, ImageError> {
    let line = format!("{command:?}");
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(ImageError::io(format!("starting {line}")))?;
    let stderr = child.stderr.take().expect("piped stderr");
    let err_reader =
        std::thread::spawn(move || BufReader::new(stderr).lines().map_while(Result::ok).collect::<Vec<_>>());
    let mut out_lines = Vec::new();
    for l in BufReader::new(child.stdout.take().expect("piped stdout"))
        .lines()
        .map_while(Result::ok)
    {
        progress.detail(&l);
        out_lines.push(l);
    }
    let err_lines = err_reader.join().unwrap_or_default();
    for l in &err_lines {
        progress.detail(l);
    }
    let status = child.wait().map_err(ImageError::io(format!("waiting for {line}")))?;
    if !status.success() {
        let all: Vec<&String> = out_lines.iter().chain(err_lines.iter()).collect();
        let tail = all[all.len().saturating_sub(15)..]
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n");
        return Err(ImageError::Command {
            command: line,
            status: status.to_string(),
            output: tail,
        });
    }
    Ok(out_lines.join("\n"))
}
