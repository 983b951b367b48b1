//! A simulated fleet that drives the decision core exactly as the coordinator does, for `cargo
//! xtask eval decisions`.
//!
//! Each workload's load follows a series (a real trace, or a synthetic step, ramp, burst or
//! launch). Its live instance and its shadows run on VM types with hidden latency-versus-load
//! curves; every report interval each of them yields what an agent reports: a latency
//! histogram (its SLO percentile with multiplicative noise), the exchanges and the errors, the
//! workload's CPU time and CPU quota. From there on everything is the production code:
//! [`crate::capacity`] reads capacities through its gates, [`crate::assess::assess`] runs the
//! forecast, the warning and the placement decision, [`crate::compare::compare`] and
//! [`crate::compare::advise`] the comparison at matched load, [`crate::moves::may_move`] the act
//! policy, and [`crate::shadow_pool::desired_types`] the pool steering. A move takes one
//! interval and is verified [`FleetSetup::verify_after_steps`] later, as act mode does.
//!
//! **VM types.** A type has `vcpus` (fractional for a CPU quota) and a speed factor. Latency is
//! an M/M/c queue with `c = max(1, floor(vcpus))` servers, each at the quota's share of a CPU,
//! plus the throttling a fractional quota adds (a request that finds the quota spent waits for
//! the next CFS period, up to `(1 - quota) × 100 ms`, more often the busier the instance). So
//! the CPU ceiling (the utilization law) over-promises on throttled types, which a decision that
//! trusted it blindly would get wrong.
//!
//! **Scoring.** The oracle is the cheapest type whose true capacity at the SLO holds the
//! realised peak. Regret is the cost of the placement the workload settled on (the one in force
//! at the end) over the oracle's, minus one; cold-start regret the same for the placement at
//! the end of the first day against the first day's peak. SLO minutes are the intervals with at
//! least one exchange in which live's true SLO percentile was over the bound (the oracle has
//! none). A flap is a move back to the type the previous move left, within the cooldown.
//!
//! `DOPPEL_FLEET_DEBUG=<workload name>` prints that workload's state every simulated hour to
//! stderr: live type, load, p99, shadows, the warning, the provisioned and sizing peaks, the
//! decision, models and the comparison's ranking.

use std::collections::{BTreeMap, HashMap, VecDeque};

use hdrhistogram::Histogram;
use rand::{RngExt as _, SeedableRng as _};

use crate::Timestamp;
use crate::assess::assess;
use crate::capacity::{CapacityGates, CpuSample, FitCache, Outcome, TypeMeasurements};
use crate::compare::{CompareConfig, Measurement, Role, advise, compare};
use crate::decision::{DecisionPolicy, Placement};
use crate::forecast::ForecastConfig;
use crate::moves::{ActPolicy, LastMove, MoveOutcome, may_move};
use crate::perf_model::{LoadLatencyPoint, PointSource};
use crate::predictor::WorkloadPredictor;
use crate::shadow_pool::{self, PoolRequest, VmType, desired_types};
use crate::warning::WarningPolicy;

/// A VM type with its hidden performance.
#[derive(Debug, Clone, PartialEq)]
pub struct SimType {
    /// Catalog entry (vCPUs rounded up, memory, price).
    pub catalog: VmType,
    /// CPUs the workload may use: fractional for a CPU quota (a burstable type).
    pub cpus: f64,
    /// Service time multiplier against a reference CPU (0.85: 15 % faster).
    pub speed: f64,
}

/// p99 reported for a saturated instance, ms (the agents' timeouts).
const SATURATED_MS: f64 = 10_000.0;
/// CFS period: a throttled request waits up to the unused share of it.
const CFS_PERIOD_MS: f64 = 100.0;

