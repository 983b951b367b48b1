//! Interval reports written straight into a coordinator's store, for tests of what the
//! coordinator does with measurements (comparison, recommendations, act mode) without running
//! agents: each report carries one kernel first-byte histogram of `exchanges` samples at one
//! latency.

use doppel_common::wire::{
    EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, LatencyMetric, ResourceUsage,
};
use doppel_coordinator::store::{CheckedReport, Store};
use hdrhistogram::Histogram;

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
            CheckedReport::check(IntervalReport {
                seq: seed.first_seq + i,
                interval_start_unix_ms: seed.last_start_ms - (seed.count - 1 - i) * 1000,
                interval_ms: 1000,
                histograms: vec![HistogramRecord {
                    service: seed.service.into(),
                    class: 0,
                    scope: FlowScope::All,
                    metric: LatencyMetric::KernelFirstByte,
                    histogram: EncodedHistogram::encode(&h).expect("encode"),
                }],
                counters: vec![],
                host: ResourceUsage::default(),
                workload: None,
                patterns: vec![],
            })
        })
        .collect();
    let batch: Vec<_> = reports.iter().map(|r| (seed.agent, r)).collect();
    // Received now, as the ingest writer would record them: a receipt time of 0 (1970) made a
    // coordinator's start-up retention pass delete the seeded reports, racing its first
    // evaluation (act_mode tests then saw no recommendation at all).
    let received_ms = i64::try_from(now_ms()).expect("a time in range");
    store.ingest_batch(&batch, received_ms).expect("ingest");
}
