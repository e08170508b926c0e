//! The pool against the real `qemu-img` and `xorriso` (qemu-utils and xorriso must be
//! installed): every operation, its refusals, and that failures leave no file.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};
use viv_storage::{
    unused, DeleteDiskError, DirPool, DiskFormat, ErrorKind, ImportError, ResizeError, SeedConfig, UploadError,
};

const MIB: u64 = 1 << 20;

fn pool() -> (tempfile::TempDir, DirPool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = DirPool::open(dir.path().join("pool")).unwrap();
    (dir, pool)
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    let out = Command::new("qemu-img").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Writes `pattern` over the first 64 KiB of a disk through qemu-io.
fn fill(path: &Path, format: &str, pattern: u8) {
    let out = Command::new("qemu-io")
        .args(["-f", format, "-c", &format!("write -P {pattern} 0 64k")])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn same_contents(a: &Path, a_format: &str, b: &Path, b_format: &str) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-f", a_format, "-F", b_format])
        .arg(a)
        .arg(b)
        .status()
        .unwrap()
        .success()
}

/// A raw image of `size` bytes with a recognisable pattern in its first megabyte.
fn patterned_raw(dir: &Path, size: u64) -> PathBuf {
    let path = dir.join("source.raw");
    let mut bytes: Vec<u8> = (0..MIB as usize).map(|i| (i * 7 % 251) as u8).collect();
    bytes.resize(size as usize, 0);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn create_info_and_resize() {
    let (_dir, pool) = pool();
    let size = viv_storage::size::parse_disk_size("20M").unwrap();
    let info = pool.create_disk("root", DiskFormat::Qcow2, size).await.unwrap();
    assert_eq!(
        (info.format, info.virtual_size, info.backing.as_deref()),
        (DiskFormat::Qcow2, 20 * MIB, None)
    );
    assert!(info.path.ends_with("disks/root.qcow2"));
    let raw = pool.create_disk("data", DiskFormat::Raw, 8 * MIB).await.unwrap();
    assert_eq!(raw.virtual_size, 8 * MIB);

    let err = pool.create_disk("root", DiskFormat::Raw, MIB).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    for bad in [0, 1000, (64u64 << 40) + 512] {
        let err = pool.create_disk("other", DiskFormat::Qcow2, bad).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    }

    let grown = pool.resize_disk("root", 40 * MIB, false).await.unwrap();
    assert_eq!(grown.virtual_size, 40 * MIB);
    let err = pool.resize_disk("root", 10 * MIB, false).await.unwrap_err();
    assert!(
        matches!(err, ResizeError::WouldShrink { current, requested, .. } if current == 40 * MIB && requested == 10 * MIB)
    );
    assert!(err.to_string().contains("loses the data"), "{err}");
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert_eq!(pool.disk_info("root").await.unwrap().virtual_size, 40 * MIB);
    let shrunk = pool.resize_disk("data", 4 * MIB, true).await.unwrap();
    assert_eq!(shrunk.virtual_size, 4 * MIB);

    let listed: Vec<_> = pool
        .list_disks()
        .unwrap()
        .into_iter()
        .map(|d| (d.name, d.format))
        .collect();
    assert_eq!(
        listed,
        [("data".into(), DiskFormat::Raw), ("root".into(), DiskFormat::Qcow2)]
    );
    let err = pool.disk_info("missing").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn linked_clone_is_relative_and_protects_its_parent() {
    let (_dir, pool) = pool();
    let base = pool.create_disk("base", DiskFormat::Qcow2, 16 * MIB).await.unwrap();
    fill(&base.path, "qcow2", 0xab);
    let clone = pool.linked_clone("base", "clone").await.unwrap();
    assert_eq!(clone.backing.as_deref(), Some("base"));
    assert_eq!(clone.virtual_size, 16 * MIB);
    let raw_info = qemu_img(&["info", "--output=json", "-U", clone.path.to_str().unwrap()]);
    let json: serde_json::Value = serde_json::from_slice(&raw_info.stdout).unwrap();
    assert_eq!(json["backing-filename"], "base.qcow2", "backing must be relative");
    assert_eq!(json["backing-filename-format"], "qcow2");
    assert!(same_contents(&base.path, "qcow2", &clone.path, "qcow2"));

    let err = pool.delete_disk("base", unused).await.unwrap_err();
    assert!(
        matches!(&err, DeleteDiskError::HasChildren { child, .. } if child == "clone"),
        "{err}"
    );
    assert!(err.to_string().contains("'clone'"));
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let err = pool.resize_disk("base", 32 * MIB, false).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");
    let err = pool.wipe_disk("base", unused).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict, "{err}");

    let err = pool
        .delete_disk("clone", |_| Some("VM web-1".into()))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("VM web-1"), "{err}");
    pool.delete_disk("clone", unused).await.unwrap();
    pool.delete_disk("base", unused).await.unwrap();
    assert!(pool.list_disks().unwrap().is_empty());
}

#[tokio::test]
async fn full_clone_is_independent() {
    let (_dir, pool) = pool();
    let base = pool.create_disk("base", DiskFormat::Qcow2, 8 * MIB).await.unwrap();
    fill(&base.path, "qcow2", 0x11);
    pool.linked_clone("base", "linked").await.unwrap();
    let mut seen = Vec::new();
    let copy = pool.full_clone("linked", "copy", &mut |p| seen.push(p)).await.unwrap();
    assert_eq!(copy.backing, None, "a full clone of a linked disk is flattened");
    assert_eq!(seen.last().copied(), Some(100.0), "progress: {seen:?}");
    assert!(same_contents(&base.path, "qcow2", &copy.path, "qcow2"));
    fill(&copy.path, "qcow2", 0x22);
    assert!(!same_contents(&base.path, "qcow2", &copy.path, "qcow2"));
    pool.delete_disk("linked", unused).await.unwrap();
    pool.delete_disk("base", unused).await.unwrap();
    assert_eq!(pool.disk_info("copy").await.unwrap().virtual_size, 8 * MIB);

    let raw = pool.create_disk("plain", DiskFormat::Raw, MIB).await.unwrap();
    fill(&raw.path, "raw", 0x33);
    let raw_copy = pool.full_clone("plain", "plain-copy", &mut |_| {}).await.unwrap();
    assert_eq!(raw_copy.format, DiskFormat::Raw);
    assert!(same_contents(&raw.path, "raw", &raw_copy.path, "raw"));
    let err = pool.full_clone("nothing", "x", &mut |_| {}).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

#[tokio::test]
async fn imports_vmdk_and_vdi_with_the_same_contents() {
    let (dir, pool) = pool();
    let source = patterned_raw(dir.path(), 4 * MIB);
    for format in ["vmdk", "vdi", "vhdx"] {
        let foreign = dir.path().join(format!("image.{format}"));
        qemu_img(&[
            "convert",
            "-f",
            "raw",
            "-O",
            format,
            source.to_str().unwrap(),
            foreign.to_str().unwrap(),
        ]);
        let mut seen = Vec::new();
        let name = format!("from-{format}");
        let info = pool
            .import_disk(&name, &foreign, DiskFormat::Qcow2, &mut |p| seen.push(p))
            .await
            .unwrap();
        assert_eq!(info.format, DiskFormat::Qcow2);
        assert!(!seen.is_empty(), "no progress reported for {format}");
        assert!(
            same_contents(&source, "raw", &info.path, "qcow2"),
            "{format} import differs"
        );
    }
    let raw = pool
        .import_disk("as-raw", &source, DiskFormat::Raw, &mut |_| {})
        .await
        .unwrap();
    assert!(same_contents(&source, "raw", &raw.path, "raw"));

    let err = pool
        .import_disk("x", Path::new("relative.vmdk"), DiskFormat::Qcow2, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    let err = pool
        .import_disk("x", &dir.path().join("missing.vmdk"), DiskFormat::Qcow2, &mut |_| {})
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound, "{err}");
}

#[tokio::test]
async fn upload_checks_the_checksum_and_leaves_nothing_when_wrong() {
    let (dir, pool) = pool();
    let source = patterned_raw(dir.path(), 2 * MIB);
    let qcow2 = dir.path().join("image.qcow2");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        source.to_str().unwrap(),
        qcow2.to_str().unwrap(),
    ]);
    let bytes = std::fs::read(&qcow2).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));

    let wrong = hex::encode(Sha256::digest(b"something else"));
    let err = pool.upload_disk("up", &mut bytes.as_slice(), &wrong).await.unwrap_err();
    assert!(matches!(err, UploadError::ChecksumMismatch { .. }), "{err}");
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert!(
        files_in(&pool.path().join("disks")).is_empty(),
        "a refused upload left files"
    );
    let err = pool
        .upload_disk("up", &mut bytes.as_slice(), "not-hex")
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::BadChecksum(_)));

    let info = pool.upload_disk("up", &mut bytes.as_slice(), &sha).await.unwrap();
    assert_eq!(info.format, DiskFormat::Qcow2);
    assert!(same_contents(&source, "raw", &info.path, "qcow2"));
    assert_eq!(files_in(&pool.path().join("disks")), ["up.qcow2"]);

    let raw_bytes = std::fs::read(&source).unwrap();
    let raw_sha = hex::encode(Sha256::digest(&raw_bytes));
    let raw = pool
        .upload_disk("up-raw", &mut raw_bytes.as_slice(), &raw_sha)
        .await
        .unwrap();
    assert_eq!(raw.format, DiskFormat::Raw);

    let vdi = dir.path().join("image.vdi");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vdi",
        source.to_str().unwrap(),
        vdi.to_str().unwrap(),
    ]);
    let vdi_bytes = std::fs::read(&vdi).unwrap();
    let vdi_sha = hex::encode(Sha256::digest(&vdi_bytes));
    let converted = pool
        .upload_disk("up-vdi", &mut vdi_bytes.as_slice(), &vdi_sha)
        .await
        .unwrap();
    assert_eq!(converted.format, DiskFormat::Qcow2);
    assert!(same_contents(&source, "raw", &converted.path, "qcow2"));

    let mut download = pool.download_disk("up-raw").await.unwrap();
    let mut downloaded = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut download.file, &mut downloaded)
        .await
        .unwrap();
    assert_eq!(
        (download.len, download.format),
        (raw_bytes.len() as u64, DiskFormat::Raw)
    );
    assert_eq!(downloaded, raw_bytes);

    let err = pool
        .upload_disk("up", &mut raw_bytes.as_slice(), &raw_sha)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let odd = vec![1u8; 1000];
    let err = pool
        .upload_disk("odd", &mut odd.as_slice(), &hex::encode(Sha256::digest(&odd)))
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Unaligned(1000)), "{err}");
    assert_eq!(
        files_in(&pool.path().join("disks")),
        ["up-raw.raw", "up-vdi.qcow2", "up.qcow2"]
    );
}

