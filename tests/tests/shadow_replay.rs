//! The shadow role end to end: a client talks to real servers (nginx, redis-server) on a live
//! host whose agent mirrors every flow over VXLAN to a shadow host; the shadow agent
//! (`doppel-agent --config shadow.toml`) admits the session in XDP, reassembles the flows and
//! replays them against the same servers on the shadow's loopback. The servers' own records
//! (nginx access logs, redis `INFO commandstats`) say what was replayed.

use std::{
    net::{SocketAddr, TcpListener, UdpSocket},
    thread,
    time::Duration,
};

use doppel_agent::shadow::vxlan::SegmentBuilder;
use doppel_tests::{
    agent::counter,
    testbed::privileged_or_skip,
    topology::{Topology, VNI, wait_for},
    traffic::{HttpServer, http_flow},
    workloads::{Nginx, Redis, redis_flow},
};
use serde_json::Value;

/// The largest p50 (µs) among a source's latency entries, and their total count.
fn latency(lines: &[Value], source: Option<&str>) -> (f64, u64) {
    let entries: Vec<Value> = lines
        .iter()
        .flat_map(|l| l["latency"].as_array().cloned().unwrap_or_default())
        .filter(|e| source.is_none_or(|s| e["source"] == s))
        .filter(|e| e["scope"] != "mirrored")
        .collect();
    let p50 = entries
        .iter()
        .filter_map(|e| e["p50_us"].as_f64())
        .fold(0.0, f64::max);
    let count = entries.iter().filter_map(|e| e["count"].as_u64()).sum();
    (p50, count)
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Runs `flows` HTTP flows from the client, 2 at a time.
fn http_flows(
    t: &Topology,
    server: SocketAddr,
    flows: usize,
    requests: impl Fn(usize) -> Vec<String> + Sync,
) {
    thread::scope(|s| {
        for worker in 0..2 {
            let requests = &requests;
            s.spawn(move || {
                let _inside = t.client.enter().expect("enter client");
                for i in (worker..flows).step_by(2) {
                    http_flow(server, &requests(i));
                }
            });
        }
    });
}

fn mixed_requests(i: usize) -> Vec<String> {
    vec![
        format!("GET /items/{i}?q=a HTTP/1.1\r\nHost: live\r\n\r\n"),
        format!(
            "POST /orders/{i} HTTP/1.1\r\nHost: live\r\nContent-Length: 11\r\n\r\n{{\"qty\": 1}}\n"
        ),
        format!("OPTIONS /static/{i}.css HTTP/1.1\r\nHost: live\r\n\r\n"),
        format!(
            "PUT /upload/{i} HTTP/1.1\r\nHost: live\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n0\r\n\r\n"
        ),
        format!("GET /after-writes/{i} HTTP/1.1\r\nHost: live\r\n\r\n"),
    ]
}

#[test]
fn nginx_shadow_serves_exactly_the_mirrored_safe_requests_and_skips_writes() {
    if !privileged_or_skip(
        "nginx_shadow_serves_exactly_the_mirrored_safe_requests_and_skips_writes",
    ) {
        return;
    }
    let t = Topology::new();
    let live_nginx = Nginx::start(&t.live, t.live_addr(), 8080);
    let shadow_nginx = Nginx::start(&t.shadow, "127.0.0.1".parse().expect("addr"), 8080);
    let shadow = t.shadow_agent(&["port = 8080"], "");
    let live = t.live_agent(&[8080]);

    const FLOWS: usize = 30;
    http_flows(&t, live_nginx.addr, FLOWS, mixed_requests);
    let live_log = live_nginx.access_log_of(FLOWS * 5);
    assert_eq!(
        live_log.len(),
        FLOWS * 5,
        "the live nginx served every request"
    );
    let expected: Vec<String> = live_log
        .iter()
        .filter(|l| l.starts_with("GET ") || l.starts_with("OPTIONS "))
        .cloned()
        .collect();
    let complete = wait_for(Duration::from_secs(15), || {
        shadow_nginx.access_log().len() >= expected.len()
    });
    // The server logs a request before its response reaches the replayer: wait for the
    // shadow agent to report the flows ended and the exchanges counted.
    wait_for(Duration::from_secs(5), || {
        shadow.counter("flows_completed") >= FLOWS as u64
            && shadow.counter("exchanges") >= 3 * FLOWS as u64
    });
    let shadow_lines = shadow.stop();
    let live_lines = live.stop();
    assert!(
        complete,
        "shadow served {} of {}",
        shadow_nginx.access_log().len(),
        expected.len()
    );
    // Exactly the safe requests, each once; the POSTs and PUTs in between were skipped without
    // breaking the keep-alive connection (the GET after them was still replayed).
    assert_eq!(sorted(shadow_nginx.access_log()), sorted(expected));
    assert_eq!(counter(&live_lines, "flows_sampled"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "flows_started"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "flows_completed"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "requests_denied"), 2 * FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "exchanges"), 3 * FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "http_2xx"), 3 * FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "replay_connections"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "xdp_dropped_not_admitted"), 0);
    assert!(counter(&shadow_lines, "xdp_admitted") > 0);
    // The in-kernel measurement on the shadow's loopback saw every replayed exchange, as the
    // replayer did.
    let (_, kernel) = latency(&shadow_lines, Some("kernel"));
    let (_, replayed) = latency(&shadow_lines, Some("replay_first_byte"));
    assert_eq!(kernel, 3 * FLOWS as u64, "kernel-timed shadow exchanges");
    assert_eq!(replayed, 3 * FLOWS as u64, "replayer-timed exchanges");
    // Resource use of the shadow host is reported every interval.
    assert!(shadow_lines.iter().all(|l| l["host"].is_object()));
}

