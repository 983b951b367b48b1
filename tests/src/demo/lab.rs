//! The demo's network: a lab namespace holding a bridge and the coordinator, with a live host
//! and a client host attached to the bridge. Shadow hosts the coordinator's local provisioner
//! makes attach to the same bridge. Everything lives in namespaces made here (private addresses
//! that never leave them) and disappears when the hosts drop.

use std::net::Ipv4Addr;

use crate::testbed::Host;

/// The bridge in the lab namespace.
pub const BRIDGE: &str = "doppel0";
/// The lab subnet's prefix length.
pub const PREFIX_LEN: u8 = 24;
/// The bridge's (and coordinator's) address.
pub const COORDINATOR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// The live host's address.
pub const LIVE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// The client host's address.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

/// The demo's hosts.
#[derive(Debug)]
pub struct Lab {
    /// Bridge and coordinator.
    pub lab: Host,
    /// The live workload and its agent.
    pub live: Host,
    /// The load generator.
    pub client: Host,
}

impl Lab {
    /// Creates the namespaces, the bridge and the two attached hosts.
    pub fn new() -> anyhow::Result<Self> {
        let lab = Host::new("lab")?;
        lab.ip(&["link", "add", BRIDGE, "type", "bridge"])?;
        lab.ip(&[
            "addr",
            "add",
            &format!("{COORDINATOR}/{PREFIX_LEN}"),
            "dev",
            BRIDGE,
        ])?;
        lab.ip(&["link", "set", BRIDGE, "up"])?;
        let live = Host::new("live")?;
        attach(&lab, &live, "v-live", LIVE)?;
        let client = Host::new("client")?;
        attach(&lab, &client, "v-client", CLIENT)?;
        Ok(Self { lab, live, client })
    }
}

/// The subnet the lab hosts and the shadows share.
pub const SUBNET: &str = "10.77.0.0/24";

/// The interface name inside attached hosts.
pub const HOST_IFACE: &str = "eth0";

/// Connects `host` to the lab bridge through a veth pair, `eth0` inside the host at `addr`.
fn attach(lab: &Host, host: &Host, port: &str, addr: Ipv4Addr) -> anyhow::Result<()> {
    lab.ip(&[
        "link",
        "add",
        port,
        "type",
        "veth",
        "peer",
        "name",
        HOST_IFACE,
        "netns",
        host.netns(),
    ])?;
    lab.ip(&["link", "set", port, "master", BRIDGE, "up"])?;
    host.ip(&[
        "addr",
        "add",
        &format!("{addr}/{PREFIX_LEN}"),
        "dev",
        HOST_IFACE,
    ])?;
    host.ip(&["link", "set", HOST_IFACE, "up"])?;
    host.ip(&["link", "set", "lo", "up"])?;
    Ok(())
}
