//! Act mode with a real coordinator, real SQLite and real scale commands: a recommendation of
//! an act-mode workload runs the configured action once (recommendation on stdin, types in the
//! environment), the live type is updated, and latency after the move is verified against the
//! SLO; a failing or hanging action is recorded as failed with its reason, and a hanging one's
//! whole process group is killed.

use std::{path::Path, time::Duration};

use doppel_coordinator::{
    act::ActionConfig,
    ca::CertificateAuthority,
    policy::{LiveEndpoint, Mode, Policy, ShadowEndpoint, Slo, WorkloadSpec},
    serve::{Coordinator, ServeConfig},
    shadows::catalog::VmType,
    store::{ActionState, Store},
};
use doppel_tests::reports::{Seed, now_ms, seed};
use time::OffsetDateTime;

const SERVICE: &str = "10.0.0.2:8080";

/// A workload in act mode, live on `small` breaking a 20 ms SLO, a `large` shadow holding it.
fn setup(dir: &Path, action: &str) {
    // The coordinator's log, shown when a test fails.
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug,quinn=info,rustls=info,hyper=info,h2=info,reqwest=info")
        .with_test_writer()
        .try_init();
    CertificateAuthority::in_state_dir(dir)
        .init(&["localhost".into()], OffsetDateTime::now_utc())
        .expect("ca init");
    let mut store = Store::open_in(dir).expect("store");
    store
        .put_workload(
            &WorkloadSpec {
                name: "web".into(),
                live: vec![LiveEndpoint {
                    agent: "live-1".into(),
                    vm_type: "small".into(),
                    interfaces: vec![],
                    vxlan_source: None,
                }],
                services: vec![SERVICE.into()],
                shadows: vec![ShadowEndpoint {
                    agent: "shadow-1".into(),
                    vm_type: "large".into(),
                    addr: "10.0.1.2".parse().expect("addr"),
                    vni: 42,
                }],
                shadow: None,
                policy: Policy {
                    slo: Slo {
                        percentile: 99.0,
                        max_latency_ms: 20.0,
                    },
                    mode: Mode::Act,
                    action: Some(action.into()),
                    ..Policy::default()
                },
            },
            0,
        )
        .expect("workload");
    let last_start_ms = now_ms() - 3000;
    for (agent, latency_ms) in [("live-1", 50.0), ("shadow-1", 5.0)] {
        seed(
            &mut store,
            &Seed {
                agent,
                service: SERVICE,
                first_seq: 0,
                count: 30,
                last_start_ms,
                latency_ms,
                exchanges: 100,
            },
        );
    }
}

fn config(dir: &Path, action: ActionConfig) -> ServeConfig {
    let config = ServeConfig {
        state_dir: dir.to_owned(),
        quic_listen: "127.0.0.1:0".parse().expect("addr"),
        api_listen: "127.0.0.1:0".parse().expect("addr"),
        vm_types: vec![
            VmType {
                name: "small".into(),
                price_per_hour: 0.05,
                ..VmType::default()
            },
            VmType {
                name: "large".into(),
                price_per_hour: 0.20,
                ..VmType::default()
            },
        ],
        compare_window_ms: 60_000,
        evaluate_interval_ms: 200,
        actions: vec![action],
        ..ServeConfig::default()
    };
    config.validate().expect("valid config");
    config
}

