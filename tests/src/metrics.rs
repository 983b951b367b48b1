//! The coordinator's `/metrics` as tests read it: counters to wait on instead of sleeping.
//!
//! "Nothing more happened" cannot be observed directly, so a test that asserts it waits until
//! the loop that would have done it has finished more rounds (`doppel_evaluations_total`,
//! `doppel_act_rounds_total`) and then looks.

use std::{net::SocketAddr, time::Duration};

/// The value of the unlabelled counter or gauge `name` on the coordinator's API at `api`.
pub async fn value(api: SocketAddr, name: &str) -> f64 {
    let text = reqwest::get(format!("http://{api}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|line| {
            let (metric, value) = line.split_once(' ')?;
            (metric == name).then(|| value.parse().expect("a number"))
        })
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// Waits until the counter `name` has grown by `more` from its value now: `more` rounds of the
/// loop it counts began and finished after this call.
pub async fn wait_for_rounds(api: SocketAddr, name: &str, more: u64, timeout: Duration) {
    // A round already under way when this is called may have read the state before the
    // caller's change: it counts, but it is not one of the `more`.
    let target = value(api, name).await + more as f64 + 1.0;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let now = value(api, name).await;
        if now >= target {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name} reached {now}, not {target}, in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
