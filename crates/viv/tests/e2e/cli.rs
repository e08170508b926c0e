//! The `viv` CLI: sandboxes, exec, files and keys, as a person at a terminal uses them.

use serde_json::Value;

use crate::fixture::{cli_in, cli_with, TestServer};

#[test]
fn cli_manages_sandboxes_runs_commands_and_moves_files() {
    let server = TestServer::shared();
    let created = server.cli(&[
        "sandbox",
        "create",
        "--timeout",
        "600",
        "-m",
        "who=cli",
        "-e",
        "COLOR=green",
        "--json",
    ]);
    assert_eq!(created.code, 0, "{created:?}");
    let created: Value = serde_json::from_str(&created.stdout).unwrap();
    let id = created["sandboxID"].as_str().unwrap().to_owned();
    assert!(created["envdAccessToken"].as_str().is_some());

    let table = server.cli(&["sandbox", "list", "-m", "who=cli"]);
    assert_eq!(table.code, 0);
    assert!(table.stdout.starts_with("ID "), "{}", table.stdout);
    assert!(table.stdout.contains(&id) && table.stdout.contains("running") && table.stdout.contains("who=cli"));
    let listed: Vec<Value> = serde_json::from_str(&server.cli(&["sandbox", "list", "--json"]).stdout).unwrap();
    assert!(listed.iter().any(|s| s["sandboxID"] == id.as_str()));
    let got: Value = serde_json::from_str(&server.cli(&["sandbox", "get", &id, "--json"]).stdout).unwrap();
    assert_eq!(got["metadata"]["who"], "cli");

    let run = server.cli(&["exec", &id, "--", "python3", "-c", "print(6*7)"]);
    assert_eq!((run.code, run.stdout.as_str()), (0, "42\n"));
    let env = server.cli(&["exec", "-s", &id, "--", "echo $COLOR; echo oops >&2; exit 3"]);
    assert_eq!(
        (env.code, env.stdout.as_str(), env.stderr.as_str()),
        (3, "green\n", "oops\n")
    );
    let missing = server.cli(&["exec", &id, "--", "no-such-program"]);
    assert_eq!(missing.code, 127, "{missing:?}");
    assert!(missing.stderr.contains("no-such-program"), "{}", missing.stderr);
    let as_root = server.cli(&["exec", "-u", "root", "-w", "/etc", &id, "--", "pwd"]);
    assert_eq!(as_root.stdout, "/etc\n");
    let piped = cli_with(
        &["exec", "-i", &id, "--", "wc", "-c"],
        &[("VIV_API_URL", &server.url), ("VIV_API_KEY", &server.key)],
        Some(&[7u8; 1000]),
    );
    assert_eq!(piped.stdout.trim(), "1000");

    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("in.bin");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&local, &bytes).unwrap();
    let put = server.cli(&["files", "put", &id, local.to_str().unwrap(), "cli/in.bin"]);
    assert_eq!(put.code, 0, "{put:?}");
    assert!(put.stdout.contains("/home/user/cli/in.bin"));
    let out = dir.path().join("out.bin");
    let get = server.cli(&["files", "get", &id, "cli/in.bin", out.to_str().unwrap()]);
    assert_eq!(get.code, 0, "{get:?}");
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    let ls = server.cli(&["files", "ls", &id, "cli"]);
    assert!(
        ls.stdout.contains("/home/user/cli/in.bin") && ls.stdout.contains("200000"),
        "{}",
        ls.stdout
    );
    let ls_json: Value = serde_json::from_str(&server.cli(&["files", "ls", &id, "cli", "--json"]).stdout).unwrap();
    assert_eq!(ls_json[0]["name"], "in.bin");
    let absent = server.cli(&["files", "get", &id, "/no/such"]);
    assert_eq!(absent.code, 1);
    assert!(absent.stderr.contains("HTTP 404"), "{}", absent.stderr);

    let kill = server.cli(&["sandbox", "kill", &id]);
    assert_eq!(kill.code, 0);
    let gone = server.cli(&["sandbox", "get", &id]);
    assert_eq!(gone.code, 1);
    assert!(gone.stderr.contains("not found"), "{}", gone.stderr);
}

#[test]
fn cli_reports_auth_and_connection_errors_and_manages_keys() {
    let server = TestServer::shared();
    let no_key = cli_with(&["sandbox", "list"], &[("VIV_API_URL", &server.url)], None);
    assert_eq!(no_key.code, 1);
    assert!(
        no_key.stderr.contains("HTTP 401") && no_key.stderr.contains("viv keys create"),
        "{}",
        no_key.stderr
    );
    let unreachable = cli_with(
        &["sandbox", "list"],
        &[("VIV_API_URL", "http://127.0.0.1:1"), ("VIV_API_KEY", "e2b_00")],
        None,
    );
    assert_eq!(unreachable.code, 1);
    assert!(unreachable.stderr.contains("cannot reach"), "{}", unreachable.stderr);

    let created: Value =
        serde_json::from_str(&cli_in(&server.data_dir, &["keys", "create", "--name", "temp", "--json"]).stdout)
            .unwrap();
    let key = created["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("e2b_") && key[4..].chars().all(|c| c.is_ascii_hexdigit()));
    let ok = cli_with(
        &["sandbox", "list"],
        &[("VIV_API_URL", &server.url), ("VIV_API_KEY", &key)],
        None,
    );
    assert_eq!(ok.code, 0);
    let listing = cli_in(&server.data_dir, &["keys", "list"]);
    assert!(listing.stdout.contains("temp"));
    assert!(!listing.stdout.contains(&key), "the key itself must never be listed");
    for file in ["vivarium.db", "vivarium.db-wal"] {
        let db = std::fs::read(server.data_dir.join(file)).unwrap_or_default();
        assert!(
            !db.windows(key.len()).any(|w| w == key.as_bytes()),
            "keys are stored hashed"
        );
    }
    let revoke = cli_in(&server.data_dir, &["keys", "revoke", created["id"].as_str().unwrap()]);
    assert_eq!(revoke.code, 0);
    let revoked = cli_with(
        &["sandbox", "list"],
        &[("VIV_API_URL", &server.url), ("VIV_API_KEY", &key)],
        None,
    );
    assert_eq!(revoked.code, 1);
    assert!(revoked.stderr.contains("HTTP 401"));
}
