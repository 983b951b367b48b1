//! The foundation's proof that the whole eBPF path works: the agent's embedded TC programs are
//! loaded, attached in a fresh network namespace, count exactly the packets a peer host sends,
//! and leave nothing behind when detached or when the agent stops.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, UdpSocket},
    process::Stdio,
    thread,
    time::{Duration, Instant},
};

use doppel_agent::datapath::{AttachMode, Attached, Datapath, IfaceCount, ifindex};
use doppel_tests::testbed::{Host, Link, privileged_or_skip, workspace_binary};
use nix::sys::signal::Signal;

const DATAGRAMS: u64 = 1000;
const PAYLOAD: usize = 100;
/// Ethernet + IPv4 + UDP headers: what `skb->len` adds to the payload at TC.
const FRAME_OVERHEAD: u64 = 14 + 20 + 8;

struct Pair {
    client: Host,
    server: Host,
    link: Link,
}

fn quiet_pair() -> Pair {
    let client = Host::new("client").expect("client host");
    let server = Host::new("server").expect("server host");
    let link = Link::new(&client, &server).expect("link");
    link.make_quiet(&client, &server).expect("quiet link");
    Pair {
        client,
        server,
        link,
    }
}

impl Pair {
    fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.link.b_v4.into(), 9999)
    }

    /// Sends `DATAGRAMS` UDP datagrams from the client host to the server address.
    fn send_datagrams(&self) {
        let _inside = self.client.enter().expect("enter client");
        let socket = UdpSocket::bind((self.link.a_v4, 0)).expect("bind client socket");
        let payload = [0x5a; PAYLOAD];
        for _ in 0..DATAGRAMS {
            socket.send_to(&payload, self.server_addr()).expect("send");
        }
    }
}

fn totals(counts: &[IfaceCount], ifindex: u32, direction: &str) -> (u64, u64) {
    counts
        .iter()
        .find(|c| c.ifindex == ifindex && c.direction == direction)
        .map_or((0, 0), |c| (c.packets, c.bytes))
}

fn counts_exactly_then_detaches(mode: AttachMode, expected: Attached) {
    let pair = quiet_pair();
    let iface = pair.link.b_iface.clone();
    let inside = pair.server.enter().expect("enter server");
    // A bound socket, so the kernel answers nothing (no ICMP port unreachable on egress).
    let _sink = UdpSocket::bind(pair.server_addr()).expect("bind server socket");
    let index = ifindex(&iface).expect("ifindex");
    let mut datapath = Datapath::load().expect("load eBPF object");
    assert_eq!(datapath.attach(&iface, mode).expect("attach"), expected);
    if expected == Attached::Tcx {
        // What the wait after the detach below watches for.
        assert_eq!(tcx_programs(&iface), 1, "one tcx program on ingress");
    }

    thread::scope(|s| s.spawn(|| pair.send_datagrams()).join().expect("sender"));
    let counts = datapath.iface_counters().expect("read counters");
    assert_eq!(
        totals(&counts, index, "ingress"),
        (DATAGRAMS, DATAGRAMS * (PAYLOAD as u64 + FRAME_OVERHEAD)),
        "ingress counters after {DATAGRAMS} datagrams: {counts:?}"
    );
    assert_eq!(
        totals(&counts, index, "egress"),
        (0, 0),
        "nothing was sent back: {counts:?}"
    );

    datapath.detach(&iface).expect("detach");
    wait_until_no_tcx_program(&iface);
    thread::scope(|s| s.spawn(|| pair.send_datagrams()).join().expect("sender"));
    assert_eq!(
        datapath.iface_counters().expect("read counters"),
        counts,
        "a detached program must count nothing more"
    );
    drop(datapath);
    drop(inside);
    assert_no_tc_leftovers(&pair.server, &iface);
}

/// Programs attached to `iface`'s tcx ingress (in the calling thread's network namespace).
fn tcx_programs(iface: &str) -> usize {
    use aya::programs::{SchedClassifier, tc::TcAttachType};
    SchedClassifier::query_tcx(iface, TcAttachType::Ingress).map_or(0, |(_, p)| p.len())
}

