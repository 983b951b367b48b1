//! The shadow lifecycle: reconciles what each workload asks for against what runs.
//!
//! Every [`reconcile`](ShadowManager::reconcile) (each `reconcile_interval_ms`, and at once when
//! a workload changes):
//! 1. an instance left `creating` or `destroying` (the coordinator stopped mid-way) is destroyed;
//! 2. a running instance the provisioner reports dead or missing is destroyed (and so replaced
//!    below); an instance of a removed workload, or of one without a shadow template, is destroyed;
//! 3. the manager's own instances are destroyed when they are due for re-creation or when the
//!    pool steering ([`doppel_engine::shadow_pool`], fed with the capacities the stored intervals
//!    give, see [`super::capacity`]) drops their type or a pin excludes it;
//! 4. new instances are created, in steering order, until the template's `count` runs — never
//!    beyond the workload's shadow budget (`policy.budget.shadow_cost_per_hour`): an instance is
//!    destroyed before its replacement is created, and a create that would exceed the budget is
//!    not started;
//! 5. the workload's mirror sessions (`shadows` of the spec) are made to list exactly its running
//!    instances, and the policy is republished, so live agents clone to a new shadow within a
//!    second and stop before one goes away.
//!
//! Every state change is stored with its time and reason. One operation runs at a time (the
//! reconciliation and the operator's commands share a lock), which is what keeps the budget
//! check and the create that follows it atomic.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use doppel_common::error_chain;
use doppel_engine::{CapacityMeasurement, shadow_pool};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::{AgentIdentity, CreateRequest, InstanceHealth, InstanceRef, Provisioner, VmType};
use crate::{
    ca::CertificateAuthority,
    net::PolicySnapshot,
    policy::{ShadowEndpoint, WorkloadSpec},
    store::{
        Store, StoreError,
        shadows::{ShadowOrigin, ShadowRow, ShadowState},
    },
};

/// Lowest VNI the manager gives a mirror session (below: left to hand-written sessions).
const FIRST_VNI: u32 = 1000;
/// Validity of a shadow agent's certificate, days.
const AGENT_CERT_DAYS: u32 = 365;

/// Why a lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// No such instance.
    #[error("no shadow instance {0:?}")]
    NoSuchInstance(String),
    /// No such workload.
    #[error("no workload named {0:?}")]
    NoSuchWorkload(String),
    /// The workload has no `[shadow]` template saying how to run it.
    #[error("workload {0:?} has no [shadow] template (command, count)")]
    NoTemplate(String),
    /// The VM type is not in the catalog, or this provisioner cannot make it.
    #[error("VM type {vm_type:?} cannot be shadowed: {reason}")]
    BadType {
        /// The type.
        vm_type: String,
        /// Why.
        reason: String,
    },
    /// The instance would take the workload's shadows past its budget.
    #[error(
        "budget: running shadows cost {running:.3}/h, {vm_type} costs {price:.3}/h, the budget is \
         {budget:.3}/h"
    )]
    OverBudget {
        /// The type asked for.
        vm_type: String,
        /// Its price.
        price: f64,
        /// What the workload's shadows cost now.
        running: f64,
        /// The limit.
        budget: f64,
    },
    /// The operation does not apply to the instance's state.
    #[error("shadow {id} is {state:?}; {action} needs it {needs}")]
    WrongState {
        /// The instance.
        id: String,
        /// Its state.
        state: ShadowState,
        /// What was asked.
        action: &'static str,
        /// What state it needs.
        needs: &'static str,
    },
    /// The provisioner failed; the instance was cleaned up and recorded as failed.
    #[error("shadow {id} could not be created: {reason}")]
    CreateFailed {
        /// The instance.
        id: String,
        /// The provisioner's error, causes included.
        reason: String,
    },
    /// The provisioner could not remove the instance; it stays `destroying` and is retried.
    #[error("shadow {id} could not be destroyed (will retry): {reason}")]
    DestroyFailed {
        /// The instance.
        id: String,
        /// The provisioner's error, causes included.
        reason: String,
    },
    /// The agent certificate could not be issued.
    #[error("cannot issue the shadow agent's certificate")]
    Ca(#[source] crate::ca::CaError),
    /// The store failed.
    #[error("store")]
    Store(#[from] StoreError),
}

/// How the manager reaches everything it needs.
#[derive(Debug)]
pub struct ManagerParts {
    /// Makes the instances.
    pub provisioner: Box<dyn Provisioner>,
    /// Where policy changes are published.
    pub policy: Arc<watch::Sender<Arc<PolicySnapshot>>>,
    /// The VM catalog.
    pub catalog: Vec<VmType>,
    /// Issues the shadow agents' certificates.
    pub ca: CertificateAuthority,
    /// `STATE/shadows`.
    pub shadows_dir: PathBuf,
    /// The coordinator as shadows reach it.
    pub coordinator: SocketAddr,
    /// The name in the coordinator's certificate.
    pub server_name: String,
    /// Wait after a failed create before the same type is tried again for the workload, ms.
    pub retry_after_failure_ms: i64,
    /// Measurements older than this are not used for steering, ms.
    pub window_ms: i64,
    /// The predictor's settings: steering reads capacities through the same gates.
    pub gates: crate::forecast::ForecastSettings,
    /// The coordinator's clock.
    pub clock: crate::clock::Clock,
}

/// The Shadow Instance Manager.
#[derive(Debug)]
pub struct ShadowManager {
    parts: ManagerParts,
    /// One lifecycle operation at a time; holds the store.
    ops: Mutex<Store>,
    /// Wakes the reconcile loop early (a workload changed).
    wake: Notify,
    /// Per workload: when its capacities were last computed, and what they were. Decoding a
    /// window of histograms on every reconcile pass would cost more than steering is worth.
    capacities: Mutex<HashMap<String, (i64, Capacities)>>,
}

/// Measured capacities and the live peak of one workload.
type Capacities = (Vec<CapacityMeasurement>, Option<f64>);

/// How often a workload's capacities are recomputed for steering, ms.
const CAPACITY_REFRESH_MS: i64 = 60_000;

/// An instance as `doppel shadows` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShadowView {
    /// The stored row.
    #[serde(flatten)]
    pub row: ShadowRow,
    /// Seconds since it was created.
    pub age_s: i64,
}

