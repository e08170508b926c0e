//! nftables rule sets: one table in the host's namespace per server, one in every sandbox's
//! namespace.
//!
//! The host table is the same for the server's whole life (no per-sandbox rules, so nothing can
//! leak there): sandbox links may reach the host only at the DNS forwarder and egress proxy, no
//! connection may be opened towards a sandbox link (other sandboxes, the host), and sandbox
//! addresses are masqueraded on the way out. Each sandbox's own table holds its policy; it goes
//! away with the namespace.

use std::fmt::Write as _;
use std::net::Ipv4Addr;

use crate::policy::{special_ranges, Cidr, Policy};

/// The tap device QEMU opens in a sandbox's namespace.
pub const TAP: &str = "tap0";
/// The namespace's end of the veth pair.
pub const UPLINK: &str = "eth0";
/// The gateway address the guest sees (on the tap device).
pub const GUEST_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
/// The MAC address of the guest's gateway (the tap device), fixed so that restored and forked
/// guests, whose ARP caches survive, reach their new slot's gateway.
pub const GATEWAY_MAC: &str = "52:54:00:12:34:02";
/// The DNS server address the guest sees (redirected to the host's forwarder).
pub const GUEST_DNS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 3);
/// The guest's address (the same in every sandbox, so snapshots and forks keep it).
pub const GUEST_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// The port of the agent's data path in the guest (envd's port, `viv_proto::ENVD_PORT`): the
/// host connects to it from the namespace for file transfers.
pub const AGENT_DATA_PORT: u16 = 49983;
/// The port the sandbox's egress proxy listens on inside its namespace (web connections are
/// redirected there; it must be in the namespace for `SO_ORIGINAL_DST` to see the redirect).
pub const PROXY_PORT: u16 = 15001;

/// Where a sandbox's namespace finds the server's network services.
#[derive(Debug, Clone, Copy)]
pub struct Services {
    /// The host's end of this sandbox's veth pair.
    pub host: Ipv4Addr,
    /// UDP port of the DNS forwarder.
    pub dns_port: u16,
}

/// An anonymous nftables set of the blocks, without blocks inside others (nftables refuses
/// overlapping intervals).
fn set(cidrs: &[Cidr]) -> String {
    let mut sorted = cidrs.to_vec();
    sorted.sort_by_key(|c| (c.prefix, c.network));
    let mut kept: Vec<Cidr> = Vec::new();
    for c in sorted {
        if !kept.iter().any(|k| k.contains(c.network)) {
            kept.push(c);
        }
    }
    kept.sort_by_key(|c| c.network);
    let items: Vec<String> = kept.iter().map(Cidr::to_string).collect();
    format!("{{ {} }}", items.join(", "))
}

/// The host table `table_name` for links named `link_prefix*` with addresses from `pool`.
pub fn host_table(table_name: &str, link_prefix: &str, pool: Cidr, dns_port: u16) -> String {
    let links = format!("\"{link_prefix}*\"");
    // Creating, deleting and creating again makes the load idempotent (an old table from a
    // crashed server is replaced atomically).
    format!(
        "table inet {table_name}
delete table inet {table_name}
table inet {table_name} {{
  chain input {{
    type filter hook input priority filter - 1; policy accept;
    iifname {links} ct state established,related accept
    iifname {links} udp dport {dns_port} accept
    iifname {links} drop
  }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    oifname {links} ct state established,related accept
    oifname {links} drop
    iifname {links} ip daddr {pool} drop
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {pool} oifname != {links} masquerade
  }}
}}
"
    )
}

