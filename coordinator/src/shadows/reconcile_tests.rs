//! `ShadowManager::reconcile` against a fake [`Provisioner`] on the manual clock: the lifecycle
//! rules (budget, pins, retry after a failed create, destroy retried, dead instances replaced,
//! re-creation on schedule) checked in virtual time, without namespaces or processes. The
//! end-to-end tests (`tests/tests/shadow_manager.rs`) run the same manager with real provisioners.

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    },
};

use tokio::sync::watch;

use super::{
    CreateRequest, Created, InstanceHealth, InstanceRef, ProvisionError, Provisioner, VmType,
    manager::{ManagerParts, ShadowManager},
};
use crate::{
    ca::CertificateAuthority,
    clock::Clock,
    net::PolicySnapshot,
    policy::{LiveEndpoint, Policy, ShadowTemplate, WorkloadSpec},
    store::{
        Store,
        shadows::{ShadowRow, ShadowState},
    },
};

/// What the fake was asked, and what it is told to do.
#[derive(Debug, Default)]
struct Script {
    /// `create TYPE` / `destroy TYPE`, in call order.
    calls: Mutex<Vec<String>>,
    /// Creates still to fail.
    failing_creates: AtomicUsize,
    /// Destroys still to fail.
    failing_destroys: AtomicUsize,
    /// Instances whose status check says dead.
    dead: Mutex<HashSet<String>>,
}

#[derive(Debug, Clone, Default)]
struct FakeProvisioner(Arc<Script>);

fn refused(what: &str) -> ProvisionError {
    ProvisionError::Command {
        command: what.into(),
        status: "exit status: 1".into(),
        stderr_tail: "told to fail".into(),
    }
}

impl Provisioner for FakeProvisioner {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn supports(&self, vm_type: &VmType) -> bool {
        vm_type.name != "unsupported"
    }

    fn create(&self, request: &CreateRequest) -> Result<Created, ProvisionError> {
        let s = &self.0;
        s.calls
            .lock()
            .expect("lock")
            .push(format!("create {}", request.vm_type.name));
        if s.failing_creates.load(Ordering::Relaxed) > 0 {
            s.failing_creates.fetch_sub(1, Ordering::Relaxed);
            return Err(refused("create"));
        }
        Ok(Created {
            addr: "10.9.0.2".parse().expect("addr"),
            agent: None,
            handle: serde_json::json!({ "id": request.instance_id }),
        })
    }

    fn destroy(&self, instance: &InstanceRef) -> Result<(), ProvisionError> {
        let s = &self.0;
        s.calls
            .lock()
            .expect("lock")
            .push(format!("destroy {}", instance.vm_type));
        if s.failing_destroys.load(Ordering::Relaxed) > 0 {
            s.failing_destroys.fetch_sub(1, Ordering::Relaxed);
            return Err(refused("destroy"));
        }
        Ok(())
    }

    fn status(&self, instance: &InstanceRef) -> Result<InstanceHealth, ProvisionError> {
        Ok(
            if self
                .0
                .dead
                .lock()
                .expect("lock")
                .contains(&instance.instance_id)
            {
                InstanceHealth::Dead
            } else {
                InstanceHealth::Running
            },
        )
    }
}

struct Bed {
    _dir: tempfile::TempDir,
    manager: ShadowManager,
    fake: Arc<Script>,
    now: Arc<AtomicI64>,
    store: Store,
}

const START_MS: i64 = 1_700_000_000_000;
const RETRY_MS: i64 = 60_000;

fn vm(name: &str, price: f64) -> VmType {
    VmType {
        name: name.into(),
        price_per_hour: price,
        ..VmType::default()
    }
}

