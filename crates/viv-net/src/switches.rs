//! VM switches on the host: a Linux bridge per switch, a dnsmasq per switch for DHCP (and DNS
//! on `nat` switches), one nftables table for all switches of a server, and tap devices that
//! attach VM NICs to the bridges.
//!
//! Names (KEY: the server's 6-character key, shared with the sandbox network, whose names are
//! `viv-KEY-N` namespaces, `vhKEYN` links and table `inet vivarium_KEY`):
//! - bridges `vsKEYN` (N: the switch's index in the store), taps `vtKEYN` (N chosen by the
//!   kernel; alias `viv:VM:NIC`, see [`tap_label`]), table `inet vivsw_KEY`, table `netdev
//!   vivnic_KEY` (a chain per tap whose guest's sending is limited), dnsmasq pid and lease files
//!   under `/run/vivarium/switches/KEY/`.
//!
//! Invariants:
//! - a tap is never persistent: it exists while a descriptor of it is open, that is while the
//!   QEMU it was handed to runs (the server closes its own copy after the launch), so a QEMU or
//!   server crash never leaves a tap behind;
//! - a tap's limits are set whole each time ([`SwitchHost::limit_tap`]), also when the tap is
//!   made, so a tap that got the name of a gone one never inherits its chain;
//! - the table is replaced in one transaction with every switch's rules whenever a switch is
//!   added, changed or removed; with no switch left it is deleted;
//! - [`SwitchHost::remove_unknown`] removes every bridge and dnsmasq of this key that the caller
//!   does not name (what a crashed server left), so a starting server owns exactly its store's
//!   switches.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::path::PathBuf;

use crate::policy::Cidr;
use crate::{link_names, output, run, NetError};

/// Where dnsmasq pid and lease files live, per key.
const RUN_DIR: &str = "/run/vivarium/switches";

/// What a switch forwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarding {
    /// Out of the host, masqueraded; replies back in.
    Nat,
    /// Nothing: VMs reach each other and the switch's DHCP server only.
    None,
    /// Out of the host and in, addresses kept.
    Routed,
}

/// A switch as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bridge {
    /// The bridge's name (see [`SwitchHost::bridge_name`]).
    pub name: String,
    /// Its subnet; the host has its first address.
    pub subnet: Cidr,
    /// What it forwards.
    pub forwarding: Forwarding,
    /// Whether its ports are isolated from each other.
    pub port_isolation: bool,
}

impl Bridge {
    /// The host's address on the bridge: the subnet's first.
    pub fn host_address(&self) -> Ipv4Addr {
        self.subnet.nth(1)
    }
}

/// The switches of one server (by its key) on the host.
#[derive(Debug, Clone)]
pub struct SwitchHost {
    key: String,
}

impl SwitchHost {
    /// The switches of the server with network key `key` (6 characters `[0-9a-z]`).
    pub fn new(key: &str) -> Self {
        Self { key: key.to_owned() }
    }

    /// The bridge of the switch with index `index`.
    pub fn bridge_name(&self, index: u32) -> String {
        format!("vs{}{index}", self.key)
    }

    fn table(&self) -> String {
        format!("vivsw_{}", self.key)
    }

    fn run_dir(&self) -> PathBuf {
        PathBuf::from(RUN_DIR).join(&self.key)
    }

    fn pid_file(&self, bridge: &str) -> PathBuf {
        self.run_dir().join(format!("{bridge}.pid"))
    }

