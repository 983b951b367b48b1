//! The `doppel` CLI binary against a running coordinator: real HTTP on 127.0.0.1, real SQLite,
//! and a real agent reporting client on QUIC receiving the policy the CLI changed.

use std::{
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use doppel_agent::report::ReportClient;
use doppel_coordinator::{
    ca::CertificateAuthority,
    client::{ApiClient, ClientError},
    compare::{Comparison, Verdict},
    policy::{Policy, WorkloadSpec},
    serve::{Coordinator, ServeConfig},
    store::{CheckedReport, Store},
};
use doppel_tests::{
    reports::{WEB_TOML, interval_report, report_client},
    testbed::workspace_binary,
};
use hdrhistogram::Histogram;
use time::OffsetDateTime;

struct Fixture {
    dir: tempfile::TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    CertificateAuthority::in_state_dir(dir.path())
        .init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    Fixture { dir }
}

impl Fixture {
    fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    async fn start(&self) -> Coordinator {
        Coordinator::start(ServeConfig {
            state_dir: self.state_dir().to_owned(),
            quic_listen: "127.0.0.1:0".parse().expect("addr"),
            api_listen: "127.0.0.1:0".parse().expect("addr"),
            ..ServeConfig::default()
        })
        .await
        .expect("coordinator starts")
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.state_dir().join(name);
        std::fs::write(&path, text).expect("write");
        path
    }

    /// Runs `doppel --state-dir DIR ARGS…`; the CLI finds the API address and token there.
    async fn doppel(&self, args: &[&str]) -> Output {
        let mut command = std::process::Command::new(workspace_binary("doppel"));
        command
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .env_remove("DOPPEL_API")
            .env_remove("DOPPEL_API_TOKEN");
        tokio::task::spawn_blocking(move || command.output().expect("run doppel"))
            .await
            .expect("join")
    }

    async fn doppel_ok(&self, args: &[&str]) -> String {
        let out = self.doppel(args).await;
        assert!(
            out.status.success(),
            "doppel {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8")
    }

    fn agent(&self, name: &str, coordinator: &Coordinator) -> ReportClient {
        report_client(self.state_dir(), name, coordinator.quic_addr)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_and_policies_round_trip_through_the_cli() {
    let f = fixture();
    let coordinator = f.start().await;
    let web = f.write("web.toml", WEB_TOML);

    let added = f
        .doppel_ok(&["workload", "add", "--file", web.to_str().expect("path")])
        .await;
    assert!(added.contains("policy revision 1"), "{added}");

    let listed: Vec<WorkloadSpec> =
        serde_json::from_str(&f.doppel_ok(&["workload", "list", "--json"]).await).expect("json");
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "web");
    assert_eq!(listed[0].shadows[0].vni, 42);
    let table = f.doppel_ok(&["workload", "list"]).await;
    assert!(table.starts_with("NAME"), "{table}");
    assert!(
        table.contains("live-1@m5.large") && table.contains("shadow-1@c6g.large"),
        "{table}"
    );

    let shown: WorkloadSpec =
        serde_json::from_str(&f.doppel_ok(&["workload", "show", "web", "--json"]).await)
            .expect("json");
    assert_eq!(shown, listed[0]);
    assert!(
        f.doppel_ok(&["workload", "show", "web"])
            .await
            .contains("p99 < 50 ms")
    );

    let policy = f.write(
        "policy.toml",
        "report_interval_ms = 500\n[[classes]]\nid = 0\nname = \"default\"\nsample_rate = 0.5\n\
         [[classes]]\nid = 1\nname = \"api\"\nsample_rate = 1.0\npriority = 1\n\
         patterns = [{ payload_prefix = \"GET /api/\" }]\n",
    );
    let set = f
        .doppel_ok(&[
            "policy",
            "set",
            "web",
            "--file",
            policy.to_str().expect("path"),
            "--json",
        ])
        .await;
    let revision: serde_json::Value = serde_json::from_str(&set).expect("json");
    assert_eq!(revision["revision"], 2);
    let shown: Policy =
        serde_json::from_str(&f.doppel_ok(&["policy", "show", "web", "--json"]).await)
            .expect("json");
    assert_eq!(shown.report_interval_ms, 500);
    assert_eq!(shown.classes.len(), 2);
    assert_eq!(
        shown.classes[1].patterns[0].payload_prefix.as_deref(),
        Some("GET /api/")
    );
    let table = f.doppel_ok(&["policy", "show", "web"]).await;
    assert!(table.contains("\"GET /api/\""), "{table}");

    // An invalid policy is refused naming the field, by the CLI (exit 65) and by the API (400).
    let bad = f.write(
        "bad.toml",
        "[[classes]]\nid = 0\nname = \"default\"\nsample_rate = 1.5\n",
    );
    let out = f
        .doppel(&[
            "policy",
            "set",
            "web",
            "--file",
            bad.to_str().expect("path"),
        ])
        .await;
    assert_eq!(out.status.code(), Some(65));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy.classes[0].sample_rate"), "{stderr}");
    let token = std::fs::read_to_string(f.state_dir().join("api.token")).expect("token");
    let api = ApiClient::new(format!("http://{}", coordinator.api_addr), token);
    let refused = api
        .call::<serde_json::Value>(
            reqwest::Method::PUT,
            "/v1/workloads/web/policy",
            Some(&serde_json::json!({"classes": [{"id": 0, "name": "d", "sample_rate": "all"}]})),
        )
        .await
        .expect_err("a string sample rate is refused");
    match &refused {
        ClientError::Api { status, .. } => assert_eq!(status.as_u16(), 400),
        other => panic!("expected a 400, got {other:?}"),
    }
    assert_eq!(refused.field(), Some("policy.classes[0].sample_rate"));
    let mut dup: serde_json::Value = toml::from_str(WEB_TOML).expect("toml");
    dup["name"] = "web2".into();
    let refused = api
        .call::<serde_json::Value>(reqwest::Method::POST, "/v1/workloads", Some(&dup))
        .await
        .expect_err("an agent in two workloads is refused");
    assert_eq!(refused.field(), Some("live[0].agent"));
    let still: Policy =
        serde_json::from_str(&f.doppel_ok(&["policy", "show", "web", "--json"]).await)
            .expect("json");
    assert_eq!(still, shown, "a refused change changes nothing");

    let wrong = ApiClient::new(format!("http://{}", coordinator.api_addr), "nope".into());
    match wrong.get::<serde_json::Value>("/v1/workloads").await {
        Err(ClientError::Api { status, .. }) => assert_eq!(status.as_u16(), 401),
        other => panic!("expected a 401, got {other:?}"),
    }

    f.doppel_ok(&["workload", "rm", "web"]).await;
    let listed: Vec<WorkloadSpec> =
        serde_json::from_str(&f.doppel_ok(&["workload", "list", "--json"]).await).expect("json");
    assert!(listed.is_empty());
    let out = f.doppel(&["workload", "rm", "web"]).await;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no workload named \"web\""));
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_made_with_the_cli_reaches_connected_agents_within_a_second() {
    let f = fixture();
    let coordinator = f.start().await;
    let live = f.agent("live-1", &coordinator);
    let mut policy = live.handle.policy();
    tokio::time::timeout(Duration::from_secs(5), policy.wait_for(Option::is_some))
        .await
        .expect("the current policy arrives on connect")
        .expect("watch");

    let web = f.write("web.toml", WEB_TOML);
    f.doppel_ok(&["workload", "add", "--file", web.to_str().expect("path")])
        .await;
    let added = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1),
        policy.wait_for(|p| p.as_ref().is_some_and(|p| p.policy.workload == "web")),
    )
    .await
    .expect("the new workload reaches the agent within a second")
    .expect("watch");
    assert!(added.elapsed() < Duration::from_secs(1));
    let update = policy.borrow().clone().expect("policy");
    assert_eq!(update.policy.classes[0].sample_rate_ppm, 100_000);
    assert_eq!(update.policy.mirror_sessions[0].vni, 42);

    let faster = f.write(
        "policy.toml",
        "[[classes]]\nid = 0\nname = \"default\"\nsample_rate = 0.25\n",
    );
    f.doppel_ok(&[
        "policy",
        "set",
        "web",
        "--file",
        faster.to_str().expect("path"),
    ])
    .await;
    let set = Instant::now();
    tokio::time::timeout(
        Duration::from_secs(1),
        policy.wait_for(|p| {
            p.as_ref()
                .is_some_and(|p| p.policy.classes[0].sample_rate_ppm == 250_000)
        }),
    )
    .await
    .expect("the policy change reaches the agent within a second")
    .expect("watch");
    assert!(set.elapsed() < Duration::from_secs(1));

    // An agent connecting later gets the current policy at once.
    let shadow = f.agent("shadow-1", &coordinator);
    let mut shadow_policy = shadow.handle.policy();
    tokio::time::timeout(
        Duration::from_secs(5),
        shadow_policy.wait_for(|p| p.as_ref().is_some_and(|p| p.policy.workload == "web")),
    )
    .await
    .expect("a late agent gets the current policy")
    .expect("watch");
    let agents = f.doppel_ok(&["agents", "--json"]).await;
    let agents: Vec<serde_json::Value> = serde_json::from_str(&agents).expect("json");
    let live_row = agents
        .iter()
        .find(|a| a["name"] == "live-1")
        .expect("live-1 listed");
    assert_eq!(live_row["connected"], true);
    assert_eq!(live_row["role_in_workload"], "live");
    assert_eq!(live_row["vm_type"], "m5.large");
    let metrics = reqwest::get(format!("http://{}/metrics", coordinator.api_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    assert!(
        metrics.contains("\ndoppel_agents_connected 2\n"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE doppel_reports_ingested_total counter"));
    let table = f.doppel_ok(&["agents"]).await;
    assert!(
        table.contains("shadow-1") && table.contains("c6g.large"),
        "{table}"
    );

    live.stop().await.expect("stop");
    shadow.stop().await.expect("stop");
    coordinator.shutdown().await;
}

/// Reports of `agent` for the last `n` seconds: `load` exchanges/s at `latency_ms`.
fn seed_reports(
    store: &mut Store,
    agent: &str,
    n: u64,
    load: impl Fn(u64) -> u64,
    latency_ms: f64,
) {
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis(),
    )
    .expect("ms");
    let reports: Vec<CheckedReport> = (0..n)
        .map(|i| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("hist");
            h.record_n((latency_ms * 1e6) as u64, load(i))
                .expect("record");
            CheckedReport::check(interval_report(
                "10.0.0.2:8080",
                i,
                now - (n + 5 - i) * 1000,
                1000,
                &h,
                0,
            ))
        })
        .collect();
    let batch: Vec<_> = reports.iter().map(|r| (agent, r)).collect();
    store.ingest_batch(&batch, 0).expect("ingest");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_ranks_the_shadow_types_from_stored_reports() {
    let f = fixture();
    let coordinator = f.start().await;
    let web = f.write("web.toml", WEB_TOML);
    f.doppel_ok(&["workload", "add", "--file", web.to_str().expect("path")])
        .await;
    let mut store = Store::open_in(f.state_dir()).expect("store");
    seed_reports(&mut store, "live-1", 60, |i| 100 + i, 20.0);
    seed_reports(&mut store, "shadow-1", 60, |i| 100 + i, 5.0);

    let c: Comparison = serde_json::from_str(
        &f.doppel_ok(&["compare", "web", "--window", "15m", "--json"])
            .await,
    )
    .expect("json");
    assert_eq!(c.window_ms, 900_000);
    assert_eq!(c.live_vm_type.as_deref(), Some("m5.large"));
    assert_eq!(c.ranking.len(), 1);
    assert_eq!(c.ranking[0].vm_type, "c6g.large");
    assert_eq!(c.ranking[0].verdict, Verdict::Faster);
    assert_eq!(c.ranking[0].difference.pairs, 60);
    let table = f.doppel_ok(&["compare", "web"]).await;
    assert!(
        table.contains("c6g.large") && table.contains("faster"),
        "{table}"
    );
    let out = f.doppel(&["compare", "web", "--window", "soon"]).await;
    assert!(!out.status.success());
    coordinator.shutdown().await;
}
