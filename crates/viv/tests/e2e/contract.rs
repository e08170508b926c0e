//! The API keeps the contract of its OpenAPI document for input schemathesis found mishandled:
//! every error is a JSON `{code, message}` body with the right status (query, path and method
//! errors included), shapes beyond the host are refused with its limits (which the served
//! document states), JSON bodies and nested objects must be objects, egress lists are checked
//! whole, the envd pass-through only reaches envd's routes, and template snapshots of the many
//! VM shapes clients may ask for do not fill the host's memory.

use serde_json::{json, Value};

use crate::fixture::TestServer;

/// Asserts a JSON error body with this status and a message containing `needle`.
fn assert_error(response: reqwest::blocking::Response, status: u16, needle: &str) {
    assert_eq!(response.status(), status, "{response:?}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/json"), "{content_type}");
    let body: Value = response.json().unwrap();
    assert_eq!(body["code"], status, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains(needle), "'{needle}' not in '{message}'");
}

#[test]
fn query_path_and_method_errors_are_json_errors() {
    let server = TestServer::shared();
    // axum's own rejections were plain text.
    assert_error(server.get("/v2/sandboxes?limit=null").send().unwrap(), 400, "limit");
    assert_error(
        server.get("/sandboxes/x/files/list?path=a&depth=null").send().unwrap(),
        400,
        "depth",
    );
    assert_error(
        server.get("/sandboxes/x/files/list?path=a&depth=0").send().unwrap(),
        400,
        "depth must be between 1 and 64",
    );
    // States are exact names, as the document's pattern says.
    assert_error(
        server.get("/v2/sandboxes?state=%20running").send().unwrap(),
        400,
        "unknown state",
    );
    assert_eq!(
        server
            .get("/v2/sandboxes?state=running,paused")
            .send()
            .unwrap()
            .status(),
        200
    );
    assert_eq!(server.get("/v2/sandboxes?state=").send().unwrap().status(), 200);
    // A method a route does not have: 405 with an Allow header and a JSON body.
    let patch = server
        .http
        .patch(format!("{}/sandboxes", server.url))
        .header("X-API-Key", &server.key)
        .send()
        .unwrap();
    let allow = patch.headers()["allow"].to_str().unwrap().to_owned();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_error(patch, 405, "PATCH is not allowed on /sandboxes");
    // Template limits from the query are whole numbers in range, not truncated to 32 bits.
    assert_error(
        server
            .post("/templates?name=big&cpuCount=4294967297")
            .body(Vec::new())
            .send()
            .unwrap(),
        400,
        "cpuCount",
    );
}

#[test]
fn shapes_beyond_the_host_are_refused_with_its_limits() {
    let server = TestServer::shared();
    let cpus = std::thread::available_parallelism().unwrap().get();
    // 64 vCPUs under TCG on a small host panicked the guest's kernel while its template booted
    // (a 502 after a minute); 65535 MiB made QEMU fail to map guest memory (a 502).
    let vcpus = server
        .post("/sandboxes")
        .json(&json!({ "cpuCount": 64 }))
        .send()
        .unwrap();
    assert_error(vcpus, 400, &format!("between 1 and {cpus} (the CPUs of this host)"));
    let memory = server
        .post("/v2/sandboxes")
        .json(&json!({ "memoryMB": 65535 }))
        .send()
        .unwrap();
    assert_error(memory, 400, "what this host can give one sandbox");
    let build = server
        .post("/templates")
        .json(&json!({ "name": "huge", "spec": "FROM base", "memoryMB": 65536 }))
        .send()
        .unwrap();
    assert_error(build, 400, "memoryMB");
    // A name no template could have is a template that does not exist; `base` stays.
    assert_error(server.get("/templates/%C3%B3%1A").send().unwrap(), 404, "not found");
    let odd = server
        .post("/sandboxes")
        .json(&json!({ "templateID": "Bad/Name" }))
        .send()
        .unwrap();
    assert_error(odd, 404, "template 'Bad/Name' not found");
    assert_error(
        server.delete("/templates/base").send().unwrap(),
        409,
        "cannot be deleted",
    );
    // The served document states the same limits.
    let doc = server.get("/openapi.yaml").send().unwrap().text().unwrap();
    assert!(doc.contains(&format!("maximum: {cpus} # host: max vCPUs")), "{doc}");
    let memory_max: u32 = doc
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_suffix(" # host: max memory")?
                .strip_prefix("maximum: ")?
                .parse()
                .ok()
        })
        .unwrap();
    assert!((128..65536).contains(&memory_max), "{memory_max}");
    let over = server
        .post("/sandboxes")
        .json(&json!({ "memoryMB": memory_max + 1 }))
        .send()
        .unwrap();
    assert_error(over, 400, &format!("between 128 and {memory_max}"));
}

#[test]
fn bodies_and_nested_objects_must_be_objects() {
    let server = TestServer::shared();
    // serde reads a struct from an array of its fields: `network: [null, null]` created a
    // sandbox, and so would a body `[...]`.
    let nested = server
        .post("/sandboxes")
        .json(&json!({ "network": [null, null] }))
        .send()
        .unwrap();
    assert_error(nested, 400, "expected an object");
    let array = server.post("/sandboxes").json(&json!(["base", 300])).send().unwrap();
    assert_error(array, 400, "expected an object");
    let timeout = server.post("/sandboxes/x/timeout").json(&json!([60])).send().unwrap();
    assert_error(timeout, 400, "expected an object");
    let connect = server.post("/sandboxes/x/connect").json(&json!([60])).send().unwrap();
    assert_error(connect, 400, "expected an object");
    // A body of whitespace is not JSON (it was taken for no body).
    let blank = server
        .post("/sandboxes/x/connect")
        .header("content-type", "application/json")
        .body("\n")
        .send()
        .unwrap();
    assert_error(blank, 400, "invalid JSON body");
    // DNS servers are checked even when no allowed domain uses them (they were stored as given).
    let dns = server
        .put("/sandboxes/x/network")
        .json(&json!({ "dnsServers": ["dns.example"] }))
        .send()
        .unwrap();
    assert_error(dns, 400, "network.dnsServers");
}