    /// Bridges of this key on the host.
    fn our_bridges(&self) -> Vec<String> {
        let prefix = format!("vs{}", self.key);
        link_names()
            .unwrap_or_default()
            .into_iter()
            .filter(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
            })
            .collect()
    }

    /// Creates the bridge unless it exists (taps of VMs that outlived a server stay attached),
    /// gives it the host address alone, brings it up and enables IPv4 forwarding.
    pub fn ensure(&self, bridge: &Bridge) -> Result<(), NetError> {
        if !self.our_bridges().contains(&bridge.name) {
            run("ip", &["link", "add", &bridge.name, "type", "bridge"], None)?;
        }
        let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", bridge.name), "1");
        run("ip", &["-4", "addr", "flush", "dev", &bridge.name], None)?;
        let addr = format!("{}/{}", bridge.host_address(), bridge.subnet.prefix);
        run("ip", &["addr", "add", &addr, "dev", &bridge.name], None)?;
        run("ip", &["link", "set", &bridge.name, "up"], None)?;
        if bridge.forwarding != Forwarding::None {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").map_err(|source| NetError::Io {
                context: "enabling IPv4 forwarding (/proc/sys/net/ipv4/ip_forward)".into(),
                source,
            })?;
        }
        Ok(())
    }

    /// Sets the isolation of every port of `bridge` as it asks (taps of running VMs after an
    /// edit, or after a restart).
    pub fn set_port_isolation(&self, bridge: &Bridge) -> Result<(), NetError> {
        self.set_tap_isolation(&bridge.name, bridge.port_isolation)
    }

    /// Sets the isolation of this key's taps on `bridge` (any bridge: a bridged switch's
    /// uplink has ports that are not ours, which keep theirs).
    pub fn set_tap_isolation(&self, bridge: &str, isolated: bool) -> Result<(), NetError> {
        let ports = output("ip", &["-o", "link", "show", "master", bridge])?;
        let flag = if isolated { "on" } else { "off" };
        let ours = format!("vt{}", self.key);
        for port in ports.lines().filter_map(|l| l.split(':').nth(1)) {
            let port = port.trim().split('@').next().unwrap_or_default();
            if !port.starts_with(&ours) {
                continue;
            }
            run(
                "ip",
                &["link", "set", "dev", port, "type", "bridge_slave", "isolated", flag],
                None,
            )?;
        }
        Ok(())
    }

    /// Removes a bridge and its dnsmasq; what is gone already is no error.
    pub fn remove(&self, bridge: &str) {
        self.stop_dnsmasq(bridge);
        let _ = std::fs::remove_file(self.run_dir().join(format!("{bridge}.leases")));
        if self.our_bridges().iter().any(|b| b == bridge) {
            tracing::info!(bridge, "removing a switch bridge");
            let _ = run("ip", &["link", "del", bridge], None);
        }
    }

    /// Removes the bridges and dnsmasqs of this key but those of `known` (a crashed server's
    /// leftovers).
    pub fn remove_unknown(&self, known: &[String]) {
        let mut stale: Vec<String> = self.our_bridges().into_iter().filter(|b| !known.contains(b)).collect();
        for entry in std::fs::read_dir(self.run_dir()).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(bridge) = name.strip_suffix(".pid") {
                if !known.iter().any(|k| k == bridge) && !stale.iter().any(|s| s == bridge) {
                    stale.push(bridge.to_owned());
                }
            }
        }
        for bridge in stale {
            self.remove(&bridge);
        }
    }

    /// Removes every bridge, dnsmasq and the table of this key.
    pub fn remove_all(&self) {
        self.remove_unknown(&[]);
        let _ = run("nft", &["delete", "table", "inet", &self.table()], None);
        self.remove_limits_table();
        let _ = std::fs::remove_dir(self.run_dir());
    }

    /// Replaces the table with the rules of `bridges` (deletes it when there are none).
    pub fn load_rules(&self, bridges: &[Bridge]) -> Result<(), NetError> {
        let table = self.table();
        if bridges.is_empty() {
            delete_table("inet", &table)?;
            // No switch, no tap on one: the limits' chains are all stale.
            self.remove_limits_table();
            return Ok(());
        }
        run(
            "nft",
            &["-f", "-"],
            Some(&rules(&table, &format!("vs{}", self.key), bridges)),
        )
    }

    /// (Re)starts the dnsmasq of `bridge`: DHCP on it, and on `nat` and `routed` switches DNS (forwarding to
    /// the host's resolvers) with the host as gateway.
    pub fn start_dnsmasq(&self, bridge: &Bridge) -> Result<(), NetError> {
        self.stop_dnsmasq(&bridge.name);
        let dir = self.run_dir();
        std::fs::create_dir_all(&dir).map_err(|source| NetError::Io {
            context: format!("creating {}", dir.display()),
            source,
        })?;
        let host = bridge.host_address();
        let last = bridge.subnet.nth((bridge.subnet.size() - 2) as u32);
        let mask = Ipv4Addr::from(u32::MAX << (32 - u32::from(bridge.subnet.prefix)));
        let mut args = vec![
            "--conf-file=/dev/null".to_owned(),
            "--no-hosts".to_owned(),
            "--bind-interfaces".to_owned(),
            "--except-interface=lo".to_owned(),
            format!("--interface={}", bridge.name),
            format!("--listen-address={host}"),
            format!("--pid-file={}", self.pid_file(&bridge.name).display()),
            format!(
                "--dhcp-leasefile={}",
                dir.join(format!("{}.leases", bridge.name)).display()
            ),
            format!("--dhcp-range={},{last},{mask},1h", bridge.subnet.nth(2)),
            "--dhcp-authoritative".to_owned(),
            "--dhcp-no-override".to_owned(),
        ];
        if bridge.forwarding == Forwarding::None {
            // No DNS service, no gateway, no name server: the guests configure only their address.
            args.extend([
                "--port=0".to_owned(),
                "--dhcp-option=3".to_owned(),
                "--dhcp-option=6".to_owned(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("dnsmasq", &args, None).map_err(|e| match e {
            NetError::MissingTool { source, .. } => NetError::MissingTool {
                tool: "dnsmasq",
                package: "dnsmasq-base",
                source,
            },
            other => other,
        })
    }

    /// Ends the dnsmasq of `bridge` (by its pid file, checked against its command line).
    pub fn stop_dnsmasq(&self, bridge: &str) {
        let path = self.pid_file(bridge);
        let pid = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok());
        if let Some(pid) = pid {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            if cmdline.starts_with("dnsmasq") && cmdline.contains(&format!("--interface={bridge}\0")) {
                // SAFETY: kill has no memory preconditions; the pid is a dnsmasq of this bridge.
                unsafe { libc::kill(pid, libc::SIGTERM) };
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while std::path::Path::new(&format!("/proc/{pid}")).exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
            }
        }
        let _ = std::fs::remove_file(&path);
    }

    /// Creates a tap on `bridge` (its ports isolated when `isolated`) and returns its
    /// descriptor, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, and its name. The tap goes away
    /// when the last copy of the descriptor is closed. `label` (at most [`MAX_LABEL`] bytes,
    /// see [`tap_label`]) becomes the tap's alias, by which [`SwitchHost::find_tap`] finds it
    /// again, from this server or the next.
    pub fn open_tap(
        &self,
        bridge: &str,
        isolated: bool,
        limits: TapRules,
        label: &str,
    ) -> Result<(OwnedFd, String), NetError> {
        let io = |context: &str| {
            let context = context.to_owned();
            move |source| NetError::Io { context, source }
        };
        let tun = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .map_err(io("opening /dev/net/tun"))?;
        // SAFETY: an all-zero ifreq is valid; the name and flags are set below.
        let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
        let pattern = format!("vt{}%d", self.key);
        for (slot, byte) in request.ifr_name.iter_mut().zip(pattern.bytes()) {
            *slot = byte as libc::c_char;
        }
        request.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which lives across the call.
        if unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut request) } != 0 {
            return Err(io("creating a tap device")(std::io::Error::last_os_error()));
        }
        let name: String = request
            .ifr_name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        run("ip", &["link", "set", "dev", &name, "alias", label], None)?;
        self.attach_tap(&name, bridge, isolated)?;
        run("ip", &["link", "set", &name, "up"], None)?;
        self.limit_tap(&name, &limits)?;
        Ok((OwnedFd::from(tun), name))
    }

    /// Puts tap `tap` on `bridge` (off the one it was on), its port isolated when `isolated`.
    pub fn attach_tap(&self, tap: &str, bridge: &str, isolated: bool) -> Result<(), NetError> {
        run("ip", &["link", "set", "dev", tap, "master", bridge], None)?;
        let flag = if isolated { "on" } else { "off" };
        run(
            "ip",
            &["link", "set", "dev", tap, "type", "bridge_slave", "isolated", flag],
            None,
        )
    }

    /// The tap of this key whose alias is `label`, if one exists.
    pub fn find_tap(&self, label: &str) -> Option<String> {
        let prefix = format!("vt{}", self.key);
        link_names().unwrap_or_default().into_iter().find(|name| {
            name.starts_with(&prefix)
                && std::fs::read_to_string(format!("/sys/class/net/{name}/ifalias"))
                    .is_ok_and(|alias| alias.trim_end() == label)
        })
    }
}

