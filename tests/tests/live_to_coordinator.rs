//! The whole reporting path with real binaries: `doppel ca` makes the certificates, `doppel
//! serve` runs on the live host, and `doppel-agent --config live.toml` with a `[coordinator]`
//! section measures real HTTP flows and delivers every interval over QUIC + mTLS into SQLite.

use std::{
    io::{BufRead as _, BufReader},
    net::{SocketAddr, TcpListener},
    path::Path,
    process::Stdio,
    time::Duration,
};

use doppel_coordinator::store::Store;
use doppel_tests::{
    testbed::{Host, Link, privileged_or_skip, workspace_binary},
    traffic::{HttpServer, http_flow},
};

fn doppel(state: &Path, args: &[&str]) {
    let out = std::process::Command::new(workspace_binary("doppel"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .expect("run doppel");
    assert!(
        out.status.success(),
        "doppel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_live_agent_delivers_every_interval_to_the_coordinator() {
    if !privileged_or_skip("a_live_agent_delivers_every_interval_to_the_coordinator") {
        return;
    }
    let state = tempfile::tempdir().expect("state dir");
    let certs = state.path().join("agent-certs");
    doppel(state.path(), &["ca", "init"]);
    doppel(
        state.path(),
        &[
            "ca",
            "issue",
            "--agent",
            "live-1",
            "--out",
            certs.to_str().expect("utf-8"),
        ],
    );

    let client = Host::new("client").expect("client");
    let live = Host::new("live").expect("live");
    let link = Link::new(&client, &live).expect("link");
    let server = {
        let _inside = live.enter().expect("enter live");
        HttpServer::start(TcpListener::bind((link.b_v4, 8080)).expect("bind"))
    };
    let mut serve = live.command(workspace_binary("doppel").to_str().expect("utf-8"));
    serve
        .arg("--state-dir")
        .arg(state.path())
        .args(["serve", "--quic-listen", "127.0.0.1:4433"]);
    let _coordinator = live.spawn(serve).expect("spawn coordinator");

    let config = format!(
        r#"
interface = "{iface}"
report_interval_ms = 300
[coordinator]
address = "127.0.0.1:4433"
ca_cert = "{certs}/ca.crt"
cert = "{certs}/live-1.crt"
key = "{certs}/live-1.key"
spool_dir = "{spool}"
[[services]]
addr = "{addr}"
port = 8080
"#,
        iface = link.b_iface,
        certs = certs.display(),
        spool = state.path().join("spool").display(),
        addr = link.b_v4,
    );
    let config_path = state.path().join("live.toml");
    std::fs::write(&config_path, config).expect("config");
    let mut agent = live.command(workspace_binary("doppel-agent").to_str().expect("utf-8"));
    agent
        .arg("--config")
        .arg(&config_path)
        .stdout(Stdio::piped());
    let mut agent = live.spawn(agent).expect("spawn agent");
    let mut lines = BufReader::new(agent.child_mut().stdout.take().expect("stdout")).lines();

    {
        let _inside = client.enter().expect("enter client");
        for i in 0..30 {
            http_flow(
                SocketAddr::new(link.b_v4.into(), 8080),
                &[format!("GET /r/{i} HTTP/1.1\r\nHost: l\r\n\r\n")],
            );
        }
    }
    // Wait for a few printed intervals, then for their acknowledgements to empty the spool.
    let mut printed = 0;
    while printed < 4 {
        lines.next().expect("agent output").expect("line");
        printed += 1;
    }
    doppel_tests::lab::wait_for_stored_reports(
        state.path(),
        "live-1",
        printed,
        Duration::from_secs(10),
    );
    let stored = Store::open_in(state.path())
        .expect("store")
        .report_seqs("live-1")
        .expect("seqs");
    // A fresh spool numbers from the clock (so a wiped spool never reuses numbers): consecutive
    // from its first.
    let first = stored.first().copied().unwrap_or_default();
    assert_eq!(
        stored,
        (first..first + stored.len() as u64).collect::<Vec<_>>(),
        "every interval once, in order"
    );
    assert!(
        stored.len() >= printed,
        "{printed} intervals printed, {} stored",
        stored.len()
    );
    let status = agent.stop(Duration::from_secs(10));
    assert!(status.success(), "agent exit {status:?}");
    drop(server);
}
