//! Builds the web console from `web/` (scripts/web-build: `npm ci` from the lock file, then
//! Vite) into `OUT_DIR/dist` and writes `OUT_DIR/assets.rs`, a table of every built file
//! embedded with `include_bytes!`. Runs again only when the web sources change, so lint and
//! test builds do not rebuild the app.
//!
//! `VIV_WEB_DIST=DIR` embeds an already built `dist` directory instead (hosts without Node).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let web = root.join("web");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    for watched in [
        "web/src",
        "web/index.html",
        "web/package.json",
        "web/package-lock.json",
        "web/vite.config.js",
        "scripts/web-build",
        "scripts/node.sh",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=VIV_WEB_DIST");
    let dist = match std::env::var_os("VIV_WEB_DIST") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let dist = out.join("dist");
            let status = Command::new("bash")
                .arg(root.join("scripts/web-build"))
                .arg(&dist)
                .current_dir(&web)
                .status()
                .expect("running bash scripts/web-build");
            assert!(
                status.success(),
                "building the web console (scripts/web-build) failed: {status}; it needs Node and npm \
                 (scripts/install-deps), or set VIV_WEB_DIST to a built web/dist"
            );
            dist
        }
    };
    let mut files = Vec::new();
    collect(&dist, &dist, &mut files);
    files.sort();
    assert!(
        files.iter().any(|(name, _)| name == "index.html"),
        "{} holds no index.html",
        dist.display()
    );
    let mut table = String::from("/// Every file of the built console: path relative to `dist`, bytes.\npub static ASSETS: &[(&str, &[u8])] = &[\n");
    for (name, path) in &files {
        writeln!(
            table,
            "    ({name:?}, include_bytes!({:?})),",
            path.display().to_string()
        )
        .expect("write");
    }
    table.push_str("];\n");
    std::fs::write(out.join("assets.rs"), table).expect("writing assets.rs");
}

/// Files under `dir`, as (path relative to `base` with `/`, absolute path).
fn collect(base: &Path, dir: &Path, files: &mut Vec<(String, PathBuf)>) {
    let entries = std::fs::read_dir(dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    for entry in entries {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect(base, &path, files);
        } else {
            let rel = path.strip_prefix(base).expect("under base");
            let name = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            files.push((name, path.canonicalize().expect("canonical path")));
        }
    }
}