#[test]
fn live_counts_the_5xx_responses_its_server_sent() {
    if !privileged_or_skip("live_counts_the_5xx_responses_its_server_sent") {
        return;
    }
    // nginx answers `/fail` with 503 and `/items/..` with 200; the data path reads the status
    // from the first bytes of each exchange's response.
    let t = Topology::new();
    let live_nginx = Nginx::start(&t.live, t.live_addr(), 8080);
    let live = t.live_agent(&[8080]);
    const FLOWS: usize = 6;
    http_flows(&t, live_nginx.addr, FLOWS, |i| {
        vec![
            "GET /fail HTTP/1.1\r\nHost: live\r\n\r\n".to_owned(),
            format!("GET /items/{i} HTTP/1.1\r\nHost: live\r\n\r\n"),
        ]
    });
    let log = live_nginx.access_log_of(2 * FLOWS);
    // The server's own record: it served `/fail` (its config's `return 503`) once a flow.
    assert_eq!(
        log.iter().filter(|l| *l == "GET /fail").count(),
        FLOWS,
        "{log:?}"
    );
    wait_for(Duration::from_secs(5), || {
        live.counter("exchanges") >= 2 * FLOWS as u64
    });
    let lines = live.stop();
    assert_eq!(counter(&lines, "exchanges"), 2 * FLOWS as u64);
    assert_eq!(
        counter(&lines, "http_5xx"),
        FLOWS as u64,
        "one 503 per flow"
    );
    assert_eq!(counter(&lines, "error_replies"), 0, "a 200 is no error");
}