/// A workload live on `live` wanting `count` shadows within `budget` per hour.
fn bed(count: u32, budget: Option<f64>, template: impl FnOnce(&mut ShadowTemplate)) -> Bed {
    let dir = tempfile::tempdir().expect("tempdir");
    CertificateAuthority::in_state_dir(dir.path())
        .init(&["localhost".into()], time::OffsetDateTime::now_utc())
        .expect("ca");
    let mut shadow = ShadowTemplate {
        command: "srv".into(),
        args: vec![],
        count,
        pin_in: vec![],
        pin_out: vec![],
        recreate_every_ms: None,
    };
    template(&mut shadow);
    let mut policy = Policy::default();
    policy.budget.shadow_cost_per_hour = budget;
    let spec = WorkloadSpec {
        name: "web".into(),
        live: vec![LiveEndpoint {
            agent: "live-1".into(),
            vm_type: "live".into(),
            interfaces: vec![],
            vxlan_source: Some("10.0.0.2".parse().expect("addr")),
        }],
        services: vec!["10.0.0.2:80".into()],
        shadows: vec![],
        policy,
        shadow: Some(shadow),
    };
    let mut store = Store::open_in(dir.path()).expect("store");
    store.put_workload(&spec, START_MS).expect("workload");
    let fake = Arc::new(Script::default());
    let (clock, now) = Clock::manual(START_MS);
    let parts = ManagerParts {
        provisioner: Box::new(FakeProvisioner(Arc::clone(&fake))),
        policy: Arc::new(watch::channel(Arc::new(PolicySnapshot::default())).0),
        catalog: vec![
            vm("live", 0.20),
            vm("small", 0.10),
            vm("medium", 0.20),
            vm("large", 0.40),
            vm("unsupported", 0.01),
        ],
        ca: CertificateAuthority::in_state_dir(dir.path()),
        shadows_dir: dir.path().join("shadows"),
        coordinator: "127.0.0.1:4433".parse().expect("addr"),
        server_name: "localhost".into(),
        retry_after_failure_ms: RETRY_MS,
        window_ms: 600_000,
        gates: crate::forecast::ForecastSettings::default(),
        clock,
    };
    let manager = ShadowManager::new(parts, Store::open_in(dir.path()).expect("store"));
    Bed {
        _dir: dir,
        manager,
        fake,
        now,
        store,
    }
}

impl Bed {
    fn reconcile(&self) {
        self.manager.reconcile().expect("reconcile");
    }

    fn rows(&self) -> Vec<ShadowRow> {
        self.store.shadows(true).expect("rows")
    }

    fn in_state(&self, state: ShadowState) -> Vec<String> {
        let mut types: Vec<String> = self
            .rows()
            .into_iter()
            .filter(|r| r.state == state)
            .map(|r| r.vm_type)
            .collect();
        types.sort();
        types
    }

    fn calls(&self) -> Vec<String> {
        std::mem::take(&mut *self.fake.calls.lock().expect("lock"))
    }

    fn advance(&self, ms: i64) {
        self.now.fetch_add(ms, Ordering::Relaxed);
    }
}

#[test]
fn the_budget_caps_the_pool_and_cheaper_types_fill_what_is_left() {
    // Three wanted, 0.35/h allowed: large (0.40) never fits; small and medium do (0.30).
    let b = bed(3, Some(0.35), |_| {});
    b.reconcile();
    assert_eq!(b.in_state(ShadowState::Running), ["medium", "small"]);
    let cost: f64 = b
        .rows()
        .iter()
        .filter(|r| r.state == ShadowState::Running)
        .map(|r| r.price_per_hour)
        .sum();
    assert!(cost <= 0.35 + 1e-9, "{cost}");
    assert!(
        !b.calls().iter().any(|c| c == "create large"),
        "over budget: never asked"
    );
    // Another pass makes nothing more: the pool is as full as the budget allows.
    b.reconcile();
    assert_eq!(b.calls(), Vec::<String>::new());
}

