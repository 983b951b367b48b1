//! Live and shadow measurements side by side in the coordinator, from real components only:
//! `doppel ca` certificates, `doppel serve`, a workload registered with `doppel workload add`,
//! a live `doppel-agent` in front of nginx whose mirror sessions and sample rate come from the
//! coordinator's policy, and a shadow `doppel-agent` replaying the mirrored flows against its
//! own nginx and reporting over QUIC through its spool, across a coordinator outage.
//!
//! What must hold: `doppel compare` shows a live row and a shadow row for the workload from what
//! the agents measured; the shadow measured exactly the exchanges of the flows the live agent
//! mirrored (a sample of the live ones, none lost in the outage); and the client received exactly
//! the bytes the live nginx sent, so nothing the shadow answered reached it.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::Path,
    thread,
    time::Duration,
};

use doppel_common::wire::FlowScope;
use doppel_coordinator::{
    compare::{Comparison, Role},
    store::Store,
};
use doppel_tests::{
    agent::{AgentProcess, counter},
    lab::{
        coordinator_section, doppel, issue_agent_certs, shadow_agent_config, start_coordinator,
        stored_exchanges_per_class, wait_for_stored_reports,
    },
    testbed::{Host, Link, privileged_or_skip, wait_for},
    workloads::Nginx,
};

const VNI: u32 = 101;
/// Share of the flows the workload's policy mirrors to the shadow.
const SAMPLE_RATE: f64 = 0.5;
const REQUESTS_PER_FLOW: usize = 3;
const FLOWS_PER_BATCH: usize = 40;
/// Flows whose first request starts with `GET /items/1` (flows 1 and 10..=19): class 1.
const CLASS_1_FLOWS: usize = 11;

/// One keep-alive flow of `REQUESTS_PER_FLOW` GETs, each response read whole; then the client
/// closes its side and reads to the end. Returns every byte received on the connection.
fn client_flow(server: SocketAddr, flow: usize) -> u64 {
    let mut conn = TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut received = 0u64;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    for i in 0..REQUESTS_PER_FLOW {
        let request = format!("GET /items/{flow}/{i} HTTP/1.1\r\nHost: live\r\n\r\n");
        conn.write_all(request.as_bytes()).expect("send request");
        // Read one whole response: headers, then Content-Length bytes of body.
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let length: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map(|v| v.trim().parse().expect("content-length"))
                    .expect("nginx sends Content-Length");
                if buf.len() >= end + 4 + length {
                    buf.drain(..end + 4 + length);
                    break;
                }
            }
            let n = conn.read(&mut chunk).expect("read response");
            assert!(n > 0, "nginx closed the connection mid-response");
            received += n as u64;
            buf.extend_from_slice(&chunk[..n]);
        }
        // Think time: separate exchanges on the wire, as a real client makes them.
        thread::sleep(Duration::from_millis(1));
    }
    conn.shutdown(Shutdown::Write).expect("shutdown");
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) => panic!("reading to the end of the flow: {e}"),
        }
    }
    assert!(buf.is_empty(), "bytes after the last response");
    received
}

