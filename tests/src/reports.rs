//! Interval reports for tests of what the coordinator does with measurements (comparison,
//! recommendations, act mode, the dashboard) without running agents: written straight into a
//! coordinator's store ([`seed`]), or sent through the agent's own reporting client over QUIC
//! and mTLS ([`report_client`]). Each report carries one kernel first-byte histogram.

use std::{net::SocketAddr, path::Path, time::Duration};

use doppel_agent::report::{ClientConfig, ReportClient, Spool, SpoolConfig};
use doppel_common::wire::{
    Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, LatencyMetric,
    ResourceUsage,
};
use doppel_coordinator::{
    ca::CertificateAuthority,
    store::{CheckedReport, Store},
};
use hdrhistogram::Histogram;

/// A workload of one live agent (`live-1`, m5.large) and one shadow (`shadow-1`, c6g.large),
/// reporting every second, SLO p99 under 50 ms.
pub const WEB_TOML: &str = r#"
name = "web"
services = ["10.0.0.2:8080"]

[[live]]
agent = "live-1"
vm_type = "m5.large"

[[shadows]]
agent = "shadow-1"
vm_type = "c6g.large"
addr = "10.0.1.2"
vni = 42

[policy]
report_interval_ms = 1000
slo = { percentile = 99.0, max_latency_ms = 50.0 }

[[policy.classes]]
id = 0
name = "default"
sample_rate = 0.1
"#;

/// A one-interval report of `histogram` (kernel first byte, all flows, class 0) for `service`,
/// with `errors` failed exchanges when any.
pub fn interval_report(
    service: &str,
    seq: u64,
    start_ms: u64,
    interval_ms: u32,
    histogram: &Histogram<u64>,
    errors: u64,
) -> IntervalReport {
    IntervalReport {
        seq,
        interval_start_unix_ms: start_ms,
        interval_ms,
        histograms: vec![HistogramRecord {
            service: service.into(),
            class: 0,
            scope: FlowScope::All,
            metric: LatencyMetric::KernelFirstByte,
            histogram: EncodedHistogram::encode(histogram).expect("encode"),
        }],
        counters: if errors > 0 {
            vec![Counter {
                name: "exchange_errors".into(),
                value: errors,
            }]
        } else {
            vec![]
        },
        host: ResourceUsage::default(),
        workload: None,
        patterns: vec![],
    }
}

/// The reporting client config of agent `name` against `quic_addr`, with a certificate the CA
/// in `state_dir` issues (into `state_dir/agents`), and backoffs short enough for a test.
pub fn client_config(state_dir: &Path, name: &str, quic_addr: SocketAddr) -> ClientConfig {
    let files = CertificateAuthority::in_state_dir(state_dir)
        .issue(
            name,
            30,
            &state_dir.join("agents"),
            time::OffsetDateTime::now_utc(),
        )
        .expect("issue");
    let mut config = ClientConfig::new(
        quic_addr,
        "localhost".into(),
        files.ca_cert,
        files.cert,
        files.key,
    );
    config.backoff_min = Duration::from_millis(50);
    config.backoff_max = Duration::from_millis(400);
    config
}

/// Agent `name`'s reporting client ([`client_config`]), spooling into `state_dir/spool-NAME`.
pub fn report_client(state_dir: &Path, name: &str, quic_addr: SocketAddr) -> ReportClient {
    let spool =
        Spool::open(SpoolConfig::new(state_dir.join(format!("spool-{name}")))).expect("spool");
    ReportClient::start(client_config(state_dir, name, quic_addr), spool)
}

/// Milliseconds since the epoch now.
pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_millis(),
    )
    .expect("ms fit u64")
}

/// Which reports to write.
#[derive(Debug, Clone)]
pub struct Seed<'a> {
    /// The reporting agent.
    pub agent: &'a str,
    /// The service the histograms are for.
    pub service: &'a str,
    /// Sequence number of the first report.
    pub first_seq: u64,
    /// Reports, one per second.
    pub count: u64,
    /// Start of the last report's interval, ms since the epoch.
    pub last_start_ms: u64,
    /// Every exchange's latency.
    pub latency_ms: f64,
    /// Exchanges in the first report; each later one has one more.
    pub exchanges: u64,
}

/// Writes the reports (one-second intervals ending with the one starting at `last_start_ms`).
pub fn seed(store: &mut Store, seed: &Seed<'_>) {
    let reports: Vec<CheckedReport> = (0..seed.count)
        .map(|i| {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("bounds");
            h.record_n((seed.latency_ms * 1e6) as u64, seed.exchanges + i)
                .expect("record");
            CheckedReport::check(interval_report(
                seed.service,
                seed.first_seq + i,
                seed.last_start_ms - (seed.count - 1 - i) * 1000,
                1000,
                &h,
                0,
            ))
        })
        .collect();
    let batch: Vec<_> = reports.iter().map(|r| (seed.agent, r)).collect();
    // Received now, as the ingest writer would record them: a receipt time of 0 (1970) made a
    // coordinator's start-up retention pass delete the seeded reports, racing its first
    // evaluation (act_mode tests then saw no recommendation at all).
    let received_ms = i64::try_from(now_ms()).expect("a time in range");
    store.ingest_batch(&batch, received_ms).expect("ingest");
}
