//! Sandbox networking in the `isolated` mode (a network namespace, tap and veth pair per
//! sandbox), with real packets: a "web host" in a network namespace the test creates stands in
//! for the internet (nothing leaves the machine but package downloads from the registries).

use std::io::Read as _;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::fixture::{network_resources, wait_until, ExecResult, Sandbox, TestServer};

fn sh(script: &str) {
    let status = Command::new("sh").args(["-c", script]).status().unwrap();
    assert!(status.success(), "`{script}` failed");
}

/// An HTTP server (port 80) and a TLS listener recording ClientHellos (port 443) on
/// 198.51.100.2 and .3, in a namespace linked to the host.
struct WebHost {
    dir: tempfile::TempDir,
    servers: Vec<Child>,
}

const WEB_NETNS: &str = "vivtest-web";
const WEB_LINK: &str = "vtweb0";

/// Accepts connections and appends the first bytes of each (a ClientHello names its server) to
/// the file given as the first argument.
const TLS_RECORDER: &str = r#"
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 443)); s.listen(16)
while True:
    c, _ = s.accept(); c.settimeout(5)
    try: data = c.recv(4096)
    except Exception: data = b""
    with open(sys.argv[1], "ab") as f: f.write(data + b"\n")
    c.close()
"#;

impl WebHost {
    fn start() -> Self {
        let _ = Command::new("ip").args(["netns", "del", WEB_NETNS]).status();
        let _ = Command::new("ip").args(["link", "del", WEB_LINK]).status();
        sh(&format!(
            "ip netns add {WEB_NETNS} && ip link add {WEB_LINK} type veth peer name eth0 netns {WEB_NETNS} \
             && ip addr add 198.51.100.1/24 dev {WEB_LINK} && ip link set {WEB_LINK} up \
             && ip -n {WEB_NETNS} addr add 198.51.100.2/24 dev eth0 && ip -n {WEB_NETNS} addr add 198.51.100.3/24 dev eth0 \
             && ip -n {WEB_NETNS} link set eth0 up && ip -n {WEB_NETNS} link set lo up"
        ));
        let dir = tempfile::tempdir().unwrap();
        let http_log = std::fs::File::create(dir.path().join("http.log")).unwrap();
        let in_netns = |args: &[&str]| {
            let mut command = Command::new("ip");
            command
                .args(["netns", "exec", WEB_NETNS])
                .args(args)
                .stdout(Stdio::null());
            command
        };
        let servers = vec![
            in_netns(&["python3", "-m", "http.server", "80", "--directory"])
                .arg(dir.path())
                .stderr(http_log)
                .spawn()
                .unwrap(),
            in_netns(&["python3", "-c", TLS_RECORDER])
                .arg(dir.path().join("tls.log"))
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        ];
        let web = Self { dir, servers };
        for port in [80, 443] {
            assert!(
                wait_until(Duration::from_secs(20), || std::net::TcpStream::connect((
                    "198.51.100.2",
                    port
                ))
                .is_ok()),
                "the web host's port {port} did not open"
            );
        }
        web
    }

    fn log(&self, name: &str) -> String {
        String::from_utf8_lossy(&std::fs::read(self.dir.path().join(name)).unwrap_or_default()).into_owned()
    }
}

