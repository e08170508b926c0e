//! The console hub against a real Unix socket server standing in for QEMU's telnet-mode serial
//! chardev: fan-out, replay, input escaping and breaks, reconnection, the capped log, slow
//! clients.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{UnixListener, UnixStream};

use super::*;

/// What QEMU sends first on each telnet-mode connection.
const TELNET_INIT: [u8; 12] = [0xff, 0xfb, 0x01, 0xff, 0xfb, 0x03, 0xff, 0xfb, 0x00, 0xff, 0xfd, 0x00];
const LIMIT: Duration = Duration::from_secs(20);

struct FakeQemu {
    dir: PathBuf,
    listener: UnixListener,
}

impl FakeQemu {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("viv-console-{name}-{}", crate::manager::random_id(8)));
        std::fs::create_dir_all(&dir).unwrap();
        let listener = UnixListener::bind(dir.join("serial.sock")).unwrap();
        Self { dir, listener }
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("serial.sock")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("log").join("console.log")
    }

    /// Accepts the hub's connection and sends the telnet negotiation, as QEMU does.
    async fn accept(&self) -> UnixStream {
        let (mut stream, _) = tokio::time::timeout(LIMIT, self.listener.accept())
            .await
            .expect("the hub did not connect")
            .unwrap();
        stream.write_all(&TELNET_INIT).await.unwrap();
        stream
    }
}

impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Reads from `client` until `want` bytes came (or the stream ended).
async fn read_exactly(client: &mut ConsoleClient, want: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < want {
        match tokio::time::timeout(LIMIT, client.recv())
            .await
            .expect("no console output")
        {
            Some(bytes) => got.extend_from_slice(&bytes),
            None => break,
        }
    }
    got
}

/// Reads from `stream` (the fake QEMU's side) until `want` bytes came.
async fn read_stream(stream: &mut UnixStream, want: usize) -> Vec<u8> {
    let mut got = vec![0; want];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut got))
        .await
        .expect("no console input")
        .unwrap();
    got
}

