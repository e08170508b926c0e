//! The backing file reference written in a qcow2 header, read without `qemu-img`, so the pool can
//! find a disk's children quickly.
//!
//! Invariant: only the header's fixed fields are trusted, and only after the magic, the version
//! and the bounds (a name of at most [`MAX_BACKING_NAME`] bytes, inside the file) check out; any
//! other file reads as "no backing file".

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The longest backing file name the qcow2 format allows.
pub const MAX_BACKING_NAME: u32 = 1023;

const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";

/// Where a qcow2 header says its backing file name is: `(offset, length)`, or `None` when the
/// bytes are not a qcow2 header or name no backing file.
pub fn backing_name_location(header: &[u8]) -> Option<(u64, u32)> {
    if header.len() < 20 || header[..4] != QCOW2_MAGIC {
        return None;
    }
    let version = u32::from_be_bytes(header[4..8].try_into().ok()?);
    if !(2..=3).contains(&version) {
        return None;
    }
    let offset = u64::from_be_bytes(header[8..16].try_into().ok()?);
    let length = u32::from_be_bytes(header[16..20].try_into().ok()?);
    (offset != 0 && length != 0 && length <= MAX_BACKING_NAME).then_some((offset, length))
}

/// Reads the backing file name of the qcow2 image at `path` (as written, usually relative).
pub fn read_backing_name(path: &Path) -> std::io::Result<Option<String>> {
    let file = File::open(path)?;
    let mut header = [0u8; 20];
    if file.read_exact_at(&mut header, 0).is_err() {
        return Ok(None);
    }
    let Some((offset, length)) = backing_name_location(&header) else {
        return Ok(None);
    };
    let mut name = vec![0u8; length as usize];
    if file.read_exact_at(&mut name, offset).is_err() {
        return Ok(None);
    }
    Ok(Some(String::from_utf8_lossy(&name).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(version: u32, offset: u64, length: u32) -> Vec<u8> {
        let mut h = QCOW2_MAGIC.to_vec();
        h.extend_from_slice(&version.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&length.to_be_bytes());
        h
    }

    #[test]
    fn reads_only_sane_headers() {
        assert_eq!(backing_name_location(&header(3, 512, 10)), Some((512, 10)));
        assert_eq!(backing_name_location(&header(3, 0, 0)), None);
        assert_eq!(backing_name_location(&header(4, 512, 10)), None);
        assert_eq!(backing_name_location(&header(3, 512, 5000)), None);
        assert_eq!(backing_name_location(b"QFI"), None);
        assert_eq!(backing_name_location(&[0u8; 64]), None);
    }
}