#[test]
fn allowed_writes_are_replayed_and_amplification_doubles_the_requests() {
    if !privileged_or_skip("allowed_writes_are_replayed_and_amplification_doubles_the_requests") {
        return;
    }
    let t = Topology::new();
    let live_nginx = Nginx::start(&t.live, t.live_addr(), 8080);
    let shadow_nginx = Nginx::start(&t.shadow, "127.0.0.1".parse().expect("addr"), 8080);
    let shadow = t.shadow_agent(
        &["port = 8080"],
        "amplification = 2.0\n[http]\nallow_methods = [\"GET\", \"OPTIONS\", \"POST\", \"PUT\"]",
    );
    let live = t.live_agent(&[8080]);
    const FLOWS: usize = 20;
    http_flows(&t, live_nginx.addr, FLOWS, mixed_requests);
    let live_log = live_nginx.access_log_of(FLOWS * 5);
    let expected: Vec<String> = live_log
        .iter()
        .flat_map(|l| [l.clone(), l.clone()])
        .collect();
    let complete = wait_for(Duration::from_secs(15), || {
        shadow_nginx.access_log().len() >= expected.len()
    });
    wait_for(Duration::from_secs(5), || {
        shadow.counter("replay_connections") >= 2 * FLOWS as u64
    });
    let shadow_lines = shadow.stop();
    live.stop();
    assert!(
        complete,
        "shadow served {} of {}",
        shadow_nginx.access_log().len(),
        expected.len()
    );
    assert_eq!(
        sorted(shadow_nginx.access_log()),
        sorted(expected),
        "every request twice, writes included"
    );
    assert_eq!(
        counter(&shadow_lines, "replay_connections"),
        2 * FLOWS as u64
    );
    assert_eq!(counter(&shadow_lines, "requests_denied"), 0);
}

#[test]
fn a_delay_on_the_shadow_shows_in_shadow_latency_and_not_in_live_latency() {
    if !privileged_or_skip("a_delay_on_the_shadow_shows_in_shadow_latency_and_not_in_live_latency")
    {
        return;
    }
    let t = Topology::new();
    let _live_server = {
        let _inside = t.live.enter().expect("enter live");
        HttpServer::start(TcpListener::bind((t.live_addr(), 8080)).expect("bind"))
    };
    let _shadow_server = {
        let _inside = t.shadow.enter().expect("enter shadow");
        HttpServer::start_with_delay(
            TcpListener::bind(("127.0.0.1", 8080)).expect("bind"),
            Duration::from_millis(40),
        )
    };
    let shadow = t.shadow_agent(&["port = 8080"], "");
    let live = t.live_agent(&[8080]);
    const FLOWS: usize = 10;
    http_flows(&t, SocketAddr::new(t.live_addr(), 8080), FLOWS, |i| {
        vec![format!("GET /item/{i} HTTP/1.1\r\nHost: live\r\n\r\n"); 2]
    });
    // Every exchange timed by the replayer, in the shadow's kernel and in live's.
    wait_for(Duration::from_secs(15), || {
        shadow.counter("exchanges") >= 2 * FLOWS as u64
            && latency(&shadow.lines(), Some("kernel")).1 >= 2 * FLOWS as u64
            && latency(&live.lines(), None).1 >= 2 * FLOWS as u64
    });
    let shadow_lines = shadow.stop();
    let live_lines = live.stop();
    let (live_p50, live_n) = latency(&live_lines, None);
    let (kernel_p50, kernel_n) = latency(&shadow_lines, Some("kernel"));
    let (replay_p50, replay_n) = latency(&shadow_lines, Some("replay_first_byte"));
    assert_eq!(live_n, 2 * FLOWS as u64, "live exchanges measured");
    assert_eq!(
        kernel_n,
        2 * FLOWS as u64,
        "shadow exchanges measured in the kernel"
    );
    assert_eq!(
        replay_n,
        2 * FLOWS as u64,
        "shadow exchanges measured by the replayer"
    );
    assert!(
        live_p50 < 10_000.0,
        "live p50 {live_p50} µs: the delay is not on the live host"
    );
    assert!(
        kernel_p50 >= 39_000.0,
        "shadow kernel p50 {kernel_p50} µs shows the 40 ms delay"
    );
    assert!(
        replay_p50 >= 39_000.0,
        "shadow replay p50 {replay_p50} µs shows the 40 ms delay"
    );
}