async fn wait_for_state(dir: &Path, wanted: ActionState, timeout: Duration) -> Vec<ActionState> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let states: Vec<ActionState> = Store::open_in(dir)
            .expect("store")
            .actions(None, 10)
            .expect("actions")
            .iter()
            .map(|a| a.state)
            .collect();
        if states.first() == Some(&wanted) || tokio::time::Instant::now() > deadline {
            if states.first() != Some(&wanted) {
                let store = Store::open_in(dir).expect("store");
                eprintln!(
                    "recommendations: {:?}",
                    store
                        .recommendations(None, 10)
                        .expect("recommendations")
                        .iter()
                        .map(|r| (
                            r.id,
                            r.created_ms,
                            &r.reason,
                            &r.current_vm_type,
                            &r.recommended_vm_type
                        ))
                        .collect::<Vec<_>>()
                );
            }
            return states;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_act_mode_recommendation_is_carried_out_once_and_verified() {
    let dir = tempfile::tempdir().expect("tempdir");
    setup(dir.path(), "resize");
    let log = dir.path().join("action.log");
    let script = format!(
        "echo \"$DOPPEL_WORKLOAD $DOPPEL_FROM_VM_TYPE $DOPPEL_TO_VM_TYPE\" >> '{log}'; \
         cat >> '{log}'; echo >> '{log}'; echo resized",
        log = log.display()
    );
    let coordinator = Coordinator::start(config(
        dir.path(),
        ActionConfig {
            name: "resize".into(),
            command: vec!["sh".into(), "-c".into(), script],
            timeout_ms: 5000,
            verify_after_ms: 1500,
        },
    ))
    .await
    .expect("start");

    let states = wait_for_state(dir.path(), ActionState::Done, Duration::from_secs(30)).await;
    assert_eq!(states, [ActionState::Done], "one action, done");
    let spec = Store::open_in(dir.path())
        .expect("store")
        .workload("web")
        .expect("read")
        .expect("workload");
    assert_eq!(
        spec.live[0].vm_type, "large",
        "live moved to the recommended type"
    );

    // After the move live meets the SLO: the verification must see it. Live's agent reports
    // an interval every 500 ms (the pace of its reports, not a wait), each starting after the
    // move, so they fall in the verification's window (the second half of the settling time).
    for i in 0..4 {
        let mut store = Store::open_in(dir.path()).expect("store");
        seed(
            &mut store,
            &Seed {
                agent: "live-1",
                service: SERVICE,
                first_seq: 30 + i,
                count: 1,
                // Intervals that start after the move, as a live agent's would.
                last_start_ms: now_ms(),
                latency_ms: 4.0,
                exchanges: 100,
            },
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let states = wait_for_state(dir.path(), ActionState::Verified, Duration::from_secs(30)).await;
    assert_eq!(
        states,
        [ActionState::Verified],
        "verified, and acted on once"
    );
    let store = Store::open_in(dir.path()).expect("store");
    let action = &store.actions(Some("web"), 10).expect("actions")[0];
    assert_eq!(
        (action.from_vm_type.as_str(), action.to_vm_type.as_str()),
        ("small", "large")
    );
    assert_eq!(action.detail, "resized");
    let live_ms = action.live_latency_ms.expect("latency after the move");
    assert!(live_ms < 20.0, "live after the move: {live_ms} ms");
    let text = std::fs::read_to_string(&log).expect("action log");
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("web small large"));
    let body: serde_json::Value =
        serde_json::from_str(lines.next().expect("stdin line")).expect("recommendation JSON");
    assert_eq!(body["recommended_vm_type"], "large");
    assert_eq!(body["trigger"], "slo_breach");
    assert_eq!(lines.next(), None, "the action ran exactly once");
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_action_is_recorded_with_its_reason_and_moves_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    setup(dir.path(), "resize");
    let coordinator = Coordinator::start(config(
        dir.path(),
        ActionConfig {
            name: "resize".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo 'quota exceeded in region' >&2; exit 3".into(),
            ],
            timeout_ms: 5000,
            verify_after_ms: 1000,
        },
    ))
    .await
    .expect("start");
    let states = wait_for_state(dir.path(), ActionState::Failed, Duration::from_secs(30)).await;
    assert_eq!(states, [ActionState::Failed]);
    // Two more act-mode rounds, and evaluations that keep giving the same advice: a failed
    // action is not retried for it.
    doppel_tests::metrics::wait_for_rounds(
        coordinator.api_addr,
        "doppel_act_rounds_total",
        2,
        Duration::from_secs(10),
    )
    .await;
    let store = Store::open_in(dir.path()).expect("store");
    let actions = store.actions(None, 10).expect("actions");
    assert_eq!(actions.len(), 1, "not retried");
    assert!(
        actions[0].detail.contains("exit status: 3")
            && actions[0].detail.contains("quota exceeded in region"),
        "{}",
        actions[0].detail
    );
    let spec = store.workload("web").expect("read").expect("workload");
    assert_eq!(spec.live[0].vm_type, "small", "nothing moved");
    coordinator.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_action_is_killed_with_its_children_at_the_timeout() {
    let dir = tempfile::tempdir().expect("tempdir");
    setup(dir.path(), "resize");
    let pid_file = dir.path().join("child.pid");
    let script = format!("sleep 300 & echo $! > '{}'; wait", pid_file.display());
    let coordinator = Coordinator::start(config(
        dir.path(),
        ActionConfig {
            name: "resize".into(),
            command: vec!["sh".into(), "-c".into(), script],
            timeout_ms: 700,
            verify_after_ms: 1000,
        },
    ))
    .await
    .expect("start");
    let states = wait_for_state(dir.path(), ActionState::Failed, Duration::from_secs(30)).await;
    assert_eq!(states, [ActionState::Failed]);
    let store = Store::open_in(dir.path()).expect("store");
    let detail = store.actions(None, 1).expect("actions")[0].detail.clone();
    assert!(detail.contains("did not finish within"), "{detail}");
    let child: i32 = std::fs::read_to_string(&pid_file)
        .expect("pid file")
        .trim()
        .parse()
        .expect("pid");
    // The killed child is reaped by init shortly after the group is killed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{child}")).exists()
        && std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the action's child {child} outlived the timeout"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    coordinator.shutdown().await;
}
