//! The demo as an end-to-end test: real nginx in cgroups standing for VM types, real traffic
//! following the WorldCup98 trace (a synthetic curve of its shape when the trace files are not
//! beside the checkout), shadows made by the coordinator's local provisioner, real eBPF
//! mirroring, QUIC reporting, forecasting, a recommendation, the signed webhook and the act-mode
//! resize. It asserts what the product promises and this machine can measure reliably:
//!
//! - the client never receives a byte from a shadow: its responses and bytes are exactly what the
//!   live nginx logged;
//! - the manager runs a shadow on each of the three other types, and each reports;
//! - a warning is raised while the load still rises, before the peak;
//! - the recommendation is the cheapest shadow type whose measured p99 holds the SLO;
//! - the webhook receiver gets it, correctly signed;
//! - act mode resizes the live host and the coordinator verifies latency came back under the SLO.

use std::{sync::atomic::AtomicBool, time::Duration};

use doppel_tests::{
    demo::{self, SLO_P99_MS, VM_TYPES},
    testbed::{privileged_or_skip, workspace_binary},
};

#[test]
fn the_demo_forecasts_warns_recommends_and_recovers() {
    if !privileged_or_skip("the_demo_forecasts_warns_recommends_and_recovers") {
        return;
    }
    let work = tempfile::tempdir().expect("work dir");
    let bin_dir = workspace_binary("doppel")
        .parent()
        .expect("bin dir")
        .to_owned();
    let stop = AtomicBool::new(false);
    let trace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/traces/worldcup98_per_minute.csv");
    let summary = demo::run(
        &demo::Options {
            act: true,
            step: Duration::from_secs(1),
            trace: trace.exists().then_some(trace),
            trace_start: "1998-06-15 11:40".into(),
            minutes: 240,
            peak_rps: None,
            bin_dir,
            work: work.path().to_owned(),
        },
        &stop,
    )
    .expect("the demo runs to its end");

    // Nothing from a shadow reached the client.
    assert_eq!(
        (summary.client_responses, summary.client_bytes),
        summary.live_served,
        "client responses and bytes = what the live nginx sent"
    );
    assert!(summary.client_responses > 5000, "{summary:?}");

    // Shadows on the three other types, each measured.
    let mut types = summary.shadow_types.clone();
    types.sort();
    assert_eq!(types, ["large", "medium", "xlarge"]);
    let comparison = summary.comparison.as_ref().expect("a comparison");
    let shadow_p99: Vec<(String, f64, f64)> = comparison["types"]
        .as_array()
        .expect("types")
        .iter()
        .filter(|t| t["role"] == "shadow")
        .map(|t| {
            (
                t["vm_type"].as_str().expect("type").to_owned(),
                t["price_per_hour"].as_f64().expect("price"),
                t["all"]["p99_ms"].as_f64().expect("p99"),
            )
        })
        .collect();
    assert_eq!(shadow_p99.len(), 3, "{comparison}");

    // A warning while the load still rises.
    let warning = summary.warning_step.expect("a warning");
    assert!(
        warning < summary.peak_step,
        "warning at minute {warning}, peak at {}",
        summary.peak_step
    );

    // The recommendation: the cheapest shadow type whose measured p99 holds the SLO.
    let rec = summary.recommendation.as_ref().expect("a recommendation");
    let recommended = rec["recommended_vm_type"].as_str().expect("type");
    let mut holding: Vec<&(String, f64, f64)> = shadow_p99
        .iter()
        .filter(|(_, _, p99)| *p99 < SLO_P99_MS)
        .collect();
    holding.sort_by(|a, b| a.1.total_cmp(&b.1));
    assert_eq!(
        Some(recommended),
        holding.first().map(|t| t.0.as_str()),
        "shadows measured: {shadow_p99:?}"
    );
    assert!(VM_TYPES.iter().any(|t| t.name == recommended));

    // The signed webhook delivery.
    assert_eq!(summary.bad_signatures, 0);
    assert!(
        summary
            .webhook_deliveries
            .iter()
            .any(|d| d["recommended_vm_type"] == recommended),
        "{:?}",
        summary.webhook_deliveries
    );

    // Act mode: the live host was resized and latency recovered.
    let action = summary.action.as_ref().expect("an action");
    assert_eq!(action["to_vm_type"], recommended);
    assert_eq!(action["state"], "verified", "{action}");
    let after = action["live_latency_ms"].as_f64().expect("latency after");
    assert!(after < SLO_P99_MS, "live p99 after the move: {after} ms");
}