#[test]
fn envd_pass_through_reaches_only_envd_routes() {
    let server = TestServer::shared();
    // Anything but envd's services and files is refused before the sandbox is looked up.
    for route in [
        "0",
        "init",
        "build/copy",
        "tunnel",
        "metrics",
        "process.Process/",
        "other.Service/Call",
    ] {
        let response = server.post(&format!("/sandboxes/x/envd/{route}")).send().unwrap();
        assert_error(response, 404, "route");
    }
    let delete = server.delete("/sandboxes/x/envd/files").send().unwrap();
    assert_error(delete, 405, "DELETE is not allowed");
    // Connect calls are POSTs (a GET reached the agent, whose 405 the document did not allow).
    let get = server
        .get("/sandboxes/x/envd/filesystem.Filesystem/ListDir")
        .send()
        .unwrap();
    assert_eq!(get.headers()["allow"], "POST");
    assert_error(get, 405, "GET is not allowed");
    // A method envd's services lack: the agent's empty 404 becomes a JSON error.
    let sandbox = server.sandbox();
    let missing = server
        .post(&format!("/sandboxes/{}/envd/process.Process/Nope", sandbox.id))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_error(missing, 404, "the sandbox's agent answered 404");
    let list = server
        .post(&format!("/sandboxes/{}/envd/process.Process/List", sandbox.id))
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(list.status(), 200);
}

#[test]
fn template_snapshot_memory_is_a_bounded_cache() {
    // Every VM shape has a template snapshot whose memory stays on tmpfs: a fuzzer asking for
    // shape after shape filled the host's memory. With a budget of 1 MiB only the newest stays.
    let server = TestServer::start_with_env(0, &[], &[("VIV_TEMPLATE_MEMORY_MIB", "1")]);
    let memory_files = || -> Vec<String> {
        std::fs::read_dir(crate::fixture::shm_dir(&server.data_dir).join("templates"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.ends_with(".mem"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let first = server.sandbox_with(json!({ "memoryMB": 256, "timeout": 600 }));
    let kept = memory_files();
    assert_eq!(kept.len(), 1, "{kept:?}");
    let second = server.sandbox_with(json!({ "memoryMB": 288, "timeout": 600 }));
    let now = memory_files();
    assert_eq!(now.len(), 1, "the older shape's memory is dropped: {now:?}");
    assert_ne!(now, kept);
    // Sandboxes restored from a dropped snapshot keep running; a new one of its shape saves it
    // again.
    assert_eq!(first.sh("echo first").out(), "first\n");
    let third = server.sandbox_with(json!({ "memoryMB": 256, "timeout": 600 }));
    assert_eq!(third.sh("echo third").out(), "third\n");
    assert_eq!(second.sh("echo second").out(), "second\n");
    assert_eq!(memory_files().len(), 1);
}

#[test]
fn requests_racing_a_pause_get_the_sandboxes_state_not_a_502() {
    // A pause hangs up the agent and stops the VM under requests in flight: they answered 502
    // ("agent channel: http2 error"), as if the VM had failed. Found with sandboxes whose
    // one-second timeout auto-paused them while requests ran.
    let server = TestServer::shared();
    let sandbox = server.sandbox();
    let metrics = format!("/sandboxes/{}/metrics", sandbox.id);
    let mut seen = Vec::new();
    for _ in 0..3 {
        let stop = std::sync::atomic::AtomicBool::new(false);
        let statuses = std::thread::scope(|scope| {
            let pollers: Vec<_> = (0..2)
                .map(|_| {
                    scope.spawn(|| {
                        let mut statuses = Vec::new();
                        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                            let response = server.get(&metrics).send().unwrap();
                            let status = response.status().as_u16();
                            statuses.push((status, response.text().unwrap()));
                        }
                        statuses
                    })
                })
                .collect();
            std::thread::sleep(std::time::Duration::from_millis(300));
            let pause = server.post(&format!("/sandboxes/{}/pause", sandbox.id)).send().unwrap();
            assert_eq!(pause.status(), 204, "{}", pause.text().unwrap());
            std::thread::sleep(std::time::Duration::from_millis(200));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
            pollers.into_iter().flat_map(|p| p.join().unwrap()).collect::<Vec<_>>()
        });
        seen.extend(statuses);
        let resume = server
            .post(&format!("/sandboxes/{}/connect", sandbox.id))
            .send()
            .unwrap();
        assert_eq!(resume.status(), 201, "{}", resume.text().unwrap());
    }
    let failed: Vec<_> = seen.iter().filter(|(status, _)| *status >= 500).collect();
    assert!(failed.is_empty(), "requests during a pause failed: {failed:?}");
    assert!(seen.iter().any(|(status, _)| *status == 200));
    assert!(
        seen.iter().any(|(status, _)| *status == 409),
        "no request saw the pause: {seen:?}"
    );
}