impl SimType {
    /// The true p99 latency (ms) of a workload that spends `cpu_ms` of a reference CPU per
    /// exchange, at `load` exchanges/s on one instance.
    pub fn p99_ms(&self, cpu_ms: f64, load: f64) -> f64 {
        let servers = self.cpus.floor().max(1.0);
        let quota = (self.cpus / servers).min(1.0);
        let service_s = cpu_ms * self.speed / 1000.0;
        // Each server runs at the quota's share of a CPU.
        let mu = quota / service_s;
        let offered = load / mu;
        let rho = offered / servers;
        if rho >= 0.995 {
            return SATURATED_MS;
        }
        let wait_tail = erlang_c(servers as u32, offered);
        let wait_p99_s = if wait_tail > 0.01 {
            (wait_tail / 0.01).ln() / (servers * mu - load)
        } else {
            0.0
        };
        let service_p99_s = 100f64.ln() / mu;
        let throttle_ms = (1.0 - quota) * CFS_PERIOD_MS * (rho / 0.5).min(1.0);
        (1.0 + 1000.0 * (service_p99_s + wait_p99_s) + throttle_ms).min(SATURATED_MS)
    }

    /// The highest load whose true p99 is within `slo_ms` (0 when not even a trickle is).
    pub fn capacity_at(&self, cpu_ms: f64, slo_ms: f64) -> f64 {
        let servers = self.cpus.floor().max(1.0);
        let quota = (self.cpus / servers).min(1.0);
        let (mut lo, mut hi) = (0.0, servers * quota * 1000.0 / (cpu_ms * self.speed));
        if self.p99_ms(cpu_ms, hi * 1e-6) > slo_ms {
            return 0.0;
        }
        for _ in 0..60 {
            let mid = f64::midpoint(lo, hi);
            if self.p99_ms(cpu_ms, mid) <= slo_ms {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    }
}

/// Erlang C: the probability an arrival waits in an M/M/c queue with `offered` Erlangs.
fn erlang_c(servers: u32, offered: f64) -> f64 {
    let mut b = 1.0;
    for k in 1..=servers {
        b = offered * b / (f64::from(k) + offered * b);
    }
    let rho = offered / f64::from(servers);
    b / (1.0 - rho * (1.0 - b))
}

/// A catalog of `size` types drawn from four families and a burstable line, cheapest first.
pub fn catalog(size: usize, seed: u64) -> Vec<SimType> {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    // (family, speed, price per vCPU-hour, GiB per vCPU)
    let families = [
        ("c", 0.85, 0.0425, 2.0),
        ("m", 1.0, 0.048, 4.0),
        ("a", 1.08, 0.043, 4.0),
        ("r", 1.05, 0.063, 8.0),
    ];
    let mut all = Vec::new();
    for (family, speed, per_cpu, gib) in families {
        for vcpus in [1u32, 2, 4, 8, 16] {
            all.push(SimType {
                catalog: VmType {
                    name: format!("{family}.{vcpus}x"),
                    vcpus,
                    memory_gib: gib * f64::from(vcpus),
                    price_per_hour: per_cpu * f64::from(vcpus) * rng.random_range(0.95..1.05),
                    benchmark_score: None,
                },
                cpus: f64::from(vcpus),
                speed,
            });
        }
    }
    // Burstable: two vCPUs on the label, a quota of a fraction of one.
    for (name, quota, price) in [("t.small", 0.2, 0.0104), ("t.medium", 0.4, 0.0208)] {
        all.push(SimType {
            catalog: VmType {
                name: name.to_owned(),
                vcpus: 2,
                memory_gib: 2.0,
                price_per_hour: price,
                benchmark_score: None,
            },
            cpus: quota,
            speed: 1.0,
        });
    }
    // A random subset, always with the biggest type so every peak has a home.
    let biggest = all
        .iter()
        .max_by(|a, b| a.cpus.total_cmp(&b.cpus).then(b.speed.total_cmp(&a.speed)))
        .cloned()
        .unwrap_or_else(|| unreachable!("the families are not empty"));
    let mut rest: Vec<SimType> = all.into_iter().filter(|t| *t != biggest).collect();
    let mut chosen = vec![biggest];
    while chosen.len() < size.max(2) && !rest.is_empty() {
        let i = rng.random_range(0..rest.len());
        chosen.push(rest.swap_remove(i));
    }
    chosen.sort_by(|a, b| {
        a.catalog
            .price_per_hour
            .total_cmp(&b.catalog.price_per_hour)
    });
    chosen
}

/// What a workload's load does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A real trace.
    Trace,
    /// A daily cycle that steps up once.
    Step,
    /// A daily cycle on a steady ramp.
    Ramp,
    /// A daily cycle with short bursts.
    Burst,
    /// A launch: from almost nothing to its plateau within hours.
    Launch,
}

impl Shape {
    /// Whether the load trends (moves are expected to follow it).
    pub fn trends(self) -> bool {
        matches!(self, Self::Step | Self::Ramp | Self::Launch)
    }

