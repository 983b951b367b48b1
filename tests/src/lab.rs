//! A coordinator and its agents for end-to-end tests: the `doppel` CLI run inside a host against
//! a state directory, a CA with agent certificates, `doppel serve`, the `[coordinator]` section
//! an agent reports through, and what the coordinator stored, read back from its SQLite file.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use doppel_common::wire::{EncodedHistogram, FlowScope, LatencyMetric};
use doppel_coordinator::store::Store;

use crate::testbed::{Host, Process, wait_for, workspace_binary};

/// The QUIC port `doppel serve` listens on in these labs.
pub const QUIC_PORT: u16 = 4433;

/// Runs `doppel --state-dir STATE ARGS…` inside `host` (the API listens on the host's loopback)
/// and asserts it succeeded.
pub fn doppel(host: &Host, state: &Path, args: &[&str]) -> Output {
    let mut command = host.command(workspace_binary("doppel").to_str().expect("utf-8"));
    command
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .env_remove("DOPPEL_API")
        .env_remove("DOPPEL_API_TOKEN");
    let out = command.output().expect("run doppel");
    assert!(
        out.status.success(),
        "doppel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `doppel ca init`, then a certificate for each of `agents`; returns the directory they are in.
pub fn issue_agent_certs(host: &Host, state: &Path, agents: &[&str]) -> PathBuf {
    doppel(host, state, &["ca", "init"]);
    let certs = state.join("agent-certs");
    for agent in agents {
        doppel(
            host,
            state,
            &[
                "ca",
                "issue",
                "--agent",
                agent,
                "--out",
                certs.to_str().expect("utf-8"),
            ],
        );
    }
    certs
}

/// Starts `doppel serve` inside `host` with QUIC on [`QUIC_PORT`] (and `--config CONFIG` when
/// given), and waits until its API listens.
pub fn start_coordinator(host: &Host, state: &Path, config: Option<&Path>) -> Process {
    let mut serve = host.command(workspace_binary("doppel").to_str().expect("utf-8"));
    serve.arg("--state-dir").arg(state).arg("serve");
    if let Some(config) = config {
        serve.arg("--config").arg(config);
    }
    serve.args(["--quic-listen", &format!("0.0.0.0:{QUIC_PORT}")]);
    let process = host.spawn(serve).expect("spawn coordinator");
    // The API address file appears once the API listens.
    assert!(
        wait_for(Duration::from_secs(20), || state.join("api.addr").exists()),
        "coordinator API did not start"
    );
    process
}

/// The `[coordinator]` section of `agent`'s config: the coordinator at `quic`, the lab's
/// certificates in `certs`, and a spool of its own under `state`.
pub fn coordinator_section(state: &Path, certs: &Path, agent: &str, quic: IpAddr) -> String {
    format!(
        "[coordinator]\naddress = \"{quic}:{QUIC_PORT}\"\nca_cert = \"{certs}/ca.crt\"\n\
         cert = \"{certs}/{agent}.crt\"\nkey = \"{certs}/{agent}.key\"\nspool_dir = \"{spool}\"\n",
        certs = certs.display(),
        spool = state.join(format!("spool-{agent}")).display(),
    )
}

/// A shadow agent's config: it admits `source`'s copies with `vni` on `iface` (XDP), replays them
/// to port 8080 on its loopback, and measures the replay there with the same TC programs as live.
pub fn shadow_agent_config(iface: &str, source: IpAddr, vni: u32, coordinator: &str) -> String {
    format!(
        "role = \"shadow\"\nxdp_interface = \"{iface}\"\nreplay_addr = \"127.0.0.1\"\n\
         replay_interface = \"lo\"\nreport_interval_ms = 400\nresponse_timeout_ms = 2000\n\
         [[sessions]]\nsource = \"{source}\"\nvni = {vni}\n[[services]]\nport = 8080\n\
         {coordinator}"
    )
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// Exchanges in the stored kernel first-byte histograms of `agent` with `scope`, per class.
pub fn stored_exchanges_per_class(
    state: &Path,
    agent: &str,
    scope: FlowScope,
) -> BTreeMap<u16, u64> {
    let mut per_class = BTreeMap::new();
    for row in Store::open_in(state)
        .expect("store")
        .interval_histograms(&[agent], 0, now_ms() + 60_000)
        .expect("histograms")
    {
        if row.scope == scope && row.metric == LatencyMetric::KernelFirstByte {
            *per_class.entry(row.class).or_default() +=
                EncodedHistogram(row.hist).decode().expect("decode").len();
        }
    }
    per_class
}

/// Waits up to `limit` until the coordinator stored at least `count` reports of `agent` (one per
/// JSON line it printed: pass the lines printed so far); returns whether it did. An agent sends
/// in order, so what a test then reads from the store covers everything the agent measured up
/// to those lines. (The store's sequence numbers are the agent's spool's, not the lines'.)
pub fn wait_for_stored_reports(state: &Path, agent: &str, count: usize, limit: Duration) -> bool {
    wait_for(limit, || {
        Store::open_in(state)
            .and_then(|s| s.report_seqs(agent))
            .is_ok_and(|seqs| seqs.len() >= count)
    })
}
