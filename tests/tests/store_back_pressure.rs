//! A locked database is back-pressure, never silent loss: while another connection holds the
//! SQLite write lock, an agent's reports are not acknowledged (they stay in its spool), the
//! coordinator logs why, the API answers a write with 503 and `Retry-After`; once the lock is
//! released every report arrives exactly once. Real QUIC on 127.0.0.1, real certificates, real
//! SQLite, the agent's own reporting client.

use std::{
    io::Write,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use doppel_common::wire::{IntervalReport, ResourceUsage};
use doppel_coordinator::{
    ca::CertificateAuthority,
    client::resolve_token,
    serve::{Coordinator, ServeConfig},
    store::{DB_FILE, Store},
};
use doppel_tests::reports::report_client;
use time::OffsetDateTime;

/// Everything the coordinator logs, for the assertions on what the operator is told.
#[derive(Clone, Default)]
struct LogBuffer(Arc<Mutex<Vec<u8>>>);

impl LogBuffer {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }
}

impl Write for LogBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        // Also to stderr, so a failing test shows the log.
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

const WORKLOAD: &str = r#"{"name": "web", "services": ["10.0.0.2:8080"],
    "live": [{"agent": "agent-1", "vm_type": "m5.large"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_is_back_pressure_and_every_report_arrives_once_after() {
    let logs = LogBuffer::default();
    let writer = logs.clone();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish(),
    )
    .expect("the only subscriber of this test binary");

    let dir = tempfile::tempdir().expect("tempdir");
    let ca = CertificateAuthority::in_state_dir(dir.path());
    ca.init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    let coordinator = Coordinator::start(ServeConfig {
        state_dir: dir.path().to_owned(),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        ..ServeConfig::default()
    })
    .await
    .expect("coordinator starts");
    let agent = report_client(dir.path(), "agent-1", coordinator.quic_addr);
    let handle = agent.handle.clone();
    let acked = || handle.stats().acked.load(Ordering::Relaxed);

    // Before: the path works.
    for n in 0..5 {
        handle.submit(report(n)).await.expect("submit");
    }
    eventually(
        "the first reports acknowledged",
        Duration::from_secs(10),
        || handle.unacknowledged() == 0,
    )
    .await;
    assert_eq!(acked(), 5);

    // Another process's connection takes the write lock and keeps it. (In WAL mode an
    // exclusive transaction shuts out writers, not readers.)
    let locker = rusqlite::Connection::open(dir.path().join(DB_FILE)).expect("open the store");
    locker
        .execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    for n in 5..15 {
        handle.submit(report(n)).await.expect("submit while locked");
    }
    // The writer waits the busy timeout (5 s), fails, and says why.
    eventually(
        "the coordinator to log the failed ingest",
        Duration::from_secs(20),
        || logs.text().contains("ingest transaction failed"),
    )
    .await;
    let log = logs.text();
    assert!(
        log.contains("database is locked"),
        "the logged error names the cause:\n{log}"
    );
    assert_eq!(
        acked(),
        5,
        "no report acknowledged while the store is locked"
    );
    assert_eq!(
        handle.unacknowledged(),
        10,
        "the locked-out reports wait in the agent's spool"
    );

    // The API refuses a change with 503 and Retry-After rather than pretending.
    let token = resolve_token(None, dir.path()).expect("token");
    let url = format!("http://{}/v1/workloads", coordinator.api_addr);
    let http = reqwest::Client::new();
    let response = http
        .post(&url)
        .bearer_auth(&token)
        .body(WORKLOAD)
        .send()
        .await
        .expect("API answers");
    assert_eq!(response.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let body: serde_json::Value = response.json().await.expect("JSON error body");
    assert!(
        body["error"]
            .as_str()
            .is_some_and(|e| e.contains("database is locked")),
        "the 503 says why: {body}"
    );
    // Still nothing acknowledged: the agent kept retrying (reconnecting) against the lock.
    assert_eq!(
        acked(),
        5,
        "no report acknowledged while the store is locked"
    );
    assert_eq!(handle.unacknowledged(), 10);

    locker.execute_batch("ROLLBACK").expect("release the lock");
    drop(locker);
    eventually(
        "every report acknowledged after the lock is released",
        Duration::from_secs(30),
        || handle.unacknowledged() == 0,
    )
    .await;
    assert_eq!(acked(), 15);
    let response = http
        .post(&url)
        .bearer_auth(&token)
        .body(WORKLOAD)
        .send()
        .await
        .expect("API answers");
    assert!(
        response.status().is_success(),
        "the API works again: {}",
        response.status()
    );

    let store = Store::open_in(dir.path()).expect("store");
    let seqs = store.report_seqs("agent-1").expect("seqs");
    let first = seqs.first().copied().unwrap_or_default();
    assert_eq!(
        seqs,
        (first..first + 15).collect::<Vec<_>>(),
        "each report stored exactly once"
    );
    let metrics = reqwest::get(format!("http://{}/metrics", coordinator.api_addr))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics body");
    let failed: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("doppel_reports_failed_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("doppel_reports_failed_total");
    assert!(failed >= 1.0, "the failed transactions are counted");
    agent.stop().await.expect("stop");
    coordinator.shutdown().await;
}
