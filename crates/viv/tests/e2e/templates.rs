//! Template builds from specs: steps run in a VM with their output streamed, layers are cached
//! by content, sandboxes start from the snapshot with the start command running, and failures
//! name the line and leave nothing behind.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{wait_until, TestServer};

const SPEC: &str = r#"# a web app
FROM base
ENV APP_HOME=/srv/app GREETING="hello world"
WORKDIR $APP_HOME
COPY app/ ./
COPY --chown=user:user notes.txt /home/user/notes.txt
RUN echo "built by $(id -un)" > built.txt && chmod 755 run.sh && echo step-output-marker
USER user
CMD ["python3", "-m", "http.server", "8000"]
HEALTHCHECK --interval=200ms CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/')"
"#;

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

/// Posts a spec without a context and returns the build's events.
fn build_json(server: &TestServer, body: Value) -> (u16, Vec<Value>, String) {
    let response = server.post("/templates").json(&body).send().unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap();
    let events = if status == 200 {
        text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    } else {
        Vec::new()
    };
    (status, events, text)
}

#[test]
fn templates_build_from_specs_with_cached_layers_and_start_running() {
    let server = TestServer::start();
    let context = tempfile::tempdir().unwrap();
    let dir = context.path();
    std::fs::create_dir_all(dir.join("app")).unwrap();
    std::fs::write(dir.join("app/run.sh"), "echo first version\n").unwrap();
    std::fs::write(dir.join("notes.txt"), "my notes\n").unwrap();
    std::fs::write(dir.join("Dockerfile"), SPEC).unwrap();
    let dir_arg = dir.to_str().unwrap();

    let built = server.cli(&["template", "build", dir_arg, "--name", "web"]);
    assert_eq!(built.code, 0, "{built:?}");
    assert!(built.stderr.contains("Step 1/6 (line 3): ENV"), "{}", built.stderr);
    assert!(built.stderr.contains("Built template web"), "{}", built.stderr);
    assert!(
        built.stdout.contains("step-output-marker"),
        "RUN output is streamed: {built:?}"
    );
    let info: Value = server.get("/templates/web").send().unwrap().json().unwrap();
    assert_eq!(info["kind"], "built");
    assert_eq!(info["from"], "base");
    assert_eq!(info["layers"], 4, "{info}");
    assert_eq!(info["envVars"]["GREETING"], "hello world");
    let layers = files_in(&server.data_dir.join("layers"));
    assert_eq!(layers.len(), 4, "{layers:?}");

    // A sandbox of the template: files, owner, environment, and the start command serving.
    let id = server.create(json!({ "templateID": "web", "timeout": 600 }));
    let run = server.exec(
        &id,
        json!({ "command": "echo $GREETING; cat /srv/app/built.txt; stat -c %U /home/user/notes.txt; curl -s localhost:8000/run.sh" }),
    );
    assert_eq!(run.exit_code, Some(0), "{run:?}");
    assert_eq!(run.out(), "hello world\nbuilt by root\nuser\necho first version\n");
    let overridden = server.create(json!({ "templateID": "web", "envVars": { "GREETING": "hi" } }));
    assert_eq!(
        server.exec(&overridden, json!({ "command": "echo $GREETING" })).out(),
        "hi\n"
    );

    // Unchanged: nothing is rebuilt.
    let again = server.cli(&["template", "build", dir_arg, "--name", "web"]);
    assert_eq!(again.code, 0, "{again:?}");
    assert_eq!(again.stderr.matches("(cached)").count(), 6, "{}", again.stderr);
    assert!(again.stderr.contains("nothing to rebuild"), "{}", again.stderr);
    assert_eq!(files_in(&server.data_dir.join("layers")), layers);

    // Deleting a template in use is refused.
    let in_use = server.delete("/templates/web").send().unwrap();
    assert_eq!(in_use.status(), 409);
    assert!(in_use.text().unwrap().contains(&id));
    for sandbox in [&id, &overridden] {
        assert_eq!(
            server.delete(&format!("/sandboxes/{sandbox}")).send().unwrap().status(),
            204
        );
    }

    // A changed COPY source: the steps before it are cached, it and the later ones rebuild; the
    // first build stays as a version until deleted, then its own layers are collected (the
    // WORKDIR layer stays: the new version uses it).
    let first_version = {
        let info: Value = server.get("/templates/web").send().unwrap().json().unwrap();
        info["versionID"].as_str().unwrap().to_owned()
    };
    std::fs::write(dir.join("app/run.sh"), "echo second version\n").unwrap();
    let changed = server.cli(&["template", "build", dir_arg, "--name", "web"]);
    assert_eq!(changed.code, 0, "{changed:?}");
    assert!(
        changed.stderr.contains("Step 2/6 (line 4): WORKDIR $APP_HOME (cached)"),
        "{}",
        changed.stderr
    );
    assert!(
        changed.stderr.contains("Step 3/6 (line 5): COPY app/ ./\n"),
        "{}",
        changed.stderr
    );
    assert!(!changed.stderr.contains("Step 5/6 (line 7): RUN echo \"built by $(id -un)\" > built.txt && chmod 755 run.sh && echo step-output-marker (cached)"));
    assert_eq!(files_in(&server.data_dir.join("layers")).len(), 7);
    let deleted = server
        .delete(&format!("/templates/web/versions/{first_version}"))
        .send()
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let new_layers = files_in(&server.data_dir.join("layers"));
    assert_eq!(new_layers.len(), 4, "{new_layers:?}");
    let kept = new_layers.iter().filter(|l| layers.contains(l)).count();
    assert_eq!(kept, 1, "{layers:?} {new_layers:?}");
    let id = server.create(json!({ "templateID": "web" }));
    assert_eq!(
        server
            .exec(&id, json!({ "command": "curl -s localhost:8000/run.sh" }))
            .out(),
        "echo second version\n"
    );
    assert_eq!(server.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);

    // Deleted: its layers and snapshots go; the listing keeps `base`.
    let deleted = server.cli(&["template", "delete", "web"]);
    assert_eq!(deleted.code, 0, "{deleted:?}");
    assert!(files_in(&server.data_dir.join("layers")).is_empty());
    assert_eq!(server.get("/templates/web").send().unwrap().status(), 404);
    let listed = server.cli(&["template", "list", "--json"]);
    let listed: Vec<Value> = serde_json::from_str(&listed.stdout).unwrap();
    assert!(listed.iter().any(|t| t["templateID"] == "base"));
    assert!(listed.iter().all(|t| t["templateID"] != "web"));
}

