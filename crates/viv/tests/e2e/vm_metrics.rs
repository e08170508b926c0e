//! Per-VM series on `GET /metrics`: a running VM's CPU time, resident memory and drive
//! counters with plausible values, its state gauge, a hung QEMU that cannot hold a scrape, and
//! the series gone once the VM stops.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::fixture::{unique, wait_until, TestServer};
use crate::vm_cloudinit::Console;
use crate::vm_console::add_iso;

fn scrape(server: &TestServer) -> String {
    let response = server.get("/metrics").send().unwrap();
    assert_eq!(response.status(), 200);
    response.text().unwrap()
}

/// The value of the sample `family{labels}`, if present.
fn sample(text: &str, family: &str, labels: &str) -> Option<f64> {
    let prefix = format!("{family}{{{labels}}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

/// Every sample of `family` whose labels start with `labels`.
fn samples(text: &str, family: &str, labels: &str) -> Vec<(String, f64)> {
    let prefix = format!("{family}{{{labels}");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (labels, value) = rest.rsplit_once(' ').unwrap();
            (labels.to_owned(), value.parse().unwrap())
        })
        .collect()
}

fn state_is(text: &str, vm: &str, state: &str) {
    for s in [
        "defined", "starting", "running", "paused", "stopping", "stopped", "crashed",
    ] {
        let labels = format!("{vm},state=\"{s}\"");
        assert_eq!(
            sample(text, "vivarium_vm_state", &labels),
            Some(if s == state { 1.0 } else { 0.0 }),
            "{labels}:\n{text}"
        );
    }
}

#[test]
fn a_running_vms_series_appear_rise_and_go_when_it_stops() {
    let server = TestServer::shared();
    let name = unique("metrics");
    let iso = format!("{name}-iso");
    add_iso(server, &iso);
    let created = server
        .post("/vms")
        .json(&json!({"name": name, "memoryMib": 256, "cdroms": [{"iso": iso}]}))
        .send()
        .unwrap();
    assert_eq!(created.status(), 201);
    let id = created.json::<Value>().unwrap()["id"].as_str().unwrap().to_owned();
    let vm = format!("vm=\"{id}\",name=\"{name}\"");

    let text = scrape(server);
    state_is(&text, &vm, "defined");
    assert!(sample(&text, "vivarium_vm_cpu_seconds_total", &vm).is_none(), "{text}");

    let started = server.post(&format!("/vms/{id}/start")).send().unwrap();
    assert!(started.status().is_success(), "start: {}", started.text().unwrap());
    let mut console = Console::open(server, &id);
    console.wait_for("VIVARIUM-ACPID-READY", 0, Duration::from_secs(300));

    let text = scrape(server);
    state_is(&text, &vm, "running");
    assert_eq!(sample(&text, "vivarium_vm_stats_up", &vm), Some(1.0), "{text}");
    let cpu = sample(&text, "vivarium_vm_cpu_seconds_total", &vm).expect("CPU seconds");
    assert!(cpu > 0.0, "{text}");
    let rss = sample(&text, "vivarium_vm_memory_rss_bytes", &vm).expect("RSS");
    assert!(
        rss > 16.0 * 1024.0 * 1024.0,
        "a booted guest's QEMU holds more than 16 MiB: {rss}"
    );
    // The firmware and grub read the kernel and initramfs from the CD.
    let read = sample(
        &text,
        "vivarium_vm_disk_read_bytes_total",
        &format!("{vm},disk=\"cd0\""),
    )
    .expect("cd0 reads");
    assert!(read > 1024.0 * 1024.0, "{read} bytes read from the boot CD:\n{text}");
    let ops = sample(&text, "vivarium_vm_disk_reads_total", &format!("{vm},disk=\"cd0\"")).expect("cd0 read ops");
    assert!(ops > 0.0, "{text}");
    assert!(
        samples(&text, "vivarium_vm_disk_written_bytes_total", &vm)
            .iter()
            .all(|(_, v)| *v == 0.0),
        "nothing writes to a CD:\n{text}"
    );
    assert!(text.contains("# TYPE vivarium_vm_cpu_seconds_total counter"), "{text}");

    // CPU time rises while the guest runs.
    assert!(
        wait_until(Duration::from_secs(60), || {
            sample(&scrape(server), "vivarium_vm_cpu_seconds_total", &vm).is_some_and(|now| now > cpu)
        }),
        "CPU seconds did not rise past {cpu}"
    );

    // A QEMU that does not answer (stopped with SIGSTOP) cannot hold a scrape.
    let pid = server
        .get(&format!("/vms/{id}"))
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap()["pid"]
        .as_i64()
        .expect("a running VM's pid") as i32;
    // SAFETY: kill with plain integers, on the QEMU process this test's VM runs.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let asked = Instant::now();
    let text = scrape(server);
    let took = asked.elapsed();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0);
    assert!(
        took < Duration::from_secs(10),
        "a scrape took {took:?} with a hung QEMU"
    );
    assert_eq!(sample(&text, "vivarium_vm_stats_up", &vm), Some(0.0), "{text}");
    assert!(sample(&text, "vivarium_vm_cpu_seconds_total", &vm).is_none(), "{text}");
    assert!(
        wait_until(Duration::from_secs(30), || {
            sample(&scrape(server), "vivarium_vm_stats_up", &vm) == Some(1.0)
        }),
        "the VM's statistics did not come back after SIGCONT"
    );

    // Paused: still running QEMU, so still series; the state gauge follows.
    assert!(server
        .post(&format!("/vms/{id}/pause"))
        .send()
        .unwrap()
        .status()
        .is_success());
    let text = scrape(server);
    state_is(&text, &vm, "paused");
    assert!(sample(&text, "vivarium_vm_memory_rss_bytes", &vm).is_some(), "{text}");
    assert!(server
        .post(&format!("/vms/{id}/resume"))
        .send()
        .unwrap()
        .status()
        .is_success());

    // Stopped: the state says so and every series of the VM is gone.
    let stopped = server.post(&format!("/vms/{id}/stop")).send().unwrap();
    assert!(stopped.status().is_success(), "stop: {}", stopped.text().unwrap());
    let text = scrape(server);
    state_is(&text, &vm, "stopped");
    for family in [
        "vivarium_vm_stats_up",
        "vivarium_vm_cpu_seconds_total",
        "vivarium_vm_memory_rss_bytes",
        "vivarium_vm_disk_read_bytes_total",
    ] {
        assert!(
            samples(&text, family, &vm).is_empty(),
            "{family} of a stopped VM:\n{text}"
        );
    }

    assert_eq!(server.delete(&format!("/vms/{id}")).send().unwrap().status(), 204);
    let text = scrape(server);
    assert!(
        !text.contains(&format!("vm=\"{id}\"")),
        "a deleted VM's series:\n{text}"
    );
}
