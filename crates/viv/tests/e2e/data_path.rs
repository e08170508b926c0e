//! The data path from clients through the server's proxy and the agent channel to files and
//! processes in the guest: many uploads, downloads and output streams at once on one sandbox's
//! channel arrive byte for byte, and an upload cut short is refused with a 400 and leaves no
//! file (nor a temporary one) behind. Uploads to a sandbox with its own network take the data
//! path over that network; the others, the channel.

use std::io::{Read as _, Write as _};
use std::time::Duration;

use serde_json::{json, Value};
use sha2::Digest as _;

use crate::fixture::TestServer;

/// A small deterministic generator (xorshift64*), so a failure can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(len);
        out
    }
}

/// A multipart/form-data body holding `data` as one file, and its content type.
fn multipart(data: &[u8], boundary: &str) -> (Vec<u8>, String) {
    let mut body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"upload.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
    )
    .into_bytes();
    body.extend_from_slice(data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (body, format!("multipart/form-data; boundary={boundary}"))
}

#[test]
fn concurrent_uploads_downloads_and_output_streams_through_the_proxy_stay_whole() {
    let server = TestServer::shared();
    let (sandbox, token) = server.secure_sandbox();
    let id = sandbox.id.clone();
    // Sizes around the channel's and the protocol's edges: empty, one byte, a whole SDK text
    // upload, page and frame sizes, and a few MiB.
    const SIZES: [usize; 12] = [
        0,
        1,
        10,
        191,
        4095,
        4097,
        16_385,
        65_536,
        100_000,
        262_145,
        1 << 20,
        3 << 20,
    ];
    let failures = std::sync::Mutex::new(Vec::<String>::new());
    std::thread::scope(|scope| {
        for worker in 0..6u64 {
            let (server, id, token, failures) = (server, &id, &token, &failures);
            scope.spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (worker + 1));
                let client = reqwest::blocking::Client::builder()
                    .timeout(Duration::from_secs(300))
                    .build()
                    .unwrap();
                let envd = |method: reqwest::Method, path: &str| {
                    client
                        .request(method, format!("{}{path}", server.url))
                        .header("E2b-Sandbox-Id", id.as_str())
                        .header("E2b-Sandbox-Port", "49983")
                        .header("X-Access-Token", token.as_str())
                };
                for round in 0..16usize {
                    let size = SIZES[(rng.next() % SIZES.len() as u64) as usize];
                    let data = rng.bytes(size);
                    let path = format!("/home/user/stress/{worker}-{}.bin", round % 3);
                    let as_multipart = round % 2 == 0;
                    let sent = if as_multipart {
                        let (body, content_type) = multipart(&data, &format!("{:032x}", rng.next()));
                        envd(reqwest::Method::POST, "/files")
                            .query(&[("path", path.as_str())])
                            .header("content-type", content_type)
                            .body(body)
                            .send()
                    } else {
                        envd(reqwest::Method::POST, "/files")
                            .query(&[("path", path.as_str())])
                            .header("content-type", "application/octet-stream")
                            .body(data.clone())
                            .send()
                    };
                    let what = format!(
                        "worker {worker} round {round}: {size} B as {}",
                        if as_multipart { "multipart" } else { "octet-stream" }
                    );
                    match sent {
                        Ok(r) if r.status() == 200 => {}
                        Ok(r) => {
                            let status = r.status();
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{what}: upload {status} {}", r.text().unwrap_or_default()));
                            continue;
                        }
                        Err(err) => {
                            failures.lock().unwrap().push(format!("{what}: upload failed: {err}"));
                            continue;
                        }
                    }
                    let back = envd(reqwest::Method::GET, "/files")
                        .query(&[("path", path.as_str())])
                        .send()
                        .and_then(|r| r.error_for_status())
                        .and_then(|r| r.bytes());
                    match back {
                        Ok(back) if back.as_ref() == data.as_slice() => {}
                        Ok(back) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: read back {} B that differ", back.len())),
                        Err(err) => failures
                            .lock()
                            .unwrap()
                            .push(format!("{what}: read back failed: {err}")),
                    }
                    if round % 4 == 3 {
                        let inside = server.exec(id, json!({ "argv": ["sha256sum", path] })).out();
                        let digest = hex::encode(sha2::Sha256::digest(&data));
                        if !inside.starts_with(&digest) {
                            failures
                                .lock()
                                .unwrap()
                                .push(format!("{what}: SHA-256 in the guest is {inside:?}, not {digest}"));
                        }
                    }
                }
            });
        }
        // Meanwhile, interleaved output streams share the channel.
        scope.spawn(|| {
            for round in 0..4 {
                let run = sandbox.sh("for i in $(seq 1 1500); do echo out$i; echo err$i >&2; done");
                let out: String = (1..=1500).map(|i| format!("out{i}\n")).collect();
                let err: String = (1..=1500).map(|i| format!("err{i}\n")).collect();
                if run.out() != out || run.err() != err || run.exit_code != Some(0) {
                    failures.lock().unwrap().push(format!(
                        "output stream {round}: {} B stdout, {} B stderr, {:?} {:?}",
                        run.stdout.len(),
                        run.stderr.len(),
                        run.exit_code,
                        run.error
                    ));
                }
            }
        });
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Sends `head` and `body` on a fresh connection, half-closes it when `cut`, and returns the
/// status and the JSON body of the answer.
fn raw_request(server: &TestServer, head: &str, body: &[u8], cut: bool) -> (u16, Value) {
    let address = server.url.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body).unwrap();
    if cut {
        // The client stops sending before its declared end.
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"));
    let json = answer
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str(body).ok())
        .unwrap_or(Value::Null);
    (status, json)
}

