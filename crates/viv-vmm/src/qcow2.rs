//! What the host needs to know of a qcow2 image without QEMU: its virtual size and the chain of
//! backing files under it (each of which a jailed QEMU must be shown, read-only).
//!
//! Only the fixed header is read (magic, version, backing file offset and length, virtual size).
//! The images are the server's own, but a header is still parsed defensively: a wrong magic, a
//! name longer than QEMU allows, or a chain deeper than [`MAX_CHAIN`] or with a loop is an error,
//! never a panic or an endless walk.

use std::io::{Read as _, Seek as _, SeekFrom};
use std::path::{Path, PathBuf};

/// QEMU's limit on a backing file name.
const MAX_NAME: u32 = 1023;

/// Most images a backing chain may hold.
pub const MAX_CHAIN: usize = 256;

/// The fields of a qcow2 header the host uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The guest-visible size in bytes.
    pub virtual_size: u64,
    /// The backing file as written in the image (relative names are relative to the image's
    /// directory).
    pub backing_file: Option<String>,
}

fn invalid(path: &Path, what: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{}: {what}", path.display()))
}

/// Parses the first bytes of an image: at least 32, and up to the end of the backing file name
/// when there is one (`Ok(Err(n))` asks for the first `n` bytes).
pub fn parse_header(bytes: &[u8]) -> Result<Result<Header, usize>, String> {
    if bytes.len() < 32 {
        return Err("shorter than a qcow2 header".into());
    }
    if &bytes[..4] != b"QFI\xfb" {
        return Err("not a qcow2 image".into());
    }
    let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let be32 = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().expect("4 bytes"));
    let version = be32(4);
    if !(2..=3).contains(&version) {
        return Err(format!("qcow2 version {version} is not supported"));
    }
    let (offset, length) = (be64(8), be32(16));
    let virtual_size = be64(24);
    if offset == 0 || length == 0 {
        return Ok(Ok(Header {
            virtual_size,
            backing_file: None,
        }));
    }
    if length > MAX_NAME {
        return Err(format!("backing file name of {length} bytes"));
    }
    let end = offset
        .checked_add(u64::from(length))
        .filter(|e| *e <= 64 * 1024 * 1024)
        .ok_or_else(|| format!("backing file name at offset {offset}"))? as usize;
    if bytes.len() < end {
        return Ok(Err(end));
    }
    let name = std::str::from_utf8(&bytes[offset as usize..end]).map_err(|_| "backing file name is not UTF-8")?;
    if name.contains('\0') {
        return Err("backing file name contains a NUL byte".into());
    }
    Ok(Ok(Header {
        virtual_size,
        backing_file: Some(name.to_owned()),
    }))
}

/// Reads the header of the image at `path`.
pub fn header(path: &Path) -> std::io::Result<Header> {
    let mut file = std::fs::File::open(path)?;
    let mut bytes = vec![0u8; 512];
    let n = read_up_to(&mut file, &mut bytes)?;
    bytes.truncate(n);
    match parse_header(&bytes).map_err(|e| invalid(path, e))? {
        Ok(header) => Ok(header),
        Err(needed) => {
            bytes.resize(needed, 0);
            file.seek(SeekFrom::Start(0))?;
            file.read_exact(&mut bytes)
                .map_err(|e| invalid(path, format!("reading the backing file name: {e}")))?;
            match parse_header(&bytes).map_err(|e| invalid(path, e))? {
                Ok(header) => Ok(header),
                Err(_) => Err(invalid(path, "header does not fit")),
            }
        }
    }
}