#[test]
fn template_build_failures_name_the_line_and_leave_nothing_behind() {
    let server = TestServer::start();
    let nothing_left = |what: &str| {
        assert!(
            wait_until(Duration::from_secs(10), || server.qemu_processes().is_empty()),
            "{what}: a build VM is still running"
        );
        assert!(
            files_in(&server.data_dir.join("layers")).is_empty(),
            "{what}: layers left"
        );
        assert!(
            files_in(&server.data_dir.join("templates")).is_empty(),
            "{what}: snapshots left"
        );
        assert_eq!(server.get("/templates/bad").send().unwrap().status(), 404, "{what}");
    };

    // Syntax errors are refused before anything runs, naming the line.
    let (status, _, text) = build_json(
        &server,
        json!({ "name": "bad", "spec": "FROM base\nRUN true\nRUNN false\n" }),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("line 3: unknown instruction 'RUNN'"), "{text}");
    let (status, _, text) = build_json(&server, json!({ "name": "bad", "spec": "FROM debian:12\n" }));
    assert_eq!(status, 400);
    assert!(text.contains("FROM 'debian:12'"), "{text}");
    let (status, _, text) = build_json(&server, json!({ "name": "bad", "spec": "FROM base\nCOPY a /a\n" }));
    assert_eq!(status, 400);
    assert!(text.contains("line 2: COPY needs a build context"), "{text}");
    let (status, _, _) = build_json(&server, json!({ "name": "Bad Name", "spec": "FROM base\n" }));
    assert_eq!(status, 400);
    let (status, _, _) = build_json(&server, json!({ "name": "base", "spec": "FROM base\n" }));
    assert_eq!(status, 409);

    // A failing RUN: the build fails with that step's line, output and exit code.
    let (status, events, text) = build_json(
        &server,
        json!({ "name": "bad", "spec": "FROM base\nRUN echo one > /one\nRUN echo to-stderr >&2; exit 7\nRUN echo never\n" }),
    );
    assert_eq!(status, 200, "{text}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert_eq!(last["line"], 3);
    assert_eq!(last["exitCode"], 7);
    assert!(last["message"].as_str().unwrap().contains("to-stderr"), "{last}");
    assert!(!text.contains("RUN echo never"), "no step runs after a failure");
    nothing_left("failed RUN");

    // The time limit stops a build and cleans up the same way.
    let (_, events, text) = build_json(
        &server,
        json!({ "name": "bad", "spec": "FROM base\nRUN touch /x\nRUN sleep 120\n", "timeout": 15 }),
    );
    let last = events.last().unwrap();
    assert_eq!(last["type"], "error", "{text}");
    assert!(
        last["message"].as_str().unwrap().contains("time limit of 15 s"),
        "{last}"
    );
    assert_eq!(last["line"], 3);
    nothing_left("timed-out build");

    // A start command that fails before it is ready fails the build.
    let (_, events, text) = build_json(
        &server,
        json!({ "name": "bad", "spec": "FROM base\nCMD echo crashing; exit 3\nHEALTHCHECK CMD false\n" }),
    );
    let last = events.last().unwrap();
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("exited with code 3 before the template was ready"),
        "{text}"
    );
    assert!(
        text.contains("crashing"),
        "the start command's output is streamed: {text}"
    );
    nothing_left("failed start command");
}

