//! Egress policies: which destinations a sandbox may open connections to.
//!
//! A policy is E2B's model: `allowOut` and `denyOut` lists of IPv4 addresses, CIDR blocks and
//! domain names (`example.com`, or `*.example.com` for every subdomain but not the apex), where
//! an allowed entry always wins over a denied one, and "no internet" is a denial of
//! `0.0.0.0/0`. On top of the lists, some targets are denied unless an `allowOut` CIDR names
//! them (private, loopback, link-local — cloud metadata — and other special ranges), and the
//! host and other sandboxes are denied always (that part lives in the rule sets, see
//! [`crate::rules`]).
//!
//! Domain names can only be checked where a connection names its destination: the HTTP `Host`
//! header (port 80) and the TLS SNI (port 443), read by the egress proxy, and DNS questions,
//! read by the DNS forwarder.

use std::fmt;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// An IPv4 CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    /// The network address (host bits are zero).
    pub network: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

impl Cidr {
    /// A block from an address and prefix length (host bits are cleared).
    pub fn new(addr: Ipv4Addr, prefix: u8) -> Self {
        let prefix = prefix.min(32);
        Self {
            network: Ipv4Addr::from(u32::from(addr) & mask(prefix)),
            prefix,
        }
    }

    /// Whether `addr` lies in the block.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == u32::from(self.network)
    }

    /// Number of addresses in the block.
    pub fn size(&self) -> u64 {
        1u64 << (32 - u32::from(self.prefix))
    }

    /// The address `offset` places after the network address.
    pub fn nth(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network).wrapping_add(offset))
    }

    /// Whether the two blocks share an address.
    pub fn overlaps(&self, other: &Cidr) -> bool {
        self.contains(other.network) || other.contains(self.network)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (
                addr,
                prefix
                    .parse::<u8>()
                    .ok()
                    .filter(|p| *p <= 32)
                    .ok_or_else(|| format!("'{s}': the prefix length must be 0 to 32"))?,
            ),
            None => (s, 32),
        };
        let addr: Ipv4Addr = addr
            .parse()
            .map_err(|_| format!("'{s}' is not an IPv4 address or CIDR block"))?;
        Ok(Cidr::new(addr, prefix))
    }
}

/// Destinations denied unless an `allowOut` CIDR covers them: private networks, loopback,
/// link-local (where clouds serve instance metadata, `169.254.169.254`), shared address space,
/// multicast and other reserved ranges.
pub const SPECIAL_RANGES: &[(Ipv4Addr, u8)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8),
    (Ipv4Addr::new(10, 0, 0, 0), 8),
    (Ipv4Addr::new(100, 64, 0, 0), 10),
    (Ipv4Addr::new(127, 0, 0, 0), 8),
    (Ipv4Addr::new(169, 254, 0, 0), 16),
    (Ipv4Addr::new(172, 16, 0, 0), 12),
    (Ipv4Addr::new(192, 0, 0, 0), 24),
    (Ipv4Addr::new(192, 168, 0, 0), 16),
    (Ipv4Addr::new(198, 18, 0, 0), 15),
    (Ipv4Addr::new(224, 0, 0, 0), 4),
    (Ipv4Addr::new(240, 0, 0, 0), 4),
];

/// The special ranges as blocks.
pub fn special_ranges() -> impl Iterator<Item = Cidr> {
    SPECIAL_RANGES.iter().map(|(a, p)| Cidr::new(*a, *p))
}

/// A domain name pattern: an exact name or `*.` and a suffix.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DomainPattern {
    /// Lowercase name without the `*.` and without a trailing dot.
    name: String,
    /// Whether this is `*.name` (subdomains at any depth, not `name` itself).
    wildcard: bool,
}