impl SwitchHost {
    /// The netdev table of this key's tap chains (one chain per limited tap, named after it).
    fn limits_table(&self) -> String {
        format!("vivnic_{}", self.key)
    }

    /// Puts `limits` on tap `tap`, replacing any it had, so that a tap's limits and firewall
    /// change at once and a new tap that got the name of a gone one never inherits them.
    pub fn limit_tap(&self, tap: &str, limits: &TapRules) -> Result<(), NetError> {
        // Removing what is absent fails; that is the common case, not an error.
        let _ = run("tc", &["qdisc", "del", "dev", tap, "root"], None);
        if let Some(kbps) = limits.into_guest {
            // A burst of 10 ms at the rate (at least 4 KiB), a queue of 200 ms.
            let burst = burst_bytes(kbps, 100).to_string();
            let rate = format!("{kbps}kbit");
            let args = [
                "qdisc", "add", "dev", tap, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "200ms",
            ];
            run("tc", &args, None)?;
        }
        // The chain is created (if absent) and deleted in one transaction, then made again
        // with the limit and the firewall when there are any: the limit first (it counts all
        // the guest sends), then what is allowed, what is denied.
        let table = self.limits_table();
        let chain = format!(
            "add chain netdev {table} {tap} {{ type filter hook ingress device \"{tap}\" priority 0; policy accept; }}\n"
        );
        let mut script = format!("add table netdev {table}\n{chain}delete chain netdev {table} {tap}\n");
        let filtered = !limits.allow_out.is_empty() || !limits.deny_out.is_empty();
        if limits.from_guest.is_some() || filtered {
            script.push_str(&chain);
        }
        if let Some(kbps) = limits.from_guest {
            // A policer drops rather than queues, so its bucket holds more: 50 ms at the rate,
            // enough for a TCP sender's window to settle near the rate instead of far below.
            let bytes_per_second = u64::from(kbps) * 1000 / 8;
            let burst = burst_bytes(kbps, 20);
            let _ = writeln!(
                script,
                "add rule netdev {table} {tap} limit rate over {bytes_per_second} bytes/second burst {burst} bytes drop"
            );
        }
        if filtered {
            let _ = writeln!(script, "add rule netdev {table} {tap} udp dport 67 accept");
            for cidr in &limits.allow_out {
                let _ = writeln!(script, "add rule netdev {table} {tap} ip daddr {cidr} accept");
            }
            for cidr in &limits.deny_out {
                let _ = writeln!(script, "add rule netdev {table} {tap} ip daddr {cidr} drop");
            }
        }
        run("nft", &["-f", "-"], Some(&script))
    }

