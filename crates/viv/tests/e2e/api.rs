//! The REST API: sandbox lifecycle, exec, files and the envd pass-through.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use crate::fixture::{rpc, wait_until, TestServer};

#[test]
fn requests_without_a_valid_key_are_refused() {
    let server = TestServer::shared();
    let no_key = server.http.get(format!("{}/sandboxes", server.url)).send().unwrap();
    assert_eq!(no_key.status(), 401);
    let body: Value = no_key.json().unwrap();
    assert_eq!(body["code"], 401);
    assert!(body["message"].as_str().unwrap().contains("X-API-Key"));
    let wrong = server
        .http
        .get(format!("{}/sandboxes", server.url))
        .header("X-API-Key", "e2b_0000")
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 401);
    // Health stays open for probes; metrics name VMs, so a scraper needs the key, which it may
    // send as a bearer token (Prometheus' `authorization` setting).
    let health: Value = server
        .http
        .get(format!("{}/health", server.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(["kvm", "tcg"].contains(&health["accel"].as_str().unwrap()));
    let metrics_url = format!("{}/metrics", server.url);
    assert_eq!(server.http.get(&metrics_url).send().unwrap().status(), 401);
    let wrong_bearer = server.http.get(&metrics_url).bearer_auth("e2b_0000").send().unwrap();
    assert_eq!(wrong_bearer.status(), 401);
    let metrics = server.http.get(&metrics_url).bearer_auth(&server.key).send().unwrap();
    assert_eq!(metrics.status(), 200);
    assert!(metrics.text().unwrap().contains("vivarium_sandboxes_running"));
    let spec = server
        .http
        .get(format!("{}/openapi.yaml", server.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(spec.contains("/sandboxes/{sandboxID}/exec"));
}

#[test]
fn sandbox_lifecycle_with_metadata_and_env_vars() {
    let server = TestServer::shared();
    let id = server.create(json!({
        "templateID": "base",
        "timeout": 600,
        "metadata": { "owner": "e2e", "run": "lifecycle" },
        "envVars": { "GREETING": "hello from the host" },
    }));
    let info: Value = server.get(&format!("/sandboxes/{id}")).send().unwrap().json().unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["templateID"], "base");
    assert_eq!(info["metadata"]["run"], "lifecycle");
    assert_eq!(info["memoryMB"], 256);

    let listed: Vec<Value> = server
        .get("/sandboxes")
        .query(&[("metadata", "run=lifecycle")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["sandboxID"], id.as_str());
    let none: Vec<Value> = server
        .get("/sandboxes")
        .query(&[("metadata", "run=other")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(none.is_empty());

    let run = server.exec(&id, json!({ "command": "echo \"$GREETING\"; python3 -c 'print(6*7)'" }));
    assert_eq!(run.out(), "hello from the host\n42\n");
    assert_eq!(run.exit_code, Some(0));

    assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
    assert_eq!(server.get(&format!("/sandboxes/{id}")).send().unwrap().status(), 404);
    let again = server.delete(&format!("/sandboxes/{id}")).send().unwrap();
    assert_eq!(again.status(), 404);
    let body: Value = again.json().unwrap();
    assert!(body["message"].as_str().unwrap().contains(&id));
    let exec = server
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({"command": "true"}))
        .send()
        .unwrap();
    assert_eq!(exec.status(), 404);
}

#[test]
fn bad_create_requests_get_clear_errors() {
    let server = TestServer::shared();
    let unknown = server
        .post("/sandboxes")
        .json(&json!({ "templateID": "no-such-template" }))
        .send()
        .unwrap();
    assert_eq!(unknown.status(), 404);
    assert!(unknown.text().unwrap().contains("no-such-template"));
    let timeout = server
        .post("/sandboxes")
        .json(&json!({ "timeout": 999999 }))
        .send()
        .unwrap();
    assert_eq!(timeout.status(), 400);
    assert!(timeout.text().unwrap().contains("timeout"));
    let memory = server
        .post("/sandboxes")
        .json(&json!({ "memoryMB": 1 }))
        .send()
        .unwrap();
    assert_eq!(memory.status(), 400);
    let malformed = server
        .post("/sandboxes")
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .unwrap();
    assert_eq!(malformed.status(), 400);
    let body: Value = malformed.json().unwrap();
    assert_eq!(body["code"], 400);
    assert_eq!(server.get("/no/such/route").send().unwrap().status(), 404);
}

#[test]
fn exec_streams_output_exit_codes_stdin_users_and_cwd() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = &sandbox.id;

    // stdout and stderr arrive separately, each in order.
    let run = sandbox.sh("for i in $(seq 1 2000); do echo out$i; echo err$i >&2; done; exit 7");
    let expected_out: String = (1..=2000).map(|i| format!("out{i}\n")).collect();
    let expected_err: String = (1..=2000).map(|i| format!("err{i}\n")).collect();
    assert_eq!(run.out(), expected_out);
    assert_eq!(run.err(), expected_err);
    assert_eq!(run.exit_code, Some(7));
    assert_eq!(run.status.as_deref(), Some("exit status 7"));
    assert!(run.pid.unwrap() > 1);

    // A program that does not exist: a clear error, and the sandbox still works.
    let missing = server.exec(id, json!({ "argv": ["/usr/bin/no-such-program", "x"] }));
    assert!(
        missing.error.as_deref().unwrap().contains("no-such-program"),
        "{missing:?}"
    );
    let shell_missing = sandbox.sh("no-such-command");
    assert_eq!(shell_missing.exit_code, Some(127));
    assert!(shell_missing.err().contains("not found"));
    assert_eq!(sandbox.sh("echo still alive").out(), "still alive\n");

    // stdin, bytes that are not UTF-8 included.
    let input: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&input);
    let piped = server.exec(id, json!({ "argv": ["sha256sum"], "stdin": b64 }));
    let digest = {
        use sha2::Digest as _;
        hex::encode(sha2::Sha256::digest(&input))
    };
    assert!(piped.out().starts_with(&digest), "{}", piped.out());

    // Users, home directories, working directory and environment.
    assert_eq!(server.exec(id, json!({ "argv": ["id", "-un"] })).out(), "user\n");
    assert_eq!(
        server.exec(id, json!({ "argv": ["id", "-un"], "user": "root" })).out(),
        "root\n"
    );
    assert_eq!(server.exec(id, json!({ "command": "pwd" })).out(), "/home/user\n");
    assert_eq!(
        server
            .exec(id, json!({ "command": "echo $HOME", "user": "root" }))
            .out(),
        "/root\n"
    );
    assert_eq!(
        server.exec(id, json!({ "argv": ["pwd"], "cwd": "/tmp" })).out(),
        "/tmp\n"
    );
    assert_eq!(
        server
            .exec(id, json!({ "command": "echo $A-$B", "env": {"A": "1", "B": "2"} }))
            .out(),
        "1-2\n"
    );
    let bad_cwd = server.exec(id, json!({ "argv": ["pwd"], "cwd": "/no/such/dir" }));
    assert!(bad_cwd.error.as_deref().unwrap().contains("/no/such/dir"));
    let bad_user = server.exec(id, json!({ "argv": ["true"], "user": "nobody-here" }));
    assert!(bad_user.error.as_deref().unwrap().contains("nobody-here"));
    // PID 1 reaps orphans, and the guest has its host name.
    sandbox.sh("for i in 1 2 3; do (sleep 0.2 &) ; done");
    assert!(wait_until(Duration::from_secs(10), || sandbox
        .sh("ps -eo stat= | grep -c '^Z' || true")
        .out()
        .trim()
        == "0"));
    assert_eq!(sandbox.sh("hostname").out(), "sandbox\n");
    // The guest clock was set from the host at start.
    let guest_now: i64 = sandbox.sh("date +%s").out().trim().parse().unwrap();
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now} vs host {host_now}"
    );
    let empty = server
        .post(&format!("/sandboxes/{id}/exec"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(empty.status(), 400);
}

#[test]
fn files_round_trip_bytes_and_stay_inside_the_guest() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = &sandbox.id;
    let files = format!("/sandboxes/{id}/files");

    let data: Vec<u8> = (0..(3 << 20))
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let put = server
        .put(&files)
        .query(&[("path", "data/blob.bin")])
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    let written: Value = put.json().unwrap();
    assert_eq!(written[0]["path"], "/home/user/data/blob.bin");
    let got = server
        .get(&files)
        .query(&[("path", "/home/user/data/blob.bin")])
        .send()
        .unwrap();
    assert_eq!(got.status(), 200);
    assert_eq!(got.bytes().unwrap().as_ref(), data.as_slice());
    // Written as the acting user.
    assert_eq!(sandbox.sh("stat -c %U /home/user/data/blob.bin").out(), "user\n");
    // A command's login shell picks its PATH without running `id` (a fork and an exec of a
    // dynamically linked program for every command).
    let traced = sandbox.sh("bash -l -x -c true 2>&1").out();
    assert!(traced.contains("PATH=") && !traced.contains("id -u"), "{traced}");
    // Under TCG the guest's CPU has no fast-string flags: with them, its kernel and libc copy
    // with `rep movsb`, which TCG runs a byte at a time.
    let cpuinfo = sandbox.sh("grep -m2 -E '^(model name|flags)' /proc/cpuinfo").out();
    if cpuinfo.contains("QEMU TCG CPU") {
        let flags: Vec<&str> = cpuinfo.split_whitespace().collect();
        assert!(
            flags.contains(&"avx2") && !flags.contains(&"erms") && !flags.contains(&"fsrm"),
            "{cpuinfo}"
        );
    }

    let listing: Value = server
        .get(&format!("{files}/list"))
        .query(&[("path", "/home/user"), ("depth", "2")])
        .send()
        .unwrap()
        .json()
        .unwrap();
    let paths: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    assert!(paths.contains(&"/home/user/data"));
    assert!(paths.contains(&"/home/user/data/blob.bin"));

    let missing = server.get(&files).query(&[("path", "/no/such/file")]).send().unwrap();
    assert_eq!(missing.status(), 404);
    let body: Value = missing.json().unwrap();
    assert!(body["message"].as_str().unwrap().contains("/no/such/file"));
    let no_path = server.get(&files).send().unwrap();
    assert_eq!(no_path.status(), 400);
    let denied = server.get(&files).query(&[("path", "/etc/shadow")]).send().unwrap();
    assert_eq!(denied.status(), 403);
    let as_root = server
        .get(&files)
        .query(&[("path", "/etc/shadow"), ("user", "root")])
        .send()
        .unwrap();
    assert_eq!(as_root.status(), 200);

    // `..` cannot climb out of the guest's root: the file lands in the guest's /tmp, never on the host.
    let marker = format!("escape-{id}.txt");
    let tricky = format!("../../../../../../tmp/{marker}");
    assert!(!std::path::Path::new("/tmp").join(&marker).exists());
    let put = server
        .put(&files)
        .query(&[("path", tricky.as_str())])
        .body("inside")
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(sandbox.sh(&format!("cat /tmp/{marker}")).out(), "inside");
    assert!(!std::path::Path::new("/tmp").join(&marker).exists());

    // Overwriting keeps the file whole; a directory cannot be overwritten by a file.
    let put = server.put(&files).query(&[("path", "data")]).body("x").send().unwrap();
    assert_eq!(put.status(), 400);
}

/// Calls an envd Connect unary method through the pass-through route.
#[test]
fn envd_services_stat_mkdir_move_remove_and_signals() {
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let id = &sandbox.id;

    let (status, made) = rpc(server, id, "filesystem.Filesystem/MakeDir", json!({ "path": "a/b/c" }));
    assert_eq!(status, 200, "{made}");
    assert_eq!(made["entry"]["type"], "FILE_TYPE_DIRECTORY");
    assert_eq!(made["entry"]["path"], "/home/user/a/b/c");
    let (status, again) = rpc(server, id, "filesystem.Filesystem/MakeDir", json!({ "path": "a/b/c" }));
    assert_eq!((status, again["code"].as_str()), (409, Some("already_exists")));

    sandbox.sh("printf hello > /home/user/a/f.txt");
    let (status, stat) = rpc(
        server,
        id,
        "filesystem.Filesystem/Stat",
        json!({ "path": "/home/user/a/f.txt" }),
    );
    assert_eq!(status, 200);
    assert_eq!(stat["entry"]["size"], "5");
    assert_eq!(stat["entry"]["owner"], "user");
    assert_eq!(stat["entry"]["permissions"], "-rw-r--r--");

    let (status, moved) = rpc(
        server,
        id,
        "filesystem.Filesystem/Move",
        json!({ "source": "a/f.txt", "destination": "a/b/g.txt" }),
    );
    assert_eq!(status, 200);
    assert_eq!(moved["entry"]["path"], "/home/user/a/b/g.txt");
    let (status, listing) = rpc(
        server,
        id,
        "filesystem.Filesystem/ListDir",
        json!({ "path": "a", "depth": 3 }),
    );
    assert_eq!(status, 200);
    let names: Vec<&str> = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["b", "c", "g.txt"]);

    let (status, _) = rpc(server, id, "filesystem.Filesystem/Remove", json!({ "path": "a" }));
    assert_eq!(status, 200);
    let (status, gone) = rpc(server, id, "filesystem.Filesystem/Stat", json!({ "path": "a" }));
    assert_eq!((status, gone["code"].as_str()), (404, Some("not_found")));
    let (status, _) = rpc(server, id, "filesystem.Filesystem/Remove", json!({ "path": "/root" }));
    assert_eq!(status, 403, "a user must not remove root's home");

    // A long-running process, listed, then killed with a signal.
    let handle = {
        let url = format!("{}/sandboxes/{id}/envd/process.Process/Start", server.url);
        let key = server.key.clone();
        let msg = json!({ "process": { "cmd": "/bin/sleep", "args": ["300"] }, "tag": "sleeper" }).to_string();
        let mut frame = vec![0u8];
        frame.extend((msg.len() as u32).to_be_bytes());
        frame.extend(msg.as_bytes());
        std::thread::spawn(move || {
            reqwest::blocking::Client::new()
                .post(url)
                .header("X-API-Key", key)
                .header("content-type", "application/connect+json")
                .body(frame)
                .send()
                .unwrap()
                .bytes()
                .unwrap()
        })
    };
    let mut pid = None;
    assert!(wait_until(Duration::from_secs(30), || {
        let (_, list) = rpc(server, id, "process.Process/List", json!({}));
        pid = list["processes"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["tag"] == "sleeper"))
            .and_then(|p| p["pid"].as_u64());
        pid.is_some()
    }));
    let (status, _) = rpc(
        server,
        id,
        "process.Process/SendSignal",
        json!({ "process": { "pid": pid }, "signal": "SIGNAL_SIGKILL" }),
    );
    assert_eq!(status, 200);
    let stream = handle.join().unwrap();
    let text = String::from_utf8_lossy(&stream);
    assert!(text.contains("\"start\""));
    assert!(text.contains("signal: killed"), "{text}");
    let (status, err) = rpc(
        server,
        id,
        "process.Process/SendSignal",
        json!({ "process": { "pid": 999999 }, "signal": "SIGNAL_SIGKILL" }),
    );
    assert_eq!((status, err["code"].as_str()), (404, Some("not_found")));

    // The host-only init route is not reachable from outside.
    let init = server
        .post(&format!("/sandboxes/{id}/envd/init"))
        .json(&json!({ "accessToken": "" }))
        .send()
        .unwrap();
    assert_eq!(init.status(), 404);
}

