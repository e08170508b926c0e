//! The web console's files, built from `web/` by npm and Vite when this crate is built (see
//! `build.rs`) and embedded in the binary, so the console never fetches anything at run time.
//!
//! Invariants: names are paths relative to the build's `dist` with `/` separators and no `..`
//! (they come from the build, not from clients); [`asset`] only looks names up, so a client's
//! path can never reach the file system.

include!(concat!(env!("OUT_DIR"), "/assets.rs"));

/// A built file.
#[derive(Debug, Clone, Copy)]
pub struct Asset {
    /// Its bytes.
    pub bytes: &'static [u8],
    /// Its media type, from its extension.
    pub content_type: &'static str,
    /// Whether its name carries a content hash (Vite's `assets/NAME-HASH.EXT`), so it may be
    /// cached forever.
    pub immutable: bool,
}

/// The file at `path` (relative to the console's root, e.g. `index.html` or `assets/x.js`).
pub fn asset(path: &str) -> Option<Asset> {
    ASSETS
        .iter()
        .find(|(name, _)| *name == path)
        .map(|(name, bytes)| Asset {
            bytes,
            content_type: content_type(name),
            immutable: name.starts_with("assets/"),
        })
}

/// The media type of a file name.
pub fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js" | "mjs") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        Some("woff2") => "font/woff2",
        Some("json" | "map") => "application/json",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_and_its_scripts_are_embedded() {
        let index = asset("index.html").expect("index.html");
        assert_eq!(index.content_type, "text/html; charset=utf-8");
        assert!(!index.immutable);
        let html = std::str::from_utf8(index.bytes).unwrap();
        // Every script is a file of the build (the CSP allows no inline script).
        assert!(html.contains("<script type=\"module\""));
        assert!(!html.contains("<script>"));
        let script = ASSETS
            .iter()
            .find(|(n, _)| n.starts_with("assets/") && n.ends_with(".js"))
            .expect("a built script");
        assert!(asset(script.0).unwrap().immutable);
        assert!(asset("../Cargo.toml").is_none());
        assert!(asset("").is_none());
    }
}