#[tokio::test]
async fn hostile_backing_file_is_refused() {
    let (dir, pool) = pool();
    let evil = dir.path().join("evil.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/etc/passwd",
        "-F",
        "raw",
        evil.to_str().unwrap(),
        "1M",
    ]);
    let err = pool
        .import_disk("evil", &evil, DiskFormat::Qcow2, &mut |_| {})
        .await
        .unwrap_err();
    assert!(matches!(&err, ImportError::Refused(_)), "{err}");
    assert!(err.to_string().contains("/etc/passwd"), "{err}");
    assert_eq!(err.kind(), ErrorKind::BadRequest);

    let bytes = std::fs::read(&evil).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));
    let err = pool.upload_disk("evil", &mut bytes.as_slice(), &sha).await.unwrap_err();
    assert!(matches!(&err, UploadError::Refused(_)), "{err}");
    assert!(files_in(&pool.path().join("disks")).is_empty());

    // A qcow2 placed in the pool by hand with such a backing file is not used either.
    std::fs::copy(&evil, pool.path().join("disks/planted.qcow2")).unwrap();
    let err = pool.disk_info("planted").await.unwrap_err();
    assert!(err.to_string().contains("not a disk of this pool"), "{err}");
}

#[tokio::test]
async fn path_like_names_are_refused() {
    let (dir, pool) = pool();
    let source = patterned_raw(dir.path(), MIB);
    for name in ["../escape", "a/b", "/etc/passwd", "..", ".hidden", ""] {
        let err = pool.create_disk(name, DiskFormat::Raw, MIB).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{name:?}: {err}");
        let err = pool
            .import_disk(name, &source, DiskFormat::Raw, &mut |_| {})
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{name:?}");
        let err = pool.delete_disk(name, unused).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{name:?}");
        let err = pool.add_iso_from_path(name, &source, None).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadRequest, "{name:?}");
    }
    let err = pool.linked_clone("../base", "x").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert!(!dir.path().join("escape.raw").exists());
}