#[test]
fn sandbox_traffic_is_routed_by_header_or_host_name_with_the_clients_token() {
    let server = TestServer::shared();
    let (sandbox, token) = server.secure_sandbox();
    let id = sandbox.id.clone();
    let envd = |path: &str| {
        server
            .http
            .post(format!("{}{path}", server.url))
            .header("E2b-Sandbox-Id", &id)
            .header("E2b-Sandbox-Port", "49983")
            .header("content-type", "application/json")
    };
    let list = "/process.Process/List";
    // No API key is needed, but the sandbox's own token is: the server adds none.
    assert_eq!(envd(list).body("{}").send().unwrap().status(), 401);
    let listed = envd(list).header("X-Access-Token", &token).body("{}").send().unwrap();
    assert_eq!(listed.status(), 200, "{}", listed.text().unwrap());
    // The host's own routes are not reachable through the proxy.
    let init = envd("/init")
        .header("X-Access-Token", &token)
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(init.status(), 404);
    // `PORT-ID.DOMAIN` host names route the same way.
    let health = server
        .http
        .get(format!("{}/health", server.url))
        .header("Host", format!("49983-{id}.sandboxes.example"))
        .send()
        .unwrap();
    assert_eq!(health.status(), 204);
    assert!(health.headers().contains_key("x-envd-version"));
    // HTTP/2 without TLS (prior knowledge), as gRPC-style clients speak it.
    let h2c = std::process::Command::new("curl")
        .args(["-s", "--http2-prior-knowledge", "-w", "\n%{http_version}", "-H"])
        .arg(format!("E2b-Sandbox-Id: {id}"))
        .args([
            "-H",
            &format!("X-Access-Token: {token}"),
            "-H",
            "content-type: application/json",
        ])
        .args(["-d", r#"{"path":"/etc"}"#])
        .arg(format!("{}/filesystem.Filesystem/Stat", server.url))
        .output()
        .unwrap();
    let h2c = String::from_utf8_lossy(&h2c.stdout);
    assert!(h2c.contains("FILE_TYPE_DIRECTORY") && h2c.ends_with("\n2"), "{h2c}");
    // Unknown or stopped sandboxes answer 502, which the SDKs read as "not running".
    let gone = server
        .http
        .get(format!("{}/health", server.url))
        .header("E2b-Sandbox-Id", "nosuchsandbox")
        .send()
        .unwrap();
    assert_eq!(gone.status(), 502);
    assert!(gone.text().unwrap().contains("nosuchsandbox"));
}

#[test]
fn envd_speaks_binary_protobuf_unary_and_streaming() {
    use viv_proto::protobuf::{binary_to_json, json_to_binary, method_types};
    let server = TestServer::shared();
    let (sandbox, token) = server.secure_sandbox();
    let id = sandbox.id.clone();
    let call = |path: &str, content_type: &str, body: Vec<u8>| {
        server
            .http
            .post(format!("{}{path}", server.url))
            .header("E2b-Sandbox-Id", &id)
            .header("X-Access-Token", &token)
            .header("Connect-Protocol-Version", "1")
            .header("content-type", content_type)
            .body(body)
            .send()
            .unwrap()
    };

    // Unary: StatRequest in, StatResponse out, both binary.
    let (stat_in, stat_out) = method_types("/filesystem.Filesystem/Stat").unwrap();
    let request = json_to_binary(&stat_in, br#"{"path":"/etc"}"#).unwrap();
    let response = call("/filesystem.Filesystem/Stat", "application/proto", request);
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "application/proto");
    let stat: Value = serde_json::from_slice(&binary_to_json(&stat_out, &response.bytes().unwrap()).unwrap()).unwrap();
    assert_eq!(stat["entry"]["type"], "FILE_TYPE_DIRECTORY");

    // Errors stay JSON, as Connect has them for every codec.
    let missing = call(
        "/filesystem.Filesystem/Stat",
        "application/proto",
        json_to_binary(&stat_in, br#"{"path":"/no/such/file"}"#).unwrap(),
    );
    assert_eq!(missing.status(), 404);
    let error: Value = missing.json().unwrap();
    assert_eq!(error["code"], "not_found");

    // Server stream: an enveloped binary StartRequest, binary events back, a JSON end frame.
    let (start_in, start_out) = method_types("/process.Process/Start").unwrap();
    let start = json_to_binary(
        &start_in,
        br#"{"process":{"cmd":"/bin/sh","args":["-c","echo hi; exit 3"]}}"#,
    )
    .unwrap();
    let response = call(
        "/process.Process/Start",
        "application/connect+proto",
        viv_proto::envelope::encode(0, &start).to_vec(),
    );
    assert_eq!(response.headers()["content-type"], "application/connect+proto");
    let mut decoder = viv_proto::envelope::Decoder::default();
    decoder.push(&response.bytes().unwrap());
    let (mut stdout, mut exit_code, mut ended) = (String::new(), None, false);
    while let Some(frame) = decoder.next_frame().unwrap() {
        if frame.is_end() {
            ended = true;
            continue;
        }
        let event: Value = serde_json::from_slice(&binary_to_json(&start_out, &frame.data).unwrap()).unwrap();
        if let Some(data) = event["event"]["data"]["stdout"].as_str() {
            stdout
                .push_str(&String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).unwrap()).unwrap());
        }
        if let Some(code) = event["event"]["end"]["exitCode"].as_i64() {
            exit_code = Some(code);
        }
    }
    assert!(ended);
    assert_eq!(stdout, "hi\n");
    assert_eq!(exit_code, Some(3));
}