/// `FLOWS_PER_BATCH` flows from the client, two at a time; the bytes the client received.
fn client_batch(client: &Host, server: SocketAddr, first_flow: usize) -> u64 {
    thread::scope(|s| {
        let workers: Vec<_> = (0..2)
            .map(|worker| {
                s.spawn(move || {
                    let _inside = client.enter().expect("enter client");
                    (first_flow + worker..first_flow + FLOWS_PER_BATCH)
                        .step_by(2)
                        .map(|flow| client_flow(server, flow))
                        .sum::<u64>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("client worker"))
            .sum()
    })
}

fn stored_seqs(state: &Path, agent: &str) -> Vec<u64> {
    Store::open_in(state)
        .expect("store")
        .report_seqs(agent)
        .expect("seqs")
}

/// Exchanges in the stored kernel histograms of `agent` with `scope` (and `class`, if given).
fn stored_exchanges(state: &Path, agent: &str, scope: FlowScope, class: Option<u16>) -> u64 {
    stored_exchanges_per_class(state, agent, scope)
        .into_iter()
        .filter(|(c, _)| class.is_none_or(|class| *c == class))
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn the_coordinator_compares_a_shadow_agents_measurements_with_the_live_ones() {
    if !privileged_or_skip(
        "the_coordinator_compares_a_shadow_agents_measurements_with_the_live_ones",
    ) {
        return;
    }
    let state_dir = tempfile::tempdir().expect("state dir");
    let state = state_dir.path();
    let client = Host::new("client").expect("client");
    let live = Host::new("live").expect("live");
    let shadow = Host::new("shadow").expect("shadow");
    let client_link = Link::new(&client, &live).expect("client link");
    let shadow_link = Link::new(&live, &shadow).expect("shadow link");
    let live_addr: IpAddr = client_link.b_v4.into();

    let certs = issue_agent_certs(&live, state, &["live-1", "shadow-1"]);
    let mut coordinator = start_coordinator(&live, state, None);
    // The workload as an operator registers it: the mirror session and the sample rate reach
    // the live agent only through the coordinator's policy (its file mirrors nothing).
    let workload = format!(
        r#"
name = "web"
services = ["{live_addr}:8080"]
[[live]]
agent = "live-1"
vm_type = "live.medium"
[[shadows]]
agent = "shadow-1"
vm_type = "shadow.small"
addr = "{shadow_addr}"
vni = {VNI}
[policy]
report_interval_ms = 400
[[policy.classes]]
id = 0
name = "default"
sample_rate = {SAMPLE_RATE}
[[policy.classes]]
id = 1
name = "items-1x"
sample_rate = 1.0
patterns = [{{ payload_prefix = "GET /items/1" }}]
"#,
        shadow_addr = shadow_link.b_v4,
    );
    std::fs::write(state.join("web.toml"), workload).expect("workload file");
    doppel(
        &live,
        state,
        &[
            "workload",
            "add",
            "-f",
            state.join("web.toml").to_str().expect("utf-8"),
        ],
    );

    let live_nginx = Nginx::start(&live, live_addr, 8080);
    let shadow_nginx = Nginx::start(&shadow, "127.0.0.1".parse().expect("addr"), 8080);
    let coordinator_section =
        |agent: &str, quic: IpAddr| coordinator_section(state, &certs, agent, quic);
    let shadow_agent = AgentProcess::start(
        &shadow,
        "shadow",
        &shadow_agent_config(
            &shadow_link.b_iface,
            shadow_link.a_v4.into(),
            VNI,
            &coordinator_section("shadow-1", shadow_link.a_v4.into()),
        ),
    );
    let live_agent = AgentProcess::start(
        &live,
        "live",
        &format!(
            "interface = \"{iface}\"\nreport_interval_ms = 400\n[[services]]\naddr = \"{live_addr}\"\n\
             port = 8080\n{section}",
            iface = client_link.b_iface,
            section = coordinator_section("live-1", "127.0.0.1".parse().expect("addr")),
        ),
    );
    // Both connected means both were sent their policy: the coordinator sends it right after
    // the handshake. Each agent logs when it has applied it.
    assert!(
        wait_for(Duration::from_secs(20), || {
            let out = doppel(&live, state, &["agents", "--json"]);
            let agents: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
            agents
                .as_array()
                .is_some_and(|a| a.iter().filter(|a| a["connected"] == true).count() == 2)
        }),
        "both agents connect to the coordinator"
    );
    assert!(
        wait_for(Duration::from_secs(10), || [&live_agent, &shadow_agent]
            .iter()
            .all(|a| a.log().contains("coordinator policy applied"))),
        "both agents apply the coordinator's policy"
    );

    let agents = doppel(&live, state, &["agents", "--json"]);
    let agents: Vec<serde_json::Value> = serde_json::from_slice(&agents.stdout).expect("json");
    let roles = |name: &str| {
        agents
            .iter()
            .find(|a| a["name"] == name)
            .map(|a| a["roles"].clone())
    };
    assert_eq!(roles("shadow-1"), Some("shadow".into()), "{agents:?}");
    assert_eq!(roles("live-1"), Some("live".into()), "{agents:?}");

    let mut client_received = client_batch(&client, live_nginx.addr, 0);
    // A coordinator outage: the agents keep measuring, their spools keep the reports.
    let status = coordinator.stop(Duration::from_secs(10));
    assert!(status.success(), "coordinator exit {status:?}");
    let shadow_lines_at_outage = shadow_agent.lines().len();
    client_received += client_batch(&client, live_nginx.addr, FLOWS_PER_BATCH);
    let live_requests = 2 * FLOWS_PER_BATCH * REQUESTS_PER_FLOW;
    assert_eq!(live_nginx.access_log_of(live_requests).len(), live_requests);
    // Live closes two more intervals (the one in progress when the batch ended, and one): its
    // lines then count every exchange of the flows it mirrored. The shadow is done when its
    // nginx served that many.
    let live_printed = live_agent.lines().len();
    assert!(live_agent.wait_for_lines(Duration::from_secs(10), |l| l.len() >= live_printed + 2));
    let mirrored_in_lines: u64 = live_agent
        .lines()
        .iter()
        .flat_map(|l| l["latency"].as_array().cloned().unwrap_or_default())
        .filter(|s| s["scope"] == "mirrored")
        .map(|s| s["count"].as_u64().expect("count"))
        .sum();
    assert!(
        wait_for(Duration::from_secs(20), || shadow_nginx.access_log().len()
            as u64
            >= mirrored_in_lines),
        "the shadow nginx served {} of the {mirrored_in_lines} requests live mirrored",
        shadow_nginx.access_log().len()
    );
    let served = shadow_nginx.access_log().len();
    // Drained: the shadow agent reported every exchange its nginx served.
    assert!(
        wait_for(Duration::from_secs(10), || {
            counter(&shadow_agent.lines(), "exchanges") >= served as u64
        }),
        "the shadow agent reported {} exchanges of the {served} its nginx served",
        counter(&shadow_agent.lines(), "exchanges")
    );
    let offline_shadow_lines = shadow_agent.lines().len();

    let _coordinator = start_coordinator(&live, state, None);
    for (agent, process) in [("live-1", &live_agent), ("shadow-1", &shadow_agent)] {
        let printed = process.lines().len();
        let delivered = wait_for_stored_reports(state, agent, printed, Duration::from_secs(30));
        let seqs = stored_seqs(state, agent);
        assert!(
            delivered,
            "{agent}: {printed} intervals printed, {} stored",
            seqs.len()
        );
        // A fresh spool numbers from the clock (a wiped spool never reuses numbers):
        // consecutive from its first.
        let first = seqs.first().copied().unwrap_or_default();
        assert_eq!(
            seqs,
            (first..first + seqs.len() as u64).collect::<Vec<_>>(),
            "{agent}: every interval once, in order, across the outage"
        );
    }

    // What the comparison shows, through the CLI and the API.
    let out = doppel(
        &live,
        state,
        &["compare", "web", "--window", "15m", "--json"],
    );
    let comparison: Comparison = serde_json::from_slice(&out.stdout).expect("comparison json");
    let row = |role: Role, vm_type: &str| {
        comparison
            .types
            .iter()
            .find(|t| t.role == role && t.vm_type == vm_type)
            .unwrap_or_else(|| panic!("no {role:?} row for {vm_type} in {comparison:#?}"))
            .clone()
    };
    let live_row = row(Role::Live, "live.medium");
    let shadow_row = row(Role::Shadow, "shadow.small");
    assert_eq!(comparison.types.len(), 2, "{comparison:#?}");
    assert_eq!(comparison.live_vm_type.as_deref(), Some("live.medium"));
    assert_eq!(comparison.ranking.len(), 1);
    assert_eq!(comparison.ranking[0].vm_type, "shadow.small");

    // Live measured every exchange the client made.
    assert_eq!(
        live_row.all.exchanges, live_requests as u64,
        "live exchanges measured"
    );
    // The shadow measured exactly the exchanges of the flows the live agent mirrored.
    let mirrored = stored_exchanges(state, "live-1", FlowScope::Mirrored, None);
    let shadow_lines = shadow_agent.lines();
    assert!(shadow_row.all.exchanges > 0, "the shadow measured nothing");
    assert_eq!(
        shadow_row.all.exchanges, mirrored,
        "shadow kernel exchanges = live exchanges on mirrored flows"
    );
    assert_eq!(
        shadow_nginx.access_log().len() as u64,
        mirrored,
        "shadow nginx served each mirrored request once"
    );
    assert_eq!(counter(&shadow_lines, "exchanges"), mirrored);
    // The shadow's file has no classes: class 1 exists on the shadow only because it applied
    // the coordinator's policy, and it classifies replayed flows as the live host did.
    let class_1 = |row: &doppel_coordinator::compare::TypeSummary| {
        row.classes.get(&1).map_or(0, |c| c.exchanges)
    };
    // Flows 1 and 10..=19 of the two batches start with `GET /items/1`, a class mirrored
    // whole.
    let class_1_exchanges = (CLASS_1_FLOWS * REQUESTS_PER_FLOW) as u64;
    assert_eq!(class_1(&live_row), class_1_exchanges);
    assert_eq!(
        stored_exchanges(state, "live-1", FlowScope::Mirrored, Some(1)),
        class_1_exchanges
    );
    assert_eq!(
        class_1(&shadow_row),
        class_1_exchanges,
        "shadow class 1 = live class 1"
    );
    // Class 0 is a sample of the live exchanges at the policy's rate: whole flows are sampled,
    // so the spread is that of a binomial over flows; 4.5 sigma keeps a correct agent from
    // failing. (A plain `shadow <= live x rate` would fail a correct agent half the time.)
    let flows = (2 * FLOWS_PER_BATCH - CLASS_1_FLOWS) as f64;
    let sigma_exchanges =
        (flows * SAMPLE_RATE * (1.0 - SAMPLE_RATE)).sqrt() * REQUESTS_PER_FLOW as f64;
    let expected = class_1_exchanges as f64
        + (live_row.all.exchanges - class_1_exchanges) as f64 * SAMPLE_RATE;
    assert!(
        (shadow_row.all.exchanges as f64 - expected).abs() <= 4.5 * sigma_exchanges,
        "shadow exchanges {} vs expected {expected:.1} (live {})",
        shadow_row.all.exchanges,
        live_row.all.exchanges
    );
    assert!(shadow_row.all.exchanges < live_row.all.exchanges);
    // Part of it was measured while the coordinator was down and delivered from the spool.
    let during_outage = counter(
        &shadow_lines[shadow_lines_at_outage..offline_shadow_lines],
        "exchanges",
    );
    assert!(
        during_outage > 0,
        "no shadow exchanges in the outage's reports"
    );
    assert!(shadow_row.all.p50_ms > 0.0, "shadow latency {shadow_row:?}");

    eprintln!(
        "live exchanges {}, mirrored {mirrored}, shadow exchanges {} ({during_outage} reported \
         during the outage), client bytes {client_received}, shadow nginx bytes {}",
        live_row.all.exchanges,
        shadow_row.all.exchanges,
        shadow_nginx.bytes_sent()
    );
    // The client got exactly what the live nginx sent; the shadow's responses (it sent some)
    // went nowhere near it.
    // (The log of the last request is long written: the shadow's replay came after it.)
    assert_eq!(client_received, live_nginx.bytes_sent());
    assert!(shadow_nginx.bytes_sent() > 0);

    // Both stop cleanly (exit status checked by `stop`).
    live_agent.stop();
    shadow_agent.stop();
}