/// Waits until no tcx program is attached to `iface`. A tcx link lives as long as any file
/// descriptor refers to it, and a process forked by another test thread of this binary holds a
/// copy of every descriptor until it execs: the detach takes effect then, a moment later.
fn wait_until_no_tcx_program(iface: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while tcx_programs(iface) > 0 {
        assert!(
            Instant::now() < deadline,
            "a tcx program is still attached to {iface} 5 s after detach"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

fn assert_no_tc_leftovers(host: &Host, iface: &str) {
    let qdiscs = host
        .run("tc", &["qdisc", "show", "dev", iface])
        .expect("tc qdisc show");
    let qdiscs = String::from_utf8_lossy(&qdiscs.stdout);
    assert!(
        !qdiscs.contains("clsact"),
        "clsact qdisc left on {iface}: {qdiscs}"
    );
    for direction in ["ingress", "egress"] {
        let filters = host
            .run("tc", &["filter", "show", "dev", iface, direction])
            .expect("tc filter show");
        assert!(
            filters.stdout.is_empty(),
            "filters left on {iface} {direction}"
        );
    }
}

#[test]
fn tcx_attachment_counts_every_packet_and_detaches() {
    if privileged_or_skip("tcx_attachment_counts_every_packet_and_detaches") {
        counts_exactly_then_detaches(AttachMode::Auto, Attached::Tcx);
    }
}

#[test]
fn clsact_attachment_counts_every_packet_and_removes_its_qdisc() {
    if privileged_or_skip("clsact_attachment_counts_every_packet_and_removes_its_qdisc") {
        counts_exactly_then_detaches(AttachMode::Clsact, Attached::Clsact { owns_qdisc: true });
    }
}

#[test]
fn a_clsact_qdisc_someone_else_added_is_left_in_place() {
    if !privileged_or_skip("a_clsact_qdisc_someone_else_added_is_left_in_place") {
        return;
    }
    let pair = quiet_pair();
    let iface = pair.link.b_iface.clone();
    pair.server
        .run("tc", &["qdisc", "add", "dev", &iface, "clsact"])
        .expect("add clsact");
    let _inside = pair.server.enter().expect("enter server");
    let mut datapath = Datapath::load().expect("load");
    let how = datapath.attach(&iface, AttachMode::Clsact).expect("attach");
    assert_eq!(how, Attached::Clsact { owns_qdisc: false });
    datapath.detach(&iface).expect("detach");
    let qdiscs = pair
        .server
        .run("tc", &["qdisc", "show", "dev", &iface])
        .expect("tc");
    assert!(String::from_utf8_lossy(&qdiscs.stdout).contains("clsact"));
}

/// Starts `doppel-agent counters` in the server host and waits for its "attached" line.
fn start_agent(
    pair: &Pair,
    mode: &str,
) -> (
    doppel_tests::testbed::Process,
    BufReader<std::process::ChildStdout>,
) {
    let mut command = pair
        .server
        .command(workspace_binary("doppel-agent").to_str().expect("utf-8"));
    command
        .args([
            "counters",
            "--iface",
            &pair.link.b_iface,
            "--attach-mode",
            mode,
        ])
        .args(["--interval-ms", "100"])
        .stdout(Stdio::piped());
    let mut agent = pair.server.spawn(command).expect("spawn agent");
    let mut lines = BufReader::new(agent.child_mut().stdout.take().expect("stdout"));
    let mut first = String::new();
    lines.read_line(&mut first).expect("agent output");
    assert!(
        first.contains("\"attached\""),
        "agent did not attach: {first:?}"
    );
    (agent, lines)
}

fn next_ingress_packets(lines: &mut BufReader<std::process::ChildStdout>) -> u64 {
    let mut line = String::new();
    lines.read_line(&mut line).expect("agent output");
    let value: serde_json::Value = serde_json::from_str(&line).expect("JSON line");
    value["counters"]
        .as_array()
        .expect("counters array")
        .iter()
        .filter(|c| c["direction"] == "ingress")
        .map(|c| c["packets"].as_u64().expect("packets"))
        .sum()
}

#[test]
fn the_agent_binary_counts_and_cleans_up_on_sigterm_and_after_a_crash() {
    if !privileged_or_skip("the_agent_binary_counts_and_cleans_up_on_sigterm_and_after_a_crash") {
        return;
    }
    let pair = quiet_pair();
    let iface = pair.link.b_iface.clone();
    let _sink = {
        let _inside = pair.server.enter().expect("enter server");
        UdpSocket::bind(pair.server_addr()).expect("bind server socket")
    };

    // A crashed agent (SIGKILL) leaves its clsact filters behind...
    let (mut crashed, _) = start_agent(&pair, "clsact");
    crashed.signal(Signal::SIGKILL);
    assert!(
        crashed.wait_timeout(Duration::from_secs(5)).is_some(),
        "killed agent exits"
    );
    let left = pair
        .server
        .run("tc", &["filter", "show", "dev", &iface, "ingress"])
        .expect("tc");
    assert!(
        !left.stdout.is_empty(),
        "a SIGKILLed agent leaves its filter (precondition)"
    );

    // ...which the next agent replaces: it counts every datagram once, not twice.
    let (mut agent, mut lines) = start_agent(&pair, "clsact");
    let before = next_ingress_packets(&mut lines);
    pair.send_datagrams();
    // Lines printed while datagrams were still on their way show fewer: read on to the first
    // that shows them all, then one more, which must show no more (twice counted would).
    let mut after = next_ingress_packets(&mut lines);
    for _ in 0..50 {
        if after - before >= DATAGRAMS {
            break;
        }
        after = next_ingress_packets(&mut lines);
    }
    let settled = next_ingress_packets(&mut lines);
    assert_eq!(
        (after - before, settled - before),
        (DATAGRAMS, DATAGRAMS),
        "the restarted agent counts each datagram once"
    );
    let filters = pair
        .server
        .run("tc", &["filter", "show", "dev", &iface, "ingress"])
        .expect("tc");
    let filters = String::from_utf8_lossy(&filters.stdout);
    assert_eq!(
        filters.matches("doppel_tc_ingress").count(),
        1,
        "one filter, not two: {filters}"
    );

    let status = agent.stop(Duration::from_secs(5));
    assert!(
        status.success(),
        "agent exits cleanly on SIGTERM: {status:?}"
    );
    assert_no_tc_leftovers(&pair.server, &iface);
}

#[test]
fn the_agent_refuses_an_interface_that_does_not_exist() {
    if !privileged_or_skip("the_agent_refuses_an_interface_that_does_not_exist") {
        return;
    }
    let host = Host::new("lonely").expect("host");
    let agent = workspace_binary("doppel-agent");
    let out = host
        .command(agent.to_str().expect("utf-8"))
        .args(["counters", "--iface", "nosuch0"])
        .output()
        .expect("run agent");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("interface \"nosuch0\" does not exist"),
        "stderr: {stderr}"
    );
}
