//! A sandbox's slot: its namespace, tap device and veth pair, made on a free index with a policy
//! in force, and removed when its [`Slot`] value drops (unless detached).
//!
//! Invariants: the index is taken in [`Shared::used`] before anything is made and freed only
//! when the slot's value drops; a slot whose making failed leaves nothing behind (its handle
//! removes what it made).

use std::net::Ipv4Addr;
use std::sync::Arc;

use crate::{listen_in, output, proxy, rules, run, NetError, Policy, Shared};

/// The slot of `index` (taken in `used` by the caller); dropping it removes its namespace.
pub(crate) fn slot_of(shared: &Arc<Shared>, index: u32) -> Slot {
    Slot {
        handle: SlotHandle {
            shared: shared.clone(),
            index,
        },
        proxy: None,
        detached: false,
    }
}

/// Starts the egress proxy of `slot`, listening inside its namespace.
pub(crate) fn start_proxy(shared: &Arc<Shared>, slot: &mut Slot) -> Result<(), NetError> {
    let listener = listen_in(&slot.netns_path(), rules::PROXY_PORT)?;
    slot.proxy = Some(tokio::spawn(proxy::serve(listener, shared.clone(), slot.namespace_address())).abort_handle());
    Ok(())
}

/// Makes a slot on a free index: a namespace with a tap device for the VM, linked to the host,
/// with `policy` in force.
pub(crate) async fn make_slot(shared: &Arc<Shared>, policy: Policy) -> Result<Slot, NetError> {
    let index = {
        let mut used = shared.used.lock().expect("slots lock");
        let index = (0..shared.slots as u32)
            .find(|i| !used.contains(i))
            .ok_or(NetError::Exhausted(shared.slots))?;
        used.insert(index);
        index
    };
    let mut slot = slot_of(shared, index);
    let policy = Arc::new(policy);
    let setup = (slot.handle.clone(), policy.clone());
    tokio::task::spawn_blocking(move || {
        let (handle, policy) = setup;
        handle.create(&policy)
    })
    .await
    .map_err(|e| NetError::Io {
        context: "creating a network slot".into(),
        source: std::io::Error::other(e),
    })??;
    start_proxy(shared, &mut slot)?;
    shared
        .policies
        .write()
        .expect("policies lock")
        .insert(slot.namespace_address(), policy);
    Ok(slot)
}

/// A sandbox's network: its namespace, tap device and veth pair. Dropping it removes them,
/// unless it was detached.
pub struct Slot {
    handle: SlotHandle,
    /// The egress proxy's task (its socket keeps the namespace alive, so it ends first).
    proxy: Option<tokio::task::AbortHandle>,
    /// Left for a VM that runs on after the server stops.
    detached: bool,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("netns", &self.netns_name()).finish()
    }
}

impl Slot {
    /// The namespace's name (`ip netns` list it).
    pub fn netns_name(&self) -> String {
        self.handle.netns_name()
    }

    /// The namespace file a process joins to run in it.
    pub fn netns_path(&self) -> std::path::PathBuf {
        std::path::PathBuf::from("/run/netns").join(self.netns_name())
    }

    /// The namespace's end of the veth pair (what the sandbox's traffic leaves as).
    pub fn namespace_address(&self) -> Ipv4Addr {
        self.handle.namespace_address()
    }

    /// The slot's number in the pool (recorded, so a later server can take it back).
    pub fn index(&self) -> u32 {
        self.handle.index
    }

    /// Leaves the namespace and links in place for a VM that runs on after the server stops.
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Gives the slot's links this server's addresses for its index, if they have others (a
    /// slot taken back after `--net-pool` changed).
    pub(crate) async fn readdress(&self) -> Result<(), NetError> {
        let handle = self.handle.clone();
        tokio::task::spawn_blocking(move || handle.ensure_addresses())
            .await
            .map_err(|e| NetError::Io {
                context: "readdressing a network slot".into(),
                source: std::io::Error::other(e),
            })?
    }

    /// Puts `policy` in force (one nftables transaction).
    pub async fn apply(&self, policy: Policy) -> Result<(), NetError> {
        let handle = self.handle.clone();
        let policy = Arc::new(policy);
        let rules = policy.clone();
        tokio::task::spawn_blocking(move || handle.load_rules(&rules))
            .await
            .map_err(|e| NetError::Io {
                context: "changing a sandbox's rules".into(),
                source: std::io::Error::other(e),
            })??;
        self.handle
            .shared
            .policies
            .write()
            .expect("policies lock")
            .insert(self.namespace_address(), policy);
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.abort();
        }
        let shared = &self.handle.shared;
        shared
            .policies
            .write()
            .expect("policies lock")
            .remove(&self.handle.namespace_address());
        if !self.detached {
            tracing::debug!(netns = %self.netns_name(), "removing a network slot");
            self.handle.remove();
        }
        shared.used.lock().expect("slots lock").remove(&self.handle.index);
    }
}

