//! `/metrics`' per-workload latency: for each workload, VM type and role, what the agents
//! measured over the last [`WINDOW_MS`], for Grafana.
//!
//! The figures are gauges over a sliding window, not counters: the store keeps histograms per
//! report interval, so a window's quantiles are exact merges of what the agents sent, while a
//! cumulative Prometheus histogram would have to re-read every report ever stored on each
//! scrape. For the same reason the latency is a gauge with a `percentile` label (50, 90, 99)
//! rather than a summary: a summary's `quantile` label comes with cumulative `_sum` and
//! `_count`, which a window cannot give (promtool refuses `quantile` on anything else). Labels
//! are bounded by the configuration: `workload`, `vm_type` (a catalog or policy type) and
//! `role` (`live` or `shadow`).

use std::{collections::BTreeMap, fmt::Write as _};

use crate::{
    compare::Role,
    measurements::{Merged, for_each_measurement},
    store::{Store, StoreError},
};

/// The window the latency gauges cover, ms.
pub const WINDOW_MS: i64 = 60_000;

/// The quantiles exposed, with their label values.
const QUANTILES: [(f64, &str); 3] = [(0.5, "50"), (0.9, "90"), (0.99, "99")];

/// A label value as the text exposition format wants it: `\`, `"` and newlines escaped.
fn label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The latency, rate and error gauges of every workload over `[now_ms - WINDOW_MS, now_ms)`,
/// in the text exposition format, `# HELP` and `# TYPE` included.
pub fn workload_latency(store: &Store, now_ms: i64) -> Result<String, StoreError> {
    let mut windows: BTreeMap<(String, String, Role), Merged> = BTreeMap::new();
    for spec in store.workloads()? {
        for_each_measurement(store, &spec, now_ms - WINDOW_MS, now_ms, |m| {
            windows
                .entry((spec.name.clone(), m.vm_type.clone(), m.role))
                .or_insert_with(|| Merged::like(&m))
                .add(&m);
        })?;
    }
    let mut out = String::new();
    let help = |out: &mut String, name: &str, text: &str| {
        let _ = writeln!(out, "# HELP {name} {text}\n# TYPE {name} gauge");
    };
    let labels = |(workload, vm_type, role): &(String, String, Role)| {
        format!(
            "workload=\"{}\",vm_type=\"{}\",role=\"{}\"",
            label_value(workload),
            label_value(vm_type),
            role.as_str()
        )
    };
    let window_s = WINDOW_MS / 1000;
    help(
        &mut out,
        "doppel_exchange_latency_seconds",
        &format!(
            "Exchange latency (last request byte to first response byte, in the kernel) over \
             the last {window_s} s, by percentile."
        ),
    );
    for (key, w) in &windows {
        for (q, label) in QUANTILES {
            let seconds = w.quantile_ms(q) / 1e3;
            let _ = writeln!(
                out,
                "doppel_exchange_latency_seconds{{{},percentile=\"{label}\"}} {seconds}",
                labels(key)
            );
        }
    }
    help(
        &mut out,
        "doppel_exchanges_per_second",
        &format!("Exchanges per second over the last {window_s} s, all agents together."),
    );
    for (key, w) in &windows {
        let rate = w.per_s();
        let _ = writeln!(out, "doppel_exchanges_per_second{{{}}} {rate}", labels(key));
    }
    help(
        &mut out,
        "doppel_exchange_error_ratio",
        &format!(
            "Failed over measured exchanges over the last {window_s} s (shadows count 5xx, \
             resets, timeouts and refusals; live agents count none)."
        ),
    );
    for (key, w) in &windows {
        let ratio = w.error_rate();
        let _ = writeln!(
            out,
            "doppel_exchange_error_ratio{{{}}} {ratio}",
            labels(key)
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        measurements::timeline_tests::{SPEC, report},
        policy::WorkloadSpec,
    };

    #[test]
    fn each_workload_type_and_role_gets_its_window() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut store = Store::open_in(dir.path()).expect("store");
        let spec: WorkloadSpec = toml::from_str(SPEC).expect("spec");
        store.put_workload(&spec, 0).expect("workload");
        let base = 1_000_000_u64;
        let mut reports = Vec::new();
        // 90 s of reports; the window (the last 60 s before `now`) holds the last 60.
        for i in 0..90 {
            let start = base + i * 1000;
            let slow = if i < 30 { 500 } else { 10 };
            reports.push(("live-1", report(i, start, 100, slow, 0)));
            reports.push(("live-2", report(i, start, 50, 30, 0)));
            reports.push(("shadow-1", report(i, start, 100, 5, 3)));
        }
        let batch: Vec<_> = reports.iter().map(|(a, r)| (*a, r)).collect();
        store.ingest_batch(&batch, 0).expect("ingest");
        let now = i64::try_from(base + 90_000).expect("ms");
        let text = workload_latency(&store, now).expect("metrics");
        let value = |series: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
                .unwrap_or_else(|| panic!("no {series} in\n{text}"))
        };
        let live = r#"workload="web",vm_type="small",role="live""#;
        let shadow = r#"workload="web",vm_type="large",role="shadow""#;
        // Live: two thirds at 10 ms, one third at 30 ms; the 500 ms intervals are older.
        let p50 = value(&format!(
            "doppel_exchange_latency_seconds{{{live},percentile=\"50\"}}"
        ));
        assert!((p50 - 0.010).abs() < 0.0002, "{p50}");
        let p99 = value(&format!(
            "doppel_exchange_latency_seconds{{{live},percentile=\"99\"}}"
        ));
        assert!((p99 - 0.030).abs() < 0.0005, "{p99}");
        assert!((value(&format!("doppel_exchanges_per_second{{{live}}}")) - 150.0).abs() < 1e-9);
        assert!((value(&format!("doppel_exchanges_per_second{{{shadow}}}")) - 100.0).abs() < 1e-9);
        assert_eq!(
            value(&format!("doppel_exchange_error_ratio{{{live}}}")),
            0.0
        );
        let errors = value(&format!("doppel_exchange_error_ratio{{{shadow}}}"));
        assert!((errors - 0.03).abs() < 1e-12, "{errors}");
        // Nothing in the window: no series.
        let later = workload_latency(&store, now + 120_000).expect("metrics");
        assert!(!later.contains("workload=\"web\""), "{later}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(label_value("x\ny"), "x\\ny");
    }
}