/// The body of `POST /v1/shadows`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateShadow {
    /// The workload.
    pub workload: String,
    /// The VM type.
    pub vm_type: String,
}

/// A pin of a VM type in or out of a workload's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pin {
    /// Always shadowed (within the budget).
    In,
    /// Never shadowed.
    Out,
    /// Up to the steering again.
    None,
}

/// The body of `PUT /v1/workloads/{name}/pins`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PinRequest {
    /// The VM type.
    pub vm_type: String,
    /// Where to pin it.
    pub pin: Pin,
}

/// The workload's VM types in the order shadows should be made: pinned-in types, then what
/// the pool steering keeps or wants tried, then the rest it does not drop, cheapest first. Types
/// the provisioner cannot make (`supports`), pinned out, or live (unless pinned in) are left out.
///
/// `measured` are the capacities the store's intervals give ([`super::capacity`]) and `peak` the
/// highest live load seen; they are used once the live type itself is measured (capacities are
/// then in exchanges/s). Before that, the one fact known is that the live type holds today's
/// load, which anchors the catalog prior's scale.
pub fn desired_types(
    catalog: &[VmType],
    supports: impl Fn(&VmType) -> bool,
    spec: &WorkloadSpec,
    running: &[String],
    measured: &[CapacityMeasurement],
    peak: Option<f64>,
) -> Vec<String> {
    let Some(template) = &spec.shadow else {
        return Vec::new();
    };
    let live: Vec<String> = spec.live.iter().map(|l| l.vm_type.clone()).collect();
    let candidates: Vec<(String, f64)> = catalog
        .iter()
        .filter(|t| supports(t))
        .filter(|t| !template.pin_out.contains(&t.name))
        .filter(|t| template.pin_in.contains(&t.name) || !live.contains(&t.name))
        .map(|t| (t.name.clone(), t.price_per_hour))
        .collect();
    let steerable: Vec<doppel_engine::VmType> =
        catalog.iter().filter_map(VmType::steering).collect();
    let seed = spec.name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let (order, failure) = shadow_pool::desired_types(&shadow_pool::PoolRequest {
        steerable: &steerable,
        candidates: &candidates,
        pin_in: &template.pin_in,
        live: &live,
        count: template.count as usize,
        max_instances: u32::try_from(spec.live.len()).unwrap_or(u32::MAX),
        running,
        measured,
        peak,
        seed,
    });
    if let Some(e) = failure {
        warn!(workload = spec.name, error = %e, "pool steering failed");
    }
    order
}

