//! The live data path end to end: a client host sends real HTTP flows to a server on the live
//! host, `doppel-agent --config live.toml` samples flows by pattern and mirrors them over VXLAN
//! to two shadow hosts, whose UDP sinks decode the copies; the agent's JSON lines are checked
//! against what the client did.

use std::{
    collections::{HashMap, HashSet},
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, SocketAddr, TcpListener, UdpSocket},
    process::Stdio,
    sync::Mutex,
    thread,
    time::Duration,
};

use doppel_tests::{
    agent::{AgentProcess as Agent, counter},
    testbed::{Host, Link, privileged_or_skip, wait_for, workspace_binary},
    traffic::{HttpServer, VxlanSink, http_flow},
};
use serde_json::Value;

/// Client, live and two shadow hosts; the server runs on the live host's client-side address.
struct Topology {
    client: Host,
    live: Host,
    shadows: [Host; 2],
    client_link: Link,
    shadow_links: [Link; 2],
}

impl Topology {
    fn new() -> Self {
        let client = Host::new("client").expect("client");
        let live = Host::new("live").expect("live");
        let shadows = [
            Host::new("shadow1").expect("shadow1"),
            Host::new("shadow2").expect("shadow2"),
        ];
        let client_link = Link::new(&client, &live).expect("client link");
        let shadow_links = [
            Link::new(&live, &shadows[0]).expect("shadow link 1"),
            Link::new(&live, &shadows[1]).expect("shadow link 2"),
        ];
        Self {
            client,
            live,
            shadows,
            client_link,
            shadow_links,
        }
    }

    fn server_addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.client_link.b_v6.into()
        } else {
            self.client_link.b_v4.into()
        }
    }

    fn shadow_addr(&self, i: usize, v6: bool) -> IpAddr {
        let l = &self.shadow_links[i];
        if v6 { l.b_v6.into() } else { l.b_v4.into() }
    }

    fn start_server(&self, v6: bool) -> HttpServer {
        let _inside = self.live.enter().expect("enter live");
        HttpServer::start(TcpListener::bind((self.server_addr(v6), 8080)).expect("bind server"))
    }

    fn start_sink(&self, i: usize, v6: bool) -> VxlanSink {
        let _inside = self.shadows[i].enter().expect("enter shadow");
        VxlanSink::start(UdpSocket::bind((self.shadow_addr(i, v6), 4789)).expect("bind sink"))
    }
}

fn class_total(lines: &[Value], class: u64, field: &str) -> u64 {
    lines
        .iter()
        .flat_map(|l| l["classes"].as_array().cloned().unwrap_or_default())
        .filter(|c| c["class"] == class)
        .map(|c| c[field].as_u64().unwrap_or(0))
        .sum()
}

/// Exchanges whose latency the lines summarise, over every service and class.
fn latency_count(lines: &[Value]) -> u64 {
    lines
        .iter()
        .flat_map(|l| l["latency"].as_array().into_iter().flatten())
        .filter(|s| s["scope"] == "all")
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum()
}

/// Whether session `vni`'s sink received at least the request bytes of every flow in `sent`
/// (client port -> bytes sent).
fn mirrored_whole(sink: &VxlanSink, vni: u32, sent: &HashMap<u16, (usize, u64)>) -> bool {
    let flows = sink.flows();
    sent.iter().all(|(port, (_, bytes))| {
        flows
            .get(&(vni, *port))
            .is_some_and(|f| f.payload_bytes >= *bytes)
    })
}

fn live_config(t: &Topology, iface: &str, v6: bool, top: &str, tables: &str) -> String {
    format!(
        r#"
{top}
interface = "{iface}"
report_interval_ms = 300
pattern_sample_one_in = 4
[[services]]
addr = "{server}"
port = 8080
[[mirror_sessions]]
shadow = "{s1}"
vni = 101
[[mirror_sessions]]
shadow = "{s2}"
vni = 102
{tables}
"#,
        server = t.server_addr(v6),
        s1 = t.shadow_addr(0, v6),
        s2 = t.shadow_addr(1, v6),
    )
}

/// The live agent's config on the client link, IPv4, mirroring every flow.
fn mirror_all_config(t: &Topology) -> String {
    live_config(
        t,
        &t.client_link.b_iface,
        false,
        "default_sample_percent = 100.0",
        "",
    )
}

/// Starts the live agent on the client link, IPv4, with `top` and `tables` in its config.
fn start_live_agent(t: &Topology, top: &str, tables: &str) -> Agent {
    Agent::start(
        &t.live,
        "live",
        &live_config(t, &t.client_link.b_iface, false, top, tables),
    )
}

/// Runs `flows` client flows of `requests` each on 4 threads; returns client port -> bytes sent.
fn run_flows(
    t: &Topology,
    v6: bool,
    flows: usize,
    request: impl Fn(usize) -> Vec<String> + Sync,
) -> HashMap<u16, (usize, u64)> {
    let server = SocketAddr::new(t.server_addr(v6), 8080);
    let sent = Mutex::new(HashMap::new());
    thread::scope(|s| {
        for worker in 0..4 {
            let (sent, request) = (&sent, &request);
            s.spawn(move || {
                let _inside = t.client.enter().expect("enter client");
                for i in (worker..flows).step_by(4) {
                    let (port, bytes) = http_flow(server, &request(i));
                    sent.lock().expect("lock").insert(port, (i, bytes));
                }
            });
        }
    });
    sent.into_inner().expect("lock")
}