#[test]
fn redis_shadow_executes_the_commands_the_client_sent() {
    if !privileged_or_skip("redis_shadow_executes_the_commands_the_client_sent") {
        return;
    }
    let t = Topology::new();
    let live_redis = Redis::start(&t.live, t.live_addr(), 6379);
    let shadow_redis = Redis::start(&t.shadow, "127.0.0.1".parse().expect("addr"), 6379);
    let shadow = t.shadow_agent(&["port = 6379"], "");
    let live = t.live_agent(&[6379]);
    const FLOWS: usize = 12;
    {
        let _inside = t.client.enter().expect("enter client");
        for i in 0..FLOWS {
            let key = format!("k{i}");
            redis_flow(
                live_redis.addr,
                &[
                    &["SET", &key, "v"],
                    &["INCR", "counter"],
                    &["GET", &key],
                    &["LPUSH", "list", &key],
                    // A server-side error reply (WRONGTYPE): counted on both sides alike.
                    &["INCR", "list"],
                ],
            );
        }
    }
    let wanted = ["set", "incr", "get", "lpush"];
    let live_calls = live_redis.command_calls(&t.live);
    for command in wanted {
        let per_flow = if command == "incr" { 2 } else { 1 };
        assert_eq!(
            live_calls.get(command),
            Some(&(per_flow * FLOWS as u64)),
            "live {command}"
        );
    }
    let replayed = wait_for(Duration::from_secs(15), || {
        let calls = shadow_redis.command_calls(&t.shadow);
        wanted.iter().all(|c| calls.get(*c) >= live_calls.get(*c))
    });
    wait_for(Duration::from_secs(5), || {
        shadow.counter("exchanges") >= 5 * FLOWS as u64
            && live.counter("error_replies") >= FLOWS as u64
    });
    let shadow_calls = shadow_redis.command_calls(&t.shadow);
    let shadow_lines = shadow.stop();
    let live_lines = live.stop();
    assert!(
        replayed,
        "shadow executed {shadow_calls:?}, live {live_calls:?}"
    );
    for command in wanted {
        assert_eq!(
            shadow_calls.get(command),
            live_calls.get(command),
            "shadow {command}"
        );
    }
    // RESP framing: one exchange per command, each reply read to its end.
    assert_eq!(counter(&shadow_lines, "exchanges"), 5 * FLOWS as u64);
    // The error replies, and nothing else, are errors; on live too (from the first response
    // bytes, in the kernel). The clients' closes are not.
    assert_eq!(counter(&shadow_lines, "error_replies"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "exchange_errors"), FLOWS as u64);
    assert_eq!(counter(&live_lines, "error_replies"), FLOWS as u64);
    assert_eq!(counter(&live_lines, "exchange_errors"), FLOWS as u64);
    assert_eq!(counter(&shadow_lines, "replay_resets"), 0);
}