#[tokio::test]
async fn wipe_zeroes_and_keeps_size_and_format() {
    let (_dir, pool) = pool();
    let disk = pool.create_disk("scratch", DiskFormat::Qcow2, 4 * MIB).await.unwrap();
    let blank = pool.create_disk("blank", DiskFormat::Qcow2, 4 * MIB).await.unwrap();
    fill(&disk.path, "qcow2", 0x5a);
    assert!(!same_contents(&disk.path, "qcow2", &blank.path, "qcow2"));
    let err = pool.wipe_disk("scratch", |_| Some("VM db".into())).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    let wiped = pool.wipe_disk("scratch", unused).await.unwrap();
    assert_eq!((wiped.format, wiped.virtual_size), (DiskFormat::Qcow2, 4 * MIB));
    assert!(same_contents(&wiped.path, "qcow2", &blank.path, "qcow2"));
    assert_eq!(files_in(&pool.path().join("disks")), ["blank.qcow2", "scratch.qcow2"]);
}

#[tokio::test]
async fn stale_temporaries_are_removed_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("pool");
    drop(DirPool::open(&root).unwrap());
    std::fs::write(root.join("disks/.tmp-1-0-x.qcow2"), b"half").unwrap();
    std::fs::write(root.join("isos/.tmp-1-0-y.iso"), b"half").unwrap();
    std::fs::write(root.join("isos/gone.iso.json"), b"{}").unwrap();
    std::fs::write(root.join("disks/kept.raw"), vec![0u8; 512]).unwrap();
    let pool = DirPool::open(&root).unwrap();
    assert_eq!(files_in(&root.join("disks")), ["kept.raw"]);
    assert!(files_in(&root.join("isos")).is_empty());
    assert_eq!(pool.list_disks().unwrap().len(), 1);
    assert!(DirPool::open("relative/pool").is_err());
}

