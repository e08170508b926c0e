//! Packs the built-in templates' build contexts (`templates/<name>/` at the repository root) into
//! tar archives in `OUT_DIR`, which the server embeds: a `viv` binary builds them without the
//! repository at hand.
//!
//! The archives are reproducible: entries sorted by path, owner root, times zero, modes kept (so
//! the layer keys of their `COPY` steps change only when a file does).

use std::path::{Path, PathBuf};

/// The built-in templates, by directory name under `templates/`.
const BUILTINS: &[&str] = &["code-interpreter"];

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("../../templates");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    for name in BUILTINS {
        let dir = root.join(name);
        println!("cargo:rerun-if-changed={}", dir.display());
        let mut files = Vec::new();
        walk(&dir, &dir, &mut files);
        files.sort();
        let mut builder = tar::Builder::new(Vec::new());
        for relative in &files {
            let path = dir.join(relative);
            println!("cargo:rerun-if-changed={}", path.display());
            let meta = std::fs::symlink_metadata(&path).expect("listed just now");
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            header.set_uid(0);
            header.set_gid(0);
            if meta.is_dir() {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder
                    .append_data(&mut header, relative, std::io::empty())
                    .expect("appending to a Vec");
            } else {
                use std::os::unix::fs::PermissionsExt as _;
                let data = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if meta.permissions().mode() & 0o111 != 0 {
                    0o755
                } else {
                    0o644
                });
                header.set_size(data.len() as u64);
                builder
                    .append_data(&mut header, relative, data.as_slice())
                    .expect("appending to a Vec");
            }
        }
        let archive = builder.into_inner().expect("finishing a Vec");
        std::fs::write(out.join(format!("{name}.tar")), archive).expect("writing to OUT_DIR");
    }
}

/// Every directory and regular file under `dir` (relative paths), skipping caches of tools run
/// in the tree (`__pycache__`, `node_modules`, `*.pyc`, `*.class`).
fn walk(base: &Path, dir: &Path, files: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let entry = entry.expect("a readable directory entry");
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "__pycache__" || name == "node_modules" || name.ends_with(".pyc") || name.ends_with(".class") {
            continue;
        }
        let kind = entry.file_type().expect("a file type");
        let relative = path.strip_prefix(base).expect("under base").to_path_buf();
        if kind.is_dir() {
            files.push(relative);
            walk(base, &path, files);
        } else if kind.is_file() {
            files.push(relative);
        }
    }
}