    /// The name printed.
    pub fn name(self) -> &'static str {
        match self {
            Self::Trace => "trace",
            Self::Step => "step",
            Self::Ramp => "ramp",
            Self::Burst => "burst",
            Self::Launch => "launch",
        }
    }
}

/// A synthetic load series of `steps` one-minute steps, unscaled (peak about 1).
pub fn synthetic(shape: Shape, steps: usize, seed: u64) -> Vec<f64> {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let step_at = rng.random_range(steps / 4..steps * 3 / 4);
    let step_by = rng.random_range(1.5..2.5);
    let ramp_to = rng.random_range(2.0..4.0);
    let mut burst_left = 0usize;
    let mut burst_by = 1.0;
    (0..steps)
        .map(|i| {
            let phase = (i % 1440) as f64 / 1440.0 * std::f64::consts::TAU;
            let daily = 1.0 + 0.5 * (phase - 2.0).sin();
            let noise = 1.0 + 0.08 * (rng.random::<f64>() - 0.5);
            let trend = match shape {
                Shape::Step if i >= step_at => step_by,
                Shape::Ramp => 1.0 + (ramp_to - 1.0) * i as f64 / steps as f64,
                Shape::Launch => (i as f64 / 240.0).clamp(0.02, 1.0),
                _ => 1.0,
            };
            let burst = if shape == Shape::Burst {
                if burst_left == 0 && rng.random::<f64>() < 3.0 / 1440.0 {
                    burst_left = rng.random_range(5..20);
                    burst_by = rng.random_range(1.5..2.5);
                }
                if burst_left > 0 {
                    burst_left -= 1;
                    burst_by
                } else {
                    1.0
                }
            } else {
                1.0
            };
            (daily * trend * burst * noise).max(0.0)
        })
        .collect()
}

/// One simulated workload.
#[derive(Debug, Clone)]
pub struct SimWorkload {
    /// Name printed.
    pub name: String,
    /// Its load shape.
    pub shape: Shape,
    /// Offered load per one-minute step, exchanges/s (already scaled).
    pub load: Vec<f64>,
    /// Reference-CPU milliseconds per exchange.
    pub cpu_ms: f64,
    /// The SLO: p99 bound, ms.
    pub slo_ms: f64,
    /// Its catalog.
    pub catalog: Vec<SimType>,
    /// Seed of its noise.
    pub seed: u64,
}

/// How the fleet is run.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetSetup {
    /// Seconds per step (the report interval).
    pub step_secs: u64,
    /// Shadows per workload.
    pub shadows: usize,
    /// Share of live's flows mirrored to each shadow.
    pub mirror_rate: f64,
    /// Multiplicative noise (log-sd) of each interval's measured percentile.
    pub latency_noise: f64,
    /// Steps between a finished move and its verification.
    pub verify_after_steps: u64,
    /// The act policy's cooldown, steps.
    pub cooldown_steps: u64,
    /// Steps between pool re-plans.
    pub replan_every: usize,
    /// Steps of measurements the models rest on (the coordinator's `perf_window_ms`).
    pub perf_window_steps: usize,
    /// Steps the comparison looks back.
    pub compare_window_steps: usize,
    /// The predictor's warning settings.
    pub warning: WarningPolicy,
    /// The capacity gates.
    pub gates: CapacityGates,
    /// Intervals a type's fit is reused for (the coordinator's `refit_after_steps`).
    pub refit_after_steps: usize,
}

impl Default for FleetSetup {
    /// The coordinator's defaults at one-minute reports.
    fn default() -> Self {
        Self {
            step_secs: 60,
            shadows: 3,
            mirror_rate: 1.0,
            latency_noise: 0.08,
            verify_after_steps: 1,
            cooldown_steps: 30,
            replan_every: 60,
            perf_window_steps: 360,
            compare_window_steps: 15,
            warning: WarningPolicy::CHOSEN_PER_MINUTE,
            gates: CapacityGates::default(),
            refit_after_steps: 10,
        }
    }
}

