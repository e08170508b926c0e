//! Egress policy parsing (`viv_net::policy`): the `allowOut`/`denyOut`/`dnsServers` lists clients
//! send at create and `PUT /sandboxes/{id}/network`, as JSON or as entries, and the nftables
//! table generated from a checked policy.
//!
//! Checks, besides never panicking:
//! - parse → print → parse = identity for entries (`Target`) and CIDR blocks; a block's network
//!   address has no host bits and lies in the block;
//! - domain patterns match exactly what they promise: `name` the name itself (any case, a
//!   trailing dot allowed), `*.name` names ending in `.name` and nothing else;
//! - decisions: a connection that names no host is judged as its address alone; an address in
//!   `allowOut` is always allowed, one in a special range never unless allowed; with the internet
//!   off only allowed addresses pass; a name lookup allowed by name always passes;
//! - the nftables table is generated for any checked policy; domain names only switch the proxy
//!   redirect on (a table does not depend on which names a policy has).
#![no_main]

use std::net::Ipv4Addr;

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use viv_net::policy::{special_ranges, Target};
use viv_net::rules::{sandbox_table, Services};
use viv_net::{Cidr, Policy, PolicySpec};

#[derive(Debug, Arbitrary)]
enum Built {
    /// Lists as given, probed with these hosts and addresses.
    Spec {
        internet: bool,
        allow: Vec<String>,
        deny: Vec<String>,
        dns: Option<Vec<String>>,
        probes: Vec<(String, u32)>,
    },
    /// One entry, probed with a host.
    Entry(String, String),
}

fn trimmed(host: &str) -> String {
    host.trim_end_matches('.').to_ascii_lowercase()
}

fn check_entry(entry: &str, probe: &str) {
    let Ok(target) = Target::parse(entry) else { return };
    let printed = target.to_string();
    assert_eq!(
        Target::parse(&printed),
        Ok(target.clone()),
        "'{entry}' printed as '{printed}'"
    );
    match target {
        Target::Cidr(cidr) => {
            assert_eq!(printed.parse::<Cidr>(), Ok(cidr));
            assert!(cidr.prefix <= 32);
            assert!(cidr.contains(cidr.network));
            assert_eq!(Cidr::new(cidr.network, cidr.prefix), cidr, "host bits in {printed}");
        }
        Target::Domain(pattern) => {
            let host = trimmed(probe);
            let expected = match printed.strip_prefix("*.") {
                Some(name) => host.ends_with(&format!(".{name}")),
                None => host == printed,
            };
            assert_eq!(pattern.matches(probe), expected, "'{printed}' against '{probe}'");
            if !printed.starts_with("*.") {
                assert!(pattern.matches(&printed.to_ascii_uppercase()));
                assert!(pattern.matches(&format!("{printed}.")));
            }
        }
    }
}

fn services() -> Services {
    Services {
        host: Ipv4Addr::new(10, 200, 0, 1),
        dns_port: 5353,
    }
}

fn pool() -> Cidr {
    Cidr::new(Ipv4Addr::new(10, 200, 0, 0), 16)
}

fn check_policy(spec: &PolicySpec, probes: &[(String, u32)]) {
    for entry in spec.allow_out.iter().chain(&spec.deny_out) {
        check_entry(entry, probes.first().map_or("", |(h, _)| h.as_str()));
    }
    let Ok(policy) = Policy::from_spec(spec) else { return };
    let table = sandbox_table(&policy, services(), pool());
    // Only addresses and fixed words make the table: which names a policy has does not show.
    let Ok(Target::Domain(one)) = Target::parse("example.com") else {
        unreachable!()
    };
    let names = if policy.has_domains() { vec![one] } else { Vec::new() };
    let replaced = Policy {
        allow_domains: names,
        deny_domains: Vec::new(),
        ..policy.clone()
    };
    assert_eq!(table, sandbox_table(&replaced, services(), pool()));
    for (host, addr) in probes {
        let dst = Ipv4Addr::from(*addr);
        let by_address = policy.allows_address(dst);
        assert_eq!(policy.allows_connection(None, dst), by_address);
        let allowed = policy.allow_cidrs.iter().any(|c| c.contains(dst));
        if allowed {
            assert!(by_address && policy.allows_connection(Some(host), dst));
        } else {
            if special_ranges().any(|c| c.contains(dst)) {
                assert!(!policy.allows_connection(Some(host), dst));
            }
            if !spec.internet {
                assert!(!by_address);
            }
        }
        if policy.allow_domains.iter().any(|d| d.matches(host)) {
            assert!(policy.allows_lookup(host));
        }
    }
}

// The first byte chooses: even, the rest is a request body (JSON); odd, lists or an entry
// built from the rest.
fuzz_target!(|data: &[u8]| match data.split_first() {
    None => {}
    Some((mode, json)) if mode % 2 == 0 => {
        if let Ok(spec) = serde_json::from_slice::<PolicySpec>(json) {
            check_policy(&spec, &[("example.com".into(), 0x0808_0808)]);
        }
    }
    Some((_, rest)) => match Built::arbitrary_take_rest(Unstructured::new(rest)) {
        Ok(Built::Spec {
            internet,
            allow,
            deny,
            dns,
            probes,
        }) => {
            let spec = PolicySpec {
                internet,
                allow_out: allow,
                deny_out: deny,
                dns_servers: dns,
            };
            check_policy(&spec, &probes);
        }
        Ok(Built::Entry(entry, probe)) => check_entry(&entry, &probe),
        Err(_) => {}
    },
});