#[test]
fn uploads_cut_short_are_refused_and_leave_no_file() {
    let server = TestServer::shared();
    let (sandbox, token) = server.secure_sandbox();
    let id = &sandbox.id;
    let put = server
        .put(&format!("/sandboxes/{id}/files"))
        .query(&[("path", "/home/user/cut/kept.txt")])
        .body("old content")
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    let proxy = |path: &str, headers: &str| {
        format!(
            "POST /files?path={path} HTTP/1.1\r\nHost: sandbox\r\nE2b-Sandbox-Id: {id}\r\nE2b-Sandbox-Port: 49983\r\nX-Access-Token: {token}\r\n{headers}\r\n"
        )
    };
    let boundary = "0f1e2d3c4b5a69788796a5b4c3d2e1f0";
    let (form, form_type) = multipart(&[b'm'; 20_000], boundary);
    let unclosed = &form[..form.len() - boundary.len() - 8];

    let cases: Vec<(&str, String, Vec<u8>, bool, &str)> = vec![
        (
            "raw body shorter than its Content-Length, through the proxy",
            proxy(
                "/home/user/cut/raw.bin",
                "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n",
            ),
            vec![b'r'; 40_000],
            true,
            "cut short after 40000 bytes",
        ),
        (
            "an overwrite cut short",
            proxy(
                "/home/user/cut/kept.txt",
                "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n",
            ),
            vec![b'o'; 3_000],
            true,
            "cut short after 3000 bytes",
        ),
        (
            "multipart body shorter than its Content-Length",
            proxy(
                "/home/user/cut/form.bin",
                &format!("Content-Type: {form_type}\r\nContent-Length: {}\r\n", form.len() + 1000),
            ),
            form.clone(),
            true,
            "cut short",
        ),
        (
            "multipart body without its closing delimiter",
            proxy(
                "/home/user/cut/unclosed.bin",
                &format!(
                    "Content-Type: {form_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
                    unclosed.len()
                ),
            ),
            unclosed.to_vec(),
            false,
            "ended early",
        ),
        (
            "chunked body that stops inside a chunk",
            proxy(
                "/home/user/cut/chunked.bin",
                "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n",
            ),
            [b"1000\r\n".as_slice(), &[b'c'; 4096], b"\r\n800\r\n", &[b'd'; 100]].concat(),
            true,
            "cut short",
        ),
        (
            "raw body shorter than its Content-Length, through the files route",
            format!(
                "PUT /sandboxes/{id}/files?path=/home/user/cut/route.bin HTTP/1.1\r\nHost: server\r\nX-API-Key: {}\r\nContent-Length: 100000\r\n\r\n",
                server.key
            ),
            vec![b'p'; 30_000],
            true,
            "cut short after 30000 bytes",
        ),
    ];
    for (what, head, body, cut, expected) in &cases {
        let (status, answer) = raw_request(server, head, body, *cut);
        assert_eq!(status, 400, "{what}: {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(expected), "{what}: {message:?}");
    }
    // Nothing was written: no new file, no temporary file, and the old content stays.
    let listing = sandbox.sh("ls -A /home/user/cut");
    assert_eq!(listing.out(), "kept.txt\n", "{}", listing.err());
    assert_eq!(sandbox.sh("cat /home/user/cut/kept.txt").out(), "old content");

    // The same requests, whole, are stored.
    let (status, _) = raw_request(
        server,
        &proxy(
            "/home/user/cut/chunked.bin",
            "Content-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n",
        ),
        b"3\r\nabc\r\n0\r\n\r\n",
        false,
    );
    assert_eq!(status, 200);
    let (status, _) = raw_request(
        server,
        &proxy(
            "/home/user/cut/form.bin",
            &format!(
                "Content-Type: {form_type}\r\nContent-Length: {}\r\nConnection: close\r\n",
                form.len()
            ),
        ),
        &form,
        false,
    );
    assert_eq!(status, 200);
    assert_eq!(
        sandbox
            .sh("cat /home/user/cut/chunked.bin; echo; wc -c < /home/user/cut/form.bin")
            .out(),
        "abc\n20000\n"
    );
}

#[test]
fn a_file_whose_name_has_any_bytes_is_read_back_with_a_valid_header() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = &sandbox.id;
    // Control characters, a quote, a backslash and non-ASCII in one name: none may go into a
    // header as is, and a read of the file must still answer it.
    let path = "/home/user/odd-\u{e3}\u{6}\u{dd}\u{f0da6}\"\\\u{11}<\u{12}.bin";
    let put = server
        .put(&format!("/sandboxes/{id}/files"))
        .query(&[("path", path)])
        .body("odd name")
        .send()
        .unwrap();
    assert!(put.status().is_success(), "{}", put.text().unwrap());
    let got = server
        .get(&format!("/sandboxes/{id}/files"))
        .query(&[("path", path)])
        .send()
        .unwrap();
    assert_eq!(got.status(), 200);
    let disposition = got.headers()["content-disposition"].to_str().unwrap().to_owned();
    assert!(
        disposition.contains("filename*=UTF-8''odd-%C3%A3%06%C3%9D%F3%B0%B6%A6%22%5C%11%3C%12.bin"),
        "{disposition}"
    );
    assert_eq!(got.text().unwrap(), "odd name");
}

