//! Unit tests of the FUSE file server: requests built byte by byte, answers checked.
use super::*;

fn request(opcode: u32, unique: u64, nodeid: u64, body: &[u8]) -> Vec<u8> {
    let mut m = Vec::new();
    m.extend_from_slice(&((IN_HEADER + body.len()) as u32).to_le_bytes());
    m.extend_from_slice(&opcode.to_le_bytes());
    m.extend_from_slice(&unique.to_le_bytes());
    m.extend_from_slice(&nodeid.to_le_bytes());
    m.extend_from_slice(&1000u32.to_le_bytes());
    m.extend_from_slice(&1000u32.to_le_bytes());
    m.extend_from_slice(&[0u8; 8]);
    m.extend_from_slice(body);
    m
}

fn error(reply: &[u8]) -> i32 {
    i32::from_le_bytes(reply[4..8].try_into().unwrap())
}

fn u64_at(reply: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(reply[at..at + 8].try_into().unwrap())
}

fn session() -> (FuseSession, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("viv-volfuse-{}", crate::manager::random_id(10)));
    std::fs::create_dir_all(&dir).unwrap();
    let root = File::open(&dir).unwrap();
    (FuseSession::new(root.as_fd()).unwrap(), dir)
}

#[test]
fn create_write_read_and_list_through_the_protocol() {
    let (mut s, dir) = session();
    let init = s
        .handle(&request(
            FUSE_INIT,
            1,
            0,
            &[7, 0, 0, 0, 31, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0],
        ))
        .unwrap();
    assert_eq!(error(&init), 0);
    assert_eq!(init.len(), OUT_HEADER + 64);

    let mut create = Vec::new();
    for v in [libc::O_RDWR as u32, 0o644, 0o022, 0] {
        create.extend_from_slice(&v.to_le_bytes());
    }
    create.extend_from_slice(b"f.txt\0");
    let made = s.handle(&request(FUSE_CREATE, 2, ROOT, &create)).unwrap();
    assert_eq!(error(&made), 0);
    let node = u64_at(&made, OUT_HEADER);
    let fh = u64_at(&made, OUT_HEADER + 128);

    let mut write = Vec::new();
    write.extend_from_slice(&fh.to_le_bytes());
    write.extend_from_slice(&0u64.to_le_bytes());
    write.extend_from_slice(&5u32.to_le_bytes());
    write.extend_from_slice(&[0u8; 20]);
    write.extend_from_slice(b"hello");
    assert_eq!(error(&s.handle(&request(FUSE_WRITE, 3, node, &write)).unwrap()), 0);
    assert_eq!(std::fs::read(dir.join("f.txt")).unwrap(), b"hello");

    let mut read = Vec::new();
    read.extend_from_slice(&fh.to_le_bytes());
    read.extend_from_slice(&1u64.to_le_bytes());
    read.extend_from_slice(&100u32.to_le_bytes());
    read.extend_from_slice(&[0u8; 20]);
    let got = s.handle(&request(FUSE_READ, 4, node, &read)).unwrap();
    assert_eq!(&got[OUT_HEADER..], b"ello");

    let opened = s.handle(&request(FUSE_OPENDIR, 5, ROOT, &[0u8; 8])).unwrap();
    let dh = u64_at(&opened, OUT_HEADER);
    let mut rd = Vec::new();
    rd.extend_from_slice(&dh.to_le_bytes());
    rd.extend_from_slice(&0u64.to_le_bytes());
    rd.extend_from_slice(&4096u32.to_le_bytes());
    rd.extend_from_slice(&[0u8; 20]);
    let listing = s.handle(&request(FUSE_READDIR, 6, ROOT, &rd)).unwrap();
    assert!(listing.windows(5).any(|w| w == b"f.txt"));

    // A lookup of the same inode gives the same node; forgetting both references drops it.
    let again = s.handle(&request(FUSE_LOOKUP, 7, ROOT, b"f.txt\0")).unwrap();
    assert_eq!(u64_at(&again, OUT_HEADER), node);
    assert!(s.handle(&request(FUSE_FORGET, 8, node, &2u64.to_le_bytes())).is_none());
    assert_eq!(
        error(&s.handle(&request(FUSE_GETATTR, 9, node, &[0u8; 16])).unwrap()),
        -libc::ESTALE
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hostile_names_and_short_messages_are_refused() {
    let (mut s, dir) = session();
    std::os::unix::fs::symlink("/etc", dir.join("etc")).unwrap();
    for name in [&b"..\0"[..], b".\0", b"a/b\0", b"\0", b"no-terminator"] {
        assert_eq!(
            error(&s.handle(&request(FUSE_LOOKUP, 1, ROOT, name)).unwrap()),
            -libc::EINVAL
        );
    }
    // The symlink is a node of its own; it is never followed on the host.
    let link = s.handle(&request(FUSE_LOOKUP, 2, ROOT, b"etc\0")).unwrap();
    assert_eq!(error(&link), 0);
    let node = u64_at(&link, OUT_HEADER);
    assert_eq!(
        error(&s.handle(&request(FUSE_LOOKUP, 3, node, b"passwd\0")).unwrap()),
        -libc::ENOTDIR
    );
    assert_eq!(
        error(&s.handle(&request(FUSE_OPEN, 4, node, &[0u8; 8])).unwrap()),
        -libc::EINVAL
    );
    assert_eq!(
        error(&s.handle(&request(FUSE_GETATTR, 5, 999, &[0u8; 16])).unwrap()),
        -libc::ESTALE
    );
    assert!(s.handle(&[1, 2, 3]).is_none());
    // A body shorter than its request needs.
    assert_eq!(
        error(&s.handle(&request(FUSE_READ, 6, ROOT, &[0u8; 4])).unwrap()),
        -libc::EINVAL
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