/// Waits until the log at `path` holds `want` bytes.
async fn wait_log(path: &Path, want: usize) -> Vec<u8> {
    let start = std::time::Instant::now();
    loop {
        let log = read_log(path, None).unwrap();
        if log.len() >= want || start.elapsed() > LIMIT {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn two_clients_see_the_same_bytes_and_a_late_one_gets_the_replay() {
    let qemu = FakeQemu::new("fanout");
    let hub = ConsoleHub::start(qemu.socket(), qemu.log());
    let mut first = hub.attach(true);
    let mut second = hub.attach(true);
    let mut stream = qemu.accept().await;
    // Output with every byte value, 0xFF included (QEMU does not escape output).
    let banner: Vec<u8> = (0..=255u8).chain(*b"VIVARIUM-BOOTED\r\n").collect();
    stream.write_all(&banner).await.unwrap();
    assert_eq!(read_exactly(&mut first, banner.len()).await, banner);
    assert_eq!(read_exactly(&mut second, banner.len()).await, banner);

    // A late client gets the replay, then live bytes, nothing twice.
    let mut late = hub.attach(true);
    stream.write_all(b"after").await.unwrap();
    let want: Vec<u8> = [banner.as_slice(), b"after"].concat();
    assert_eq!(read_exactly(&mut late, want.len()).await, want);
    assert_eq!(read_exactly(&mut first, 5).await, b"after");
    // Without replay, only what comes next.
    let mut fresh = hub.attach(false);
    stream.write_all(b"next").await.unwrap();
    assert_eq!(read_exactly(&mut fresh, 4).await, b"next");
    assert_eq!(
        wait_log(&qemu.log(), want.len() + 4).await,
        [want.as_slice(), b"next"].concat()
    );

    // Closed: every client's stream ends, input is refused.
    hub.close();
    assert_eq!(read_exactly(&mut second, 9).await, b"afternext");
    assert!(tokio::time::timeout(LIMIT, second.recv()).await.unwrap().is_none());
    assert!(hub.attach(true).recv().await.is_some(), "the replay stays readable");
    assert!(hub.send(b"x").await.is_err());
}

#[tokio::test]
async fn the_replay_keeps_the_newest_bytes() {
    let qemu = FakeQemu::new("replay");
    let limits = HubLimits {
        replay: 100,
        ..HubLimits::default()
    };
    let hub = ConsoleHub::start_with(qemu.socket(), qemu.log(), limits);
    let mut watcher = hub.attach(false);
    let mut stream = qemu.accept().await;
    let data: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&data).await.unwrap();
    read_exactly(&mut watcher, data.len()).await;
    let replay = hub.attach(true).recv().await.unwrap();
    assert_eq!(&replay[..], &data[900..]);
}

#[tokio::test]
async fn input_is_escaped_and_a_break_is_a_telnet_break() {
    let qemu = FakeQemu::new("input");
    let hub = ConsoleHub::start(qemu.socket(), qemu.log());
    let mut stream = qemu.accept().await;
    hub.send(b"ls\xff\n").await.unwrap();
    hub.send_break().await.unwrap();
    hub.send(b"\xff\xff").await.unwrap();
    assert_eq!(
        read_stream(&mut stream, 11).await,
        b"ls\xff\xff\n\xff\xf3\xff\xff\xff\xff"
    );
}

#[tokio::test]
async fn the_hub_reconnects_and_strips_each_negotiation() {
    let qemu = FakeQemu::new("reconnect");
    let hub = ConsoleHub::start(qemu.socket(), qemu.log());
    let mut client = hub.attach(true);
    let mut stream = qemu.accept().await;
    stream.write_all(b"one ").await.unwrap();
    assert_eq!(read_exactly(&mut client, 4).await, b"one ");
    drop(stream);
    let mut stream = qemu.accept().await;
    stream.write_all(b"two").await.unwrap();
    assert_eq!(read_exactly(&mut client, 3).await, b"two");
    // Input queued goes to the new connection.
    hub.send(b"hi").await.unwrap();
    assert_eq!(read_stream(&mut stream, 2).await, b"hi");
}

#[tokio::test]
async fn the_log_never_exceeds_its_cap_keeps_the_newest_bytes_and_survives_a_restart() {
    let qemu = FakeQemu::new("log");
    let cap = 1000;
    let limits = HubLimits {
        log_cap: cap,
        ..HubLimits::default()
    };
    let hub = ConsoleHub::start_with(qemu.socket(), qemu.log(), limits);
    let mut client = hub.attach(false);
    let mut stream = qemu.accept().await;
    let mut sent = Vec::new();
    for i in 0..200u32 {
        let line = format!("line {i:05}\n");
        sent.extend_from_slice(line.as_bytes());
        stream.write_all(line.as_bytes()).await.unwrap();
    }
    // Published to the log before the clients: once the client has it all, so has the log.
    assert_eq!(read_exactly(&mut client, sent.len()).await, sent);
    let sizes = |q: &FakeQemu| {
        let size = |p: PathBuf| std::fs::metadata(p).map_or(0, |m| m.len());
        (size(q.log()), size(rotated(&q.log())))
    };
    let (current, older) = sizes(&qemu);
    assert!(current <= cap / 2 && older <= cap / 2, "{current} + {older} > {cap}");
    let log = hub.read_log(None).unwrap();
    assert!(log.len() as u64 >= cap / 2, "only {} bytes kept", log.len());
    assert!(sent.ends_with(&log), "the log is not the newest output");
    assert_eq!(hub.read_log(Some(10)).unwrap(), &b"line 00199\n"[1..]);
    hub.close();
    drop(hub);

    // The next start appends to the same log.
    let hub = ConsoleHub::start_with(qemu.socket(), qemu.log(), limits);
    let mut client = hub.attach(false);
    let mut stream = qemu.accept().await;
    stream.write_all(b"second boot\n").await.unwrap();
    read_exactly(&mut client, 12).await;
    let log = read_log(&qemu.log(), None).unwrap();
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(qemu.log()).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the log is readable by others");
    assert!(
        log.ends_with(b"line 00199\nsecond boot\n"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    let (current, older) = sizes(&qemu);
    assert!(current + older <= cap);
}

#[tokio::test]
async fn a_slow_client_loses_output_with_a_notice_and_never_blocks_a_fast_one() {
    let qemu = FakeQemu::new("slow");
    let limits = HubLimits {
        backlog: 8,
        ..HubLimits::default()
    };
    let hub = ConsoleHub::start_with(qemu.socket(), qemu.log(), limits);
    let mut slow = hub.attach(false);
    let mut fast = hub.attach(false);
    let mut stream = qemu.accept().await;
    // Paced by the fast client: each chunk is written once it has read the one before, so
    // it never falls behind, while the slow client reads nothing.
    for i in 0..100u32 {
        let chunk = format!("<{i:03}>");
        stream.write_all(chunk.as_bytes()).await.unwrap();
        assert_eq!(read_exactly(&mut fast, 5).await, chunk.as_bytes());
    }
    let first = slow.recv().await.unwrap();
    let notice = String::from_utf8_lossy(&first);
    assert!(notice.contains("fell behind") && notice.contains("dropped"), "{notice}");
    // What it still gets is the newest output, in order.
    let rest = read_exactly(&mut slow, 8 * 5).await;
    assert!(rest.ends_with(b"<099>"), "{}", String::from_utf8_lossy(&rest));
}

#[test]
fn the_telnet_prefix_is_stripped_across_reads() {
    let mut prefix = TelnetPrefix::default();
    assert!(prefix.strip(&TELNET_INIT[..4]).is_empty());
    assert!(prefix.strip(&TELNET_INIT[4..11]).is_empty());
    assert_eq!(prefix.strip(&[0x00, b'h', 0xff]), [b'h', 0xff]);
    assert_eq!(
        prefix.strip(&[0xff, 0xfb, 0x01]),
        [0xff, 0xfb, 0x01],
        "data after the prefix"
    );

    let mut prefix = TelnetPrefix::default();
    assert_eq!(prefix.strip(b"no negotiation"), b"no negotiation");
    let mut prefix = TelnetPrefix::default();
    assert_eq!(
        prefix.strip(&[0xff, 0xf3, b'x']),
        [0xff, 0xf3, b'x'],
        "not a negotiation"
    );
}

#[test]
fn an_oversized_log_is_cut_to_its_newest_half_when_opened() {
    let dir = std::env::temp_dir().join(format!("viv-console-open-{}", crate::manager::random_id(8)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("console.log");
    let old: Vec<u8> = (0..5000u32).map(|i| (i % 256) as u8).collect();
    std::fs::write(&path, &old).unwrap();
    std::fs::write(rotated(&path), &old).unwrap();
    let mut log = ConsoleLog::open(path.clone(), 1000);
    log.append(b"new");
    let all = read_log(&path, None).unwrap();
    assert!(all.len() <= 1000, "{}", all.len());
    assert!(all.ends_with(b"new"));
    assert!(all[..all.len() - 3].ends_with(&old[old.len() - 100..]));
    std::fs::remove_dir_all(&dir).unwrap();
}