const OVER_NETWORK: &str = "vivarium_file_uploads_total{path=\"network\"}";
const OVER_CHANNEL: &str = "vivarium_file_uploads_total{path=\"channel\"}";

/// Writes `data` to `path` in the sandbox and reads it back through the REST API.
fn round_trip(server: &TestServer, id: &str, path: &str, data: &[u8]) {
    let files = format!("/sandboxes/{id}/files");
    let put = server
        .put(&files)
        .query(&[("path", path)])
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(put.status(), 200, "{}", put.text().unwrap());
    let got = server.get(&files).query(&[("path", path)]).send().unwrap();
    assert_eq!(got.status(), 200);
    let got = got.bytes().unwrap();
    assert!(
        got.as_ref() == data,
        "{path}: {} bytes back of {}",
        got.len(),
        data.len()
    );
}

/// With its own network, a sandbox's uploads go over it (the data path), also after a pause and
/// resume; processes in the guest cannot use that path; without a network they go over the
/// channel.
#[test]
fn uploads_take_the_sandboxs_network_and_the_channel_without_one() {
    let server = TestServer::start_isolated(0);
    let sandbox = server.sandbox();
    let id = sandbox.id.clone();
    let data = Rng(0x5eed).bytes((8 << 20) + 3);
    round_trip(&server, &id, "/home/user/over-network.bin", &data);
    assert_eq!(server.metric(OVER_NETWORK), 1);
    assert_eq!(server.metric(OVER_CHANNEL), 0);

    // The agent serves the data path to the host's end of the network only: a process in the
    // guest connecting to the guest's own address (or loopback) is closed before any answer
    // (a reset, when its bytes arrive after the close, counts as no answer too).
    let probe = sandbox.sh("python3 -c '
import socket
for host in (\"10.0.2.15\", \"127.0.0.1\"):
    s = socket.create_connection((host, 49983), timeout=10)
    try:
        s.sendall(b\"PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n\" + bytes(9))
        answer = len(s.recv(100))
    except (ConnectionResetError, BrokenPipeError):
        answer = 0
    print(host, answer)
'");
    assert_eq!(probe.out(), "10.0.2.15 0\n127.0.0.1 0\n", "{probe:?}");

    // A paused and resumed sandbox (a new QEMU, a new namespace) keeps its data path.
    assert_eq!(
        server.post(&format!("/sandboxes/{id}/pause")).send().unwrap().status(),
        204
    );
    let resumed = server
        .post(&format!("/sandboxes/{id}/connect"))
        .json(&json!({ "timeout": 600 }))
        .send()
        .unwrap();
    assert_eq!(resumed.status(), 201, "{}", resumed.text().unwrap());
    round_trip(&server, &id, "/home/user/after-resume.bin", &data[..1 << 20]);
    assert_eq!(server.metric(OVER_NETWORK), 2);
    assert_eq!(server.metric(OVER_CHANNEL), 0);
    drop(sandbox);

    // QEMU's user-mode network has no namespace to connect from: the channel carries them.
    let user_mode = TestServer::start_user_mode();
    let sandbox = user_mode.sandbox();
    round_trip(&user_mode, &sandbox.id, "/tmp/over-channel.bin", &data[..(1 << 20) + 1]);
    assert_eq!(user_mode.metric(OVER_CHANNEL), 1);
    assert_eq!(user_mode.metric(OVER_NETWORK), 0);
}
