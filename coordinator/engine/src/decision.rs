//! The placement decision: the cheapest VM type and instance count predicted to hold the SLO at
//! the forecast peak with a margin, citing the shadow evidence; a move up when the current
//! placement will not hold, a move down when a cheaper one proved it holds, and hysteresis so the
//! recommendation does not flap.
//!
//! Only types with a fitted [`PerformanceModel`] are candidates: a type is recommended on the
//! evidence of having carried this workload's traffic, never on its specification alone. A
//! type's capacity is trusted up to a multiple of the highest load its curve rests on (measured
//! on it, or on the type it was scaled from: [`PerformanceModel::evidence_load`]),
//! ([`DecisionPolicy::max_extrapolation`]) and at a pessimistic bootstrap quantile.
//!
//! Hysteresis, two ways: the current placement keeps its place while it holds the SLO with half
//! the margin a new placement must show, and a cheaper placement must win
//! [`DecisionPolicy::confirmations`] consecutive decisions (and save at least
//! [`DecisionPolicy::min_saving`]) before the engine recommends moving down. Moving up when the
//! current placement will not hold is immediate.

use crate::Timestamp;
use crate::perf_model::PerformanceModel;
use crate::shadow_pool::VmType;

/// How placements are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionPolicy {
    /// The latency objective (same quantile as the performance models), in milliseconds.
    pub slo_ms: f64,
    /// Headroom a new placement must keep below its capacity at the SLO (0.1 = plan for 90 %).
    pub margin: f64,
    /// Capacity is trusted up to this multiple of the highest load a type was measured at.
    pub max_extrapolation: f64,
    /// Bootstrap quantile of capacity used (0.1 = a pessimistic estimate).
    pub capacity_quantile: f64,
    /// Most instances a placement may use.
    pub max_instances: u32,
    /// A move down must save at least this fraction of the current hourly cost.
    pub min_saving: f64,
    /// Consecutive decisions a cheaper placement must win before a move down.
    pub confirmations: u32,
}

impl Default for DecisionPolicy {
    fn default() -> Self {
        Self {
            slo_ms: 200.0,
            // The capacity is already a pessimistic bootstrap quantile and the peak a
            // forecast's 90th percentile; on top of both, 20 % settled one type above the
            // cheapest sufficient one wherever that had less than 20 % room, at no SLO gain
            // (eval decisions, one run each: regret p90 0.367 -> 0.014, SLO minutes 0.089 %
            // -> 0.092 %). 10 % -> 5 % (with pool steering shopping for the warned forecast,
            // `shadow_pool::steering_peak`): 40 workloads, cold-start regret p90 0.855 -> 0.000,
            // SLO minutes 0.089 % -> 0.092 %, regret p90 0.014 -> 0.000; 80 workloads, 0.855
            // -> 0.000, 0.080 % -> 0.085 %, 0.767 -> 0.015 (with 10 %, a burst to 93 % of the
            // old type's true capacity sent one workload to a type twice its price for good).
            margin: 0.05,
            max_extrapolation: 1.25,
            capacity_quantile: 0.1,
            max_instances: 64,
            min_saving: 0.1,
            confirmations: 3,
        }
    }
}

/// A VM type and how many instances of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// Catalog name of the type.
    pub vm_type: String,
    /// Instances.
    pub count: u32,
    /// Price per hour of the whole placement.
    pub hourly_cost: f64,
}

/// A type with the evidence measured for this workload.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// The type.
    pub vm_type: &'a VmType,
    /// Its latency-versus-load model for this workload.
    pub model: &'a PerformanceModel,
    /// Highest load per instance at which it was measured holding the SLO, in at least
    /// [`crate::capacity::HELD_INTERVALS`] intervals (0 when never): for the current type,
    /// measurement outranks the model's pessimistic capacity.
    pub held_load: f64,
}

/// The evidence behind a recommended placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Evidence {
    /// Capacity at the SLO per instance that the decision relied on (after the quantile and
    /// extrapolation limits, before the margin).
    pub capacity_per_instance: f64,
    /// Predicted latency (pessimistic bootstrap quantile) at the peak, per instance, in ms.
    pub latency_at_peak_ms: f64,
    /// Highest load per instance the type was measured at.
    pub max_observed_load: f64,
    /// Measurements behind the model.
    pub points: usize,
    /// Of which from shadows.
    pub shadow_points: usize,
}

