//! Recommendations delivered to a real webhook receiver (HTTP on 127.0.0.1:0) from the
//! coordinator's persistent outbox: signature checked, 500 twice then 200, retried with backoff
//! across a coordinator restart, and accepted exactly once per idempotency key.

use std::{
    collections::HashMap,
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use doppel_coordinator::{
    ca::CertificateAuthority,
    measurements::VmType,
    policy::{LiveEndpoint, Policy, ShadowEndpoint, WorkloadSpec},
    serve::{Coordinator, ServeConfig},
    store::Store,
    webhook::WebhookConfig,
};
use doppel_tests::{
    reports::{Seed, now_ms, seed},
    testbed::workspace_binary,
};
use hmac::{Hmac, Mac as _};
use sha2::Sha256;
use time::OffsetDateTime;

const SECRET: &str = "a-webhook-secret-of-some-length";

#[derive(Debug, Default)]
struct Receiver {
    /// (idempotency key, status answered), in order.
    attempts: Mutex<Vec<(String, u16)>>,
    /// Bodies accepted (answered 2xx), per idempotency key.
    accepted: Mutex<HashMap<String, Vec<serde_json::Value>>>,
    bad_signatures: Mutex<usize>,
    failures_left: Mutex<usize>,
}

async fn receive(State(rx): State<Arc<Receiver>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let mut mac = <Hmac<Sha256>>::new_from_slice(SECRET.as_bytes()).expect("key");
    mac.update(&body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    let given = headers
        .get("x-doppel-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if given != expected {
        *rx.bad_signatures.lock().expect("lock") += 1;
        return StatusCode::UNAUTHORIZED;
    }
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let status = {
        let mut left = rx.failures_left.lock().expect("lock");
        if *left > 0 {
            *left -= 1;
            StatusCode::INTERNAL_SERVER_ERROR
        } else {
            let body = serde_json::from_slice(&body).expect("JSON body");
            rx.accepted
                .lock()
                .expect("lock")
                .entry(key.clone())
                .or_default()
                .push(body);
            StatusCode::OK
        }
    };
    rx.attempts
        .lock()
        .expect("lock")
        .push((key, status.as_u16()));
    status
}

fn seed_reports(store: &mut Store, agent: &str, n: u64, latency_ms: f64) {
    seed(
        store,
        &Seed {
            agent,
            service: "10.0.0.2:8080",
            first_seq: 0,
            count: n,
            last_start_ms: now_ms() - 6000,
            latency_ms,
            exchanges: 100,
        },
    );
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

fn doppel_json(state_dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = std::process::Command::new(workspace_binary("doppel"))
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .arg("--json")
        .env_remove("DOPPEL_API")
        .env_remove("DOPPEL_API_TOKEN")
        .output()
        .expect("run doppel");
    assert!(
        out.status.success(),
        "doppel {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recommendation_reaches_the_webhook_once_despite_failures_and_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    CertificateAuthority::in_state_dir(dir.path())
        .init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    {
        let mut store = Store::open_in(dir.path()).expect("store");
        store
            .put_workload(
                &WorkloadSpec {
                    name: "web".into(),
                    live: vec![LiveEndpoint {
                        agent: "live-1".into(),
                        vm_type: "m5.large".into(),
                        interfaces: vec![],
                        vxlan_source: None,
                    }],
                    services: vec!["10.0.0.2:8080".into()],
                    shadows: vec![ShadowEndpoint {
                        agent: "shadow-1".into(),
                        vm_type: "c6g.large".into(),
                        addr: "10.0.1.2".parse().expect("addr"),
                        vni: 42,
                    }],
                    policy: Policy::default(),
                    shadow: None,
                },
                0,
            )
            .expect("workload");
        seed_reports(&mut store, "live-1", 60, 20.0);
        seed_reports(&mut store, "shadow-1", 60, 5.0);
    }

    let receiver = Arc::new(Receiver {
        failures_left: Mutex::new(2),
        ..Receiver::default()
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let app = Router::new()
        .route("/hook", post(receive))
        .with_state(Arc::clone(&receiver));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let config = ServeConfig {
        state_dir: dir.path().to_owned(),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        vm_types: vec![
            VmType {
                name: "m5.large".into(),
                price_per_hour: 0.10,
                ..VmType::default()
            },
            VmType {
                name: "c6g.large".into(),
                price_per_hour: 0.08,
                ..VmType::default()
            },
        ],
        evaluate_interval_ms: 200,
        webhooks: vec![WebhookConfig {
            url: url.clone(),
            secret: SECRET.into(),
        }],
        webhook_backoff_ms: 400,
        ..ServeConfig::default()
    };
    config.validate().expect("valid config");
    let coordinator = Coordinator::start(config.clone()).await.expect("start");
    eventually("the first attempt", Duration::from_secs(10), || {
        !receiver.attempts.lock().expect("lock").is_empty()
    })
    .await;
    coordinator.shutdown().await;

    // The outbox survives the restart; evaluations after it find the same advice (same key)
    // and queue nothing new.
    let coordinator = Coordinator::start(config).await.expect("restart");
    eventually("the delivery accepted", Duration::from_secs(10), || {
        !receiver.accepted.lock().expect("lock").is_empty()
    })
    .await;
    // Evaluations after the delivery find the same advice: nothing new is queued or sent.
    doppel_tests::metrics::wait_for_rounds(
        coordinator.api_addr,
        "doppel_evaluations_total",
        2,
        Duration::from_secs(10),
    )
    .await;

    assert_eq!(*receiver.bad_signatures.lock().expect("lock"), 0);
    let attempts = receiver.attempts.lock().expect("lock").clone();
    let key = attempts[0].0.clone();
    assert_eq!(
        attempts,
        [(key.clone(), 500), (key.clone(), 500), (key.clone(), 200)],
        "500 twice, then 200, and nothing after"
    );
    let accepted = receiver.accepted.lock().expect("lock").clone();
    assert_eq!(accepted.len(), 1);
    let body = &accepted[&key][0];
    assert_eq!(body["workload"], "web");
    assert_eq!(body["current_vm_type"], "m5.large");
    assert_eq!(body["recommended_vm_type"], "c6g.large");
    assert_eq!(body["trigger"], "faster_at_lower_or_equal_cost");
    assert_eq!(body["idempotency_key"], key.as_str());
    assert!(body["confidence"].as_f64().expect("confidence") > 0.95);
    assert!((body["cost_delta_per_hour"].as_f64().expect("delta") + 0.02).abs() < 1e-9);
    assert_eq!(body["evidence"].as_array().expect("evidence").len(), 2);
    assert!(body["load_per_s"].as_f64().expect("load") > 100.0);

    let metrics = reqwest::get(format!("http://{}/metrics", coordinator.api_addr))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("body");
    // Counters restart with the process: after the restart, one failure and one delivery.
    assert!(
        metrics.contains("\ndoppel_webhook_deliveries_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\ndoppel_webhook_delivery_failures_total 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE doppel_store_size_bytes gauge"),
        "{metrics}"
    );

    let state_dir = dir.path().to_owned();
    let (recs, log) = tokio::task::spawn_blocking(move || {
        (
            doppel_json(&state_dir, &["recommendations"]),
            doppel_json(&state_dir, &["webhooks", "log"]),
        )
    })
    .await
    .expect("join");
    let recs = recs.as_array().expect("array");
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["idempotency_key"], key.as_str());
    let statuses: Vec<_> = log
        .as_array()
        .expect("array")
        .iter()
        .map(|d| (d["attempt"].as_i64(), d["status"].as_i64()))
        .collect();
    assert_eq!(
        statuses,
        [
            (Some(3), Some(200)),
            (Some(2), Some(500)),
            (Some(1), Some(500))
        ],
        "the delivery log, newest first"
    );
    coordinator.shutdown().await;
    server.abort();
}
