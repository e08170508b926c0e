//! User metadata on files (envd 0.6.2): `X-Metadata-<key>: <value>` headers of an upload are
//! stored with each uploaded file as the extended attribute `user.e2b.<key>`, and every entry
//! description (stat, list, rename, watch events) shows a file's `user.e2b.*` attributes as its
//! metadata, whoever set them (an upload, or `setfattr` inside the guest).
//!
//! Invariants: keys are lowercased HTTP tokens and values printable ASCII, checked before any
//! file is touched, so a refused upload changes nothing; metadata is set on an upload's
//! temporary file before it is renamed into place, so a file never appears without it, and an
//! overwrite (a new file renamed over the old one) carries only the new upload's metadata.
//! Reading never fails an entry: a file system without extended attributes has no metadata.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use axum::http::HeaderMap;

/// The extended attribute namespace that holds user metadata.
pub const XATTR_PREFIX: &str = "user.e2b.";

/// The header prefix an upload's metadata arrives under (HTTP header names are lowercase here).
const HEADER_PREFIX: &str = "x-metadata-";

/// Most metadata entries one upload may carry.
const MAX_ENTRIES: usize = 64;

/// Longest key: an extended attribute name has at most 255 bytes, the prefix included.
const MAX_KEY: usize = 255 - XATTR_PREFIX.len();

/// Longest value; ext4 keeps all of a file's attributes in one block.
const MAX_VALUE: usize = 2048;

/// Why an upload's metadata was refused (a 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetadataError {
    #[error("invalid metadata key {0:?}: keys must be 1 to {MAX_KEY} HTTP token characters")]
    Key(String),
    #[error("invalid metadata value for key {0:?}: values must be printable US-ASCII of at most {MAX_VALUE} bytes")]
    Value(String),
    #[error("too many metadata entries: at most {MAX_ENTRIES}")]
    TooMany,
}

fn is_token(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

/// The metadata of an upload's `X-Metadata-*` headers, keys lowercased.
pub fn from_headers(headers: &HeaderMap) -> Result<BTreeMap<String, String>, MetadataError> {
    let mut out = BTreeMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        let key = key.to_ascii_lowercase();
        if key.is_empty() || key.len() > MAX_KEY || !key.bytes().all(is_token) {
            return Err(MetadataError::Key(key));
        }
        let bytes = value.as_bytes();
        if bytes.len() > MAX_VALUE || !bytes.iter().all(|&b| (0x20..=0x7e).contains(&b)) {
            return Err(MetadataError::Value(key));
        }
        out.insert(key, String::from_utf8_lossy(bytes).into_owned());
        if out.len() > MAX_ENTRIES {
            return Err(MetadataError::TooMany);
        }
    }
    Ok(out)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Stores `metadata` on the file at `path` (not following a final symlink: it is an upload's
/// own temporary file).
pub fn write(path: &Path, metadata: &BTreeMap<String, String>) -> io::Result<()> {
    if metadata.is_empty() {
        return Ok(());
    }
    let path = c_path(path)?;
    for (key, value) in metadata {
        let name = CString::new(format!("{XATTR_PREFIX}{key}")).map_err(io::Error::other)?;
        // SAFETY: NUL-terminated path and name, and a value buffer of the given length, all
        // outliving the call.
        let rc = unsafe { libc::lsetxattr(path.as_ptr(), name.as_ptr(), value.as_ptr().cast(), value.len(), 0) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            let kind = match err.raw_os_error() {
                Some(libc::ENOTSUP) => io::ErrorKind::Unsupported,
                Some(libc::ENOSPC | libc::E2BIG | libc::ERANGE) => io::ErrorKind::InvalidInput,
                _ => err.kind(),
            };
            return Err(io::Error::new(kind, format!("storing metadata {key:?}: {err}")));
        }
    }
    Ok(())
}

/// The `user.e2b.*` attributes of the file at `path` (following symlinks, as envd does), without
/// the prefix; empty when there are none or the file system has no extended attributes.
pub fn read(path: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let Ok(cpath) = c_path(path) else {
        return out;
    };
    let Some(names) = list(&cpath) else {
        return out;
    };
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let Some(key) = name.strip_prefix(XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else { continue };
        if let Some(value) = get(&cpath, &cname) {
            out.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    out
}

/// The NUL-separated attribute names of a file (`None` when it has none).
fn list(path: &CString) -> Option<Vec<u8>> {
    sized_read(|buf, len| {
        // SAFETY: a NUL-terminated path and a buffer of `len` writable bytes (or null with 0,
        // which asks for the size).
        unsafe { libc::listxattr(path.as_ptr(), buf, len) }
    })
    .filter(|names| !names.is_empty())
}

fn get(path: &CString, name: &CString) -> Option<Vec<u8>> {
    sized_read(|buf, len| {
        // SAFETY: NUL-terminated path and name and a buffer of `len` writable bytes (or null
        // with 0, which asks for the size).
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf.cast(), len) }
    })
}

/// Reads a value whose size the same call reports when given no buffer (`listxattr`,
/// `getxattr`); a value that grows between the two calls is read again, a few times.
fn sized_read(call: impl Fn(*mut libc::c_char, usize) -> isize) -> Option<Vec<u8>> {
    for _ in 0..4 {
        let size = call(std::ptr::null_mut(), 0);
        if size < 0 {
            return None;
        }
        let mut buf = vec![0u8; size as usize];
        let n = call(buf.as_mut_ptr().cast(), buf.len());
        if n >= 0 {
            buf.truncate(n as usize);
            return Some(buf);
        }
        if io::Error::last_os_error().raw_os_error() != Some(libc::ERANGE) {
            return None;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }

    #[test]
    fn reads_metadata_headers_lowercased_and_checked() {
        let got = from_headers(&headers(&[
            ("X-Metadata-Author", "mish"),
            ("x-metadata-purpose", "up load"),
            ("content-type", "text/plain"),
        ]))
        .unwrap();
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![("author".into(), "mish".into()), ("purpose".into(), "up load".into())]
        );
        assert!(from_headers(&headers(&[("x-metadata-a", "caf\u{e9}")])).is_err());
        assert!(from_headers(&headers(&[("x-metadata-a", "tab\there")])).is_err());
        assert_eq!(
            from_headers(&headers(&[("x-metadata-a", &"v".repeat(MAX_VALUE + 1))])),
            Err(MetadataError::Value("a".into()))
        );
        let many: Vec<(String, String)> = (0..=MAX_ENTRIES)
            .map(|i| (format!("x-metadata-k{i}"), "v".into()))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(from_headers(&headers(&many)), Err(MetadataError::TooMany));
    }

    #[test]
    fn round_trips_through_extended_attributes_where_supported() {
        let dir = std::env::temp_dir().join(format!("viv-agent-xattr-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, "x").unwrap();
        let metadata = BTreeMap::from([("author".to_owned(), "mish".to_owned())]);
        match write(&file, &metadata) {
            Ok(()) => assert_eq!(read(&file), metadata),
            // The test's file system may have no user attributes; reading then finds none.
            Err(err) => {
                assert_eq!(err.kind(), io::ErrorKind::Unsupported, "{err}");
                assert!(read(&file).is_empty());
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