impl Drop for WebHost {
    fn drop(&mut self) {
        for server in &mut self.servers {
            let _ = server.kill();
            let _ = server.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", WEB_NETNS]).status();
        let _ = Command::new("ip").args(["link", "del", WEB_LINK]).status();
    }
}

/// The HTTP status a sandbox gets for `url` with curl (`000`: no connection).
fn http_status(sandbox: &Sandbox<'_>, url: &str, host: Option<&str>) -> String {
    let header = host.map(|h| format!("-H 'Host: {h}'")).unwrap_or_default();
    let result = sandbox.sh(&format!("curl -s -m 4 -o /dev/null -w '%{{http_code}}' {header} {url}"));
    result.out()
}

/// Sends a TLS ClientHello naming `name` to the web host.
fn tls_hello(sandbox: &Sandbox<'_>, name: &str) -> ExecResult {
    sandbox.sh(&format!(
        "python3 -c \"import socket, ssl\ntry:\n  s = socket.create_connection(('198.51.100.2', 443), timeout=4)\n  ssl.create_default_context().wrap_socket(s, server_hostname='{name}')\nexcept Exception as e:\n  print(type(e).__name__)\""
    ))
}

#[test]
fn isolated_sandboxes_follow_their_allow_and_deny_rules() {
    let web = WebHost::start();
    let server = TestServer::start_isolated(1);

    // Internet on, one address and one name denied.
    let a = server.sandbox_with(json!({ "timeout": 300, "network": { "denyOut": ["198.51.100.3", "denied.test"] } }));
    assert_eq!(http_status(&a, "http://198.51.100.2/a-open", None), "404");
    // (A policy naming domains sends web traffic to the egress proxy, which answers 403.)
    assert_eq!(http_status(&a, "http://198.51.100.3/a-denied-address", None), "403");
    assert_eq!(
        http_status(&a, "http://198.51.100.2/a-denied-name", Some("denied.test")),
        "403"
    );
    assert_eq!(
        http_status(&a, "http://198.51.100.2/a-other-name", Some("other.test")),
        "404"
    );
    // A denied address stays denied on other ports too.
    assert_eq!(http_status(&a, "http://198.51.100.3:8080/", None), "000");

    // Internet off except one name: the web host is reached only when asked for by that name,
    // over HTTP (Host) and TLS (SNI); DNS answers nothing else.
    let b = server.sandbox_with(
        json!({ "timeout": 300, "allow_internet_access": false, "network": { "allowOut": ["allowed.test"] } }),
    );
    assert_eq!(
        http_status(&b, "http://198.51.100.2/b-allowed", Some("allowed.test")),
        "404"
    );
    assert_eq!(
        http_status(&b, "http://198.51.100.2/b-other", Some("other.test")),
        "403"
    );
    assert_eq!(http_status(&b, "http://198.51.100.2/b-address", None), "403");
    assert_eq!(http_status(&b, "http://198.51.100.2:8080/", None), "000");
    tls_hello(&b, "allowed.test");
    tls_hello(&b, "other.test");
    let lookup = b.sh("getent hosts deb.debian.org || echo refused");
    assert_eq!(lookup.out(), "refused\n", "{lookup:?}");
    assert_eq!(b.sh("echo files work > /tmp/f && cat /tmp/f").out(), "files work\n");

    // E2B's update replaces the rules: everything open now, at once.
    let response = server
        .put(&format!("/sandboxes/{}/network", b.id))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().unwrap());
    assert_eq!(
        http_status(&b, "http://198.51.100.2/b-after-update", Some("other.test")),
        "404"
    );
    let info: Value = server
        .get(&format!("/sandboxes/{}", b.id))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(info["allowInternetAccess"], true, "{info}");

    // Rules of a paused sandbox change for its resume, which gets a fresh slot.
    let paused = server.post(&format!("/sandboxes/{}/pause", b.id)).send().unwrap();
    assert_eq!(paused.status(), 204);
    let response = server
        .put(&format!("/sandboxes/{}/network", b.id))
        .json(&json!({ "denyOut": ["other.test"] }))
        .send()
        .unwrap();
    assert_eq!(response.status(), 204, "{}", response.text().unwrap());
    let resumed = server.post(&format!("/sandboxes/{}/connect", b.id)).send().unwrap();
    assert_eq!(resumed.status(), 201);
    assert_eq!(
        http_status(&b, "http://198.51.100.2/b-resumed-other", Some("other.test")),
        "403"
    );
    assert_eq!(
        http_status(&b, "http://198.51.100.2/b-resumed", Some("allowed.test")),
        "404"
    );

    let http = web.log("http.log");
    for reached in [
        "/a-open",
        "/a-other-name",
        "/b-allowed",
        "/b-after-update",
        "/b-resumed",
    ] {
        assert!(http.contains(reached), "{reached} missing from {http}");
    }
    for refused in [
        "/a-denied-address",
        "/a-denied-name",
        "/b-other",
        "/b-address",
        "/b-resumed-other",
    ] {
        assert!(!http.contains(refused), "{refused} reached the web host: {http}");
    }
    let tls = web.log("tls.log");
    assert!(
        tls.contains("allowed.test"),
        "the allowed ClientHello did not arrive: {tls:?}"
    );
    assert!(!tls.contains("other.test"), "a refused ClientHello arrived: {tls:?}");

