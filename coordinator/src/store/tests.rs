use doppel_common::wire::{
    Counter, EncodedHistogram, FlowScope, HistogramRecord, IntervalReport, LatencyMetric,
    ResourceUsage,
};
use hdrhistogram::Histogram;

use super::*;
use crate::policy::WorkloadSpec;

fn report(seq: u64, valid_histogram: bool) -> IntervalReport {
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).expect("histogram");
    h.record_n(1_000_000, 10).expect("record");
    let histogram = if valid_histogram {
        EncodedHistogram::encode(&h).expect("encode")
    } else {
        EncodedHistogram(vec![1, 2, 3])
    };
    IntervalReport {
        seq,
        interval_start_unix_ms: 1_000 * seq,
        interval_ms: 1_000,
        histograms: vec![HistogramRecord {
            service: "10.0.0.2:8080".into(),
            class: 1,
            scope: FlowScope::All,
            metric: LatencyMetric::KernelFirstByte,
            histogram,
        }],
        counters: vec![Counter {
            name: "exchange_errors".into(),
            value: 2,
        }],
        host: ResourceUsage::default(),
        workload: None,
        patterns: vec![],
    }
}

#[test]
fn a_duplicate_report_is_recognised_and_stored_once_even_after_reopening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open_in(dir.path()).expect("open");
    let first = CheckedReport::check(report(0, true));
    let second = CheckedReport::check(report(1, true));
    let outcomes = store
        .ingest_batch(&[("a1", &first), ("a1", &second), ("a1", &first)], 5)
        .expect("ingest");
    assert_eq!(
        outcomes,
        [
            IngestOutcome::Stored,
            IngestOutcome::Stored,
            IngestOutcome::Duplicate
        ]
    );
    drop(store);
    let mut store = Store::open_in(dir.path()).expect("reopen runs no migration twice");
    let again = store.ingest_batch(&[("a1", &second)], 6).expect("ingest");
    assert_eq!(again, [IngestOutcome::Duplicate]);
    assert_eq!(store.report_seqs("a1").expect("seqs"), [0, 1]);
    let agents = store.agents().expect("agents");
    assert_eq!(agents[0].last_seq, Some(1));
    assert_eq!(agents[0].reports, 2);
    let hists = store
        .interval_histograms(&["a1"], 0, i64::MAX)
        .expect("histograms");
    assert_eq!(hists.len(), 2);
    assert_eq!(hists[0].errors, 2);
}

#[test]
fn an_undecodable_histogram_is_dropped_and_counted_not_silently_lost() {
    let checked = CheckedReport::check(report(0, false));
    assert!(checked.report.histograms.is_empty());
    assert_eq!(checked.rejected_histograms, 1);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open_in(dir.path()).expect("open");
    store
        .ingest_batch(&[("a1", &checked)], 5)
        .expect("the rest of the report is stored");
    let rejected: i64 = store
        .conn
        .query_row("SELECT rejected_histograms FROM reports", [], |r| r.get(0))
        .expect("query");
    assert_eq!(rejected, 1);
}

#[test]
fn a_database_from_a_newer_coordinator_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open_in(dir.path()).expect("open");
    store
        .conn
        .pragma_update(None, "user_version", 99)
        .expect("pragma");
    drop(store);
    assert!(matches!(
        Store::open_in(dir.path()),
        Err(StoreError::SchemaTooNew { found: 99, .. })
    ));
}

#[test]
fn every_workload_change_bumps_the_policy_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut store = Store::open_in(dir.path()).expect("open");
    let spec: WorkloadSpec = serde_json::from_value(serde_json::json!({
        "name": "web",
        "live": [{"agent": "l1", "vm_type": "m5.large"}],
        "services": ["10.0.0.2:80"],
    }))
    .expect("spec");
    assert_eq!(store.put_workload(&spec, 1).expect("put"), 1);
    let mut policy = spec.policy.clone();
    policy.slo.max_latency_ms = 50.0;
    assert_eq!(store.set_policy("web", &policy, 2).expect("set"), 2);
    assert_eq!(
        store
            .workload("web")
            .expect("get")
            .expect("some")
            .policy
            .slo
            .max_latency_ms,
        50.0
    );
    assert_eq!(store.remove_workload("web").expect("rm"), 3);
    assert!(matches!(
        store.remove_workload("web"),
        Err(StoreError::NoSuchWorkload(_))
    ));
    assert_eq!(store.policy_revision().expect("rev"), 3);
}
