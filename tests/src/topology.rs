//! The three-host topology of the shadow role's end-to-end tests: a client, a live host whose
//! agent mirrors every flow over VXLAN (VNI [`VNI`]), and a shadow host whose agent replays
//! them against servers on its own loopback. The tests start the servers; [`Topology`] writes
//! both agents' configurations. [`wait_for`] polls for what the agents or servers report.

use std::net::IpAddr;

pub use crate::testbed::wait_for;
use crate::{
    agent::AgentProcess,
    testbed::{Host, Link},
};

/// The VXLAN network identifier of the mirror session between live and shadow.
pub const VNI: u32 = 101;

/// Client, live host and one shadow host, joined client–live and live–shadow.
#[derive(Debug)]
pub struct Topology {
    /// Where the client workload runs.
    pub client: Host,
    /// The live host: its servers listen on [`Topology::live_addr`].
    pub live: Host,
    /// The shadow host: its servers listen on `127.0.0.1`.
    pub shadow: Host,
    /// Client (a) to live (b).
    pub client_link: Link,
    /// Live (a) to shadow (b): the mirror datagrams' path.
    pub shadow_link: Link,
}

impl Topology {
    /// Creates the three hosts and both links.
    pub fn new() -> Self {
        let client = Host::new("client").expect("client");
        let live = Host::new("live").expect("live");
        let shadow = Host::new("shadow").expect("shadow");
        let client_link = Link::new(&client, &live).expect("client link");
        let shadow_link = Link::new(&live, &shadow).expect("shadow link");
        Self {
            client,
            live,
            shadow,
            client_link,
            shadow_link,
        }
    }

    /// The live host's address on the client link, where its servers listen.
    pub fn live_addr(&self) -> IpAddr {
        self.client_link.b_v4.into()
    }

    /// The live agent (reporting every 300 ms) mirroring 100 % of the flows to `ports` on
    /// [`Topology::live_addr`] to the shadow.
    pub fn live_agent(&self, ports: &[u16]) -> AgentProcess {
        let services: String = ports
            .iter()
            .map(|p| {
                format!(
                    "[[services]]\naddr = \"{}\"\nport = {p}\n",
                    self.live_addr()
                )
            })
            .collect();
        AgentProcess::start(
            &self.live,
            "live",
            &format!(
                "interface = \"{iface}\"\nreport_interval_ms = 300\ndefault_sample_percent = 100.0\n\
                 {services}[[mirror_sessions]]\nshadow = \"{shadow}\"\nvni = {VNI}\n",
                iface = self.client_link.b_iface,
                shadow = self.shadow_link.b_v4,
            ),
        )
    }

    /// The shadow agent (reporting every 300 ms, a 2 s response timeout) admitting the live
    /// host's session and replaying to the shadow's loopback. Each of `services` is the body of
    /// one `[[services]]` table (`"port = 8080"`, with `protocol`, credentials, …); `extra` is
    /// top-level configuration put before the tables (it may open tables of its own).
    pub fn shadow_agent(&self, services: &[&str], extra: &str) -> AgentProcess {
        let services: String = services
            .iter()
            .map(|body| format!("[[services]]\n{body}\n"))
            .collect();
        AgentProcess::start(
            &self.shadow,
            "shadow",
            &format!(
                "role = \"shadow\"\nxdp_interface = \"{iface}\"\nreplay_addr = \"127.0.0.1\"\n\
                 replay_interface = \"lo\"\nreport_interval_ms = 300\nresponse_timeout_ms = 2000\n\
                 {extra}\n[[sessions]]\nsource = \"{live}\"\nvni = {VNI}\n{services}",
                iface = self.shadow_link.b_iface,
                live = self.shadow_link.a_v4,
            ),
        )
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::new()
    }
}