    // Bad rules are refused with the list named; unsupported E2B options are refused.
    let bad = server
        .post("/sandboxes")
        .json(&json!({ "network": { "allowOut": ["not a host!"] } }))
        .send()
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().unwrap().contains("allowOut"));
    let proxy = server
        .post("/sandboxes")
        .json(&json!({ "network": { "egressProxy": { "address": "p:1080" } } }))
        .send()
        .unwrap();
    assert_eq!(proxy.status(), 400);
    let missing = server.put("/sandboxes/nope/network").json(&json!({})).send().unwrap();
    assert_eq!(missing.status(), 404);
}

/// Listens on `addr` and counts the connections it accepts.
fn counting_listener(addr: &str) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind(addr).unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let counter = count.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = stream.read(&mut [0; 64]);
        }
    });
    (port, count)
}

/// The host's IPv4 addresses, with the link each is on.
fn host_addresses() -> Vec<(String, String)> {
    let out = Command::new("ip").args(["-o", "-4", "addr", "show"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            // "2: eth0    inet 192.0.2.2/24 brd ..."
            let fields: Vec<&str> = l.split_whitespace().collect();
            let at = fields.iter().position(|f| *f == "inet")?;
            Some((fields[1].to_owned(), fields[at + 1].split('/').next()?.to_owned()))
        })
        .collect()
}

