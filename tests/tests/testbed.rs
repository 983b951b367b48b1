//! The testbed's own guarantees: hosts reach each other and nothing else, the root namespace is
//! never changed, and every resource is gone after a panic.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    panic,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use doppel_tests::testbed::{Cgroup, CgroupLimits, Host, Link, privileged_or_skip, wait_for};

fn root_network_state() -> String {
    let mut state = String::new();
    for args in [
        &["-br", "addr"][..],
        &["route"],
        &["-6", "route"],
        &["-br", "link"],
    ] {
        let out = Command::new("ip").args(args).output().expect("ip");
        state.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    state
}

fn echo_once(server: &Host, addr: IpAddr, client: &Host) {
    let listener = {
        let _inside = server.enter().expect("enter server");
        TcpListener::bind(SocketAddr::new(addr, 0)).expect("bind")
    };
    let target = listener.local_addr().expect("local addr");
    thread::scope(|s| {
        s.spawn(|| {
            let (mut conn, _) = listener.accept().expect("accept");
            let mut buf = [0; 5];
            conn.read_exact(&mut buf).expect("read");
            conn.write_all(&buf).expect("write");
        });
        let _inside = client.enter().expect("enter client");
        let mut conn =
            TcpStream::connect_timeout(&target, Duration::from_secs(5)).expect("connect");
        conn.write_all(b"hello").expect("write");
        let mut back = [0; 5];
        conn.read_exact(&mut back).expect("read");
        assert_eq!(&back, b"hello");
    });
}

#[test]
fn linked_hosts_talk_over_ipv4_and_ipv6_and_have_no_route_out() {
    if !privileged_or_skip("linked_hosts_talk_over_ipv4_and_ipv6_and_have_no_route_out") {
        return;
    }
    let (a, b) = (
        Host::new("a").expect("host a"),
        Host::new("b").expect("host b"),
    );
    let link = Link::new(&a, &b).expect("link");
    echo_once(&b, link.b_v4.into(), &a);
    echo_once(&a, link.a_v6.into(), &b);

    // Only the link's own prefixes are reachable: no default route, so nothing can leave.
    let routes = a.ip(&["route"]).expect("routes");
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("default"));
    assert!(
        a.ip(&["route", "get", "192.0.2.1"]).is_err(),
        "a route out of the testbed exists"
    );

    // Processes inside a host see the host's interfaces, not the root namespace's.
    let links = a.run("ip", &["-br", "link"]).expect("ip link");
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(
        links.contains(&link.a_iface) && links.lines().count() == 2,
        "{links}"
    );
}

#[test]
fn everything_is_removed_after_a_panic_and_the_root_namespace_is_untouched() {
    if !privileged_or_skip(
        "everything_is_removed_after_a_panic_and_the_root_namespace_is_untouched",
    ) {
        return;
    }
    let before = root_network_state();
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = panic::catch_unwind(|| {
        let host = Host::new("doomed").expect("host");
        let peer = Host::new("peer").expect("peer");
        let _link = Link::new(&host, &peer).expect("link");
        let cgroup = Cgroup::new("doomed", CgroupLimits::default()).expect("cgroup");
        let mut command = host.command("sleep");
        command.arg("300").stdout(Stdio::null());
        let process = host.spawn(command).expect("spawn");
        cgroup.add(process.pid()).expect("join cgroup");
        // A daemon that leaves our process group is still found through the namespace.
        let daemon = host
            .command("setsid")
            .args(["sleep", "301"])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn daemon");
        tx.send((
            host.netns().to_owned(),
            process.pid(),
            daemon,
            cgroup.dirs().to_vec(),
        ))
        .expect("send");
        panic!("the test fails here");
    });
    assert!(outcome.is_err());
    let (netns, pid, daemon, cgroup_dirs) = rx.recv().expect("names");
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "namespace {netns} left behind"
    );
    let mut daemon = daemon;
    let daemon_pid = daemon.id();
    // Our own child: it has exited once `wait` returns (the host's teardown killed it).
    let _ = daemon.wait();
    for pid in [pid, daemon_pid] {
        let stat = || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or killed and not yet reaped by its parent: a zombie (state Z). SIGKILL is
        // delivered asynchronously, so the state is polled rather than read once.
        let dead = |state: &str| state.is_empty() || state.contains(") Z ");
        assert!(
            wait_for(Duration::from_secs(5), || dead(&stat())),
            "process {pid} still running: {}",
            stat()
        );
    }
    for dir in cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert_eq!(
        root_network_state(),
        before,
        "the root namespace's network changed"
    );
}

#[test]
fn a_cgroup_limits_cpu_and_memory_of_its_processes() {
    if !privileged_or_skip("a_cgroup_limits_cpu_and_memory_of_its_processes") {
        return;
    }
    let limits = CgroupLimits {
        cpu_millis: Some(250),
        memory_bytes: Some(64 << 20),
    };
    let cgroup = Cgroup::new("small", limits).expect("cgroup");
    let read = |file: &str| {
        cgroup
            .dirs()
            .iter()
            .map(|d| d.join(file))
            .find(|p| p.exists())
            .map(|p| std::fs::read_to_string(p).expect("read").trim().to_owned())
    };
    match read("cpu.max") {
        Some(v2) => {
            assert_eq!(v2, "25000 100000");
            assert_eq!(read("memory.max").as_deref(), Some("67108864"));
        }
        None => {
            assert_eq!(read("cpu.cfs_quota_us").as_deref(), Some("25000"));
            assert_eq!(read("memory.limit_in_bytes").as_deref(), Some("67108864"));
        }
    }

    // A busy loop confined to a quarter CPU gets about a quarter CPU.
    let mut busy = Command::new("sh")
        .args(["-c", "while :; do :; done"])
        .spawn()
        .expect("spawn");
    cgroup.add(busy.id()).expect("join cgroup");
    assert_eq!(cgroup.pids(), vec![busy.id()]);
    let cpu_ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .expect("comm")
            .1
            .split_whitespace()
            .collect();
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
    };
    let start = cpu_ticks(busy.id());
    thread::sleep(Duration::from_secs(2));
    let used = (cpu_ticks(busy.id()) - start) as f64 / 100.0; // USER_HZ = 100
    assert!(
        (0.2..=0.8).contains(&used),
        "a 0.25-CPU cgroup used {used:.2} CPU-seconds in 2 s"
    );
    drop(cgroup);
    assert!(
        busy.wait().is_ok(),
        "dropping the cgroup kills its processes"
    );
}