/// Why the engine recommends no change.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldReason {
    /// The current placement holds the SLO at the peak and nothing enough cheaper does.
    Holds,
    /// A cheaper placement holds too, but has not yet won enough consecutive decisions.
    Confirming {
        /// The cheaper placement.
        candidate: Placement,
        /// Decisions it has won so far.
        wins: u32,
    },
    /// There is no performance model for the current type, so whether it holds is unknown.
    NoModelForCurrent,
}

/// What the engine recommends.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Keep the current placement.
    Hold {
        /// The current placement.
        placement: Placement,
        /// Why.
        reason: HoldReason,
    },
    /// Move to another placement.
    Move {
        /// From.
        from: Placement,
        /// To.
        to: Placement,
        /// The current placement is predicted to break the SLO at the peak (move now).
        urgent: bool,
        /// Predicted latency of the current placement at the peak, in ms (infinite when
        /// saturated).
        current_latency_ms: f64,
        /// The shadow evidence for the new placement.
        evidence: Evidence,
    },
    /// The current placement will not hold and no measured type can hold the peak within the
    /// instance limit.
    NoViablePlacement {
        /// The current placement.
        placement: Placement,
        /// Predicted latency of the current placement at the peak, in ms.
        current_latency_ms: f64,
    },
}

/// What the decision remembers between calls.
#[derive(Debug, Clone, PartialEq)]
pub struct DecisionState {
    current: Placement,
    pending: Option<(Placement, u32)>,
    last_change: Option<Timestamp>,
}

/// A candidate placement with its evidence.
struct ScoredPlacement {
    placement: Placement,
    evidence: Evidence,
    /// Capacity per instance at the SLO by the model's own curve (its median estimate).
    median_capacity: f64,
}

impl DecisionState {
    /// Starts from the placement the workload runs on.
    pub fn new(current: Placement) -> Self {
        Self {
            current,
            pending: None,
            last_change: None,
        }
    }

    /// The placement the workload is (or has been told to be) on.
    pub fn current(&self) -> &Placement {
        &self.current
    }

    /// When the last move was recommended.
    pub fn last_change(&self) -> Option<Timestamp> {
        self.last_change
    }