#[test]
fn pins_go_first_pinned_out_unsupported_and_live_types_never() {
    let b = bed(2, None, |t| {
        t.pin_in = vec!["large".into()];
        t.pin_out = vec!["small".into()];
    });
    b.reconcile();
    let calls = b.calls();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("create large"),
        "{calls:?}"
    );
    for never in ["create small", "create unsupported", "create live"] {
        assert!(!calls.iter().any(|c| c == never), "{never}: {calls:?}");
    }
    assert_eq!(b.in_state(ShadowState::Running), ["large", "medium"]);
}

#[test]
fn a_failed_create_is_cleaned_up_and_its_type_waits_before_it_is_tried_again() {
    // Large is the only type the workload may have: the others are pinned out, live or
    // unsupported.
    let b = bed(1, None, |t| {
        t.pin_out = vec!["small".into(), "medium".into()]
    });
    b.fake.failing_creates.store(1, Ordering::Relaxed);
    b.reconcile();
    // The failed create was destroyed (nothing half-made is left) and recorded failed.
    assert_eq!(b.calls(), ["create large", "destroy large"]);
    assert_eq!(b.in_state(ShadowState::Failed), ["large"]);
    assert!(b.in_state(ShadowState::Running).is_empty());
    // Not retried within the wait, whatever the passes...
    b.advance(RETRY_MS - 1);
    b.reconcile();
    assert_eq!(b.calls(), Vec::<String>::new());
    // ...and retried once it is over.
    b.advance(1);
    b.reconcile();
    assert_eq!(b.calls(), ["create large"]);
    assert_eq!(b.in_state(ShadowState::Running), ["large"]);
}

#[test]
fn a_failed_destroy_stays_destroying_and_is_retried_on_the_next_pass() {
    let b = bed(1, None, |t| t.pin_in = vec!["large".into()]);
    b.reconcile();
    let id = b.rows()[0].id.clone();
    b.fake.failing_destroys.store(1, Ordering::Relaxed);
    assert!(b.manager.destroy(&id).is_err(), "the provisioner refused");
    assert_eq!(b.in_state(ShadowState::Destroying), ["large"]);
    b.calls();
    b.reconcile();
    let calls = b.calls();
    assert_eq!(
        calls.first().map(String::as_str),
        Some("destroy large"),
        "{calls:?}"
    );
    assert!(
        b.rows()
            .iter()
            .any(|r| r.id == id && r.state == ShadowState::Destroyed)
    );
}

#[test]
fn a_dead_instance_is_destroyed_and_replaced_on_the_same_pass() {
    let b = bed(1, None, |t| t.pin_in = vec!["large".into()]);
    b.reconcile();
    let dead = b.rows()[0].id.clone();
    b.fake.dead.lock().expect("lock").insert(dead.clone());
    b.calls();
    b.reconcile();
    assert_eq!(b.calls(), ["destroy large", "create large"]);
    let rows = b.rows();
    let old = rows.iter().find(|r| r.id == dead).expect("old row");
    assert_eq!(old.state, ShadowState::Destroyed);
    assert!(
        old.error.as_deref().is_some_and(|e| e.contains("dead")),
        "{old:?}"
    );
    assert_eq!(b.in_state(ShadowState::Running), ["large"]);
}

#[test]
fn shadows_are_recreated_when_their_age_reaches_the_schedule_and_not_before() {
    let b = bed(1, None, |t| {
        t.pin_in = vec!["large".into()];
        t.recreate_every_ms = Some(3_600_000);
    });
    b.reconcile();
    let first = b.rows()[0].id.clone();
    b.calls();
    b.advance(3_600_000 - 1);
    b.reconcile();
    assert_eq!(b.calls(), Vec::<String>::new(), "not yet due");
    b.advance(1);
    b.reconcile();
    assert_eq!(b.calls(), ["destroy large", "create large"]);
    let running: Vec<ShadowRow> = b
        .rows()
        .into_iter()
        .filter(|r| r.state == ShadowState::Running)
        .collect();
    assert_eq!(running.len(), 1);
    assert_ne!(running[0].id, first, "a fresh instance");
}
