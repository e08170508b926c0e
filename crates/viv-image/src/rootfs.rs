//! Root file systems as qcow2 base layers: built from Debian packages with mmdebstrap, or
//! imported from a directory or an ext4 image the user supplies.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{publish, remove_any, require_tool, run};
use crate::{ImageError, ImageStore, Progress};

/// Bumped whenever the build steps change in a way the recipe fields do not capture.
const BUILD_REVISION: u32 = 3;

/// What goes into a Debian root file system.
#[derive(Debug, Clone, Serialize)]
pub struct DebianRecipe {
    /// The Debian suite, such as `bookworm`.
    pub suite: String,
    /// Packages on top of the `minbase` variant.
    pub packages: Vec<String>,
    /// An unprivileged user with passwordless sudo, as E2B's base template has.
    pub user: String,
    /// Size of the ext4 file system in MiB (the qcow2 layer only stores what is used).
    pub size_mib: u64,
}

impl Default for DebianRecipe {
    fn default() -> Self {
        Self {
            suite: "bookworm".into(),
            packages: [
                "python3",
                "python3-pip",
                // `python` and `pip` as E2B's base (a python image) has them.
                "python-is-python3",
                // E2B's base also has a C toolchain and Node.js with npm.
                "build-essential",
                "nodejs",
                "npm",
                "ca-certificates",
                "curl",
                "git",
                "sudo",
                "procps",
                "iproute2",
                "less",
                // The SSH gateway runs the guest's sftp-server for SFTP and scp (it brings
                // openssh-client, so `scp -O` works too); rsync over SSH needs rsync at both ends.
                "openssh-sftp-server",
                "rsync",
            ]
            .map(String::from)
            .to_vec(),
            user: "user".into(),
            size_mib: 4096,
        }
    }
}

impl DebianRecipe {
    /// The content key of this recipe.
    pub fn key(&self) -> String {
        let mut hash = Sha256::new();
        hash.update(serde_json::to_vec(self).expect("recipe serializes"));
        hash.update(BUILD_REVISION.to_le_bytes());
        hex::encode(&hash.finalize()[..12])
    }
}

impl ImageStore {
    /// Returns the base layer for `recipe`, building it with mmdebstrap on first use.
    pub fn debian_rootfs(&self, recipe: &DebianRecipe, progress: &dyn Progress) -> Result<PathBuf, ImageError> {
        let key = recipe.key();
        let dest = self.dir("rootfs").join(format!("debian-{}-{key}.qcow2", recipe.suite));
        if dest.is_file() {
            return Ok(dest);
        }
        let lock_name = format!("rootfs-{key}");
        let _lock = self.lock(&lock_name)?;
        if dest.is_file() {
            return Ok(dest);
        }
        require_tool("mmdebstrap", "mmdebstrap")?;
        let tree = self.temp_path(&lock_name, "tree");
        let result = (|| {
            progress.stage(&format!(
                "Building Debian {} root file system with mmdebstrap",
                recipe.suite
            ));
            let user = &recipe.user;
            // As in E2B's base template, `pip install` works in a sandbox: Debian marks its
            // Python externally managed, which pip.conf lifts. Every command the API and E2B's
            // SDKs run goes through `bash -l`, whose /etc/profile ran `id -u` in a subshell to
            // pick the PATH: a fork and an exec of a dynamically linked program, ~11 of the ~31 ms
            // of a command's round trip under TCG and ~45 ms of a restored sandbox's first one.
            // Bash knows its `EUID`; other shells still ask `id`.
            let hook = format!(
                "chroot \"$1\" useradd -m -s /bin/bash -G sudo {user} && \
                 echo '{user} ALL=(ALL:ALL) NOPASSWD: ALL' > \"$1\"/etc/sudoers.d/{user} && \
                 chmod 0440 \"$1\"/etc/sudoers.d/{user} && \
                 echo sandbox > \"$1\"/etc/hostname && \
                 printf '127.0.0.1 localhost\\n127.0.1.1 sandbox\\n::1 localhost\\n' > \"$1\"/etc/hosts && \
                 printf 'nameserver 1.1.1.1\\n' > \"$1\"/etc/resolv.conf && \
                 printf '[global]\\nbreak-system-packages = true\\n' > \"$1\"/etc/pip.conf && \
                 sed -i 's/\\$(id -u)/${{EUID:-$(id -u)}}/g' \"$1\"/etc/profile"
            );
            run(
                Command::new("mmdebstrap")
                    .arg("--variant=minbase")
                    .arg(format!("--include={}", recipe.packages.join(",")))
                    .arg(format!("--customize-hook={hook}"))
                    .arg(&recipe.suite)
                    .arg(&tree),
                progress,
            )?;
            self.layer_from_tree(&tree, recipe.size_mib, &lock_name, &dest, progress)
        })();
        remove_any(&tree);
        result?;
        progress.done(&format!("Root file system ready: {}", dest.display()));
        Ok(dest)
    }