#[test]
fn non_admitted_sessions_never_reach_user_space_and_bad_input_is_counted() {
    if !privileged_or_skip("non_admitted_sessions_never_reach_user_space_and_bad_input_is_counted")
    {
        return;
    }
    let t = Topology::new();
    // No workload listens on the shadow: admitted flows must fail fast, counted.
    let shadow = t.shadow_agent(&["port = 8080"], "connect_timeout_ms = 500");
    // A second address on the live host's shadow link: a source that is not admitted.
    let stranger = {
        let a = t.shadow_link.a_v4.octets();
        std::net::Ipv4Addr::new(a[0], a[1], a[2], 77)
    };
    t.live
        .ip(&[
            "addr",
            "add",
            &format!("{stranger}/24"),
            "dev",
            &t.shadow_link.a_iface,
        ])
        .expect("second address");
    let target = SocketAddr::new(t.shadow_link.b_v4.into(), 4789);
    let segment = |vni: u32, port: u16| SegmentBuilder {
        vni,
        client: SocketAddr::new(t.live_addr(), port),
        service: SocketAddr::new(t.live_addr(), 8080),
    };
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    {
        let _inside = t.live.enter().expect("enter live");
        let admitted = UdpSocket::bind((t.shadow_link.a_v4, 0)).expect("bind");
        let foreign = UdpSocket::bind((stranger, 0)).expect("bind stranger");
        for i in 0..20u16 {
            // Wrong VNI from the admitted source, and the right VNI from a stranger.
            admitted
                .send_to(
                    &segment(VNI + 1, 1000 + i).datagram(1, 1, 0, request),
                    target,
                )
                .expect("send");
            foreign
                .send_to(&segment(VNI, 2000 + i).datagram(1, 1, 0, request), target)
                .expect("send");
            // Too short to be VXLAN: dropped in XDP as malformed.
            admitted.send_to(&[0x08, 0, 0], target).expect("send");
        }
        // Admitted, but the inner frame is not TCP, or its lengths are absurd.
        let good = segment(VNI, 3000).datagram(1, 1, 0, request);
        let mut not_tcp = good.clone();
        not_tcp[8 + 14 + 9] = 17;
        let mut absurd = good.clone();
        absurd[8 + 14 + 2..8 + 14 + 4].copy_from_slice(&60_000u16.to_be_bytes());
        for bad in [&not_tcp, &absurd, &good[..30].to_vec()] {
            admitted.send_to(bad, target).expect("send");
        }
        // Admitted flows to a workload that is down.
        for i in 0..5u16 {
            admitted
                .send_to(
                    &segment(VNI, 4000 + i).datagram(1, 1, 0x01, request),
                    target,
                )
                .expect("send");
        }
    }
    wait_for(Duration::from_secs(5), || {
        let log = shadow.log();
        shadow.counter("connect_failures") >= 5
            && log.contains("not admitted")
            && log.contains("refused replay connections")
    });
    // The log names each cause: the last refused (source, VNI) with the session to add, and a
    // workload that refuses the replays.
    let log = shadow.log();
    assert!(
        log.contains("not admitted") && log.contains(&format!("source={stranger} vni={VNI}")),
        "the refused source and VNI are named: {log}"
    );
    assert!(
        log.contains("refused replay connections") && log.contains("counter=\"connect_failures\""),
        "the refusing workload is named: {log}"
    );
    let lines = shadow.stop();
    assert_eq!(counter(&lines, "xdp_dropped_not_admitted"), 40);
    assert_eq!(counter(&lines, "xdp_dropped_malformed"), 20);
    assert_eq!(
        counter(&lines, "not_admitted"),
        0,
        "nothing non-admitted reached the socket"
    );
    assert_eq!(
        counter(&lines, "datagrams"),
        8,
        "only admitted datagrams reached the socket"
    );
    assert_eq!(counter(&lines, "decode_not_tcp"), 1);
    assert_eq!(counter(&lines, "decode_bad_ip"), 2);
    assert_eq!(counter(&lines, "flows_started"), 5);
    assert_eq!(counter(&lines, "connect_failures"), 5);
    assert_eq!(counter(&lines, "exchanges"), 0);
}

/// 20 keep-alive requests whose segments fill the client link's 1500-byte MTU, mirrored to a
/// shadow whose link has `shadow_mtu`. Returns live's `ip_fragments_created`, its log, and the
/// requests the live and the shadow nginx served.
fn full_size_requests(shadow_mtu: u32) -> (u64, String, usize, usize) {
    let t = Topology::new();
    for (host, iface) in [
        (&t.live, &t.shadow_link.a_iface),
        (&t.shadow, &t.shadow_link.b_iface),
    ] {
        host.ip(&["link", "set", "dev", iface, "mtu", &shadow_mtu.to_string()])
            .expect("set the shadow link's MTU");
    }
    let live_nginx = Nginx::start(&t.live, t.live_addr(), 8080);
    let shadow_nginx = Nginx::start(&t.shadow, "127.0.0.1".parse().expect("addr"), 8080);
    let shadow = t.shadow_agent(&["port = 8080"], "");
    let live = t.live_agent(&[8080]);
    // 1448 bytes of TCP payload: a full segment on a 1500-byte link with timestamps.
    let pad = "x".repeat(1448 - "GET /full/00 HTTP/1.1\r\nHost: live\r\nX-Pad: \r\n\r\n".len());
    let requests: Vec<String> = (0..20)
        .map(|i| format!("GET /full/{i:02} HTTP/1.1\r\nHost: live\r\nX-Pad: {pad}\r\n\r\n"))
        .collect();
    {
        let _inside = t.client.enter().expect("enter client");
        http_flow(live_nginx.addr, &requests);
    }
    let served_live = live_nginx.access_log_of(20).len();
    wait_for(Duration::from_secs(3), || {
        shadow_nginx.access_log().len() >= 20
    });
    // Stopping closes live's last interval, whose report counts (and warns of) every fragment.
    let (lines, log) = live.stop_with_log();
    shadow.stop();
    (
        counter(&lines, "ip_fragments_created"),
        log,
        served_live,
        shadow_nginx.access_log().len(),
    )
}