#[test]
fn flows_are_sampled_by_pattern_and_mirrored_whole_to_every_session() {
    if !privileged_or_skip("flows_are_sampled_by_pattern_and_mirrored_whole_to_every_session") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let sinks = [t.start_sink(0, false), t.start_sink(1, false)];
    let classes = r#"
[[classes]]
id = 1
name = "api"
sample_percent = 30.0
[[classes]]
id = 2
name = "static"
sample_percent = 5.0
[[rules]]
class = 1
payload_prefix = "GET /api/"
[[rules]]
class = 2
port = 8080
payload_prefix = "GET /static/"
"#;
    let agent = start_live_agent(&t, "", classes);

    const FLOWS: usize = 2400;
    let sent = run_flows(&t, false, FLOWS, |i| {
        let path = if i % 2 == 0 {
            format!("/api/items/{i}")
        } else {
            format!("/static/f{i}.css")
        };
        vec![format!("GET {path} HTTP/1.1\r\nHost: live\r\n\r\n"); 2]
    });
    assert_eq!(sent.len(), FLOWS, "every flow has its own client port");
    // A line classifies every flow, and both sinks received as many flows as it sampled, each
    // whole to its FIN.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        let sampled = counter(lines, "flows_sampled");
        class_total(lines, 1, "flows") + class_total(lines, 2, "flows") >= FLOWS as u64
            && sinks.iter().zip([101, 102]).all(|(sink, vni)| {
                let flows = sink.flows();
                let mirrored: Vec<_> = flows.iter().filter(|((v, _), _)| *v == vni).collect();
                mirrored.len() as u64 >= sampled
                    && mirrored.iter().all(|((_, port), f)| {
                        f.closed && sent.get(port).is_some_and(|(_, b)| f.payload_bytes >= *b)
                    })
            })
    });
    let lines = agent.stop();

    // Each class saw all its flows (the payload-prefix rules matched) ...
    assert_eq!(
        class_total(&lines, 1, "flows"),
        FLOWS as u64 / 2,
        "api flows classified"
    );
    assert_eq!(
        class_total(&lines, 2, "flows"),
        FLOWS as u64 / 2,
        "static flows classified"
    );
    // ... and sampled them at their own rates, within 4.5 standard deviations.
    for (class, rate) in [(1, 0.30), (2, 0.05)] {
        let n = FLOWS as f64 / 2.0;
        let sampled = class_total(&lines, class, "sampled") as f64;
        let tolerance = 4.5 * (rate * (1.0 - rate) / n).sqrt();
        assert!(
            (sampled / n - rate).abs() <= tolerance,
            "class {class}: sampled {sampled} of {n} flows, rate {rate}"
        );
    }
    let sampled_total = counter(&lines, "flows_sampled");
    assert_eq!(
        sampled_total,
        class_total(&lines, 1, "sampled") + class_total(&lines, 2, "sampled")
    );

    // Every session got the same flows, exactly the sampled ones, each with every payload byte
    // the client sent and its FIN; unsampled flows sent nothing.
    let by_session: Vec<HashMap<u16, _>> = sinks
        .iter()
        .zip([101, 102])
        .map(|(sink, vni)| {
            sink.flows()
                .into_iter()
                .filter(|((v, _), _)| *v == vni)
                .map(|((_, p), f)| (p, f))
                .collect()
        })
        .collect();
    let ports: Vec<HashSet<u16>> = by_session
        .iter()
        .map(|m| m.keys().copied().collect())
        .collect();
    assert_eq!(ports[0], ports[1], "both sessions receive the same flows");
    assert_eq!(
        ports[0].len() as u64,
        sampled_total,
        "the sessions receive exactly the sampled flows"
    );
    let mut per_class = [0u64; 3];
    for session in &by_session {
        for (port, flow) in session {
            let (i, bytes) = sent
                .get(port)
                .unwrap_or_else(|| panic!("mirrored port {port} was never a client flow"));
            assert_eq!(
                flow.payload_bytes, *bytes,
                "flow {i} (port {port}): every payload byte arrives"
            );
            assert!(
                flow.closed,
                "flow {i} (port {port}): its FIN is mirrored too"
            );
            // The client ACKed every response, but a replay has no use for bare ACKs: none is
            // copied within the 10 s keepalive.
            assert_eq!(
                flow.bare_acks, 0,
                "flow {i} (port {port}): bare ACKs are not copied"
            );
        }
    }
    for port in &ports[0] {
        per_class[1 + sent[port].0 % 2] += 1;
    }
    assert_eq!(
        per_class[1],
        class_total(&lines, 1, "sampled"),
        "mirrored api flows"
    );
    assert_eq!(
        per_class[2],
        class_total(&lines, 2, "sampled"),
        "mirrored static flows"
    );
    assert_eq!(counter(&lines, "clone_failures"), 0);

    // Pattern discovery saw folded keys, never ids.
    let patterns: HashSet<String> = lines
        .iter()
        .flat_map(|l| l["patterns"].as_array().cloned().unwrap_or_default())
        .filter_map(|p| p[0].as_str().map(str::to_owned))
        .collect();
    assert!(
        patterns.contains("GET /api/items/{n}"),
        "patterns: {patterns:?}"
    );
    assert!(
        patterns
            .iter()
            .all(|p| !p.chars().any(|c| c.is_ascii_digit())),
        "ids leaked: {patterns:?}"
    );
}