fn read_up_to(file: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// The backing file format recorded in a qcow2 image's header extensions (`qemu-img create -F`),
/// if any. A format that is not recorded is never probed: probing lets a guest that writes a
/// qcow2 header into a raw disk choose how the host reads it.
pub fn backing_format(path: &Path) -> std::io::Result<Option<String>> {
    const BACKING_FORMAT: u32 = 0xE279_2ACA;
    let mut file = std::fs::File::open(path)?;
    let mut head = vec![0u8; 104];
    let n = read_up_to(&mut file, &mut head)?;
    head.truncate(n);
    if head.len() < 72 || &head[..4] != b"QFI\xfb" {
        return Err(invalid(path, "not a qcow2 image"));
    }
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    let version = be32(&head, 4);
    let header_length = match version {
        2 => 72,
        3 if head.len() >= 104 => be32(&head, 100) as u64,
        _ => return Err(invalid(path, format!("qcow2 version {version} is not supported"))),
    };
    // Extensions end at the first cluster (the backing file name follows them there).
    let cluster_bits = be32(&head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(invalid(path, format!("cluster bits {cluster_bits}")));
    }
    let limit = 1u64 << cluster_bits;
    let mut at = header_length;
    while at + 8 <= limit {
        let mut ext = [0u8; 8];
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(&mut ext)?;
        let (kind, len) = (be32(&ext, 0), be32(&ext, 4) as u64);
        if kind == 0 {
            break;
        }
        if at + 8 + len > limit {
            return Err(invalid(path, "header extension beyond the first cluster"));
        }
        if kind == BACKING_FORMAT {
            if len > 32 {
                return Err(invalid(path, "backing format name too long"));
            }
            let mut name = vec![0u8; len as usize];
            file.read_exact(&mut name)?;
            let name = String::from_utf8(name).map_err(|_| invalid(path, "backing format is not UTF-8"))?;
            return Ok(Some(name));
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    Ok(None)
}

/// The backing files under `image`, nearest first, with relative names resolved. A backing
/// file that is not qcow2 (a raw base) ends the chain.
pub fn backing_chain(image: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut chain: Vec<PathBuf> = Vec::new();
    let mut current = image.to_path_buf();
    loop {
        let header = match header(&current) {
            Ok(h) => h,
            // A raw image below qcow2 layers has no header to follow.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData && !chain.is_empty() => break,
            Err(e) => return Err(e),
        };
        let Some(name) = header.backing_file else { break };
        let mut next = PathBuf::from(&name);
        if next.is_relative() {
            next = current.parent().unwrap_or(Path::new("/")).join(next);
        }
        if next == image || chain.contains(&next) {
            return Err(invalid(image, format!("backing chain loops at {}", next.display())));
        }
        if chain.len() >= MAX_CHAIN {
            return Err(invalid(image, format!("backing chain deeper than {MAX_CHAIN}")));
        }
        chain.push(next.clone());
        current = next;
    }
    Ok(chain)
}

/// Cluster size of the overlays [`create_overlay`] writes (QEMU's default).
const OVERLAY_CLUSTER_BITS: u32 = 16;

/// Creates `path`, a new empty qcow2 image (version 3, 64 KiB clusters, 16-bit refcounts) of
/// `virtual_size` bytes over the qcow2 image `backing`, as `qemu-img create -f qcow2 -F qcow2 -b
/// BACKING -u PATH SIZE` would, without starting a process (a VM start creates one or two:
/// `qemu-img` takes ~8 ms of it). `backing` is not opened. The layout is qemu-img's: the header
/// cluster (header, the backing format extension, the backing file name), the refcount table,
/// one refcount block, then the L1 table, all zero but the refcounts of those four clusters.
/// Fails with `InvalidInput` for a name QEMU would refuse or a size whose L1 table does not fit
/// one cluster (over 4 TiB), and if `path` exists.
pub fn create_overlay(path: &Path, backing: &Path, virtual_size: u64) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::ffi::OsStrExt as _;
    let bad =
        |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{}: {what}", path.display()));
    let name = backing.as_os_str().as_bytes();
    if name.is_empty() || name.len() > MAX_NAME as usize || name.contains(&0) {
        return Err(bad(format!("backing file name of {} bytes", name.len())));
    }
    let cluster = 1u64 << OVERLAY_CLUSTER_BITS;
    // Each L2 table maps cluster / 8 clusters.
    let per_l1_entry = cluster * (cluster / 8);
    let l1_entries = virtual_size.div_ceil(per_l1_entry);
    if virtual_size == 0 || l1_entries * 8 > cluster {
        return Err(bad(format!("virtual size of {virtual_size} bytes")));
    }
    const HEADER_LEN: usize = 112;
    const BACKING_FORMAT: u32 = 0xe279_2aca;
    let (refcount_table, refcount_block, l1_table) = (cluster, 2 * cluster, 3 * cluster);
    let mut header = Vec::with_capacity(256);
    header.extend(b"QFI\xfb");
    header.extend(3u32.to_be_bytes());
    let name_at_placeholder = header.len();
    header.extend(0u64.to_be_bytes()); // backing file offset, set below
    header.extend((name.len() as u32).to_be_bytes());
    header.extend(OVERLAY_CLUSTER_BITS.to_be_bytes());
    header.extend(virtual_size.to_be_bytes());
    header.extend(0u32.to_be_bytes()); // no encryption
    header.extend((l1_entries as u32).to_be_bytes());
    header.extend(l1_table.to_be_bytes());
    header.extend(refcount_table.to_be_bytes());
    header.extend(1u32.to_be_bytes()); // refcount table clusters
    header.extend(0u32.to_be_bytes()); // snapshots
    header.extend(0u64.to_be_bytes()); // snapshots offset
    header.extend([0u8; 24]); // incompatible, compatible, autoclear features
    header.extend(4u32.to_be_bytes()); // refcount order: 16 bits
    header.extend((HEADER_LEN as u32).to_be_bytes());
    header.push(0); // compression type: zlib
    header.resize(HEADER_LEN, 0);
    header.extend(BACKING_FORMAT.to_be_bytes());
    header.extend(5u32.to_be_bytes());
    header.extend(b"qcow2\0\0\0");
    header.extend([0u8; 8]); // end of the extensions
    let name_at = header.len() as u64;
    header[name_at_placeholder..name_at_placeholder + 8].copy_from_slice(&name_at.to_be_bytes());
    header.extend(name);
    let mut image = vec![0u8; (l1_table + l1_entries * 8) as usize];
    image[..header.len()].copy_from_slice(&header);
    let at = refcount_table as usize;
    image[at..at + 8].copy_from_slice(&refcount_block.to_be_bytes());
    let at = refcount_block as usize;
    for cluster in 0..4 {
        image[at + 2 * cluster..at + 2 * cluster + 2].copy_from_slice(&1u16.to_be_bytes());
    }
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    file.write_all(&image).inspect_err(|_| {
        let _ = std::fs::remove_file(path);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(size: u64, backing: Option<&str>) -> Vec<u8> {
        let mut bytes = vec![0u8; 104];
        bytes[..4].copy_from_slice(b"QFI\xfb");
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        bytes[24..32].copy_from_slice(&size.to_be_bytes());
        if let Some(name) = backing {
            bytes[8..16].copy_from_slice(&1000u64.to_be_bytes());
            bytes[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
            bytes.resize(1000, 0);
            bytes.extend_from_slice(name.as_bytes());
        }
        bytes
    }

    #[test]
    fn headers_are_parsed_and_bad_ones_refused() {
        let h = parse_header(&image(1 << 30, Some("/a/b.qcow2"))).unwrap().unwrap();
        assert_eq!(h.virtual_size, 1 << 30);
        assert_eq!(h.backing_file.as_deref(), Some("/a/b.qcow2"));
        assert_eq!(parse_header(&image(5, Some("x"))[..200]).unwrap(), Err(1001));
        assert!(parse_header(b"QFI").is_err());
        assert!(parse_header(&[0u8; 64]).is_err());
        let mut long = image(5, Some("x"));
        long[16..20].copy_from_slice(&5000u32.to_be_bytes());
        assert!(parse_header(&long).is_err());
        let mut far = image(5, Some("x"));
        far[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        assert!(parse_header(&far).is_err());
    }

    #[test]
    fn chains_are_followed_and_loops_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        std::fs::write(path("base.raw"), b"raw bytes, no header at all").unwrap();
        std::fs::write(path("mid.qcow2"), image(9, Some("base.raw"))).unwrap();
        let top = path("top.qcow2");
        std::fs::write(&top, image(9, Some(path("mid.qcow2").to_str().unwrap()))).unwrap();
        assert_eq!(backing_chain(&top).unwrap(), vec![path("mid.qcow2"), path("base.raw")]);
        assert_eq!(header(&top).unwrap().virtual_size, 9);
        std::fs::write(path("a.qcow2"), image(9, Some("b.qcow2"))).unwrap();
        std::fs::write(path("b.qcow2"), image(9, Some("a.qcow2"))).unwrap();
        assert!(backing_chain(&path("a.qcow2")).is_err());
    }

    #[test]
    fn an_overlay_written_here_is_one_qemu_reads_checks_and_writes_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let run = |program: &str, args: &[&str]| {
            let out = std::process::Command::new(program)
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("qemu-utils is installed");
            assert!(
                out.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run("qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
        run("qemu-io", &["-c", "write -P 0x5a 0 64k", "base.qcow2"]);
        let base = path("base.qcow2");
        create_overlay(&path("top.qcow2"), &base, 1 << 30).unwrap();
        // QEMU sees what it sees in qemu-img's own overlay (which also holds an optional table of
        // feature names), and the files have the same length.
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                base.to_str().unwrap(),
                "theirs.qcow2",
            ],
        );
        let info = |name: &str| {
            let json: serde_json::Value =
                serde_json::from_str(&run("qemu-img", &["info", "--output=json", name])).unwrap();
            (
                json["virtual-size"].clone(),
                json["backing-filename"].clone(),
                json["backing-filename-format"].clone(),
                json["cluster-size"].clone(),
                json["format-specific"]["data"]["refcount-bits"].clone(),
            )
        };
        assert_eq!(info("top.qcow2"), info("theirs.qcow2"));
        assert_eq!(
            std::fs::metadata(path("top.qcow2")).unwrap().len(),
            std::fs::metadata(path("theirs.qcow2")).unwrap().len()
        );
        run("qemu-img", &["check", "-q", "top.qcow2"]);
        assert_eq!(header(&path("top.qcow2")).unwrap().virtual_size, 1 << 30);
        assert_eq!(backing_format(&path("top.qcow2")).unwrap().as_deref(), Some("qcow2"));
        // Reads fall through to the base; writes land in the overlay, the base is untouched.
        run("qemu-io", &["-c", "read -P 0x5a 0 64k", "top.qcow2"]);
        run("qemu-io", &["-c", "write -P 0x11 600M 128k", "top.qcow2"]);
        run(
            "qemu-io",
            &["-c", "read -P 0x11 600M 128k", "-c", "read -P 0x5a 0 64k", "top.qcow2"],
        );
        run("qemu-io", &["-c", "read -P 0 600M 128k", "base.qcow2"]);
        run("qemu-img", &["check", "-q", "top.qcow2"]);

        // Refused: an existing file, a size whose L1 table needs more than a cluster, a name
        // QEMU would refuse.
        assert!(create_overlay(&path("top.qcow2"), &base, 1 << 30).is_err());
        let err = create_overlay(&path("huge.qcow2"), &base, 5 << 40).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(create_overlay(&path("zero.qcow2"), &base, 0).is_err());
        let long = path(&"x".repeat(1100));
        assert!(create_overlay(&path("long.qcow2"), &long, 1 << 30).is_err());
        assert!(!path("huge.qcow2").exists() && !path("long.qcow2").exists());
    }

    #[test]
    fn the_backing_format_is_read_from_the_header_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let img = |args: &[&str]| {
            std::process::Command::new("qemu-img")
                .args(args)
                .current_dir(dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        };
        if !img(&["create", "-q", "-f", "raw", "base.raw", "1M"]) {
            eprintln!("qemu-img is missing; skipping");
            return;
        }
        assert!(img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "-b",
            "base.raw",
            "mid.qcow2"
        ]));
        assert!(img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-F",
            "qcow2",
            "-b",
            "mid.qcow2",
            "top.qcow2"
        ]));
        assert!(img(&["create", "-q", "-f", "qcow2", "alone.qcow2", "1M"]));
        let at = |name: &str| backing_format(&dir.path().join(name)).unwrap();
        assert_eq!(at("top.qcow2").as_deref(), Some("qcow2"));
        assert_eq!(at("mid.qcow2").as_deref(), Some("raw"));
        assert_eq!(at("alone.qcow2"), None);
        assert!(backing_format(&dir.path().join("base.raw")).is_err());
    }
}