#[test]
fn copies_of_full_size_packets_fit_a_path_with_room_and_are_flagged_where_it_has_none() {
    if !privileged_or_skip(
        "copies_of_full_size_packets_fit_a_path_with_room_and_are_flagged_where_it_has_none",
    ) {
        return;
    }
    // The path to the shadow as large as the workload's: each copy is fragmented in two, and
    // the agent says so and why (the shadow reassembles and still replays every request).
    let (fragments, log, live, shadow) = full_size_requests(1500);
    assert_eq!((live, shadow), (20, 20), "every request replayed");
    assert!(fragments >= 20, "copies fragmented: {fragments}");
    assert!(
        log.contains("copies are being IP-fragmented") && log.contains("50 bytes"),
        "the fragmentation and its fix are logged: {log}"
    );
    // 50 bytes of room, as the example config documents: no fragment, nothing logged.
    let (fragments, log, live, shadow) = full_size_requests(1550);
    assert_eq!((live, shadow), (20, 20), "every request replayed");
    assert_eq!(fragments, 0, "copies fit the path");
    assert!(!log.contains("IP-fragmented"), "{log}");
}

#[test]
fn copies_leaving_through_the_workloads_own_interface_are_not_counted_as_its_traffic() {
    if !privileged_or_skip(
        "copies_leaving_through_the_workloads_own_interface_are_not_counted_as_its_traffic",
    ) {
        return;
    }
    // One link for everything, as on a host with one NIC: the client (on the shadow host)
    // reaches live over it, and live's copies of full-size packets go back over it to the
    // shadow, IP-fragmented.
    let t = Topology::new();
    let live_addr = SocketAddr::new(t.shadow_link.a_v4.into(), 8080);
    let live_nginx = Nginx::start(&t.live, live_addr.ip(), 8080);
    let live = doppel_tests::agent::AgentProcess::start(
        &t.live,
        "live",
        &format!(
            "interface = \"{iface}\"\nreport_interval_ms = 300\ndefault_sample_percent = 100.0\n\
             [[services]]\naddr = \"{addr}\"\nport = 8080\n\
             [[mirror_sessions]]\nshadow = \"{shadow}\"\nvni = 9\n",
            iface = t.shadow_link.a_iface,
            addr = live_addr.ip(),
            shadow = t.shadow_link.b_v4,
        ),
    );
    let pad = "x".repeat(1448 - "GET /one/00 HTTP/1.1\r\nHost: live\r\nX-Pad: \r\n\r\n".len());
    let requests: Vec<String> = (0..20)
        .map(|i| format!("GET /one/{i:02} HTTP/1.1\r\nHost: live\r\nX-Pad: {pad}\r\n\r\n"))
        .collect();
    {
        let _inside = t.shadow.enter().expect("enter the client's host");
        http_flow(live_addr, &requests);
    }
    assert_eq!(live_nginx.access_log_of(20).len(), 20);
    wait_for(Duration::from_secs(5), || {
        live.counter("ip_fragments_created") >= 20 && live.counter("clones_sent") >= 20
    });
    let lines = live.stop();
    assert!(
        counter(&lines, "ip_fragments_created") >= 20,
        "the copies were fragmented on the workload's interface"
    );
    assert!(counter(&lines, "clones_sent") >= 20);
    // Each copy is two fragments, which counted 42 as skipped before copies were marked; what
    // remains is the link's own (ARP and the like), fewer than one per copy.
    let foreign = counter(&lines, "parse_skipped") + counter(&lines, "other_traffic");
    assert!(
        foreign < 20,
        "the agent's own copies and their fragments are not the workload's traffic: \
         parse_skipped {} other_traffic {}",
        counter(&lines, "parse_skipped"),
        counter(&lines, "other_traffic")
    );
    assert_eq!(counter(&lines, "exchanges"), 20);
}