/// Tries TCP connections to every `HOST:PORT` of its argument at once; prints those that
/// connect, then `done`.
const CONNECT_ALL: &str = r#"
import socket, sys, threading
def probe(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        print("REACHED", target, flush=True)
    except OSError:
        pass
threads = [threading.Thread(target=probe, args=(t,)) for t in sys.argv[1].split()]
for t in threads: t.start()
for t in threads: t.join()
print("done")
"#;

#[test]
fn isolated_sandboxes_reach_registries_but_not_the_host_or_each_other() {
    let server = TestServer::start_isolated(1);
    let (loopback_port, loopback_hits) = counting_listener("127.0.0.1:0");
    let (any_port, any_hits) = counting_listener("0.0.0.0:0");

    let b = server.sandbox_with(json!({ "timeout": 300 }));
    b.sh("setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 &");
    assert!(
        wait_until(Duration::from_secs(20), || http_status(
            &b,
            "http://127.0.0.1:8000/",
            None
        ) == "200"),
        "B's server did not start"
    );

    let a = server.sandbox_with(json!({ "timeout": 300 }));
    let mut targets: Vec<String> = vec![
        format!("10.0.2.2:{loopback_port}"),
        format!("10.0.2.2:{any_port}"),
        format!("10.0.2.3:{any_port}"),
        "169.254.169.254:80".into(),
    ];
    for (_, addr) in host_addresses() {
        targets.push(format!("{addr}:{any_port}"));
        targets.push(format!("{addr}:{loopback_port}"));
    }
    // Every address of the server's pool (the host's and the namespaces' ends, B's included).
    let prefix = pool_prefix(&server);
    targets.extend((1..255).map(|i| format!("{prefix}.{i}:8000")));
    let probe = a.server.exec(
        &a.id,
        json!({ "argv": ["python3", "-c", CONNECT_ALL, targets.join(" ")] }),
    );
    assert_eq!(probe.out(), "done\n", "{probe:?}");
    assert_eq!(loopback_hits.load(Ordering::SeqCst), 0);
    assert_eq!(any_hits.load(Ordering::SeqCst), 0);

    // The registries are reachable, by name.
    let pip = a.sh("python3 -m pip download -q --no-deps -d /tmp/pkgs six && ls /tmp/pkgs");
    assert_eq!(pip.exit_code, Some(0), "{pip:?}");
    assert!(pip.out().starts_with("six-"), "{pip:?}");
    let apt = a.server.exec(
        &a.id,
        json!({ "command": "apt-get update -q 2>&1 | tail -1", "user": "root" }),
    );
    assert_eq!(apt.exit_code, Some(0), "{apt:?}");
    assert!(apt.out().contains("Reading package lists"), "{apt:?}");

    // Forks of one snapshot each get a fresh slot and reach the network at once.
    let forks: Vec<Value> = server
        .post(&format!("/sandboxes/{}/fork", a.id))
        .json(&json!({ "count": 2, "timeout": 300 }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let children: Vec<Sandbox<'_>> = forks
        .iter()
        .map(|f| Sandbox {
            server: &server,
            id: f["sandbox"]["sandboxID"].as_str().expect("fork started").to_owned(),
        })
        .collect();
    let fetched: Vec<String> = std::thread::scope(|scope| {
        let running: Vec<_> = children
            .iter()
            .map(|c| scope.spawn(move || c.sh(crate::network::RELEASE).out()))
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    });
    assert!(fetched.iter().all(|f| f == "Codename: bookworm\n"), "{fetched:?}");
}

/// The first three octets of the server's /24 pool, read from its links' addresses.
fn pool_prefix(server: &TestServer) -> String {
    let links = format!("vh{}", crate::fixture::host_key(&server.data_dir));
    host_addresses()
        .into_iter()
        .filter(|(link, _)| link.starts_with(&links))
        .find_map(|(_, addr)| Some(addr.rsplit_once('.')?.0.to_owned()))
        .expect("the server has a link")
}

#[test]
fn isolated_slots_are_reclaimed_after_kills_and_crashes() {
    let temp = tempfile::Builder::new().prefix("viv-e2e-").tempdir().unwrap();
    // One spare slot made ahead: a namespace and a link besides the sandboxes'.
    let options = [
        "--network",
        "isolated",
        "--net-pool",
        "10.239.0.0/24",
        "--net-spares",
        "1",
    ];
    let server = TestServer::start_on_with(temp.path(), &options);
    let resources_become = |count: usize| {
        wait_until(Duration::from_secs(10), || {
            network_resources(temp.path()).len() == count
        });
        let found = network_resources(temp.path());
        assert_eq!(found.len(), count, "{found:?}");
    };
    let key = crate::fixture::host_key(temp.path());
    let table = || {
        let out = Command::new("nft")
            .args(["list", "table", "inet", &format!("vivarium_{key}")])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules_before = table();
    assert!(rules_before.contains("masquerade"), "{rules_before}");
    let cycles: usize = std::env::var("VIV_NET_CYCLES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(200);
    for i in 0..cycles {
        let id = server.create(json!({ "timeout": 120, "metadata": { "cycle": i.to_string() } }));
        let killed = server.delete(&format!("/sandboxes/{id}")).send().unwrap();
        assert_eq!(killed.status(), 204);
    }
    // A kill frees the slot before it returns.
    let health: Value = server.get("/health").send().unwrap().json().unwrap();
    assert_eq!(health["networkSlots"], 0, "{health}");
    // Only the host table and the spare remain.
    resources_become(3);
    assert_eq!(table(), rules_before, "the host table changed");

    // A crash leaves namespaces behind: the sandbox's and the spare made after it took one.
    let _running = server.create(json!({ "timeout": 120 }));
    resources_become(5);
    server.stop(libc::SIGKILL);
    // Its VM runs on, so a server of another data directory leaves its slot alone; the spare,
    // whose tap no VM holds, goes.
    drop(TestServer::start_isolated(0));
    let found = network_resources(temp.path());
    assert_eq!(found.len(), 3, "{found:?}");
    // Once that VM is gone too, any server that starts removes them (the crashed server's lock
    // is free), even one of another data directory; the one of the same directory finds
    // nothing left.
    for pid in crate::fixture::qemu_processes_under(temp.path()) {
        // SAFETY: plain kill of a QEMU this test's server started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    assert!(wait_until(Duration::from_secs(10), || {
        crate::fixture::qemu_processes_under(temp.path()).is_empty()
    }));
    // A lock file of a server that left no resources (older servers kept theirs) goes too.
    let locks = std::path::Path::new("/run/vivarium/net");
    let stale = locks.join(format!("stale-{key}.lock"));
    std::fs::write(&stale, "").unwrap();
    drop(TestServer::start_isolated(0));
    assert!(
        network_resources(temp.path()).is_empty(),
        "{:?}",
        network_resources(temp.path())
    );
    assert!(
        !locks.join(format!("{key}.lock")).exists(),
        "the crashed server's lock file stays"
    );
    assert!(!stale.exists(), "a stale lock file stays");
    let restarted = TestServer::start_on_with(temp.path(), &options);
    resources_become(3);
    {
        let again = restarted.sandbox_with(json!({ "timeout": 120 }));
        assert_eq!(again.sh("echo ok").out(), "ok\n");
    }
    // Stopping checks that nothing is left (namespaces, links and the table included).
    drop(restarted);
    assert!(network_resources(temp.path()).is_empty());
    assert!(
        !locks.join(format!("{key}.lock")).exists(),
        "a stopped server's lock file stays"
    );
    crate::fixture::remove_template_memory(temp.path());
}