    fn remove_limits_table(&self) {
        let _ = delete_table("netdev", &self.limits_table());
    }
}

/// Deletes nftables table `family name` if it exists.
fn delete_table(family: &str, name: &str) -> Result<(), NetError> {
    let listed = output("nft", &["list", "tables"])?;
    if listed.lines().any(|l| l.trim() == format!("table {family} {name}")) {
        run("nft", &["delete", "table", family, name], None)?;
    }
    Ok(())
}

/// Longest tap label: what the kernel keeps of an interface alias is far longer, but a label
/// names a VM and a NIC, no more.
pub const MAX_LABEL: usize = 64;

/// The label of NIC `nic` of VM `vm` (ids of `[0-9a-z-]`).
pub fn tap_label(vm: &str, nic: &str) -> String {
    let mut label = format!("viv:{vm}:{nic}");
    label.truncate(MAX_LABEL);
    label
}

/// What a tap lets through: rate limits (kbit/s, from the guest's side) and a firewall on what
/// the guest sends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapRules {
    /// What the guest receives: the tap's egress, shaped by tc's token bucket (packets wait).
    pub into_guest: Option<u32>,
    /// What the guest sends: the tap's ingress, policed by an nftables `limit` in a netdev
    /// chain of the tap (packets over the rate are dropped, which TCP senders take as
    /// congestion). Not tc's police action: kernels built without tc actions are common.
    pub from_guest: Option<u32>,
    /// Destinations the guest may send to whatever `deny_out` says (checked first).
    pub allow_out: Vec<Cidr>,
    /// Destinations the guest may not send to. DHCP and ARP always pass; an empty list with an
    /// empty `allow_out` filters nothing.
    pub deny_out: Vec<Cidr>,
}

/// A token bucket of 1/`per_second` s at `kbps` kbit/s, at least 4 KiB.
fn burst_bytes(kbps: u32, per_second: u64) -> u64 {
    (u64::from(kbps) * 1000 / 8 / per_second).max(4096)
}

/// Whether `name` is a Linux bridge on the host.
pub fn is_bridge(name: &str) -> bool {
    !name.contains('/')
        && std::path::Path::new("/sys/class/net")
            .join(name)
            .join("bridge")
            .is_dir()
}

/// The host's IPv4 routes of its main table but the default route and those through links named
/// `skip*`: destination and device.
pub fn host_routes(skip: &str) -> Vec<(Cidr, String)> {
    output("ip", &["-4", "route", "show"])
        .unwrap_or_default()
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let dest = words.next()?;
            let dev = line
                .split_whitespace()
                .skip_while(|w| *w != "dev")
                .nth(1)
                .unwrap_or_default();
            if dest == "default" || dev.starts_with(skip) {
                return None;
            }
            let cidr = if dest.contains('/') {
                dest.parse().ok()?
            } else {
                format!("{dest}/32").parse().ok()?
            };
            Some((cidr, dev.to_owned()))
        })
        .collect()
}

