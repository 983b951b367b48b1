//! The agent's reporting client against a real coordinator: real QUIC on 127.0.0.1, real
//! certificates, real SQLite, a coordinator stopped and restarted mid-stream.

use std::{net::SocketAddr, time::Duration};

use doppel_agent::report::{ClientConfig, ReportClient, Spool, SpoolConfig};
use doppel_common::wire::{IntervalReport, ResourceUsage};
use doppel_coordinator::{
    ca::CertificateAuthority,
    policy::{LiveEndpoint, Policy, WorkloadSpec},
    serve::{Coordinator, ServeConfig},
    store::Store,
};
use doppel_tests::reports::client_config;
use time::OffsetDateTime;

fn report(n: u64) -> IntervalReport {
    IntervalReport {
        seq: 0, // assigned by the spool
        interval_start_unix_ms: 1_700_000_000_000 + n * 1000,
        interval_ms: 1000,
        histograms: vec![],
        counters: vec![],
        host: ResourceUsage::default(),
        workload: None,
        patterns: vec![],
    }
}

struct Fixture {
    dir: tempfile::TempDir,
    client: ClientConfig,
}

fn fixture(agent: &str) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::in_state_dir(dir.path());
    ca.init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    // The coordinator's address is set once it listens.
    let client = client_config(dir.path(), agent, "127.0.0.1:0".parse().expect("addr"));
    Fixture { dir, client }
}

impl Fixture {
    async fn start(&self, quic_listen: SocketAddr) -> Coordinator {
        Coordinator::start(ServeConfig {
            state_dir: self.dir.path().to_owned(),
            quic_listen,
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            ..ServeConfig::default()
        })
        .await
        .expect("coordinator starts")
    }

    fn spool(&self) -> Spool {
        Spool::open(SpoolConfig::new(self.dir.path().join("spool"))).expect("spool")
    }
}

async fn eventually(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_sent_across_a_coordinator_restart_arrive_exactly_once() {
    let mut f = fixture("agent-1");
    let coordinator = f.start("127.0.0.1:0".parse().expect("addr")).await;
    let addr = coordinator.quic_addr;
    f.client.coordinator = addr;
    let agent = ReportClient::start(f.client.clone(), f.spool());
    let handle = agent.handle.clone();

    for n in 0..20 {
        handle.submit(report(n)).await.expect("submit");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Mid-stream: some of these may be acknowledged, some in flight, some not yet sent.
    coordinator.shutdown().await;
    for n in 20..40 {
        handle
            .submit(report(n))
            .await
            .expect("submit while stopped");
    }
    assert!(handle.unacknowledged() >= 20, "reports wait in the spool");
    let coordinator = f.start(addr).await;
    for n in 40..60 {
        handle.submit(report(n)).await.expect("submit");
    }
    eventually("every report acknowledged", Duration::from_secs(15), || {
        handle.unacknowledged() == 0
    })
    .await;

    let store = Store::open_in(f.dir.path()).expect("store");
    let seqs = store.report_seqs("agent-1").expect("seqs");
    let first = seqs.first().copied().unwrap_or_default();
    assert_eq!(
        seqs,
        (first..first + 60).collect::<Vec<_>>(),
        "each report exactly once"
    );
    assert!(
        handle
            .stats()
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    agent.stop().await.expect("stop");
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_reaches_a_connected_agent_within_a_second() {
    let mut f = fixture("live-1");
    let coordinator = f.start("127.0.0.1:0".parse().expect("addr")).await;
    f.client.coordinator = coordinator.quic_addr;
    let agent = ReportClient::start(f.client.clone(), f.spool());
    let mut policy = agent.handle.policy();
    tokio::time::timeout(Duration::from_secs(5), policy.wait_for(Option::is_some))
        .await
        .expect("the current policy arrives on connect")
        .expect("watch");
    assert!(
        policy
            .borrow()
            .as_ref()
            .is_some_and(|p| p.policy.workload.is_empty()),
        "an agent in no workload gets an empty policy"
    );

    let mut store = Store::open_in(f.dir.path()).expect("store");
    let mut spec_policy = Policy::default();
    spec_policy.classes[0].sample_rate = 0.25;
    let spec = WorkloadSpec {
        name: "web".into(),
        live: vec![LiveEndpoint {
            agent: "live-1".into(),
            vm_type: "m5.large".into(),
            interfaces: vec![],
            vxlan_source: None,
        }],
        services: vec!["10.0.0.2:8080".into()],
        shadows: vec![],
        policy: spec_policy,
        shadow: None,
    };
    store.put_workload(&spec, 0).expect("put");
    let changed_at = tokio::time::Instant::now();
    let revision = coordinator.publish_policy(&store).expect("publish");
    tokio::time::timeout(
        Duration::from_secs(1),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.revision == revision)),
    )
    .await
    .expect("the change arrives within a second")
    .expect("watch");
    let update = policy.borrow().clone().expect("policy");
    assert_eq!(update.policy.workload, "web");
    assert_eq!(update.policy.classes[0].sample_rate_ppm, 250_000);
    assert!(changed_at.elapsed() < Duration::from_secs(1));
    agent.stop().await.expect("stop");
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_from_a_wiped_spool_are_stored_not_taken_for_duplicates() {
    let mut f = fixture("agent-1");
    let coordinator = f.start("127.0.0.1:0".parse().expect("addr")).await;
    f.client.coordinator = coordinator.quic_addr;
    let agent = ReportClient::start(f.client.clone(), f.spool());
    let handle = agent.handle.clone();
    for n in 0..5 {
        handle.submit(report(n)).await.expect("submit");
    }
    eventually(
        "the first run's reports acknowledged",
        Duration::from_secs(10),
        || handle.unacknowledged() == 0,
    )
    .await;
    agent.stop().await.expect("stop");

    // The spool directory is lost (a reinstall, an operator's `rm -rf`); the agent starts again
    // under the same name with an empty spool.
    std::fs::remove_dir_all(f.dir.path().join("spool")).expect("wipe the spool");
    let agent = ReportClient::start(f.client.clone(), f.spool());
    let handle = agent.handle.clone();
    for n in 5..10 {
        handle.submit(report(n)).await.expect("submit");
    }
    eventually(
        "the second run's reports acknowledged",
        Duration::from_secs(10),
        || handle.unacknowledged() == 0,
    )
    .await;

    let store = Store::open_in(f.dir.path()).expect("store");
    let seqs = store.report_seqs("agent-1").expect("seqs");
    assert_eq!(
        seqs.len(),
        10,
        "both runs' reports stored, none taken for a duplicate: {seqs:?}"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", coordinator.api_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("doppel_reports_duplicate_total 0\n"),
        "no report acknowledged as a duplicate:\n{metrics}"
    );
    agent.stop().await.expect("stop");
    coordinator.shutdown().await;
}