fn make_iso(dir: &Path, name: &str) -> PathBuf {
    let content = dir.join(format!("{name}-content"));
    std::fs::create_dir_all(&content).unwrap();
    std::fs::write(content.join("README"), name).unwrap();
    let iso = dir.join(format!("{name}.iso"));
    let status = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "TEST", "-o"])
        .arg(&iso)
        .arg(&content)
        .output()
        .unwrap();
    assert!(status.status.success());
    iso
}

#[tokio::test]
async fn iso_library() {
    let (dir, pool) = pool();
    let iso = make_iso(dir.path(), "installer");
    let bytes = std::fs::read(&iso).unwrap();
    let sha = hex::encode(Sha256::digest(&bytes));

    let wrong = hex::encode(Sha256::digest(b"x"));
    let err = pool
        .add_iso_from_path("installer", &iso, Some(&wrong))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::BadRequest, "{err}");
    assert!(files_in(&pool.path().join("isos")).is_empty());
    let not_iso = dir.path().join("plain.bin");
    std::fs::write(&not_iso, vec![0u8; 40000]).unwrap();
    let err = pool.add_iso_from_path("plain", &not_iso, None).await.unwrap_err();
    assert!(err.to_string().contains("not an ISO"), "{err}");

    let added = pool.add_iso_from_path("installer", &iso, Some(&sha)).await.unwrap();
    assert_eq!((added.size, added.sha256.as_str()), (bytes.len() as u64, sha.as_str()));
    let streamed = pool.add_iso("second", &mut bytes.as_slice(), None).await.unwrap();
    assert_eq!(streamed.sha256, sha);
    let err = pool.add_iso("second", &mut bytes.as_slice(), None).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);

    // An ISO copied in by an operator gets its checksum computed.
    std::fs::copy(&iso, pool.path().join("isos/copied.iso")).unwrap();
    let listed: Vec<_> = pool
        .list_isos()
        .await
        .unwrap()
        .into_iter()
        .map(|i| (i.name, i.size, i.sha256))
        .collect();
    let expected: Vec<_> = ["copied", "installer", "second"]
        .into_iter()
        .map(|n| (n.to_owned(), bytes.len() as u64, sha.clone()))
        .collect();
    assert_eq!(listed, expected);

    let err = pool
        .delete_iso("installer", |_| Some("VM setup".into()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Conflict);
    pool.delete_iso("installer", unused).await.unwrap();
    assert_eq!(
        pool.delete_iso("installer", unused).await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(pool.list_isos().await.unwrap().len(), 2);
}

#[tokio::test]
async fn cloud_init_seed() {
    let (_dir, pool) = pool();
    let config = SeedConfig {
        instance_id: "vm-42".into(),
        hostname: "web1".into(),
        user_data: "#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA test\n".into(),
        network_config: Some("version: 2\nethernets:\n  eth0:\n    dhcp4: true\n".into()),
    };
    let path = pool.create_seed("vm-42", &config).await.unwrap();
    let out = Command::new("xorriso")
        .args(["-indev"])
        .arg(&path)
        .args(["-pvd_info", "-ls", "/"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for entry in ["'user-data'", "'meta-data'", "'network-config'"] {
        assert!(text.contains(entry), "{entry} missing from {text}");
    }
    assert!(text.contains("Volume Id    : cidata"), "{text}");
    let extract = path.with_extension("meta");
    let status = Command::new("xorriso")
        .args(["-osirrox", "on", "-indev"])
        .arg(&path)
        .args(["-extract", "/meta-data"])
        .arg(&extract)
        .output()
        .unwrap();
    assert!(status.status.success());
    assert_eq!(
        std::fs::read_to_string(&extract).unwrap(),
        "instance-id: vm-42\nlocal-hostname: web1\n"
    );
    std::fs::remove_file(&extract).unwrap();

    let bad = SeedConfig {
        user_data: "#cloud-config\n\u{1}".into(),
        ..config.clone()
    };
    assert_eq!(
        pool.create_seed("vm-43", &bad).await.unwrap_err().kind(),
        ErrorKind::BadRequest
    );
    assert_eq!(
        pool.create_seed("../x", &config).await.unwrap_err().kind(),
        ErrorKind::BadRequest
    );
    assert_eq!(files_in(&pool.path().join("seeds")), ["vm-42.iso"]);
    pool.delete_seed("vm-42").unwrap();
    assert_eq!(pool.delete_seed("vm-42").unwrap_err().kind(), ErrorKind::NotFound);
}