/// A move made.
#[derive(Debug, Clone, PartialEq)]
pub struct SimMove {
    /// Step it took effect.
    pub step: usize,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// `slo_breach`, `faster_at_lower_or_equal_cost` or `forecast_breach`.
    pub reason: &'static str,
}

/// How one workload went.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadOutcome {
    /// Name.
    pub name: String,
    /// Load shape.
    pub shape: Shape,
    /// Types in its catalog.
    pub catalog_size: usize,
    /// Days simulated.
    pub days: f64,
    /// The type it started on.
    pub start: String,
    /// The type it ended on.
    pub settled: String,
    /// The oracle: the cheapest type holding the realised peak.
    pub oracle: String,
    /// Settled cost over the oracle's, minus one.
    pub regret: f64,
    /// The type in force at the end of the first day, against the first day's oracle.
    pub cold_start_regret: f64,
    /// Steps whose true live p99 broke the SLO.
    pub slo_steps: usize,
    /// Steps simulated.
    pub steps: usize,
    /// Moves made.
    pub moves: Vec<SimMove>,
    /// Moves back to the type the previous move left, within the cooldown.
    pub flaps: usize,
    /// Time-averaged cost over the oracle's, minus one.
    pub mean_cost_regret: f64,
    /// The oracle's true capacity at the SLO over the realised peak, minus one: how much room
    /// the cheapest sufficient type leaves. A decision that keeps a safety margin settles on
    /// the next type up when this is smaller than its margin.
    pub oracle_room: f64,
    /// The same for the first day: the first day's oracle's true capacity over the first day's
    /// peak, minus one ([`WorkloadOutcome::cold_start_regret`]'s reference).
    pub day_one_oracle_room: f64,
}

/// The cheapest type whose true capacity holds `peak`. A type that misses the SLO at any load
/// (a small CPU quota's throttling alone can) holds nothing, not even an idle workload.
fn oracle(w: &SimWorkload, peak: f64) -> Option<&SimType> {
    w.catalog
        .iter()
        .filter(|t| {
            let capacity = t.capacity_at(w.cpu_ms, w.slo_ms);
            capacity > 0.0 && capacity >= peak
        })
        .min_by(|a, b| {
            a.catalog
                .price_per_hour
                .total_cmp(&b.catalog.price_per_hour)
        })
}

/// Scales `shape` so its peak needs a mid-catalog type, and picks the SLO and CPU cost.
pub fn workload(
    name: String,
    shape: Shape,
    unscaled: &[f64],
    catalog: Vec<SimType>,
    seed: u64,
) -> SimWorkload {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let cpu_ms = rng.random_range(2.0..8.0);
    let slo_ms = (100f64.ln() * cpu_ms) * rng.random_range(3.0..6.0);
    let mut capacities: Vec<f64> = catalog
        .iter()
        .map(|t| t.capacity_at(cpu_ms, slo_ms))
        .collect();
    capacities.sort_by(f64::total_cmp);
    let biggest = capacities.last().copied().unwrap_or(1.0);
    let peak_target = biggest * rng.random_range(0.1..0.7);
    let unscaled_peak = unscaled.iter().copied().fold(0.0, f64::max).max(1e-9);
    let load = unscaled
        .iter()
        .map(|v| v / unscaled_peak * peak_target)
        .collect();
    SimWorkload {
        name,
        shape,
        load,
        cpu_ms,
        slo_ms,
        catalog,
        seed,
    }
}

/// One interval's histogram: the bulk near a third of the p99, 1 % at the p99 (so the
/// histogram's 99th percentile is the p99 the agent would report).
fn histogram(exchanges: u64, p99_ms: f64) -> Histogram<u64> {
    let mut h = Histogram::<u64>::new_with_bounds(1000, 100_000_000_000, 2)
        .unwrap_or_else(|_| unreachable!("valid bounds"));
    let tail = exchanges.div_ceil(100);
    let _ = h.record_n(
        (p99_ms * 0.35 * 1e6) as u64,
        exchanges - tail.min(exchanges),
    );
    let _ = h.record_n((p99_ms * 1e6) as u64, tail);
    h
}