/// Names, addresses and commands of a slot, without ownership (dropping it frees nothing).
#[derive(Clone)]
struct SlotHandle {
    shared: Arc<Shared>,
    index: u32,
}

impl SlotHandle {
    fn netns_name(&self) -> String {
        format!("{}{}", self.shared.netns_prefix(), self.index)
    }

    fn link_name(&self) -> String {
        format!("{}{}", self.shared.link_prefix(), self.index)
    }

    /// The host's end of the veth pair (where the host's services are reached).
    fn host_address(&self) -> Ipv4Addr {
        self.shared.config.pool.nth(self.index * 4 + 1)
    }

    /// The namespace's end of the veth pair.
    fn namespace_address(&self) -> Ipv4Addr {
        self.shared.config.pool.nth(self.index * 4 + 2)
    }

    fn services(&self) -> rules::Services {
        rules::Services {
            host: self.host_address(),
            dns_port: self.shared.dns_port,
        }
    }

    /// Creates the namespace, links and rules; on failure removes what it made.
    fn create(&self, policy: &Policy) -> Result<(), NetError> {
        let (netns, link) = (self.netns_name(), self.link_name());
        let (host, inside) = (self.host_address(), self.namespace_address());
        let host_side = format!(
            "netns add {netns}\nlink add {link} type veth peer name {uplink} netns {netns}\naddr add {host}/30 dev {link}\nlink set {link} up\n",
            uplink = rules::UPLINK
        );
        let inside_setup = format!(
            "link set lo up\naddr add {inside}/30 dev {uplink}\nlink set {uplink} up\nroute add default via {host}\ntuntap add dev {tap} mode tap\nlink set {tap} address {mac}\naddr add {gateway}/24 dev {tap}\naddr add {dns}/32 dev {tap}\nlink set {tap} up\n",
            uplink = rules::UPLINK,
            tap = rules::TAP,
            gateway = rules::GUEST_GATEWAY,
            // The guest asks for the DNS server's MAC address before its packets can be
            // redirected.
            dns = rules::GUEST_DNS,
            // The same in every slot: a restored guest's ARP cache still holds it.
            mac = rules::GATEWAY_MAC,
        );
        let result = run("ip", &["-batch", "-"], Some(&host_side))
            .and_then(|()| run("ip", &["-n", &netns, "-batch", "-"], Some(&inside_setup)))
            .and_then(|()| {
                // Forwarding on, IPv6 off (sandboxes are IPv4 only), then the rules.
                let table = rules::sandbox_table(policy, self.services(), self.shared.config.pool);
                run(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        &netns,
                        "sh",
                        "-c",
                        "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6 && exec nft -f -",
                    ],
                    Some(&table),
                )
            });
        if result.is_err() {
            self.remove();
        }
        result
    }

    /// Gives the links this index's addresses of the pool, if they have others (a slot made
    /// under another `--net-pool`).
    fn ensure_addresses(&self) -> Result<(), NetError> {
        let (netns, link) = (self.netns_name(), self.link_name());
        let (host, inside) = (self.host_address(), self.namespace_address());
        let current = output("ip", &["-o", "-4", "addr", "show", "dev", &link])?;
        if current.contains(&format!(" {host}/30 ")) {
            return Ok(());
        }
        tracing::info!(netns = %netns, %host, "the address pool changed: readdressing a network slot");
        run(
            "ip",
            &["-batch", "-"],
            Some(&format!("addr flush dev {link}\naddr add {host}/30 dev {link}\n")),
        )?;
        run(
            "ip",
            &["-n", &netns, "-batch", "-"],
            Some(&format!(
                "addr flush dev {uplink}\naddr add {inside}/30 dev {uplink}\nroute replace default via {host}\n",
                uplink = rules::UPLINK
            )),
        )
    }

    fn load_rules(&self, policy: &Policy) -> Result<(), NetError> {
        let table = rules::sandbox_table(policy, self.services(), self.shared.config.pool);
        run(
            "ip",
            &["netns", "exec", &self.netns_name(), "nft", "-f", "-"],
            Some(&table),
        )
    }

    /// Removes the links (both ends) and the namespace; what is already gone is no error.
    fn remove(&self) {
        let _ = run(
            "ip",
            &["-force", "-batch", "-"],
            Some(&format!(
                "link del {}\nnetns del {}\n",
                self.link_name(),
                self.netns_name()
            )),
        );
    }
}
