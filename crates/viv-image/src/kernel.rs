//! The guest kernel: Debian's cloud kernel package, downloaded with `apt-get download` and
//! unpacked into the store with just the modules the guest needs.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::store::{publish, remove_any, require_tool, run, PARTIAL};
use crate::{ImageError, ImageStore, Progress};

/// The meta package whose dependency names the current cloud kernel.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";

/// Modules the guest loads at boot (their dependencies are added automatically).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "virtio_rng",
    // Volumes mounted into sandboxes (a FUSE file system served by the host).
    "fuse",
];

/// An unpacked kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The package it came from, such as `linux-image-6.1.0-56-cloud-amd64`.
    pub package: String,
    /// `vmlinuz`.
    pub image: PathBuf,
    /// Directory of the `.ko` files, with `order` listing them dependencies first.
    pub modules: PathBuf,
}

impl ImageStore {
    /// Returns the kernel, downloading and unpacking it on first use. `package` overrides the
    /// package name; by default it is what [`META_PACKAGE`] depends on.
    pub fn kernel(&self, package: Option<&str>, progress: &dyn Progress) -> Result<Kernel, ImageError> {
        let package = match package {
            Some(p) => p.to_owned(),
            None => resolve_kernel_package()?,
        };
        if !package.chars().all(|c| c.is_ascii_alphanumeric() || "-.+_".contains(c)) {
            return Err(ImageError::Invalid(format!("'{package}' is not a Debian package name")));
        }
        // The module set is part of the name, so a cache unpacked with fewer modules is not taken.
        let dest = self.dir("kernels").join(format!("{package}-m{}", modules_key()));
        if let Some(k) = existing(&package, &dest) {
            return Ok(k);
        }
        let _lock = self.lock(&format!("kernel-{package}"))?;
        if let Some(k) = existing(&package, &dest) {
            return Ok(k);
        }
        require_tool("apt-get", "apt")?;
        require_tool("dpkg-deb", "dpkg")?;
        let work = self.temp_path(&format!("kernel-{package}"), "work");
        fs::create_dir_all(&work).map_err(ImageError::io("creating kernel work directory"))?;
        let result = self.unpack_kernel(&package, &work, &dest, progress);
        remove_any(&work);
        result
    }

    fn unpack_kernel(
        &self,
        package: &str,
        work: &Path,
        dest: &Path,
        progress: &dyn Progress,
    ) -> Result<Kernel, ImageError> {
        progress.stage(&format!("Downloading {package}"));
        run(
            Command::new("apt-get")
                .args(["download", "-q", package])
                .current_dir(work),
            progress,
        )?;
        let deb = fs::read_dir(work)
            .map_err(ImageError::io("listing kernel download"))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .ok_or_else(|| ImageError::Invalid(format!("apt-get download {package} produced no .deb")))?;
        progress.stage("Unpacking the kernel");
        let tree = work.join("tree");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree), progress)?;
        let staged = dest.with_file_name(format!("{package}{PARTIAL}"));
        remove_any(&staged);
        fs::create_dir_all(staged.join("modules")).map_err(ImageError::io("creating kernel directory"))?;
        let vmlinuz = find_file(&tree.join("boot"), "vmlinuz-")
            .ok_or_else(|| ImageError::Invalid(format!("{package} contains no /boot/vmlinuz-*")))?;
        fs::copy(&vmlinuz, staged.join("vmlinuz")).map_err(ImageError::io("copying vmlinuz"))?;
        let module_root = fs::read_dir(tree.join("lib/modules"))
            .map_err(ImageError::io("reading the package's /lib/modules"))?
            .flatten()
            .map(|e| e.path())
            .next()
            .ok_or_else(|| ImageError::Invalid(format!("{package} contains no modules")))?;
        let order = module_order(&module_root, GUEST_MODULES)?;
        for (name, path) in &order {
            fs::copy(path, staged.join("modules").join(format!("{name}.ko")))
                .map_err(ImageError::io(format!("copying module {name}")))?;
        }
        let listing: String = order.iter().map(|(name, _)| format!("{name}.ko\n")).collect();
        fs::write(staged.join("modules/order"), listing).map_err(ImageError::io("writing module order"))?;
        publish(&staged, dest)?;
        progress.done(&format!("Kernel {package} ready ({} modules)", order.len()));
        existing(package, dest).ok_or_else(|| ImageError::Invalid("kernel vanished after unpacking".into()))
    }
}

/// A short hash of [`GUEST_MODULES`].
fn modules_key() -> String {
    use sha2::Digest as _;
    let digest = sha2::Sha256::digest(GUEST_MODULES.join(",").as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

fn existing(package: &str, dest: &Path) -> Option<Kernel> {
    let k = Kernel {
        package: package.to_owned(),
        image: dest.join("vmlinuz"),
        modules: dest.join("modules"),
    };
    (k.image.is_file() && k.modules.join("order").is_file()).then_some(k)
}

fn find_file(dir: &Path, prefix: &str) -> Option<PathBuf> {
    fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
}

/// Asks apt which versioned package the cloud kernel meta package depends on.
fn resolve_kernel_package() -> Result<String, ImageError> {
    require_tool("apt-cache", "apt")?;
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .output()
        .map_err(ImageError::io("running apt-cache depends"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .map(str::to_owned)
        .ok_or_else(|| {
            ImageError::Invalid(format!(
                "apt does not know {META_PACKAGE}; run `apt-get update` first (Debian's main archive must be configured)"
            ))
        })
}

/// The `.ko` files for `wanted` and their dependencies, dependencies first. Dependencies come from
/// each module's `depends=` entry in its `.modinfo` section (the package ships no modules.dep).
pub fn module_order(module_root: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>, ImageError> {
    let mut index = std::collections::HashMap::new();
    index_modules(module_root, &mut index);
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    for name in wanted {
        visit(name, &index, &mut seen, &mut order)?;
    }
    Ok(order)
}

fn index_modules(dir: &Path, index: &mut std::collections::HashMap<String, PathBuf>) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, index);
        } else if let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            index.insert(stem.replace('-', "_"), path);
        }
    }
}

fn visit(
    name: &str,
    index: &std::collections::HashMap<String, PathBuf>,
    seen: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
) -> Result<(), ImageError> {
    let name = name.replace('-', "_");
    if !seen.insert(name.clone()) {
        return Ok(());
    }
    // Not a module file: built into the kernel, nothing to load.
    let Some(path) = index.get(&name) else { return Ok(()) };
    let bytes = fs::read(path).map_err(ImageError::io(format!("reading {}", path.display())))?;
    for dep in modinfo_depends(&bytes) {
        visit(&dep, index, seen, order)?;
    }
    order.push((name, path.clone()));
    Ok(())
}

/// The module names in a module's `depends=` modinfo entry.
pub fn modinfo_depends(module: &[u8]) -> Vec<String> {
    let key = b"\0depends=";
    let Some(at) = module.windows(key.len()).position(|w| w == key) else {
        return Vec::new();
    };
    let rest = &module[at + key.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_dependencies_first() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, deps: &str| {
            fs::write(
                dir.path().join(format!("{name}.ko")),
                format!("ELF\0license=GPL\0depends={deps}\0name={name}\0"),
            )
            .unwrap();
        };
        write("virtio_ring", "");
        write("virtio", "virtio_ring");
        write("virtio_blk", "virtio,virtio_ring");
        let order = module_order(dir.path(), &["virtio_blk", "ext4"]).unwrap();
        let names: Vec<_> = order.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
    }
}