/// Simulates one workload from a cold start.
pub fn simulate(w: &SimWorkload, setup: &FleetSetup) -> WorkloadOutcome {
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(w.seed);
    // Read once: the loop below runs a step a simulated minute.
    let debug = std::env::var("DOPPEL_FLEET_DEBUG").is_ok_and(|n| n == w.name);
    let step_secs = setup.step_secs;
    let step_ms = i64::try_from(step_secs * 1000).unwrap_or(i64::MAX);
    let by_name: HashMap<&str, &SimType> = w
        .catalog
        .iter()
        .map(|t| (t.catalog.name.as_str(), t))
        .collect();
    let prices: HashMap<String, f64> = w
        .catalog
        .iter()
        .map(|t| (t.catalog.name.clone(), t.catalog.price_per_hour))
        .collect();
    let steerable: Vec<VmType> = w.catalog.iter().map(|t| t.catalog.clone()).collect();
    // Start on the cheapest type holding the first hour's peak with 20 % to spare: how a user
    // sizes a launch.
    let first_hour = w.load.iter().take(60).copied().fold(0.0, f64::max);
    let start = oracle(w, first_hour * 1.2)
        .or_else(|| w.catalog.last())
        .map(|t| t.catalog.name.clone())
        .unwrap_or_default();
    let placement = |name: &str| Placement {
        vm_type: name.to_owned(),
        count: 1,
        hourly_cost: prices.get(name).copied().unwrap_or(f64::INFINITY),
    };
    let mut live = start.clone();
    let mut predictor = WorkloadPredictor::new(
        ForecastConfig::for_step(
            step_secs,
            4 * 1440,
            setup.warning.horizon_steps + setup.warning.min_breach_steps,
        ),
        setup.warning.clone(),
        DecisionPolicy {
            slo_ms: w.slo_ms,
            max_instances: 1,
            ..DecisionPolicy::default()
        },
        placement(&live),
    );
    let mut by_type: BTreeMap<String, TypeMeasurements> = BTreeMap::new();
    let mut fits = FitCache::new(setup.refit_after_steps);
    let mut window: VecDeque<Measurement> = VecDeque::new();
    let mut shadows: Vec<String> = Vec::new();
    let mut last: Option<LastMove> = None;
    let mut pending: Option<(String, &'static str)> = None;
    let mut moves: Vec<SimMove> = Vec::new();
    let mut moved_at: Option<usize> = None;
    let mut slo_steps = 0;
    // Live's measured p99 broke the SLO in the last interval, for the first time since it held.
    let (mut breach_onset, mut live_was_breaking) = (false, false);
    // The last evaluation's provisioned peak, while its warning was raised.
    let mut warned_peak: Option<f64> = None;
    let mut cost_sum = 0.0;
    let mut settled_day_one = None;
    let t0: Timestamp = 1_700_000_000 / 86_400 * 86_400;
    let act = ActPolicy {
        cooldown_secs: setup.cooldown_steps * step_secs,
    };
    for (step, &load) in w.load.iter().enumerate() {
        let now = t0 + step as u64 * step_secs;
        let now_ms = i64::try_from(now).unwrap_or(i64::MAX) * 1000;
        // The action of the last admitted advice runs during this interval.
        if let Some((to, reason)) = pending.take() {
            moves.push(SimMove {
                step,
                from: live.clone(),
                to: to.clone(),
                reason,
            });
            last = Some(LastMove {
                from: live.clone(),
                to: to.clone(),
                at: now,
                outcome: MoveOutcome::AwaitingVerification,
            });
            live = to;
            moved_at = Some(step);
            shadows.retain(|s| *s != live);
        }
        // Verification: live's p99 since the move, against the SLO.
        if let (Some(at), Some(l)) = (moved_at, last.as_mut())
            && l.outcome == MoveOutcome::AwaitingVerification
            && step as u64 >= at as u64 + setup.verify_after_steps
        {
            let t = by_name[live.as_str()];
            let recovered = (at..=step).all(|s| t.p99_ms(w.cpu_ms, w.load[s]) <= w.slo_ms);
            l.outcome = if recovered {
                MoveOutcome::Recovered
            } else {
                MoveOutcome::NotRecovered
            };
            l.at = now;
        }
        // Pool steering, on schedule, and at once when live starts breaking the SLO: the
        // coordinator's shadow manager re-steers on every pass (seconds), so an hourly
        // schedule alone would leave a failing workload with shadows chosen for a load it no
        // longer has.
        if step % setup.replan_every == 0 || breach_onset {
            let candidates: Vec<(String, f64)> = w
                .catalog
                .iter()
                .filter(|t| t.catalog.name != live)
                .map(|t| (t.catalog.name.clone(), t.catalog.price_per_hour))
                .collect();
            let models =
                crate::capacity::type_models_cached(&by_type, &setup.gates, w.slo_ms, &mut fits);
            let measured = models.pool_measurements(w.slo_ms);
            let seen = by_type
                .get(&live)
                .map(|t| t.points.iter().map(|(_, p)| p.load).fold(0.0, f64::max));
            let peak = shadow_pool::steering_peak(seen, warned_peak);
            let (order, _) = desired_types(&PoolRequest {
                steerable: &steerable,
                candidates: &candidates,
                pin_in: &[],
                live: std::slice::from_ref(&live),
                count: setup.shadows,
                max_instances: 1,
                running: &shadows,
                measured: &measured,
                peak,
                seed: w.seed ^ step as u64,
            });
            shadows = order.into_iter().take(setup.shadows).collect();
        }
        predictor
            .handle_load(now, load)
            .unwrap_or_else(|e| unreachable!("simulated loads are finite and positive: {e}"));
        // What the agents report for this interval.
        let start_ms = now_ms - step_ms;
        let mut report =
            |vm_type: &str, role: Role, load: f64, rng: &mut rand::rngs::ChaCha8Rng| {
                let t = by_name[vm_type];
                let true_p99 = t.p99_ms(w.cpu_ms, load);
                // An agent counts the exchanges that completed: a saturated instance completes
                // what its CPUs allow, the rest time out.
                let ceiling = t.cpus * 1000.0 / (w.cpu_ms * t.speed);
                let load = load.min(ceiling);
                let exchanges = (load * step_secs as f64).round() as u64;
                let noise = (setup.latency_noise * standard_normal(rng)).exp();
                let p99 = (true_p99 * noise).min(SATURATED_MS);
                // Shadows count the exchanges that timed out; live agents count no errors.
                let failed = if role == Role::Shadow && true_p99 >= SATURATED_MS {
                    exchanges / 3
                } else {
                    0
                };
                window.push_back(Measurement {
                    agent: format!("{vm_type}-{role:?}"),
                    vm_type: vm_type.to_owned(),
                    role,
                    interval_start_ms: start_ms,
                    interval_ms: step_ms,
                    class: 0,
                    histogram: histogram(exchanges.max(1), p99),
                    report_errors: failed,
                });
                if exchanges < 10 {
                    return (true_p99, p99);
                }
                let tm = by_type.entry(vm_type.to_owned()).or_default();
                tm.role = Some(match (tm.role, role) {
                    (Some(Role::Live), _) | (_, Role::Live) => Role::Live,
                    _ => Role::Shadow,
                });
                let start = start_ms;
                tm.points.push_back((
                    start,
                    LoadLatencyPoint {
                        load,
                        latency_ms: p99,
                        source: match role {
                            Role::Live => PointSource::Live,
                            Role::Shadow => PointSource::Shadow,
                        },
                    },
                ));
                tm.outcomes.push_back((
                    start,
                    Outcome {
                        failed,
                        measured: exchanges,
                        load,
                    },
                ));
                // CPU time: what was served, capped by what the quota allows.
                let cpu_us = (exchanges as f64 * w.cpu_ms * t.speed * 1000.0)
                    .min(t.cpus * step_secs as f64 * 1e6) as u64;
                tm.cpu.push_back((
                    start,
                    CpuSample {
                        cpu_us,
                        exchanges,
                        capacity_millis: (t.cpus * 1000.0) as u32,
                    },
                ));
                (true_p99, p99)
            };
        let (live_p99, live_measured_p99) = report(&live, Role::Live, load, &mut rng);
        let breaking = live_measured_p99 > w.slo_ms;
        breach_onset = breaking && !live_was_breaking;
        live_was_breaking = breaking;
        // A minute without a single exchange broke no one's SLO.
        if live_p99 > w.slo_ms && load * step_secs as f64 >= 1.0 {
            slo_steps += 1;
        }
        for s in &shadows {
            report(s, Role::Shadow, load * setup.mirror_rate, &mut rng);
        }
        // The coordinator's windows.
        let perf_start = now_ms - i64::try_from(setup.perf_window_steps).unwrap_or(0) * step_ms;
        for tm in by_type.values_mut() {
            while tm.points.front().is_some_and(|(s, _)| *s < perf_start) {
                tm.points.pop_front();
            }
            while tm.cpu.front().is_some_and(|(s, _)| *s < perf_start) {
                tm.cpu.pop_front();
            }
            while tm.outcomes.front().is_some_and(|(s, _)| *s < perf_start) {
                tm.outcomes.pop_front();
            }
        }
        by_type.retain(|_, tm| !tm.points.is_empty());
        let compare_ms = i64::try_from(setup.compare_window_steps).unwrap_or(0) * step_ms;
        while window
            .front()
            .is_some_and(|m| m.interval_start_ms < now_ms - compare_ms)
        {
            window.pop_front();
        }
        // The evaluation: the comparison's advice (unless the forecast vetoes it), then the
        // forecast's; each passes the act policy on its own, and the newest admitted one is
        // acted on (as act mode takes the newest recommendation).
        let comparison = compare(
            &w.name,
            now_ms,
            compare_ms,
            99.0,
            &CompareConfig::default(),
            &prices,
            window.make_contiguous(),
        );
        let assessment = assess(
            &mut predictor,
            &by_type,
            &mut fits,
            &setup.gates,
            w.slo_ms,
            placement(&live),
            &prices,
            None,
            now,
        );
        warned_peak = assessment
            .provisioned_peak
            .filter(|_| assessment.warning.is_some());
        let mut advice: Vec<(String, &'static str, bool)> = Vec::new();
        if let Some((chosen, trigger)) = advise(&comparison, w.slo_ms, None)
            && assessment
                .peak_check
                .vetoes(&comparison, trigger, &chosen.vm_type)
                .is_none()
        {
            advice.push((
                chosen.vm_type.clone(),
                trigger.as_str(),
                trigger.is_urgent(),
            ));
        }
        if let Some(m) = assessment.forecast_move() {
            advice.push((m.to.vm_type.clone(), "forecast_breach", true));
        }
        // Every hour, and at every evaluation that advised a move (acted on or not).
        if debug && (step % 60 == 0 || !advice.is_empty()) {
            eprintln!(
                "{step} live {live} load {load:.0} p99 {live_p99:.0}/{:.0} shadows {shadows:?} warning {:?} provisioned {:?} sizing {:?} decision {:?} models {:?} unmodelled {:?} ranking {:?}",
                w.slo_ms,
                assessment
                    .warning
                    .as_ref()
                    .map(|w| format!("{w:?}").chars().take(200).collect::<String>()),
                assessment.provisioned_peak.map(|p| p as i64),
                assessment.peak_check.sizing_peak.map(|p| p as i64),
                assessment
                    .decision
                    .as_ref()
                    .map(|d| format!("{d:?}").chars().take(120).collect::<String>()),
                assessment
                    .capacity
                    .models
                    .iter()
                    .map(|t| (
                        t.vm_type.clone(),
                        t.model.capacity_at(w.slo_ms) as i64,
                        t.basis.clone()
                    ))
                    .collect::<Vec<_>>(),
                assessment
                    .capacity
                    .unmodelled
                    .iter()
                    .map(|u| (
                        u.vm_type.clone(),
                        u.reason.chars().take(60).collect::<String>()
                    ))
                    .collect::<Vec<_>>(),
                comparison
                    .ranking
                    .iter()
                    .map(|r| (r.vm_type.clone(), r.verdict, r.shadow_at_load_ms as i64))
                    .collect::<Vec<_>>(),
            );
        }
        for (to, reason, urgent) in advice {
            if to == live {
                continue;
            }
            if may_move(&act, now, last.as_ref(), &live, &to, urgent).is_ok() {
                if debug {
                    eprintln!("{step} MOVE {live} -> {to} ({reason}) load {load:.0}");
                }
                last = Some(LastMove {
                    from: live.clone(),
                    to: to.clone(),
                    at: now,
                    outcome: MoveOutcome::Running,
                });
                pending = Some((to, reason));
            }
        }
        cost_sum += prices[&live];
        if step + 1 == 1440 {
            settled_day_one = Some(live.clone());
        }
    }
    let steps = w.load.len();
    let peak = w.load.iter().copied().fold(0.0, f64::max);
    let best_type = oracle(w, peak);
    let best = best_type.map_or(f64::INFINITY, |t| t.catalog.price_per_hour);
    let oracle_name = best_type
        .map(|t| t.catalog.name.clone())
        .unwrap_or_default();
    let oracle_room = best_type.map_or(0.0, |t| t.capacity_at(w.cpu_ms, w.slo_ms) / peak - 1.0);
    let day_one_peak = w.load.iter().take(1440).copied().fold(0.0, f64::max);
    let day_one_oracle = oracle(w, day_one_peak);
    let day_one_best = day_one_oracle.map_or(f64::INFINITY, |t| t.catalog.price_per_hour);
    let day_one_oracle_room = day_one_oracle.map_or(0.0, |t| {
        t.capacity_at(w.cpu_ms, w.slo_ms) / day_one_peak - 1.0
    });
    let day_one = settled_day_one.unwrap_or_else(|| live.clone());
    let cooldown = usize::try_from(setup.cooldown_steps).unwrap_or(usize::MAX);
    let flaps = moves
        .windows(2)
        .filter(|m| m[1].to == m[0].from && m[1].step - m[0].step < cooldown)
        .count();
    WorkloadOutcome {
        name: w.name.clone(),
        shape: w.shape,
        catalog_size: w.catalog.len(),
        days: steps as f64 * step_secs as f64 / 86_400.0,
        start,
        regret: prices[&live] / best - 1.0,
        cold_start_regret: prices[&day_one] / day_one_best - 1.0,
        mean_cost_regret: cost_sum / steps.max(1) as f64 / best - 1.0,
        settled: live,
        oracle: oracle_name,
        slo_steps,
        steps,
        moves,
        flaps,
        oracle_room,
        day_one_oracle_room,
    }
}

/// A standard normal draw (Box-Muller).
fn standard_normal(rng: &mut rand::rngs::ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random_range(f64::EPSILON..1.0);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(cpus: f64, speed: f64) -> SimType {
        SimType {
            catalog: VmType {
                name: format!("{cpus}"),
                vcpus: cpus.ceil() as u32,
                memory_gib: 4.0,
                price_per_hour: cpus,
                benchmark_score: None,
            },
            cpus,
            speed,
        }
    }

    #[test]
    fn more_cpus_and_faster_ones_hold_more_and_a_quota_is_worse_than_its_ceiling() {
        let (one, two, fast) = (t(1.0, 1.0), t(2.0, 1.0), t(2.0, 0.8));
        let c = |t: &SimType| t.capacity_at(4.0, 100.0);
        assert!(c(&two) > 1.9 * c(&one), "{} vs {}", c(&two), c(&one));
        assert!(c(&fast) > c(&two));
        // Latency rises with load and saturates at the CPU ceiling.
        assert!(one.p99_ms(4.0, 200.0) > one.p99_ms(4.0, 50.0));
        assert_eq!(one.p99_ms(4.0, 251.0), SATURATED_MS);
        // A 0.4 CPU quota: its ceiling is 40 % of one CPU's, its capacity at the SLO far less
        // than 40 % (throttling waits).
        let quota = t(0.4, 1.0);
        assert!(c(&quota) < 0.3 * c(&one), "{} vs {}", c(&quota), c(&one));
    }

    #[test]
    fn a_steady_workload_on_the_oracle_stays_there() {
        let catalog = catalog(8, 3);
        let unscaled = synthetic(Shape::Burst, 1440 * 2, 5);
        let w = workload("steady".into(), Shape::Trace, &unscaled, catalog, 9);
        let out = simulate(&w, &FleetSetup::default());
        assert_eq!(out.steps, 2880);
        assert_eq!(out.flaps, 0, "{:?}", out.moves);
        // It ends on the oracle, having broken the SLO for at most a few minutes on the way.
        // Three moves: the launch size corrected, then with a 5 % margin the cheaper of two
        // sizes tried first (a.2x -> m.2x -> a.4x); at 10 % it went to a.4x at once.
        assert_eq!(out.settled, out.oracle, "{:?}", out.moves);
        assert!(out.slo_steps <= 5, "{} SLO minutes", out.slo_steps);
        assert!(out.moves.len() <= 3, "{:?}", out.moves);
    }
}