/// The table inside a sandbox's namespace enforcing `policy`. `pool` is the server's address
/// pool (never reachable: other sandboxes and the host live there).
pub fn sandbox_table(policy: &Policy, services: Services, pool: Cidr) -> String {
    let Services { host, dns_port } = services;
    let special: Vec<Cidr> = special_ranges().collect();
    let mut t = String::new();
    // Replacing the table in one transaction: no moment without rules.
    let _ = writeln!(t, "table inet viv\ndelete table inet viv\ntable inet viv {{");
    let _ = writeln!(
        t,
        "  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    iifname \"{TAP}\" ip daddr {GUEST_DNS} udp dport 53 dnat ip to {host}:{dns_port}"
    );
    if policy.has_domains() {
        // Web connections whose address alone does not decide go to the proxy, which reads the
        // name they ask for.
        let mut line = format!("    iifname \"{TAP}\" tcp dport {{ 80, 443 }}");
        if !policy.allow_cidrs.is_empty() {
            let _ = write!(line, " ip daddr != {}", set(&policy.allow_cidrs));
        }
        let _ = write!(line, " ip daddr != {} redirect to :{PROXY_PORT}", set(&special));
        let _ = writeln!(t, "{line}");
    }
    let _ = writeln!(t, "  }}");
    let _ = writeln!(
        t,
        "  chain input {{\n    type filter hook input priority filter; policy accept;\n    iifname \"{TAP}\" tcp dport {PROXY_PORT} ct status dnat accept\n    iifname \"{TAP}\" ip saddr {GUEST_ADDRESS} tcp sport {AGENT_DATA_PORT} ct state established accept\n    iifname \"{TAP}\" drop\n  }}"
    );
    let _ = writeln!(
        t,
        "  chain forward {{\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept"
    );
    let _ = writeln!(t, "    iifname \"{TAP}\" ip daddr {host} udp dport {dns_port} accept");
    // The host's end of the link and every other sandbox are in the pool.
    let _ = writeln!(t, "    iifname \"{TAP}\" ip daddr {pool} drop");
    if !policy.allow_cidrs.is_empty() {
        let _ = writeln!(t, "    iifname \"{TAP}\" ip daddr {} accept", set(&policy.allow_cidrs));
    }
    let _ = writeln!(t, "    iifname \"{TAP}\" ip daddr {} drop", set(&special));
    if !policy.deny_cidrs.is_empty() {
        let _ = writeln!(t, "    iifname \"{TAP}\" ip daddr {} drop", set(&policy.deny_cidrs));
    }
    let _ = writeln!(t, "    iifname \"{TAP}\" meta nfproto ipv4 accept\n  }}");
    let _ = writeln!(
        t,
        "  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    oifname \"{UPLINK}\" masquerade\n  }}\n}}"
    );
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::PolicySpec;

    fn services() -> Services {
        Services {
            host: Ipv4Addr::new(10, 200, 0, 1),
            dns_port: 5353,
        }
    }

    #[test]
    fn open_policy_has_no_proxy_and_always_denies_host_and_pool() {
        let policy = Policy::from_spec(&PolicySpec::open()).unwrap();
        let t = sandbox_table(&policy, services(), "10.200.0.0/16".parse().unwrap());
        assert!(!t.contains("redirect"));
        assert!(t.contains("ip daddr 10.200.0.0/16 drop"));
        assert!(t.contains("169.254.0.0/16"));
        assert!(t.contains("dnat ip to 10.200.0.1:5353"));
        // From the guest, the namespace takes only answers on connections it opened to the
        // agent's data path, before dropping everything else.
        let input = &t[t.find("chain input").unwrap()..t.find("chain forward").unwrap()];
        let replies = input
            .find("iifname \"tap0\" ip saddr 10.0.2.15 tcp sport 49983 ct state established accept")
            .unwrap();
        assert!(replies < input.find("iifname \"tap0\" drop").unwrap(), "{input}");
    }

    #[test]
    fn domains_send_web_traffic_to_the_proxy() {
        let policy = Policy::from_spec(&PolicySpec {
            internet: false,
            allow_out: vec!["pypi.org".into(), "1.1.1.1".into()],
            ..PolicySpec::open()
        })
        .unwrap();
        let t = sandbox_table(&policy, services(), "10.200.0.0/16".parse().unwrap());
        assert!(t.contains("tcp dport { 80, 443 } ip daddr != { 1.1.1.1/32, 8.8.8.8/32 }"));
        assert!(t.contains("redirect to :15001"));
        assert!(t.contains("ip daddr { 0.0.0.0/0 } drop"));
    }

    #[test]
    fn sets_drop_blocks_inside_others() {
        let cidrs: Vec<Cidr> = ["1.1.1.1", "1.1.0.0/16", "2.2.2.2"]
            .iter()
            .map(|c| c.parse().unwrap())
            .collect();
        assert_eq!(set(&cidrs), "{ 1.1.0.0/16, 2.2.2.2/32 }");
    }

    #[test]
    fn host_table_names_the_links() {
        let t = host_table("vivarium_ab", "vhab", "10.200.0.0/16".parse().unwrap(), 1);
        assert!(t.contains("iifname \"vhab*\" udp dport 1 accept"));
        assert!(t.contains("ip saddr 10.200.0.0/16 oifname != \"vhab*\" masquerade"));
    }
}