    /// Imports a directory tree as the named image.
    pub fn import_dir(&self, name: &str, dir: &Path, progress: &dyn Progress) -> Result<PathBuf, ImageError> {
        validate_name(name)?;
        if !dir.is_dir() {
            return Err(ImageError::Invalid(format!("{} is not a directory", dir.display())));
        }
        let used_mib = du_mib(dir)?;
        let size = used_mib + used_mib / 2 + 512;
        let dest = self.named(name);
        let lock_name = format!("import-{name}");
        let _lock = self.lock(&lock_name)?;
        self.layer_from_tree(dir, size, &lock_name, &dest, progress)?;
        Ok(dest)
    }

    /// Imports an ext4 image file as the named image.
    pub fn import_ext4(&self, name: &str, image: &Path, progress: &dyn Progress) -> Result<PathBuf, ImageError> {
        validate_name(name)?;
        let mut magic = [0u8; 2];
        let file = fs::File::open(image).map_err(ImageError::io(format!("opening {}", image.display())))?;
        let read = std::os::unix::fs::FileExt::read_exact_at(&file, &mut magic, 1080);
        if read.is_err() || magic != [0x53, 0xEF] {
            return Err(ImageError::Invalid(format!(
                "{} is not an ext2/3/4 file system image",
                image.display()
            )));
        }
        require_tool("qemu-img", "qemu-utils")?;
        let dest = self.named(name);
        let lock_name = format!("import-{name}");
        let _lock = self.lock(&lock_name)?;
        let temp = self.temp_path(&lock_name, "qcow2");
        progress.stage(&format!("Converting {} to a qcow2 layer", image.display()));
        let result = run(
            Command::new("qemu-img")
                .args(["convert", "-f", "raw", "-O", "qcow2"])
                .arg(image)
                .arg(&temp),
            progress,
        )
        .and_then(|_| publish(&temp, &dest));
        if result.is_err() {
            remove_any(&temp);
        }
        result.map(|()| dest)
    }

    /// The path of a named (imported) image.
    pub fn named(&self, name: &str) -> PathBuf {
        self.dir("rootfs").join(format!("{name}.qcow2"))
    }

    /// Names of the imported images.
    pub fn named_images(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.dir("rootfs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let stem = name.strip_suffix(".qcow2")?;
                (!stem.starts_with("debian-") && validate_name(stem).is_ok()).then(|| stem.to_owned())
            })
            .collect();
        names.sort();
        names
    }

    /// Finds a named image.
    pub fn find_named(&self, name: &str) -> Result<PathBuf, ImageError> {
        validate_name(name)?;
        let path = self.named(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(ImageError::NotFound(name.to_owned()))
        }
    }

    /// Makes an ext4 file system from `tree` and stores it as a qcow2 layer at `dest`.
    fn layer_from_tree(
        &self,
        tree: &Path,
        size_mib: u64,
        lock_name: &str,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<(), ImageError> {
        require_tool("mkfs.ext4", "e2fsprogs")?;
        require_tool("qemu-img", "qemu-utils")?;
        let raw = self.temp_path(lock_name, "ext4");
        let qcow = self.temp_path(lock_name, "qcow2");
        let result = (|| {
            progress.stage("Creating the ext4 file system");
            run(
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "vivroot", "-O", "^has_journal", "-d"])
                    .arg(tree)
                    .arg(&raw)
                    .arg(format!("{size_mib}M")),
                progress,
            )?;
            progress.stage("Converting to a qcow2 layer");
            run(
                Command::new("qemu-img")
                    .args(["convert", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(&qcow),
                progress,
            )?;
            publish(&qcow, dest)
        })();
        remove_any(&raw);
        remove_any(&qcow);
        result
    }
}

fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !name.starts_with("debian-");
    if ok {
        Ok(())
    } else {
        Err(ImageError::Invalid(format!(
            "invalid image name '{name}': use 1-64 lowercase letters, digits, '-' or '_' (not starting with 'debian-')"
        )))
    }
}

fn du_mib(dir: &Path) -> Result<u64, ImageError> {
    let out = Command::new("du")
        .arg("-sm")
        .arg(dir)
        .output()
        .map_err(ImageError::io("running du"))?;
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| ImageError::Invalid(format!("cannot measure {}", dir.display())))
}