impl DomainPattern {
    fn parse(s: &str) -> Result<Self, String> {
        let lower = s.trim_end_matches('.').to_ascii_lowercase();
        let (wildcard, name) = match lower.strip_prefix("*.") {
            Some(rest) => (true, rest.to_owned()),
            None => (false, lower.clone()),
        };
        let valid_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.is_empty() || name.len() > 253 || !name.split('.').all(valid_label) {
            return Err(format!(
                "'{s}' is neither an IPv4 address, a CIDR block nor a domain name (like example.com or *.example.com)"
            ));
        }
        Ok(Self { name, wildcard })
    }

    /// Whether `host` (any case, trailing dot allowed) matches.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.wildcard {
            host.len() > self.name.len()
                && host.ends_with(&self.name)
                && host.as_bytes()[host.len() - self.name.len() - 1] == b'.'
        } else {
            host == self.name
        }
    }
}

impl fmt::Display for DomainPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            write!(f, "*.{}", self.name)
        } else {
            f.write_str(&self.name)
        }
    }
}

/// One entry of an allow or deny list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Addresses.
    Cidr(Cidr),
    /// Host names.
    Domain(DomainPattern),
}

impl Target {
    /// Parses an address, CIDR block or domain pattern.
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.contains(':') {
            return Err(format!("'{s}': IPv6 is not supported (sandboxes have IPv4 only)"));
        }
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.' || b == b'/') {
            return s.parse().map(Target::Cidr);
        }
        DomainPattern::parse(s).map(Target::Domain)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cidr(c) => c.fmt(f),
            Target::Domain(d) => d.fmt(f),
        }
    }
}

/// The most entries an allow or deny list may have.
pub const MAX_ENTRIES: usize = 1000;

/// A sandbox's egress rules as clients state them (E2B's field names), stored with the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicySpec {
    /// Whether the sandbox may reach the internet at all (`false` = deny `0.0.0.0/0`).
    #[serde(default = "yes")]
    pub internet: bool,
    /// Destinations allowed even when denied otherwise.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations denied.
    #[serde(default)]
    pub deny_out: Vec<String>,
    /// DNS servers reachable directly when `allowOut` names a domain (`None`: `8.8.8.8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_servers: Option<Vec<String>>,
}

fn yes() -> bool {
    true
}

impl Default for PolicySpec {
    /// Internet on, no lists.
    fn default() -> Self {
        Self::open()
    }
}

impl PolicySpec {
    /// Internet on, no lists.
    pub fn open() -> Self {
        Self {
            internet: true,
            allow_out: Vec::new(),
            deny_out: Vec::new(),
            dns_servers: None,
        }
    }

    /// Nothing reachable.
    pub fn closed() -> Self {
        Self {
            internet: false,
            ..Self::open()
        }
    }

    /// Whether the spec has lists (anything beyond internet on or off).
    pub fn has_rules(&self) -> bool {
        !self.allow_out.is_empty() || !self.deny_out.is_empty()
    }

    /// Whether the spec is just internet on or off: no lists, no DNS servers.
    pub fn is_plain(&self) -> bool {
        !self.has_rules() && self.dns_servers.is_none()
    }
}

/// A checked policy. Its default is the open policy: internet on, no lists (what
/// [`PolicySpec::default`] checks to).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Allowed addresses (win over everything but the host and other sandboxes).
    pub allow_cidrs: Vec<Cidr>,
    /// Allowed host names.
    pub allow_domains: Vec<DomainPattern>,
    /// Denied addresses (`0.0.0.0/0` when the internet is off).
    pub deny_cidrs: Vec<Cidr>,
    /// Denied host names.
    pub deny_domains: Vec<DomainPattern>,
}

/// Why a policy spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{list}: {message}")]
pub struct PolicyError {
    /// `allowOut`, `denyOut` or `dnsServers`.
    pub list: &'static str,
    /// What is wrong with it.
    pub message: String,
}