#[test]
fn servers_sharing_a_layer_cache_reuse_each_others_layers_even_from_failed_builds() {
    let cache = tempfile::tempdir().unwrap();
    let cache_arg = cache.path().to_str().unwrap();
    // A nonce makes this run's keys new, whatever earlier runs left in other caches.
    let nonce = format!(
        "{:x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let first = TestServer::start_with_env(0, &["--layer-cache-dir", cache_arg], &[]);

    // A build that fails at its third step still leaves its first two layers in the cache.
    let failing = format!(
        "FROM base\nENV NONCE={nonce}\nRUN echo first-marker > /first\nRUN echo second-marker > /second\nRUN exit 3\n"
    );
    let (status, events, text) = build_json(&first, json!({ "name": "cached", "spec": failing }));
    assert_eq!(status, 200, "{text}");
    assert_eq!(events.last().unwrap()["type"], "error", "{text}");
    assert!(
        files_in(&first.data_dir.join("layers")).is_empty(),
        "the data directory keeps nothing"
    );
    assert_eq!(files_in(cache.path()).len(), 2, "{:?}", files_in(cache.path()));
    drop(first);

    // Another server (another data directory) builds the fixed spec: the two steps come from the
    // cache (no output, marked cached), the new one runs, and sandboxes see all three.
    let second = TestServer::start_with_env(0, &["--layer-cache-dir", cache_arg], &[]);
    let fixed = format!("FROM base\nENV NONCE={nonce}\nRUN echo first-marker > /first\nRUN echo second-marker > /second\nRUN echo third-marker > /third\n");
    let (status, events, text) = build_json(&second, json!({ "name": "cached", "spec": fixed }));
    assert_eq!(status, 200, "{text}");
    assert_eq!(events.last().unwrap()["type"], "done", "{text}");
    let cached: Vec<bool> = events
        .iter()
        .filter(|e| e["type"] == "step")
        .map(|e| e["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached, [true, true, true, false], "{text}");
    assert_eq!(files_in(cache.path()).len(), 3, "the new layer is offered too");
    let id = second.create(json!({ "templateID": "cached" }));
    let run = second.exec(&id, json!({ "command": "cat /first /second /third" }));
    assert_eq!(run.out(), "first-marker\nsecond-marker\nthird-marker\n", "{run:?}");
    assert_eq!(second.delete(&format!("/sandboxes/{id}")).send().unwrap().status(), 204);
}

/// Bytes of a `/proc/PID/smaps_rollup` field given in kB.
fn smaps_bytes(pid: u32, field: &str) -> u64 {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    rollup
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        << 10
}

/// Asserts that sandbox `id`'s QEMU, after its guest ran, reads template memory through 2 MiB
/// entries of its private mapping.
fn assert_template_mapped_in_2_mib_pages(server: &TestServer, id: &str) {
    let qemu = crate::fixture::qemu_of(&server.data_dir, id);
    let pmd = smaps_bytes(qemu, "ShmemPmdMapped");
    assert!(
        pmd >= 2 << 20,
        "no template memory mapped through 2 MiB pages: ShmemPmdMapped {pmd}"
    );
}

/// The template memory file of the server of `data_dir` (it has one template snapshot) and
/// whether all its pages are allocated.
fn template_memory(data_dir: &Path) -> (std::path::PathBuf, bool) {
    use std::os::unix::fs::MetadataExt as _;
    let templates = crate::fixture::shm_dir(data_dir).join("templates");
    let memory = std::fs::read_dir(&templates)
        .unwrap()
        .flatten()
        .find(|e| e.path().extension().is_some_and(|x| x == "mem"))
        .expect("a template memory file")
        .path();
    let meta = std::fs::metadata(&memory).unwrap();
    (memory, meta.blocks() * 512 == meta.len())
}

#[test]
fn sandboxes_map_their_templates_memory_through_2_mib_pages_and_save_it_whole() {
    // A fresh data directory, so the template snapshot is saved by this build of the server.
    let server = TestServer::start();
    let sandbox = server.sandbox();
    let written = sandbox.sh("head -c 4M /dev/urandom > /dev/shm/kept && sha256sum /dev/shm/kept");
    assert_eq!(written.exit_code, Some(0), "{}", written.err());
    assert_template_mapped_in_2_mib_pages(&server, &sandbox.id);
    // The template's memory file on tmpfs has no holes left.
    let (memory, whole) = template_memory(&server.data_dir);
    assert!(whole, "{} still has holes", memory.display());

    // Its first pause reads all of it; what the guest wrote comes back after the resume.
    let paused = server
        .post(&format!("/sandboxes/{}/pause", sandbox.id))
        .json(&json!({ "keepWarm": false }))
        .send()
        .unwrap();
    assert_eq!(paused.status().as_u16(), 204, "{}", paused.text().unwrap_or_default());
    server.resume(&sandbox.id, "after the first pause");
    let read = sandbox.sh("sha256sum /dev/shm/kept");
    assert_eq!(read.out(), written.out(), "the guest's file changed across the pause");
}

#[test]
fn a_template_snapshot_an_earlier_server_left_in_4_kib_pages_is_collapsed_when_next_used() {
    let dir = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
    {
        // A server that leaves template memory as QEMU wrote it, as servers before this did.
        let old = TestServer::start_on_with_env(dir.path(), &[("VIV_TEMPLATE_HUGE_PAGES", "0")]);
        let sandbox = old.sandbox();
        assert_eq!(sandbox.sh("true").exit_code, Some(0));
        let (memory, whole) = template_memory(dir.path());
        assert!(
            !whole,
            "{} has no holes: it was not left as QEMU wrote it",
            memory.display()
        );
    }
    let server = TestServer::start_on(dir.path(), None);
    let first = server.sandbox();
    assert_eq!(first.sh("true").exit_code, Some(0));
    assert!(
        wait_until(Duration::from_secs(60), || template_memory(dir.path()).1),
        "the snapshot's memory file kept its holes"
    );
    // Sandboxes started after the collapse map it through 2 MiB entries.
    let next = server.sandbox();
    let listed = next.sh("ls /usr/bin | wc -l");
    assert_eq!(listed.exit_code, Some(0), "{}", listed.err());
    assert_template_mapped_in_2_mib_pages(&server, &next.id);
    drop((first, next));
    drop(server);
    crate::fixture::remove_template_memory(dir.path());
}