#[test]
fn a_known_server_delay_shows_as_the_exchange_latency() {
    if !privileged_or_skip("a_known_server_delay_shows_as_the_exchange_latency") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let agent = start_live_agent(&t, "", "");
    run_flows(&t, false, 40, |_| {
        vec!["GET /delay/20 HTTP/1.1\r\nHost: live\r\n\r\n".to_owned(); 3]
    });
    // A line summarises all 120 exchanges.
    agent.wait_for_lines(Duration::from_secs(10), |lines| latency_count(lines) >= 120);
    let lines = agent.stop();
    let summaries: Vec<&Value> = lines
        .iter()
        .flat_map(|l| l["latency"].as_array().into_iter().flatten())
        .filter(|s| s["scope"] == "all")
        .collect();
    let count: u64 = summaries
        .iter()
        .map(|s| s["count"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(count, 120, "every exchange measured once: {summaries:?}");
    for s in summaries {
        let p50_ms = s["p50_us"].as_f64().expect("p50") / 1000.0;
        assert!(
            (p50_ms - 20.0).abs() <= 1.0,
            "p50 {p50_ms} ms for a 20 ms server delay"
        );
    }
}

#[test]
fn ipv6_flows_are_measured_and_mirrored_over_ipv6() {
    if !privileged_or_skip("ipv6_flows_are_measured_and_mirrored_over_ipv6") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(true);
    let sinks = [t.start_sink(0, true), t.start_sink(1, true)];
    let agent = Agent::start(
        &t.live,
        "live",
        &live_config(
            &t,
            &t.client_link.b_iface,
            true,
            "default_sample_percent = 100.0",
            "",
        ),
    );
    let sent = run_flows(&t, true, 100, |i| {
        vec![format!("GET /v6/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    // A line counts every exchange, and both sinks received every flow's request bytes.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        counter(lines, "exchanges") >= 100
            && sinks
                .iter()
                .zip([101, 102])
                .all(|(sink, vni)| mirrored_whole(sink, vni, &sent))
    });
    let lines = agent.stop();
    assert_eq!(counter(&lines, "flows_sampled"), 100);
    assert_eq!(counter(&lines, "exchanges"), 100);
    for sink in &sinks {
        let flows = sink.flows();
        assert_eq!(
            flows.len(),
            100,
            "every IPv6 flow mirrored to the IPv6 shadow"
        );
        for ((_, port), flow) in flows {
            assert_eq!(flow.payload_bytes, sent[&port].1);
        }
    }
}

#[test]
fn malformed_and_unusual_packets_pass_untouched_and_are_counted() {
    use doppel_tests::traffic::{ipv4_frame, parse_mac, send_raw_frames, udp_datagram};
    if !privileged_or_skip("malformed_and_unusual_packets_pass_untouched_and_are_counted") {
        return;
    }
    let t = Topology::new();
    t.client_link
        .make_quiet(&t.client, &t.live)
        .expect("quiet link");
    let _server = t.start_server(false);
    let receiver = {
        let _inside = t.live.enter().expect("enter live");
        UdpSocket::bind((t.client_link.b_v4, 9999)).expect("bind udp")
    };
    receiver
        .set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let agent = start_live_agent(&t, "", "");
    let macs = (
        parse_mac(&t.client.mac(&t.client_link.a_iface).expect("mac")),
        parse_mac(&t.live.mac(&t.client_link.b_iface).expect("mac")),
    );
    let addrs = (t.client_link.a_v4, t.client_link.b_v4);
    let options_datagram = udp_datagram(5000, 9999, b"with ip options");
    let fragmented = udp_datagram(5001, 9999, &[b'f'; 40]);
    let mut vlan = ipv4_frame(
        macs,
        addrs,
        17,
        &[],
        (false, 0),
        &udp_datagram(5002, 9999, b"vlan"),
    );
    vlan.splice(12..12, [0x81, 0x00, 0x00, 0x05]);
    let mut truncated = ipv4_frame(macs, addrs, 6, &[], (false, 0), &[0; 20]);
    truncated.truncate(14 + 10);
    let mut bad_offset_tcp = vec![0u8; 20];
    bad_offset_tcp[0..2].copy_from_slice(&4000u16.to_be_bytes());
    bad_offset_tcp[2..4].copy_from_slice(&8080u16.to_be_bytes());
    bad_offset_tcp[12] = 0xf0; // data offset 60 bytes, far past the packet
    bad_offset_tcp[13] = 0x18;
    let frames = vec![
        ipv4_frame(
            macs,
            addrs,
            17,
            &[1, 1, 1, 0],
            (false, 0),
            &options_datagram,
        ),
        ipv4_frame(macs, addrs, 17, &[], (true, 0), &fragmented[..24]),
        ipv4_frame(macs, addrs, 17, &[], (false, 3), &fragmented[24..]),
        vlan,
        truncated,
        ipv4_frame(macs, addrs, 6, &[], (false, 0), &bad_offset_tcp),
    ];
    {
        let _inside = t.client.enter().expect("enter client");
        send_raw_frames(&t.client_link.a_iface, &frames);
    }
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = receiver.recv(&mut buf) {
        got.push(buf[..n].to_vec());
        if got.len() == 2 {
            break;
        }
    }
    assert!(
        got.contains(&b"with ip options".to_vec()),
        "the option-laden datagram passed: {got:?}"
    );
    assert!(
        got.contains(&vec![b'f'; 40]),
        "the fragmented datagram passed and reassembled"
    );
    // A line counts every frame: the last one sent, the bad-offset TCP segment, is skipped.
    agent.wait_for_lines(Duration::from_secs(5), |lines| {
        counter(lines, "parse_skipped") >= 5 && counter(lines, "other_traffic") >= 1
    });
    let lines = agent.stop();
    // The kernel strips a VLAN tag into skb metadata before TC ingress, so the programs see
    // the tagged frame's inner UDP packet: it counts as other traffic, not as a parse failure.
    assert_eq!(
        counter(&lines, "parse_skipped"),
        5,
        "options, 2 fragments, truncated, bad offset"
    );
    assert_eq!(
        counter(&lines, "other_traffic"),
        1,
        "the VLAN-tagged UDP frame"
    );
    assert_eq!(
        counter(&lines, "flows_midstream") + counter(&lines, "flows_seen"),
        0
    );
}

#[test]
fn a_killed_agent_is_replaced_cleanly_and_a_stopped_one_leaves_nothing() {
    if !privileged_or_skip("a_killed_agent_is_replaced_cleanly_and_a_stopped_one_leaves_nothing") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let sink = t.start_sink(0, false);
    let config = mirror_all_config(&t);
    let crashed = Agent::start(&t.live, "live", &config);
    crashed.process.signal(nix::sys::signal::Signal::SIGKILL);
    let mut crashed = crashed;
    assert!(
        crashed
            .process
            .wait_timeout(Duration::from_secs(5))
            .is_some()
    );
    let vxlan_left = t.live.ip(&["link", "show", "doppel-vx0s0"]);
    assert!(
        vxlan_left.is_ok(),
        "a SIGKILLed agent leaves its sessions' VXLAN devices (precondition)"
    );

    let agent = Agent::start(&t.live, "live", &config);
    run_flows(&t, false, 20, |i| {
        vec![format!("GET /r/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    // A line counts every exchange, and every flow reached the sink.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        counter(lines, "exchanges") >= 20
            && sink.flows().keys().filter(|(vni, _)| *vni == 101).count() >= 20
    });
    let lines = agent.stop();
    assert_eq!(
        counter(&lines, "exchanges"),
        20,
        "each exchange measured once, not twice"
    );
    let mirrored: usize = sink.flows().keys().filter(|(vni, _)| *vni == 101).count();
    assert_eq!(mirrored, 20, "the restarted agent mirrors");

    for device in ["doppel-vx0s0", "doppel-vx0s1", "doppel-vx0"] {
        assert!(
            t.live.ip(&["link", "show", device]).is_err(),
            "VXLAN device {device} removed on SIGTERM"
        );
    }
    let links = t
        .live
        .run("bpftool", &["net", "show", "dev", &t.client_link.b_iface])
        .expect("bpftool");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains("doppel"), "programs left attached: {links}");
    let qdiscs = t
        .live
        .run("tc", &["qdisc", "show", "dev", &t.client_link.b_iface])
        .expect("tc");
    assert!(!String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"));
}

#[test]
fn each_session_gets_its_own_device_and_sessions_sharing_a_vni_fall_back_to_external_mode() {
    if !privileged_or_skip(
        "each_session_gets_its_own_device_and_sessions_sharing_a_vni_fall_back_to_external_mode",
    ) {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let sinks = [t.start_sink(0, false), t.start_sink(1, false)];
    // Two sessions, two VNIs: each has its own fixed-remote device and no external one exists.
    let agent = Agent::start(&t.live, "live", &mirror_all_config(&t));
    for (device, vni, shadow) in [("doppel-vx0s0", 101, 0), ("doppel-vx0s1", 102, 1)] {
        let shown = t.live.ip(&["-d", "link", "show", device]).expect(device);
        let shown = String::from_utf8_lossy(&shown.stdout);
        let expected = format!("vxlan id {vni} remote {}", t.shadow_addr(shadow, false));
        assert!(shown.contains(&expected), "{device}: {shown}");
    }
    assert!(t.live.ip(&["link", "show", "doppel-vx0"]).is_err());
    run_flows(&t, false, 10, |i| {
        vec![format!("GET /own/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    let closed = |sink: &VxlanSink, vni: u32| {
        sink.flows()
            .iter()
            .filter(|((v, _), f)| *v == vni && f.closed)
            .count()
    };
    wait_for(Duration::from_secs(10), || {
        closed(&sinks[0], 101) >= 10 && closed(&sinks[1], 102) >= 10
    });
    let lines = agent.stop();
    assert_eq!(counter(&lines, "clone_failures"), 0);
    assert_eq!((closed(&sinks[0], 101), closed(&sinks[1], 102)), (10, 10));
    // Nothing but copies left through the devices (a device with IPv6 of its own would have
    // sent the shadows its neighbour discovery too).
    let received = |sink: &VxlanSink| sink.flows().len();
    assert_eq!((received(&sinks[0]), received(&sinks[1])), (10, 10));

    // One VNI for both sessions: the kernel refuses the second fixed device (same VNI, same
    // port), so both go through the external device, which the log says, and both shadows
    // still receive every flow.
    let shared = mirror_all_config(&t).replace("vni = 102", "vni = 101");
    let agent = Agent::start(&t.live, "live", &shared);
    assert!(agent.wait_for_log(Duration::from_secs(5), "external-mode device"));
    assert!(t.live.ip(&["link", "show", "doppel-vx0"]).is_ok());
    for device in ["doppel-vx0s0", "doppel-vx0s1"] {
        assert!(
            t.live.ip(&["link", "show", device]).is_err(),
            "{device} left"
        );
    }
    run_flows(&t, false, 10, |i| {
        vec![format!("GET /shared/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    wait_for(Duration::from_secs(10), || {
        closed(&sinks[0], 101) >= 20 && closed(&sinks[1], 101) >= 10
    });
    let lines = agent.stop();
    assert_eq!(counter(&lines, "clone_failures"), 0);
    assert_eq!((closed(&sinks[0], 101), closed(&sinks[1], 101)), (20, 10));
    assert!(t.live.ip(&["link", "show", "doppel-vx0"]).is_err());
}

#[test]
fn a_second_live_agent_on_a_host_is_refused_and_the_first_keeps_cloning() {
    if !privileged_or_skip("a_second_live_agent_on_a_host_is_refused_and_the_first_keeps_cloning") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let sink = t.start_sink(0, false);
    let config = mirror_all_config(&t);
    let first = Agent::start(&t.live, "live", &config);
    let path = std::env::temp_dir().join(format!("doppel-second-{}.toml", std::process::id()));
    std::fs::write(&path, &config).expect("config");
    let second = t
        .live
        .command(workspace_binary("doppel-agent").to_str().expect("utf-8"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run a second agent");
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second agent ran: {stderr}");
    assert!(
        stderr.contains(&format!(
            "is held by another doppel-agent (pid {}",
            first.process.pid()
        )) && stderr.contains(&first.config_path.display().to_string()),
        "the refusal names the holder: {stderr}"
    );
    run_flows(&t, false, 10, |i| {
        vec![format!("GET /after/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    // Every flow reached the sink to its FIN, the last packet copied: the final line at the
    // stop then counts any copy that failed.
    wait_for(Duration::from_secs(10), || {
        let flows = sink.flows();
        flows
            .iter()
            .filter(|((vni, _), f)| *vni == 101 && f.closed)
            .count()
            >= 10
    });
    let lines = first.stop();
    assert_eq!(
        counter(&lines, "clone_failures"),
        0,
        "the first agent's clones all went"
    );
    let mirrored = sink.flows().keys().filter(|(vni, _)| *vni == 101).count();
    assert_eq!(mirrored, 10, "the first agent still mirrors every flow");
}

#[test]
fn failed_copies_are_logged_with_the_kernels_error() {
    if !privileged_or_skip("failed_copies_are_logged_with_the_kernels_error") {
        return;
    }
    let t = Topology::new();
    let _server = t.start_server(false);
    let config = mirror_all_config(&t);
    let agent = Agent::start(&t.live, "live", &config);
    // The sessions' VXLAN devices go away under the agent: every copy fails.
    for device in ["doppel-vx0s0", "doppel-vx0s1"] {
        t.live
            .ip(&["link", "del", device])
            .expect("delete the device");
    }
    run_flows(&t, false, 5, |i| {
        vec![format!("GET /lost/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    // A line counts the failed copies, and the agent logged them as it printed it.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        counter(lines, "clone_failures") >= 5
    });
    agent.wait_for_log(Duration::from_secs(5), "copies to the shadows failed");
    let log = agent.log();
    let lines = agent.stop();
    assert!(counter(&lines, "clone_failures") >= 5, "copies failed");
    assert!(
        log.contains("copies to the shadows failed") && log.contains("os error"),
        "the failure and the kernel's error are logged: {log}"
    );
}

#[test]
fn a_closed_stdout_neither_panics_nor_leaves_the_device_behind() {
    if !privileged_or_skip("a_closed_stdout_neither_panics_nor_leaves_the_device_behind") {
        return;
    }
    let t = Topology::new();
    let config = live_config(&t, &t.client_link.b_iface, false, "", "");
    let path = std::env::temp_dir().join(format!("doppel-pipe-{}.toml", std::process::id()));
    std::fs::write(&path, &config).expect("config");
    // `doppel-agent --config live.toml | head -n 1`: the reader goes after the first line.
    let mut command = t
        .live
        .command(workspace_binary("doppel-agent").to_str().expect("utf-8"));
    command
        .arg("--config")
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut agent = t.live.spawn(command).expect("spawn the agent");
    let stdout = agent.child_mut().stdout.take().expect("stdout");
    let mut first = String::new();
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("a first line");
    assert!(first.starts_with('{'), "a JSON line: {first}");
    // The reader is gone; the agent's next lines hit a closed pipe.
    assert!(
        agent.wait_timeout(Duration::from_millis(1200)).is_none(),
        "the agent exited when its stdout closed"
    );
    let status = agent.stop(Duration::from_secs(10));
    let mut stderr = String::new();
    let _ = agent
        .child_mut()
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr);
    let _ = std::fs::remove_file(&path);
    assert!(status.success(), "exit status {status:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains("stdout is closed"), "said once: {stderr}");
    for device in ["doppel-vx0s0", "doppel-vx0s1"] {
        assert!(
            t.live.ip(&["link", "show", device]).is_err(),
            "the VXLAN device {device} was removed"
        );
    }
}

#[test]
fn flows_open_before_the_agent_are_measured_but_never_mirrored() {
    if !privileged_or_skip("flows_open_before_the_agent_are_measured_but_never_mirrored") {
        return;
    }
    let t = Topology::new();
    let server = t.start_server(false);
    let sink = t.start_sink(0, false);
    let mut early = {
        let _inside = t.client.enter().expect("enter client");
        std::net::TcpStream::connect(server.addr()).expect("connect before the agent")
    };
    let config = mirror_all_config(&t);
    let agent = Agent::start(&t.live, "live", &config);
    for _ in 0..5 {
        use std::io::{Read as _, Write as _};
        early
            .write_all(b"GET /early HTTP/1.1\r\nHost: live\r\n\r\n")
            .expect("send");
        let mut buf = [0u8; 256];
        let n = early.read(&mut buf).expect("response");
        assert!(n > 0);
    }
    // A line counts all five exchanges. Each was answered after its request passed the data
    // path, so a copy of the early flow would have been sent before the line was printed.
    agent.wait_for_lines(Duration::from_secs(5), |lines| {
        counter(lines, "exchanges") >= 5 && counter(lines, "flows_midstream") >= 1
    });
    let lines = agent.stop();
    assert_eq!(
        counter(&lines, "exchanges"),
        5,
        "the early flow is measured"
    );
    assert_eq!(counter(&lines, "flows_midstream"), 1);
    assert_eq!(counter(&lines, "flows_sampled"), 0, "but never mirrored");
    assert!(sink.flows().is_empty());
}

#[test]
fn a_reloaded_policy_applies_to_new_flows_and_keeps_decided_ones() {
    use std::io::{Read as _, Write as _};
    if !privileged_or_skip("a_reloaded_policy_applies_to_new_flows_and_keeps_decided_ones") {
        return;
    }
    let t = Topology::new();
    let server = t.start_server(false);
    let sink = t.start_sink(0, false);
    let all = mirror_all_config(&t);
    let agent = Agent::start(&t.live, "live", &all);
    let request = b"GET /kept HTTP/1.1\r\nHost: live\r\n\r\n";
    let mut kept = {
        let _inside = t.client.enter().expect("enter client");
        std::net::TcpStream::connect(server.addr()).expect("connect")
    };
    let kept_port = kept.local_addr().expect("addr").port();
    let exchange = |conn: &mut std::net::TcpStream| {
        conn.write_all(request).expect("send");
        let mut buf = [0u8; 256];
        assert!(conn.read(&mut buf).expect("response") > 0);
    };
    exchange(&mut kept);

    // Mirror nothing from now on; reload without restarting.
    let none = all.replace(
        "default_sample_percent = 100.0",
        "default_sample_percent = 0.0",
    );
    std::fs::write(&agent.config_path, none).expect("rewrite config");
    agent.process.signal(nix::sys::signal::Signal::SIGHUP);
    // The agent logs the reload once the new policy is in the kernel's maps.
    agent.wait_for_log(Duration::from_secs(5), "policy reloaded");

    exchange(&mut kept);
    run_flows(&t, false, 10, |i| {
        vec![format!("GET /new/{i} HTTP/1.1\r\nHost: live\r\n\r\n")]
    });
    // A line counts all 12 exchanges (so every new flow's request had passed the data path by
    // then, and would have been copied), and the kept flow's second request reached the sink.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        counter(lines, "exchanges") >= 12
            && sink
                .flows()
                .get(&(101, kept_port))
                .is_some_and(|f| f.payload_bytes >= 2 * request.len() as u64)
    });
    let lines = agent.stop();
    let flows = sink.flows();
    assert_eq!(
        flows.len(),
        1,
        "only the flow decided before the reload is mirrored: {flows:?}"
    );
    let kept_flow = &flows[&(101, kept_port)];
    assert_eq!(
        kept_flow.payload_bytes,
        2 * request.len() as u64,
        "and it stays mirrored"
    );
    assert_eq!(
        counter(&lines, "exchanges"),
        12,
        "measurement never stopped"
    );
}

#[test]
fn a_receiving_only_flow_sends_the_shadows_one_keepalive_not_its_acks() {
    if !privileged_or_skip("a_receiving_only_flow_sends_the_shadows_one_keepalive_not_its_acks") {
        return;
    }
    use std::io::{Read as _, Write as _};
    let t = Topology::new();
    // A download: one request, then a response trickling in for 12 s, which the client ACKs
    // chunk by chunk while sending nothing else.
    let listener = {
        let _inside = t.live.enter().expect("enter live");
        TcpListener::bind((t.server_addr(false), 8080)).expect("bind server")
    };
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        let mut request = [0u8; 256];
        let _ = conn.read(&mut request).expect("request");
        for _ in 0..24 {
            conn.write_all(&[b'x'; 1000]).expect("chunk");
            // Paces the download: this is traffic, not a wait.
            thread::sleep(Duration::from_millis(500));
        }
    });
    let sinks = [t.start_sink(0, false), t.start_sink(1, false)];
    let agent = Agent::start(&t.live, "live", &mirror_all_config(&t));
    let request = b"GET /download HTTP/1.1\r\nHost: live\r\n\r\n";
    let received = {
        let _inside = t.client.enter().expect("enter client");
        let mut conn = std::net::TcpStream::connect((t.server_addr(false), 8080)).expect("connect");
        conn.write_all(request).expect("request");
        let mut body = Vec::new();
        conn.read_to_end(&mut body).expect("download");
        body.len()
    };
    server.join().expect("server");
    assert_eq!(received, 24_000);
    // The client's FIN, the flow's last packet copied, reached both sinks.
    wait_for(Duration::from_secs(10), || {
        sinks.iter().all(|s| s.flows().values().any(|f| f.closed))
    });
    let lines = agent.stop();
    assert_eq!(counter(&lines, "flows_sampled"), 1);
    for sink in &sinks {
        let flows = sink.flows();
        assert_eq!(flows.len(), 1, "one mirrored flow: {flows:?}");
        let flow = flows.values().next().expect("flow");
        assert_eq!(flow.payload_bytes, request.len() as u64);
        assert!(flow.closed, "its FIN is mirrored");
        // Two dozen ACKs went by; the shadow needs only one, after 10 s without a copy, to
        // keep its idle timer from ending the flow.
        assert_eq!(flow.bare_acks, 1, "{flow:?}");
    }
}

/// New flows the budget tests open per second: ten times their budget.
const PACED_FLOWS_PER_S: u64 = 200;

/// The mirror budget tests' classes: `GET /rare/` flows are class 1, with `budget_priority`.
const PRIORITY_RARE_CLASS: &str = r#"
[[classes]]
id = 1
name = "rare"
sample_percent = 100.0
budget_priority = true
[[rules]]
class = 1
payload_prefix = "GET /rare/"
"#;

/// Opens `flows` one-request flows at [`PACED_FLOWS_PER_S`] from 4 client threads, flow `i`
/// asking for `GET /{path(i)}/{i}`; with `pin_cpu0` every thread runs on CPU 0. Returns the
/// seconds it took.
fn run_paced_flows(
    t: &Topology,
    flows: usize,
    pin_cpu0: bool,
    path: impl Fn(usize) -> &'static str + Sync,
) -> f64 {
    let server = SocketAddr::new(t.server_addr(false), 8080);
    let started = std::time::Instant::now();
    thread::scope(|s| {
        for worker in 0..4 {
            let (started, path) = (&started, &path);
            s.spawn(move || {
                let _inside = t.client.enter().expect("enter client");
                if pin_cpu0 {
                    let mut cpu0 = nix::sched::CpuSet::new();
                    cpu0.set(0).expect("cpu 0");
                    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0)
                        .expect("pin to cpu 0");
                }
                for i in (worker..flows).step_by(4) {
                    // Paces new flows at the rate: flow `i` starts `i / rate` seconds in.
                    let due = Duration::from_micros(1_000_000 * i as u64 / PACED_FLOWS_PER_S);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        thread::sleep(wait);
                    }
                    http_flow(
                        server,
                        &[format!(
                            "GET /{}/{i} HTTP/1.1\r\nHost: live\r\n\r\n",
                            path(i)
                        )],
                    );
                }
            });
        }
    });
    started.elapsed().as_secs_f64()
}

/// Whether the lines count `flows` flows of the budget tests' classes, and as many sampled or
/// turned away by the budget.
fn every_flow_decided(lines: &[Value], flows: usize) -> bool {
    let classes = [0, 1];
    let seen: u64 = classes
        .iter()
        .map(|c| class_total(lines, *c, "flows"))
        .sum();
    let sampled: u64 = classes
        .iter()
        .map(|c| class_total(lines, *c, "sampled"))
        .sum();
    seen >= flows as u64 && sampled + counter(lines, "budget_limited") >= flows as u64
}

#[test]
fn the_mirror_budget_holds_host_wide_and_keeps_room_for_priority_classes() {
    if !privileged_or_skip("the_mirror_budget_holds_host_wide_and_keeps_room_for_priority_classes")
    {
        return;
    }
    const BUDGET: f64 = 20.0;
    const FLOWS: usize = 800;
    /// One flow in this many is of the priority class: 2.5/s, within its lane (15 % of 20/s).
    const RARE_EVERY: usize = 80;
    let t = Topology::new();
    let _server = t.start_server(false);
    let _sinks = [t.start_sink(0, false), t.start_sink(1, false)];
    let agent = start_live_agent(
        &t,
        &format!("default_sample_percent = 100.0\nmirror_budget_flows_per_s = {BUDGET}"),
        PRIORITY_RARE_CLASS,
    );

    // 200 new flows/s, every one sampled by its class's rate, ten times the budget. The client's
    // threads all run on CPU 0, so the kernel decides every flow there: a budget split per CPU
    // would mirror half of it.
    let seconds = run_paced_flows(&t, FLOWS, true, |i| {
        if i % RARE_EVERY == 0 { "rare" } else { "items" }
    });
    // A line counts every flow, each sampled or turned away.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        every_flow_decided(lines, FLOWS)
    });
    let lines = agent.stop();

    let rare_flows = class_total(&lines, 1, "flows");
    let rare_sampled = class_total(&lines, 1, "sampled");
    let common_sampled = class_total(&lines, 0, "sampled");
    let sampled = rare_sampled + common_sampled;
    let limited = counter(&lines, "budget_limited");
    println!(
        "{seconds:.2} s: sampled {sampled} (rare {rare_sampled} of {rare_flows}), turned away \
         {limited}, budget {BUDGET}/s"
    );
    assert_eq!(
        rare_flows,
        (FLOWS / RARE_EVERY) as u64,
        "rare flows classified"
    );
    assert_eq!(class_total(&lines, 0, "flows") + rare_flows, FLOWS as u64);
    // The hard limit: a second's burst, then the budget's rate, whichever CPU decides.
    assert!(
        sampled as f64 <= BUDGET * (seconds + 1.0) + 1.0,
        "{sampled} flows sampled in {seconds:.2} s against {BUDGET}/s"
    );
    // Used host-wide although one CPU decided every flow.
    assert!(
        sampled as f64 >= 0.85 * BUDGET * seconds,
        "only {sampled} flows sampled in {seconds:.2} s against {BUDGET}/s"
    );
    assert_eq!(
        limited + sampled,
        FLOWS as u64,
        "every flow was sampled or turned away"
    );
    // Common flows saturate the budget, yet every priority flow found room in the reserve.
    assert_eq!(rare_sampled, rare_flows, "priority flows admitted");
}

#[test]
fn the_priority_lane_caps_a_bursting_priority_class_and_the_common_ones_keep_the_rest() {
    if !privileged_or_skip(
        "the_priority_lane_caps_a_bursting_priority_class_and_the_common_ones_keep_the_rest",
    ) {
        return;
    }
    const BUDGET: f64 = 20.0;
    const FLOWS: usize = 800;
    let t = Topology::new();
    let _server = t.start_server(false);
    let _sinks = [t.start_sink(0, false), t.start_sink(1, false)];
    let agent = start_live_agent(
        &t,
        &format!("default_sample_percent = 100.0\nmirror_budget_flows_per_s = {BUDGET}"),
        PRIORITY_RARE_CLASS,
    );
    // Half the flows are of the priority class: 100/s against a lane of 15 % of 20/s (3/s).
    // The client's threads run on both CPUs, so flows are decided on both at once and the
    // buckets' compare-and-swap is raced.
    let seconds = run_paced_flows(
        &t,
        FLOWS,
        false,
        |i| {
            if i % 2 == 0 { "rare" } else { "items" }
        },
    );
    // A line counts every flow, each sampled or turned away.
    agent.wait_for_lines(Duration::from_secs(10), |lines| {
        every_flow_decided(lines, FLOWS)
    });
    let lines = agent.stop();

    let rare_sampled = class_total(&lines, 1, "sampled");
    let common_sampled = class_total(&lines, 0, "sampled");
    let sampled = rare_sampled + common_sampled;
    let lane = BUDGET * doppel_common::maps::MIRROR_PRIORITY_SHARE_PPM as f64 / 1e6;
    println!(
        "{seconds:.2} s: sampled {sampled} (priority {rare_sampled}, common {common_sampled}), \
         budget {BUDGET}/s, lane {lane}/s"
    );
    assert_eq!(class_total(&lines, 1, "flows"), (FLOWS / 2) as u64);
    assert!(
        sampled as f64 <= BUDGET * (seconds + 1.0) + 1.0,
        "{sampled} flows sampled in {seconds:.2} s against {BUDGET}/s"
    );
    // The lane: a second's burst of it, then its rate; a lost race only leaves it a flow short.
    assert!(
        rare_sampled as f64 <= lane * (seconds + 1.0) + 1.0,
        "{rare_sampled} priority flows in {seconds:.2} s against a lane of {lane}/s"
    );
    assert!(
        rare_sampled as f64 >= 0.8 * lane * seconds,
        "only {rare_sampled} priority flows in {seconds:.2} s against a lane of {lane}/s"
    );
    // The common classes keep the rest of the budget: a bursting priority class cannot starve
    // them.
    assert!(
        common_sampled as f64 >= 0.85 * (BUDGET - lane) * seconds,
        "only {common_sampled} common flows in {seconds:.2} s against {BUDGET}/s"
    );
}