    /// Decides at `now` for a total forecast peak of `peak_load` exchanges/s.
    pub fn decide(
        &mut self,
        now: Timestamp,
        policy: &DecisionPolicy,
        peak_load: f64,
        candidates: &[Candidate<'_>],
    ) -> Decision {
        self.decide_with_recent_peak(now, policy, peak_load, peak_load, candidates)
    }

    /// [`Self::decide`], where a move down must also hold `recent_peak`, the highest load
    /// of the last day. The forecast looks one horizon ahead (an hour); at a daily trough the
    /// next peak is further away than that, and a cheaper type that holds the trough's hour is
    /// a move back up at the next peak.
    pub fn decide_with_recent_peak(
        &mut self,
        now: Timestamp,
        policy: &DecisionPolicy,
        peak_load: f64,
        recent_peak: f64,
        candidates: &[Candidate<'_>],
    ) -> Decision {
        let cheapest_for = |load: f64| {
            candidates
                .iter()
                .filter_map(|c| evaluate(policy, load, c))
                .min_by(|a, b| {
                    a.placement
                        .hourly_cost
                        .total_cmp(&b.placement.hourly_cost)
                        .then(a.placement.count.cmp(&b.placement.count))
                        .then(a.placement.vm_type.cmp(&b.placement.vm_type))
                })
        };
        let Some(current) = candidates
            .iter()
            .find(|c| c.vm_type.name == self.current.vm_type)
        else {
            self.pending = None;
            return Decision::Hold {
                placement: self.current.clone(),
                reason: HoldReason::NoModelForCurrent,
            };
        };
        let per_instance = peak_load / f64::from(self.current.count.max(1));
        let current_latency_ms = current
            .model
            .latency_quantile_at(per_instance, 1.0 - policy.capacity_quantile);
        // Whether the current placement holds is judged on its pessimistic capacity without the
        // extrapolation limit: not having been measured at the peak recently (a quiet night)
        // is no evidence that it fails there, and treating it as such moved a workload off a
        // type that held every peak, to a smaller one, "urgently".
        let current_capacity = pessimistic_capacity(policy, current.model);
        // It holds when its model says so with half the margin a new placement needs, or when
        // it was measured holding the SLO at that load: a type seen carrying the peak is not
        // moved off it because its bootstrap's pessimistic tail says it might not.
        let holds = current_capacity * (1.0 - policy.margin / 2.0) >= per_instance
            || current.held_load >= per_instance;
        if !holds {
            self.pending = None;
            // An escape must add capacity: a placement that holds less than the current one
            // is no way out of a breach. It must add it by the median estimate too, by half
            // the margin: a type of the same median capacity whose bootstrap is merely tighter
            // than live's (a type just moved to has a narrow span of loads, so a wide one) is
            // the same risk at another price. (The fleet moved a workload between two 8-vCPU
            // types of 1141 and 1173/s for a forecast breach, and paid more for it.)
            let total = |p: &Placement, per_instance: f64| per_instance * f64::from(p.count);
            let current_median = total(&self.current, current.model.capacity_at(policy.slo_ms));
            return match cheapest_for(peak_load).filter(|b| {
                total(&b.placement, b.evidence.capacity_per_instance)
                    > total(&self.current, current_capacity)
                    && total(&b.placement, b.median_capacity)
                        > current_median * (1.0 + policy.margin / 2.0)
            }) {
                Some(best) => self.move_to(now, best, true, current_latency_ms),
                None => Decision::NoViablePlacement {
                    placement: self.current.clone(),
                    current_latency_ms,
                },
            };
        }
        // A move down must hold the day's peak as well as the forecast's.
        match cheapest_for(peak_load.max(recent_peak)) {
            Some(best)
                if best.placement.vm_type != self.current.vm_type
                    || best.placement.count != self.current.count =>
            {
                if best.placement.hourly_cost > self.current.hourly_cost * (1.0 - policy.min_saving)
                {
                    self.pending = None;
                    return self.hold(HoldReason::Holds);
                }
                let wins = match &self.pending {
                    Some((p, w)) if *p == best.placement => w + 1,
                    _ => 1,
                };
                if wins >= policy.confirmations {
                    self.pending = None;
                    self.move_to(now, best, false, current_latency_ms)
                } else {
                    self.pending = Some((best.placement.clone(), wins));
                    self.hold(HoldReason::Confirming {
                        candidate: best.placement,
                        wins,
                    })
                }
            }
            _ => {
                self.pending = None;
                self.hold(HoldReason::Holds)
            }
        }
    }

    fn hold(&self, reason: HoldReason) -> Decision {
        Decision::Hold {
            placement: self.current.clone(),
            reason,
        }
    }

    fn move_to(
        &mut self,
        now: Timestamp,
        to: ScoredPlacement,
        urgent: bool,
        current_latency_ms: f64,
    ) -> Decision {
        let from = std::mem::replace(&mut self.current, to.placement.clone());
        self.last_change = Some(now);
        Decision::Move {
            from,
            to: to.placement,
            urgent,
            current_latency_ms,
            evidence: to.evidence,
        }
    }
}

/// Load per instance a new placement on a type with `model` is trusted to carry: its capacity
/// as the decision trusts it ([`usable_capacity`]) less the margin a new placement must keep.
/// The bar [`DecisionState::decide`] puts every placement it moves to over.
pub fn new_placement_capacity(policy: &DecisionPolicy, model: &PerformanceModel) -> f64 {
    with_margin(policy, usable_capacity(policy, model))
}

/// `capacity` less the margin a new placement must keep.
fn with_margin(policy: &DecisionPolicy, capacity: f64) -> f64 {
    capacity * (1.0 - policy.margin)
}

/// Capacity per instance the decision trusts: a pessimistic bootstrap quantile, capped at what
/// extrapolation from the measured loads allows.
pub fn usable_capacity(policy: &DecisionPolicy, model: &PerformanceModel) -> f64 {
    pessimistic_capacity(policy, model).min(model.evidence_load() * policy.max_extrapolation)
}

/// Capacity per instance at the pessimistic bootstrap quantile.
fn pessimistic_capacity(policy: &DecisionPolicy, model: &PerformanceModel) -> f64 {
    let samples = model.capacity_samples(policy.slo_ms);
    let index = ((samples.len() - 1) as f64 * policy.capacity_quantile).round() as usize;
    samples[index]
}

fn evaluate(
    policy: &DecisionPolicy,
    peak_load: f64,
    candidate: &Candidate<'_>,
) -> Option<ScoredPlacement> {
    let capacity = usable_capacity(policy, candidate.model);
    // `new_placement_capacity`, without sorting the bootstrap's samples a second time.
    let usable = with_margin(policy, capacity);
    if usable <= 0.0 {
        return None;
    }
    let count = (peak_load / usable).ceil().max(1.0);
    if count > f64::from(policy.max_instances) {
        return None;
    }
    let count = count as u32;
    let per_instance = peak_load / f64::from(count);
    Some(ScoredPlacement {
        median_capacity: candidate.model.capacity_at(policy.slo_ms),
        placement: Placement {
            vm_type: candidate.vm_type.name.clone(),
            count,
            hourly_cost: f64::from(count) * candidate.vm_type.price_per_hour,
        },
        evidence: Evidence {
            capacity_per_instance: capacity,
            latency_at_peak_ms: candidate
                .model
                .latency_quantile_at(per_instance, 1.0 - policy.capacity_quantile),
            max_observed_load: candidate.model.max_observed_load(),
            points: candidate.model.points(),
            shadow_points: candidate.model.shadow_points(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf_model::{LoadLatencyPoint, PointSource};

    fn vm(name: &str, price: f64) -> VmType {
        VmType {
            name: name.into(),
            vcpus: 2,
            memory_gib: 8.0,
            price_per_hour: price,
            benchmark_score: None,
        }
    }

    /// A type saturating at `saturation`/s, measured up to 90 % of it.
    fn model(saturation: f64) -> PerformanceModel {
        let points: Vec<LoadLatencyPoint> = (1..=18)
            .map(|i| {
                let load = saturation * f64::from(i) / 20.0;
                LoadLatencyPoint {
                    load,
                    latency_ms: 20.0 + 2.0 * saturation / (saturation - load),
                    source: PointSource::AmplifiedShadow { factor: 2.0 },
                }
            })
            .collect();
        PerformanceModel::fit(&points, 5).unwrap()
    }

    /// m.xlarge (0.20/h, saturating at 400/s) and m.large (0.10/h, at 200/s).
    fn big_and_small() -> [(VmType, PerformanceModel); 2] {
        [
            (vm("m.xlarge", 0.20), model(400.0)),
            (vm("m.large", 0.10), model(200.0)),
        ]
    }

    /// `types` as candidates never measured holding a load.
    fn unmeasured(types: &[(VmType, PerformanceModel)]) -> Vec<Candidate<'_>> {
        types
            .iter()
            .map(|(vm_type, model)| Candidate {
                vm_type,
                model,
                held_load: 0.0,
            })
            .collect()
    }

    #[test]
    fn moves_up_at_once_when_the_current_type_will_not_hold() {
        let (m, c) = (vm("m.large", 0.10), vm("c.large", 0.085));
        let (mm, cm) = (model(100.0), model(180.0));
        let candidates = [
            Candidate {
                vm_type: &m,
                model: &mm,
                held_load: 0.0,
            },
            Candidate {
                vm_type: &c,
                model: &cm,
                held_load: 0.0,
            },
        ];
        let policy = DecisionPolicy::default();
        let mut state = DecisionState::new(Placement {
            vm_type: "m.large".into(),
            count: 1,
            hourly_cost: 0.10,
        });
        // 120/s: past m.large's saturation; c.large holds it with margin on one instance.
        match state.decide(1000, &policy, 120.0, &candidates) {
            Decision::Move {
                to,
                urgent,
                current_latency_ms,
                evidence,
                ..
            } => {
                assert!(urgent);
                assert_eq!(to.vm_type, "c.large");
                assert_eq!(to.count, 1);
                assert!(current_latency_ms > policy.slo_ms);
                assert!(evidence.latency_at_peak_ms < policy.slo_ms);
                assert_eq!(evidence.shadow_points, 18);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(state.current().vm_type, "c.large");
        assert_eq!(state.last_change(), Some(1000));
    }

    #[test]
    fn scales_down_only_after_confirmation_and_does_not_flap() {
        let types = big_and_small();
        let candidates = unmeasured(&types);
        let policy = DecisionPolicy::default();
        let mut state = DecisionState::new(Placement {
            vm_type: "m.xlarge".into(),
            count: 1,
            hourly_cost: 0.20,
        });
        // 50/s: m.large holds it for half the price; confirm twice, move on the third.
        for wins in 1..policy.confirmations {
            match state.decide(u64::from(wins), &policy, 50.0, &candidates) {
                Decision::Hold {
                    reason: HoldReason::Confirming { wins: w, candidate },
                    ..
                } => {
                    assert_eq!(w, wins);
                    assert_eq!(candidate.vm_type, "m.large");
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(matches!(
            state.decide(9, &policy, 50.0, &candidates),
            Decision::Move { urgent: false, .. }
        ));
        // On m.large now; load wobbling a little never moves it back up.
        for (i, load) in [55.0, 48.0, 60.0, 52.0].into_iter().enumerate() {
            assert!(matches!(
                state.decide(10 + i as u64, &policy, load, &candidates),
                Decision::Hold {
                    reason: HoldReason::Holds,
                    ..
                }
            ));
        }
    }

    #[test]
    fn a_move_down_at_a_trough_must_hold_the_days_peak() {
        let types = big_and_small();
        let candidates = unmeasured(&types);
        let policy = DecisionPolicy::default();
        let mut state = DecisionState::new(Placement {
            vm_type: "m.xlarge".into(),
            count: 1,
            hourly_cost: 0.20,
        });
        // The next hour peaks at 50/s, but the day peaked at 250/s, more than m.large holds:
        // however many decisions, no move down.
        for t in 0..10 {
            assert!(
                matches!(
                    state.decide_with_recent_peak(t, &policy, 50.0, 250.0, &candidates),
                    Decision::Hold {
                        reason: HoldReason::Holds,
                        ..
                    }
                ),
                "decision {t}"
            );
        }
        // A day whose peak m.large holds: it moves down after the confirmations.
        let moved = (10..20)
            .map(|t| state.decide_with_recent_peak(t, &policy, 50.0, 90.0, &candidates))
            .any(|d| matches!(d, Decision::Move { urgent: false, .. }));
        assert!(moved);
        assert_eq!(state.current().vm_type, "m.large");
    }

    #[test]
    fn no_model_for_the_current_type_is_said_plainly() {
        let c = vm("c.large", 0.085);
        let cm = model(180.0);
        let mut state = DecisionState::new(Placement {
            vm_type: "x.large".into(),
            count: 2,
            hourly_cost: 0.3,
        });
        assert!(matches!(
            state.decide(
                0,
                &DecisionPolicy::default(),
                10.0,
                &[Candidate {
                    vm_type: &c,
                    model: &cm,
                    held_load: 0.0,
                }]
            ),
            Decision::Hold {
                reason: HoldReason::NoModelForCurrent,
                ..
            }
        ));
    }

    /// A type saturating at `saturation`/s, measured only up to `measured_to` of it.
    fn model_measured_to(saturation: f64, measured_to: f64) -> PerformanceModel {
        let points: Vec<LoadLatencyPoint> = (1..=24)
            .map(|i| {
                let load = saturation * measured_to * f64::from(i) / 24.0;
                LoadLatencyPoint {
                    load,
                    latency_ms: 20.0 + 2.0 * saturation / (saturation - load),
                    source: PointSource::Live,
                }
            })
            .collect();
        PerformanceModel::fit(&points, 5).unwrap()
    }

    #[test]
    fn a_quiet_window_is_no_reason_to_leave_a_type_that_holds_the_peak() {
        // Live measured (tonight) only up to 60 % of its saturation, where its knee already
        // shows; the forecast peak is above 1.25 times that, well inside its capacity. The
        // extrapolation limit keeps a *new* type from being trusted that far, but says nothing
        // against the current one.
        let (m, big) = (vm("m.large", 0.10), vm("m.xlarge", 0.20));
        let (mm, bm) = (model_measured_to(200.0, 0.6), model(400.0));
        let candidates = [
            Candidate {
                vm_type: &m,
                model: &mm,
                held_load: 0.0,
            },
            Candidate {
                vm_type: &big,
                model: &bm,
                held_load: 0.0,
            },
        ];
        let capacity = mm.capacity_at(200.0);
        let peak = capacity * 0.8;
        assert!(
            peak > mm.evidence_load() * 1.25,
            "peak {peak}, capacity {capacity}"
        );
        let mut state = DecisionState::new(Placement {
            vm_type: "m.large".into(),
            count: 1,
            hourly_cost: 0.10,
        });
        let decision = state.decide(0, &DecisionPolicy::default(), peak, &candidates);
        assert!(
            matches!(decision, Decision::Hold { .. }),
            "peak {peak}/s on a type holding {capacity:.0}/s: {decision:?}"
        );
    }

    #[test]
    fn an_escape_never_goes_to_a_placement_holding_less() {
        // Live on the big type cannot hold 500/s; the only cheaper candidate holds less still:
        // that is no way out.
        let types = big_and_small();
        let candidates = unmeasured(&types);
        let policy = DecisionPolicy {
            max_instances: 1,
            ..DecisionPolicy::default()
        };
        let mut state = DecisionState::new(Placement {
            vm_type: "m.xlarge".into(),
            count: 1,
            hourly_cost: 0.20,
        });
        assert!(matches!(
            state.decide(0, &policy, 500.0, &candidates),
            Decision::NoViablePlacement { .. }
        ));
    }

    #[test]
    fn a_type_measured_holding_the_peak_is_not_left_on_its_models_pessimism() {
        let (m, big) = (vm("m.large", 0.10), vm("m.xlarge", 0.20));
        let (mm, bm) = (model(100.0), model(400.0));
        // Within the margin a new placement needs, beyond the half a current one keeps.
        let peak = (1.0 - DecisionPolicy::default().margin / 4.0) * mm.capacity_at(200.0);
        let candidates = |held_load| {
            [
                Candidate {
                    vm_type: &m,
                    model: &mm,
                    held_load,
                },
                Candidate {
                    vm_type: &big,
                    model: &bm,
                    held_load: 0.0,
                },
            ]
        };
        let decide = |held_load| {
            DecisionState::new(Placement {
                vm_type: "m.large".into(),
                count: 1,
                hourly_cost: 0.10,
            })
            .decide(0, &DecisionPolicy::default(), peak, &candidates(held_load))
        };
        // By its model alone (half the margin) it will not hold that share of its capacity...
        assert!(matches!(decide(0.0), Decision::Move { urgent: true, .. }));
        // ...but it was seen holding that load.
        assert!(
            matches!(decide(peak), Decision::Hold { .. }),
            "{:?}",
            decide(peak)
        );
    }

    /// A type saturating at `saturation`/s measured only between 60 % and 80 % of it, each
    /// interval ±15 % off the curve: its median capacity is right, its bootstrap wide.
    fn narrowly_measured(saturation: f64) -> PerformanceModel {
        let points: Vec<LoadLatencyPoint> = (0..40)
            .map(|i| {
                let load = saturation * (0.6 + 0.2 * f64::from(i % 10) / 9.0);
                let noise = [1.15, 0.85, 1.0, 1.1, 0.9][i as usize % 5];
                LoadLatencyPoint {
                    load,
                    latency_ms: noise * (20.0 + 2.0 * saturation / (saturation - load)),
                    source: PointSource::Live,
                }
            })
            .collect();
        PerformanceModel::fit(&points, 5).unwrap()
    }

    #[test]
    fn an_escape_must_add_median_capacity_not_only_a_tighter_bootstrap() {
        let policy = DecisionPolicy {
            max_instances: 1,
            ..DecisionPolicy::default()
        };
        let live_model = narrowly_measured(400.0);
        let (live_median, live_pessimistic) = (
            live_model.capacity_at(policy.slo_ms),
            pessimistic_capacity(&policy, &live_model),
        );
        let decide = |other_saturation: f64| {
            let (a, r) = (vm("a.8x", 0.33), vm("r.8x", 0.52));
            let other = model(other_saturation);
            let candidates = [
                Candidate {
                    vm_type: &a,
                    model: &live_model,
                    held_load: 0.0,
                },
                Candidate {
                    vm_type: &r,
                    model: &other,
                    held_load: 0.0,
                },
            ];
            let decision = DecisionState::new(Placement {
                vm_type: "a.8x".into(),
                count: 1,
                hourly_cost: 0.33,
            })
            .decide(0, &policy, live_pessimistic, &candidates);
            (
                decision,
                other.capacity_at(policy.slo_ms),
                new_placement_capacity(&policy, &other),
            )
        };
        // A type of live's median capacity, measured tightly: it would carry the peak as a
        // new placement and its pessimistic capacity exceeds live's, yet it is the same risk
        // at a higher price.
        let (same, same_median, same_usable) = decide(420.0);
        assert!((same_median / live_median - 1.0).abs() < 0.02);
        assert!(
            same_usable >= live_pessimistic,
            "{same_usable} {live_pessimistic}"
        );
        assert!(
            matches!(same, Decision::NoViablePlacement { .. }),
            "{same:?}"
        );
        // One with 14 % more median capacity is a way out.
        let (more, more_median, _) = decide(480.0);
        assert!(more_median > live_median * (1.0 + policy.margin / 2.0));
        assert!(
            matches!(&more, Decision::Move { to, urgent: true, .. } if to.vm_type == "r.8x"),
            "{more:?}"
        );
    }
}