impl Policy {
    /// Checks a spec.
    pub fn from_spec(spec: &PolicySpec) -> Result<Self, PolicyError> {
        let mut policy = Policy::default();
        for (list, entries) in [("allowOut", &spec.allow_out), ("denyOut", &spec.deny_out)] {
            if entries.len() > MAX_ENTRIES {
                return Err(PolicyError {
                    list,
                    message: format!("at most {MAX_ENTRIES} entries, got {}", entries.len()),
                });
            }
            for entry in entries {
                let target = Target::parse(entry).map_err(|message| PolicyError { list, message })?;
                match (list, target) {
                    ("allowOut", Target::Cidr(c)) => policy.allow_cidrs.push(c),
                    ("allowOut", Target::Domain(d)) => policy.allow_domains.push(d),
                    (_, Target::Cidr(c)) => policy.deny_cidrs.push(c),
                    (_, Target::Domain(d)) => policy.deny_domains.push(d),
                }
            }
        }
        if !spec.internet {
            policy.deny_cidrs.push(Cidr::new(Ipv4Addr::UNSPECIFIED, 0));
        }
        // Checked whether or not they are used, so a wrong entry is never stored silently.
        let servers = spec
            .dns_servers
            .iter()
            .flatten()
            .map(|server| {
                server.parse::<Ipv4Addr>().map_err(|_| PolicyError {
                    list: "dnsServers",
                    message: format!("'{server}' is not an IPv4 address"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // As E2B: with a domain allowed, DNS servers become reachable directly.
        if !policy.allow_domains.is_empty() {
            let servers = if spec.dns_servers.is_some() {
                servers
            } else {
                vec![Ipv4Addr::new(8, 8, 8, 8)]
            };
            for addr in servers {
                policy.allow_cidrs.push(Cidr::new(addr, 32));
            }
        }
        Ok(policy)
    }

    /// A policy that allows nothing (for VMs no client owns yet).
    pub fn deny_all() -> Self {
        Policy {
            allow_cidrs: Vec::new(),
            allow_domains: Vec::new(),
            deny_cidrs: vec![Cidr::new(Ipv4Addr::UNSPECIFIED, 0)],
            deny_domains: Vec::new(),
        }
    }

    /// Whether some rule names a domain, so web traffic goes through the egress proxy.
    pub fn has_domains(&self) -> bool {
        !self.allow_domains.is_empty() || !self.deny_domains.is_empty()
    }

    /// Whether every address is denied.
    fn denies_everything(&self) -> bool {
        self.deny_cidrs.iter().any(|c| c.prefix == 0)
    }

    /// Whether `dst` is allowed by addresses alone (what the packet filter decides).
    pub fn allows_address(&self, dst: Ipv4Addr) -> bool {
        if self.allow_cidrs.iter().any(|c| c.contains(dst)) {
            return true;
        }
        if special_ranges().any(|c| c.contains(dst)) {
            return false;
        }
        !self.deny_cidrs.iter().any(|c| c.contains(dst))
    }

    /// Whether a connection to `dst` that names `host` (HTTP Host or TLS SNI) is allowed: an
    /// allowed address or name wins, then a denied name, then the address rules.
    pub fn allows_connection(&self, host: Option<&str>, dst: Ipv4Addr) -> bool {
        if self.allow_cidrs.iter().any(|c| c.contains(dst)) {
            return true;
        }
        if special_ranges().any(|c| c.contains(dst)) {
            return false;
        }
        if let Some(host) = host {
            if self.allow_domains.iter().any(|d| d.matches(host)) {
                return true;
            }
            if self.deny_domains.iter().any(|d| d.matches(host)) {
                return false;
            }
        }
        !self.deny_cidrs.iter().any(|c| c.contains(dst))
    }

    /// Whether the DNS forwarder answers a question for `name`: allowed names always, denied
    /// names never, others unless every address is denied (so a sandbox without internet cannot
    /// tunnel data through DNS).
    pub fn allows_lookup(&self, name: &str) -> bool {
        if self.allow_domains.iter().any(|d| d.matches(name)) {
            return true;
        }
        if self.deny_domains.iter().any(|d| d.matches(name)) {
            return false;
        }
        !self.denies_everything()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_spec_checks_to_the_open_policy() {
        assert_eq!(Policy::from_spec(&PolicySpec::default()).unwrap(), Policy::default());
    }

    fn policy(internet: bool, allow: &[&str], deny: &[&str]) -> Policy {
        Policy::from_spec(&PolicySpec {
            internet,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
            dns_servers: None,
        })
        .unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "192.168.1.77/24".parse().unwrap();
        assert_eq!(c.to_string(), "192.168.1.0/24");
        assert!(c.contains("192.168.1.3".parse().unwrap()));
        assert!(!c.contains("192.168.2.3".parse().unwrap()));
        assert_eq!("8.8.8.8".parse::<Cidr>().unwrap().prefix, 32);
        assert!("1.2.3.4/33".parse::<Cidr>().is_err());
        assert!("0.0.0.0/0"
            .parse::<Cidr>()
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn domains_match_exact_and_wildcard() {
        let Target::Domain(exact) = Target::parse("Example.com.").unwrap() else {
            panic!()
        };
        assert!(exact.matches("example.COM"));
        assert!(!exact.matches("www.example.com"));
        let Target::Domain(wild) = Target::parse("*.example.com").unwrap() else {
            panic!()
        };
        assert!(wild.matches("a.b.example.com"));
        assert!(!wild.matches("example.com"));
        assert!(!wild.matches("badexample.com"));
    }

    #[test]
    fn bad_entries_say_which_list() {
        let err = Policy::from_spec(&PolicySpec {
            deny_out: vec!["not a host!".into()],
            ..PolicySpec::open()
        })
        .unwrap_err();
        assert_eq!(err.list, "denyOut");
        assert!(Target::parse("::1").unwrap_err().contains("IPv6"));
        assert!(Target::parse("*").is_err());
        // DNS servers are checked even when no allowed domain makes them reachable.
        let err = Policy::from_spec(&PolicySpec {
            dns_servers: Some(vec!["dns.example".into()]),
            ..PolicySpec::open()
        })
        .unwrap_err();
        assert_eq!(err.list, "dnsServers");
    }

    #[test]
    fn allowed_entries_win_and_special_ranges_need_an_allow() {
        let p = policy(true, &["10.1.0.0/16"], &["1.2.3.0/24"]);
        assert!(p.allows_address("10.1.2.3".parse().unwrap()));
        assert!(!p.allows_address("10.2.0.1".parse().unwrap()));
        assert!(!p.allows_address("169.254.169.254".parse().unwrap()));
        assert!(!p.allows_address("1.2.3.4".parse().unwrap()));
        assert!(p.allows_address("1.2.4.4".parse().unwrap()));
        let offline = policy(false, &["1.1.1.1"], &[]);
        assert!(offline.allows_address("1.1.1.1".parse().unwrap()));
        assert!(!offline.allows_address("1.1.1.2".parse().unwrap()));
    }

    #[test]
    fn names_decide_web_connections_and_lookups() {
        let p = policy(false, &["pypi.org", "*.pythonhosted.org"], &[]);
        let ip = "151.101.0.223".parse().unwrap();
        assert!(p.allows_connection(Some("pypi.org"), ip));
        assert!(p.allows_connection(Some("files.pythonhosted.org"), ip));
        assert!(!p.allows_connection(Some("example.com"), ip));
        assert!(!p.allows_connection(None, ip));
        assert!(p.allows_lookup("pypi.org"));
        assert!(!p.allows_lookup("example.com"));
        // The default DNS server becomes reachable, as in E2B.
        assert!(p.allows_address("8.8.8.8".parse().unwrap()));
        let q = policy(true, &[], &["evil.test"]);
        assert!(!q.allows_connection(Some("evil.test"), ip));
        assert!(q.allows_connection(Some("good.test"), ip));
        assert!(!q.allows_lookup("evil.test"));
        assert!(q.allows_lookup("good.test"));
        // A name never opens a private address.
        assert!(!p.allows_connection(Some("pypi.org"), "10.0.0.1".parse().unwrap()));
    }
}