fn is_pinned_out(template: &crate::policy::ShadowTemplate, vm_type: &str) -> bool {
    template.pin_out.iter().any(|p| p == vm_type)
}

fn instance_ref(row: &ShadowRow) -> InstanceRef {
    InstanceRef {
        instance_id: row.id.clone(),
        workload: row.workload.clone(),
        vm_type: row.vm_type.clone(),
        handle: row.handle.clone(),
    }
}

fn cost(rows: &[ShadowRow], workload: &str) -> f64 {
    rows.iter()
        .filter(|r| r.workload == workload && r.state.is_active())
        .map(|r| r.price_per_hour)
        .sum()
}

impl ShadowManager {
    /// A manager over `parts`, with its own store connection.
    pub fn new(parts: ManagerParts, store: Store) -> Self {
        Self {
            parts,
            ops: Mutex::new(store),
            wake: Notify::new(),
            capacities: Mutex::new(HashMap::new()),
        }
    }

    /// Asks the loop to reconcile now.
    pub fn poke(&self) {
        self.wake.notify_one();
    }

    /// Runs [`reconcile`](Self::reconcile) every `interval` (and when poked) until `shutdown`.
    /// Shadows are left running at shutdown: they belong to the store, not to this process.
    pub async fn run(self: Arc<Self>, interval: Duration, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.wake.notified() => {}
                _ = shutdown.changed() => return,
            }
            let manager = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || manager.reconcile()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => warn!(error = %error_chain(&e), "shadow reconciliation failed"),
                Err(e) => warn!(error = %e, "shadow reconciliation panicked"),
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn vm_type(&self, name: &str) -> Result<&VmType, SimError> {
        let t = self
            .parts
            .catalog
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| SimError::BadType {
                vm_type: name.to_owned(),
                reason: "not in the [[vm_types]] catalog".into(),
            })?;
        if !self.parts.provisioner.supports(t) {
            return Err(SimError::BadType {
                vm_type: name.to_owned(),
                reason: format!(
                    "the {} provisioner cannot make it (local needs `local` limits)",
                    self.parts.provisioner.kind()
                ),
            });
        }
        Ok(t)
    }

    /// Instances (all ever made with `all`), with their age.
    pub fn list(&self, all: bool) -> Result<Vec<ShadowView>, SimError> {
        let store = self.lock();
        let now = self.parts.clock.now_ms();
        Ok(store
            .shadows(all)?
            .into_iter()
            .map(|row| ShadowView {
                age_s: (now - row.created_ms) / 1000,
                row,
            })
            .collect())
    }

    /// An instance's state changes, oldest first.
    pub fn events(&self, id: &str) -> Result<Vec<crate::store::shadows::ShadowEvent>, SimError> {
        let store = self.lock();
        if store.shadow(id)?.is_none() {
            return Err(SimError::NoSuchInstance(id.to_owned()));
        }
        Ok(store.shadow_events(id)?)
    }

    /// Creates a shadow by hand (kept until destroyed by hand or found dead).
    pub fn create_manual(&self, workload: &str, vm_type: &str) -> Result<ShadowRow, SimError> {
        let mut store = self.lock();
        let row = self.create(&mut store, workload, vm_type, ShadowOrigin::Manual)?;
        self.sync_sessions(&mut store, workload)?;
        Ok(row)
    }

    /// Withdraws a running shadow's mirror session; the manager then leaves it alone.
    pub fn pause(&self, id: &str) -> Result<ShadowRow, SimError> {
        self.transition(id, ShadowState::Running, ShadowState::Paused, "pause")
    }

    /// Registers a paused shadow's mirror session again.
    pub fn resume(&self, id: &str) -> Result<ShadowRow, SimError> {
        self.transition(id, ShadowState::Paused, ShadowState::Running, "resume")
    }

    fn transition(
        &self,
        id: &str,
        from: ShadowState,
        to: ShadowState,
        action: &'static str,
    ) -> Result<ShadowRow, SimError> {
        let mut store = self.lock();
        let mut row = store
            .shadow(id)?
            .ok_or_else(|| SimError::NoSuchInstance(id.to_owned()))?;
        if row.state != from {
            return Err(SimError::WrongState {
                id: id.to_owned(),
                state: row.state,
                action,
                needs: from.as_str(),
            });
        }
        row.state = to;
        row.updated_ms = self.parts.clock.now_ms();
        store.update_shadow(&row, Some(&format!("{action} by an operator")))?;
        self.sync_sessions(&mut store, &row.workload)?;
        info!(id, action, "shadow {action}d");
        Ok(row)
    }

    /// Destroys a shadow by hand.
    pub fn destroy(&self, id: &str) -> Result<ShadowRow, SimError> {
        let mut store = self.lock();
        let row = store
            .shadow(id)?
            .ok_or_else(|| SimError::NoSuchInstance(id.to_owned()))?;
        if !row.state.is_active() {
            return Err(SimError::WrongState {
                id: id.to_owned(),
                state: row.state,
                action: "destroy",
                needs: "to exist",
            });
        }
        self.destroy_row(
            &mut store,
            row,
            ShadowState::Destroyed,
            "destroyed by an operator",
        )
    }

    /// Pins a VM type in or out of a workload's pool (stored in its shadow template).
    pub fn pin(&self, workload: &str, request: &PinRequest) -> Result<u64, SimError> {
        let mut store = self.lock();
        let mut spec = store
            .workload(workload)?
            .ok_or_else(|| SimError::NoSuchWorkload(workload.to_owned()))?;
        if !self.parts.catalog.iter().any(|t| t.name == request.vm_type) {
            return Err(SimError::BadType {
                vm_type: request.vm_type.clone(),
                reason: "not in the [[vm_types]] catalog".into(),
            });
        }
        let template = spec
            .shadow
            .as_mut()
            .ok_or_else(|| SimError::NoTemplate(workload.to_owned()))?;
        template.pin_in.retain(|t| *t != request.vm_type);
        template.pin_out.retain(|t| *t != request.vm_type);
        match request.pin {
            Pin::In => template.pin_in.push(request.vm_type.clone()),
            Pin::Out => template.pin_out.push(request.vm_type.clone()),
            Pin::None => {}
        }
        store.put_workload(&spec, self.parts.clock.now_ms())?;
        let revision = PolicySnapshot::publish(&self.parts.policy, &store)?;
        drop(store);
        self.poke();
        Ok(revision)
    }

    fn allocate_vni(store: &Store, spec: &WorkloadSpec) -> Result<u32, SimError> {
        let mut used: HashSet<u32> = spec.shadows.iter().map(|s| s.vni).collect();
        used.extend(
            store
                .shadows(false)?
                .iter()
                .filter(|r| r.workload == spec.name)
                .map(|r| r.vni),
        );
        Ok((FIRST_VNI..=0x00ff_ffff)
            .find(|v| !used.contains(v))
            .unwrap_or(FIRST_VNI))
    }

    fn new_id(store: &Store) -> Result<String, SimError> {
        loop {
            let id = format!("{:08x}", rand::random::<u32>());
            if store.shadow(&id)?.is_none() {
                return Ok(id);
            }
        }
    }

    /// Creates one instance: refused when over budget; on failure whatever was made is destroyed
    /// and the instance recorded as failed.
    fn create(
        &self,
        store: &mut Store,
        workload: &str,
        vm_type: &str,
        origin: ShadowOrigin,
    ) -> Result<ShadowRow, SimError> {
        let spec = store
            .workload(workload)?
            .ok_or_else(|| SimError::NoSuchWorkload(workload.to_owned()))?;
        let template = spec
            .shadow
            .clone()
            .ok_or_else(|| SimError::NoTemplate(workload.to_owned()))?;
        let vm = self.vm_type(vm_type)?.clone();
        let rows = store.shadows(false)?;
        let running = cost(&rows, workload);
        if let Some(budget) = spec.policy.budget.shadow_cost_per_hour
            && running + vm.price_per_hour > budget + 1e-9
        {
            return Err(SimError::OverBudget {
                vm_type: vm.name.clone(),
                price: vm.price_per_hour,
                running,
                budget,
            });
        }
        let id = Self::new_id(store)?;
        let now = self.parts.clock.now_ms();
        let agent = format!("doppel-sh-{id}");
        let mut row = ShadowRow {
            id: id.clone(),
            workload: workload.to_owned(),
            vm_type: vm.name.clone(),
            provisioner: self.parts.provisioner.kind().to_owned(),
            origin,
            state: ShadowState::Creating,
            vni: Self::allocate_vni(store, &spec)?,
            agent: agent.clone(),
            addr: None,
            price_per_hour: vm.price_per_hour,
            handle: serde_json::Value::Null,
            error: None,
            created_ms: now,
            running_ms: None,
            updated_ms: now,
        };
        store.insert_shadow(&row)?;
        info!(id, workload, vm_type, "creating shadow");
        let dir = self.parts.shadows_dir.join(&id);
        let result = self
            .parts
            .ca
            .issue(
                &agent,
                AGENT_CERT_DAYS,
                &dir,
                time::OffsetDateTime::now_utc(),
            )
            .map_err(SimError::Ca)
            .and_then(|files| {
                let request = CreateRequest {
                    instance_id: id.clone(),
                    workload: workload.to_owned(),
                    vm_type: vm.clone(),
                    services: spec.services.clone(),
                    shadow: template,
                    live_sources: spec.live.iter().filter_map(|l| l.vxlan_source).collect(),
                    vni: row.vni,
                    report_interval_ms: spec.policy.report_interval_ms,
                    agent: AgentIdentity {
                        name: agent.clone(),
                        cert: files.cert,
                        key: files.key,
                        ca_cert: files.ca_cert,
                        coordinator: self.parts.coordinator,
                        server_name: self.parts.server_name.clone(),
                    },
                };
                self.parts
                    .provisioner
                    .create(&request)
                    .map_err(|e| SimError::CreateFailed {
                        id: id.clone(),
                        reason: error_chain(&e),
                    })
            });
        match result {
            Ok(created) => {
                row.state = ShadowState::Running;
                row.addr = Some(created.addr.to_string());
                row.agent = created.agent.unwrap_or(agent);
                row.handle = created.handle;
                row.updated_ms = self.parts.clock.now_ms();
                row.running_ms = Some(row.updated_ms);
                store.update_shadow(&row, Some("created"))?;
                info!(id, addr = ?row.addr, "shadow running");
                Ok(row)
            }
            Err(e) => {
                let reason = error_chain(&e);
                warn!(id, error = %reason, "shadow create failed; removing what it made");
                row.error = Some(reason);
                // Nothing half-made may stay: destroy with whatever handle exists (none).
                match self.destroy_row(store, row, ShadowState::Failed, "create failed") {
                    Ok(_) => Err(e),
                    Err(destroy) => Err(SimError::CreateFailed {
                        id,
                        reason: format!("{}; then {}", error_chain(&e), error_chain(&destroy)),
                    }),
                }
            }
        }
    }

    /// Withdraws the instance's mirror session, destroys it, removes its directory, and records
    /// `end` (or `destroying`, to be retried, when the provisioner fails).
    fn destroy_row(
        &self,
        store: &mut Store,
        mut row: ShadowRow,
        end: ShadowState,
        why: &str,
    ) -> Result<ShadowRow, SimError> {
        if row.state != ShadowState::Destroying {
            // The first reason is the one worth keeping, whatever retries follow.
            if row.error.is_none() && end == ShadowState::Destroyed {
                row.error = Some(why.to_owned());
            }
            row.state = ShadowState::Destroying;
            row.updated_ms = self.parts.clock.now_ms();
            store.update_shadow(&row, Some(why))?;
        }
        // Live agents stop cloning to it before it disappears.
        self.sync_sessions(store, &row.workload.clone())?;
        let result = self
            .parts
            .provisioner
            .destroy(&instance_ref(&row))
            .map_err(|e| error_chain(&e))
            .and_then(|()| {
                let dir = self.parts.shadows_dir.join(&row.id);
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                    Err(e) => Err(format!("cannot remove {}: {e}", dir.display())),
                }
            });
        row.updated_ms = self.parts.clock.now_ms();
        match result {
            Ok(()) => {
                // Its key is gone with its directory; revoking the certificate too means a copy
                // of the key can never report as this shadow again.
                if row.agent == format!("doppel-sh-{}", row.id) {
                    match self
                        .parts
                        .ca
                        .revoke(&row.agent, time::OffsetDateTime::now_utc())
                    {
                        Ok(_) | Err(crate::ca::CaError::UnknownAgent(_)) => {}
                        Err(e) => {
                            warn!(id = row.id, error = %error_chain(&e), "cannot revoke the shadow agent's certificate")
                        }
                    }
                }
                row.state = end;
                if end == ShadowState::Destroyed && row.error.is_none() {
                    row.error = Some(why.to_owned());
                }
                store.update_shadow(&row, Some(why))?;
                info!(id = row.id, why, "shadow {}", end.as_str());
                Ok(row)
            }
            Err(reason) => {
                warn!(id = row.id, error = %reason, "shadow destroy failed; will retry");
                store.update_shadow(&row, Some(&format!("destroy failed: {reason}")))?;
                Err(SimError::DestroyFailed { id: row.id, reason })
            }
        }
    }

    /// Makes the workload's mirror sessions list exactly its running instances (hand-written
    /// sessions of agents the manager never made are kept) and publishes a change.
    fn sync_sessions(&self, store: &mut Store, workload: &str) -> Result<(), SimError> {
        let Some(mut spec) = store.workload(workload)? else {
            return Ok(());
        };
        let all = store.shadows(true)?;
        let managed: HashSet<&str> = all
            .iter()
            .filter(|r| r.workload == workload)
            .map(|r| r.agent.as_str())
            .collect();
        let mut shadows: Vec<ShadowEndpoint> = spec
            .shadows
            .iter()
            .filter(|s| !managed.contains(s.agent.as_str()))
            .cloned()
            .collect();
        shadows.extend(
            all.iter()
                .filter(|r| r.workload == workload && r.state == ShadowState::Running)
                .filter_map(|r| {
                    Some(ShadowEndpoint {
                        agent: r.agent.clone(),
                        vm_type: r.vm_type.clone(),
                        addr: r.addr.as_deref()?.parse().ok()?,
                        vni: r.vni,
                    })
                }),
        );
        if shadows != spec.shadows {
            spec.shadows = shadows;
            store.put_workload(&spec, self.parts.clock.now_ms())?;
            let revision = PolicySnapshot::publish(&self.parts.policy, store)?;
            info!(workload, revision, "mirror sessions updated");
        }
        Ok(())
    }

    /// The workload's measured capacities and the peak steering shops for
    /// ([`doppel_engine::shadow_pool::steering_peak`]: the forecast's provisioned peak while
    /// its warning is raised), recomputed at most every minute.
    fn capacities(&self, store: &Store, spec: &WorkloadSpec, now: i64) -> Capacities {
        let mut cache = self.capacities.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, cached)) = cache.get(&spec.name)
            && now - at < CAPACITY_REFRESH_MS
        {
            return cached.clone();
        }
        let mut by_type = BTreeMap::new();
        let since = now.saturating_sub(self.parts.window_ms);
        let computed = match crate::forecast::read_type_measurements(
            store,
            spec,
            since,
            now,
            self.parts.gates.min_exchanges_per_interval,
            &mut by_type,
        ) {
            Ok(()) => {
                let (measured, seen) = super::capacity::capacities(
                    &by_type,
                    &self.parts.gates.gates(),
                    spec.policy.slo.max_latency_ms,
                );
                let warned = super::capacity::warned_peak(store, &spec.name, since);
                (measured, shadow_pool::steering_peak(seen, warned))
            }
            Err(e) => {
                warn!(workload = spec.name, error = %error_chain(&e), "cannot read measurements for steering");
                (Vec::new(), None)
            }
        };
        cache.insert(spec.name.clone(), (now, computed.clone()));
        computed
    }

    /// One pass of the lifecycle (see the module docs).
    pub fn reconcile(&self) -> Result<(), SimError> {
        let mut store = self.lock();
        let workloads = store.workloads()?;
        // 1-2: interrupted operations, dead instances, orphans.
        for row in store.shadows(false)? {
            let spec = workloads.iter().find(|w| w.name == row.workload);
            let outcome = match row.state {
                ShadowState::Creating => self.destroy_row(
                    &mut store,
                    row,
                    ShadowState::Failed,
                    "create interrupted (coordinator restarted)",
                ),
                ShadowState::Destroying => {
                    self.destroy_row(&mut store, row, ShadowState::Destroyed, "destroy retried")
                }
                _ if spec.is_none() => {
                    self.destroy_row(&mut store, row, ShadowState::Destroyed, "workload removed")
                }
                _ if spec.is_some_and(|s| s.shadow.is_none())
                    && row.origin == ShadowOrigin::Auto =>
                {
                    self.destroy_row(
                        &mut store,
                        row,
                        ShadowState::Destroyed,
                        "workload has no shadow template",
                    )
                }
                _ => match self.parts.provisioner.status(&instance_ref(&row)) {
                    Ok(InstanceHealth::Running) => continue,
                    Ok(health) => {
                        let why = format!("found {health:?} by the status check; replaced")
                            .to_lowercase();
                        warn!(id = row.id, workload = row.workload, "{why}");
                        let mut row = row;
                        row.error = Some(why.clone());
                        self.destroy_row(&mut store, row, ShadowState::Destroyed, &why)
                    }
                    Err(e) => {
                        warn!(id = row.id, error = %error_chain(&e), "shadow status check failed");
                        continue;
                    }
                },
            };
            if let Err(e) = outcome {
                warn!(error = %error_chain(&e), "shadow cleanup failed; will retry");
            }
        }
        let now = self.parts.clock.now_ms();
        for spec in workloads.iter().filter(|w| w.shadow.is_some()) {
            let Some(template) = &spec.shadow else {
                continue;
            };
            // 3: schedule and steering.
            let mine = |store: &Store| -> Result<Vec<ShadowRow>, SimError> {
                Ok(store
                    .shadows(false)?
                    .into_iter()
                    .filter(|r| r.workload == spec.name && r.origin == ShadowOrigin::Auto)
                    .collect())
            };
            let running: Vec<String> = mine(&store)?
                .iter()
                .filter(|r| r.state == ShadowState::Running)
                .map(|r| r.vm_type.clone())
                .collect();
            let (measured, peak) = self.capacities(&store, spec, now);
            let desired = desired_types(
                &self.parts.catalog,
                |t| self.parts.provisioner.supports(t),
                spec,
                &running,
                &measured,
                peak,
            );
            for row in mine(&store)? {
                if row.state != ShadowState::Running {
                    continue;
                }
                let due = template.recreate_every_ms.is_some_and(|every| {
                    now - row.running_ms.unwrap_or(row.created_ms)
                        >= i64::try_from(every).unwrap_or(i64::MAX)
                });
                // A type the steering no longer wants goes only when a wanted type is waiting
                // for its place; otherwise the fill below would make the same type again.
                let waiting = desired.iter().any(|t| !running.contains(t));
                let why = if due {
                    "re-created on schedule"
                } else if !desired.contains(&row.vm_type)
                    && (waiting || is_pinned_out(template, &row.vm_type))
                {
                    "pool steering or a pin no longer wants this type"
                } else {
                    continue;
                };
                if let Err(e) = self.destroy_row(&mut store, row, ShadowState::Destroyed, why) {
                    warn!(error = %error_chain(&e), "shadow destroy failed; will retry");
                }
            }
            // 4: fill up to `count`, in steering order, within the budget.
            let mut active: Vec<String> = mine(&store)?.iter().map(|r| r.vm_type.clone()).collect();
            for vm_type in &desired {
                if active.len() >= template.count as usize {
                    break;
                }
                if active.contains(vm_type) {
                    continue;
                }
                if store
                    .last_shadow_failure_ms(&spec.name, vm_type)?
                    .is_some_and(|at| now - at < self.parts.retry_after_failure_ms)
                {
                    continue;
                }
                match self.create(&mut store, &spec.name, vm_type, ShadowOrigin::Auto) {
                    Ok(_) => {
                        active.push(vm_type.clone());
                        // Register it now, not after the other creates: mirroring starts sooner.
                        self.sync_sessions(&mut store, &spec.name)?;
                    }
                    // A cheaper type further down may still fit.
                    Err(SimError::OverBudget { .. }) => {}
                    Err(e) => {
                        warn!(workload = spec.name, vm_type, error = %error_chain(&e), "shadow create failed")
                    }
                }
            }
        }
        // 5: sessions of every workload any instance ever belonged to.
        let mut names: Vec<String> = workloads.iter().map(|w| w.name.clone()).collect();
        names.sort();
        for name in names {
            self.sync_sessions(&mut store, &name)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{LiveEndpoint, Policy, ShadowTemplate};

    fn vm(name: &str, price: f64, vcpus: u32, local: bool) -> VmType {
        VmType {
            name: name.into(),
            price_per_hour: price,
            vcpus: Some(vcpus),
            memory_mib: Some(2048 * u64::from(vcpus)),
            local: local.then_some(super::super::catalog::LocalLimits {
                cpu: f64::from(vcpus) / 4.0,
                memory_bytes: 256 << 20,
            }),
            ..VmType::default()
        }
    }

    fn spec(pin_in: &[&str], pin_out: &[&str]) -> WorkloadSpec {
        WorkloadSpec {
            name: "web".into(),
            live: vec![LiveEndpoint {
                agent: "live-1".into(),
                vm_type: "m.2".into(),
                interfaces: vec![],
                vxlan_source: Some("10.0.0.2".parse().expect("addr")),
            }],
            services: vec!["10.0.0.2:80".into()],
            shadows: vec![],
            policy: Policy::default(),
            shadow: Some(ShadowTemplate {
                command: "srv".into(),
                args: vec![],
                count: 2,
                pin_in: pin_in.iter().map(|s| (*s).to_owned()).collect(),
                pin_out: pin_out.iter().map(|s| (*s).to_owned()).collect(),
                recreate_every_ms: None,
            }),
        }
    }

    fn catalog() -> Vec<VmType> {
        vec![
            vm("m.1", 0.10, 1, true),
            vm("m.2", 0.20, 2, true),
            vm("m.4", 0.40, 4, true),
            vm("c.4", 0.30, 4, true),
            vm("cloud-only", 0.05, 1, false),
        ]
    }

    #[test]
    fn pins_come_first_and_pinned_out_live_and_unsupported_types_never() {
        let local = |t: &VmType| t.local.is_some();
        let order = desired_types(&catalog(), local, &spec(&["m.4"], &["m.1"]), &[], &[], None);
        assert_eq!(order.first().map(String::as_str), Some("m.4"), "{order:?}");
        assert!(!order.iter().any(|t| t == "m.1"), "pinned out: {order:?}");
        assert!(!order.iter().any(|t| t == "m.2"), "live type: {order:?}");
        assert!(
            !order.iter().any(|t| t == "cloud-only"),
            "unsupported: {order:?}"
        );
        // Pinning the live type in shadows it too (a same-type baseline).
        let order = desired_types(&catalog(), local, &spec(&["m.2"], &[]), &[], &[], None);
        assert_eq!(order.first().map(String::as_str), Some("m.2"));
        // Identical inputs, identical order (the steering is seeded by the workload).
        assert_eq!(
            desired_types(&catalog(), local, &spec(&[], &[]), &[], &[], None),
            desired_types(&catalog(), local, &spec(&[], &[]), &[], &[], None)
        );
    }

    #[test]
    fn steering_tries_the_cheapest_placement_first_and_drops_a_dominated_running_type() {
        let local = |t: &VmType| t.local.is_some();
        // The live m.2 holds today's load on one instance, and the decision places as many
        // instances as live runs: under the catalog prior c.4 holds it on one (0.30/h), m.4
        // too (0.40/h: as fast as c.4 and dearer), m.1 (half of m.2) hardly. (Priced at a
        // scale-out the decision would never choose, m.1 came first.)
        let order = desired_types(&catalog(), local, &spec(&[], &[]), &[], &[], None);
        assert_eq!(order, ["c.4", "m.1", "m.4"], "{order:?}");
        // A running m.4 is dominated: the steering drops it, so the manager replaces it.
        let order = desired_types(
            &catalog(),
            local,
            &spec(&[], &[]),
            &["m.4".to_owned()],
            &[],
            None,
        );
        assert!(!order.contains(&"m.4".to_owned()), "{order:?}");
        // Measured: m.1 holds far less than the catalog suggests (the live m.2 holds 100/s, m.1
        // only 10/s): placing the peak on m.1 now costs 10 instances, so c.4 goes first.
        let measured = [
            CapacityMeasurement {
                vm_type: "m.2".into(),
                capacity: 100.0,
                log_sd: 0.05,
            },
            CapacityMeasurement {
                vm_type: "m.1".into(),
                capacity: 10.0,
                log_sd: 0.05,
            },
        ];
        let order = desired_types(
            &catalog(),
            local,
            &spec(&[], &[]),
            &["m.1".to_owned()],
            &measured,
            Some(90.0),
        );
        assert_eq!(order.first().map(String::as_str), Some("c.4"), "{order:?}");
        assert!(!order.contains(&"m.1".to_owned()), "m.1 kept: {order:?}");
        // Unless an operator pinned it in.
        let order = desired_types(
            &catalog(),
            local,
            &spec(&["m.4"], &[]),
            &["m.4".to_owned()],
            &[],
            None,
        );
        assert_eq!(order.first().map(String::as_str), Some("m.4"), "{order:?}");
    }
}