/// The table `table` for `bridges` (all named `prefix*`).
fn rules(table: &str, prefix: &str, bridges: &[Bridge]) -> String {
    let ours = format!("\"{prefix}*\"");
    let mut input = String::new();
    let mut forward = String::new();
    let mut nat = String::new();
    for b in bridges {
        let name = &b.name;
        let host = b.host_address();
        // The host answers DHCP on every switch, DNS and ping on nat and routed switches; nothing
        // else is opened towards it from a switch.
        let _ = writeln!(input, "    iifname \"{name}\" udp dport 67 accept");
        // Bridged frames between ports pass the IP hooks when br_netfilter is loaded: they stay
        // on the switch and are no forwarding of ours.
        let _ = writeln!(forward, "    iifname \"{name}\" oifname \"{name}\" accept");
        if b.forwarding != Forwarding::None {
            let _ = writeln!(input, "    iifname \"{name}\" ip daddr {host} udp dport 53 accept");
            let _ = writeln!(input, "    iifname \"{name}\" ip daddr {host} tcp dport 53 accept");
            let _ = writeln!(
                input,
                "    iifname \"{name}\" ip daddr {host} icmp type echo-request accept"
            );
            // Out of the host, never into another switch.
            let _ = writeln!(forward, "    iifname \"{name}\" oifname {ours} drop");
            let _ = writeln!(forward, "    iifname \"{name}\" ip saddr {} accept", b.subnet);
        }
        match b.forwarding {
            Forwarding::Nat => {
                let _ = writeln!(forward, "    oifname \"{name}\" ct state established,related accept");
                let _ = writeln!(nat, "    ip saddr {} oifname != \"{name}\" masquerade", b.subnet);
            }
            // In from anywhere but another switch, to the switch's addresses.
            Forwarding::Routed => {
                let _ = writeln!(forward, "    iifname {ours} oifname \"{name}\" drop");
                let _ = writeln!(forward, "    oifname \"{name}\" ip daddr {} accept", b.subnet);
            }
            Forwarding::None => {}
        }
        let _ = writeln!(forward, "    iifname \"{name}\" drop");
        let _ = writeln!(forward, "    oifname \"{name}\" drop");
    }
    format!(
        "table inet {table}
delete table inet {table}
table inet {table} {{
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname {ours} ct state established,related accept
{input}    iifname {ours} drop
  }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
{forward}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
{nat}  }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_masquerade_nat_switches_and_route_routed_ones() {
        let bridges = [
            Bridge {
                name: "vsabc1230".into(),
                subnet: "10.250.1.0/24".parse().unwrap(),
                forwarding: Forwarding::Nat,
                port_isolation: false,
            },
            Bridge {
                name: "vsabc1231".into(),
                subnet: "10.250.2.0/24".parse().unwrap(),
                forwarding: Forwarding::None,
                port_isolation: true,
            },
            Bridge {
                name: "vsabc1232".into(),
                subnet: "10.250.3.0/24".parse().unwrap(),
                forwarding: Forwarding::Routed,
                port_isolation: false,
            },
        ];
        let text = rules("vivsw_abc123", "vsabc123", &bridges);
        // Routed: both ways, no translation, not from another switch.
        assert!(
            text.contains("oifname \"vsabc1232\" ip daddr 10.250.3.0/24 accept"),
            "{text}"
        );
        assert!(
            text.contains("iifname \"vsabc1232\" ip saddr 10.250.3.0/24 accept"),
            "{text}"
        );
        assert!(!text.contains("10.250.3.0/24 oifname"), "{text}");
        let from_switches = text.find("iifname \"vsabc123*\" oifname \"vsabc1232\" drop").unwrap();
        assert!(
            from_switches < text.find("ip daddr 10.250.3.0/24 accept").unwrap(),
            "{text}"
        );
        assert!(text.contains("ip saddr 10.250.1.0/24 oifname != \"vsabc1230\" masquerade"));
        assert!(!text.contains("10.250.2.0/24 oifname"), "{text}");
        assert!(text.contains("iifname \"vsabc1231\" drop"));
        assert!(text.contains("ip daddr 10.250.1.1 udp dport 53 accept"));
        assert!(!text.contains("ip daddr 10.250.2.1 udp dport 53"));
    }
}
