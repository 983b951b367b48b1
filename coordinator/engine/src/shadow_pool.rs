//! Shadow-pool steering: which VM types of the catalog deserve shadow time for a workload — which
//! to keep, which to drop, which to try next — so the cheapest type that holds the SLO is found
//! with far fewer shadow-hours than trying every type.
//!
//! The model is a Bayesian linear regression of a type's log capacity at the SLO on what the
//! catalog says about it:
//!
//! `ln capacity(w, t) = a_w + b_w · ln performance(t) + c_w · ln(GiB per vCPU of t) + u_t + e`
//!
//! `performance(t)` is the catalog's benchmark score, or vCPUs times the median score per vCPU
//! when the catalog gives none. `a_w` is the workload's scale, `b_w` how well it scales with
//! compute, `c_w` how memory-bound it is, `u_t` what a type does for every workload beyond its
//! specification (a noisy generation, a fast network), `e` the rest. Other workloads' measurements
//! give the priors: the population's `b` and `c` and each type's `u_t`. The workload's own live
//! type and every shadow measured so far update `(a, b, c)` in closed form.
//!
//! Exploration is Thompson sampling on the cost of holding the workload's peak: draw capacities
//! from the posterior, price each type at the instance count the draw needs, and see how often
//! each type comes within `within` of the cheapest. Shadows of types that never do are dropped;
//! shadows of types that still might are kept while their measurement is imprecise, and released
//! once it is precise (more time on them buys nothing); untried types that often do are tried
//! next. The search stops once the best measured type is within `within` of
//! the cheapest with probability `confidence`.

use rand::{RngExt as _, SeedableRng as _};

/// A VM type as the catalog describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct VmType {
    /// Catalog name, e.g. `c7.2xlarge`.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u32,
    /// Memory in GiB.
    pub memory_gib: f64,
    /// Price per instance-hour.
    pub price_per_hour: f64,
    /// A throughput benchmark score for the whole instance, when the catalog has one.
    pub benchmark_score: Option<f64>,
}

/// A type's measured capacity at the SLO for one workload (from its [`crate::PerformanceModel`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CapacityMeasurement {
    /// Catalog name of the type.
    pub vm_type: String,
    /// Capacity at the SLO, exchanges/s per instance.
    pub capacity: f64,
    /// Standard deviation of `ln capacity` (from the model's bootstrap).
    pub log_sd: f64,
}

/// Why the pool cannot be planned.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShadowPoolError {
    /// The catalog has no types.
    #[error("the VM catalog is empty")]
    EmptyCatalog,
    /// A catalog entry is unusable.
    #[error("catalog type `{name}`: {reason}")]
    BadType {
        /// Its name.
        name: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// A measurement names a type the catalog does not have.
    #[error("measurement for `{0}`, which is not in the catalog")]
    UnknownType(String),
    /// A measurement's capacity is not positive and finite.
    #[error("measurement for `{0}` has a non-positive or non-finite capacity")]
    BadMeasurement(String),
}

/// How the pool is steered.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPolicy {
    /// Headroom kept below the capacity at the SLO when counting instances (0.2 = plan for 80 %).
    pub margin: f64,
    /// A type is good enough within this fraction of the cheapest cost (0.05 = 5 %).
    pub within: f64,
    /// Stop exploring when a measured type is good enough with this probability.
    pub confidence: f64,
    /// Drop (or never try) types good enough with less than this probability.
    pub drop_below: f64,
    /// Shadows that may run at once.
    pub max_concurrent: usize,
    /// Most instances a placement may use.
    pub max_instances: u32,
    /// Posterior draws per plan.
    pub samples: usize,
    /// A measured type whose log-capacity is known to this standard deviation needs no more
    /// shadow time: its shadow is released so the budget goes to types not yet tried.
    pub precise_log_sd: f64,
}

impl Default for PoolPolicy {
    fn default() -> Self {
        Self {
            margin: 0.2,
            within: 0.05,
            confidence: 0.95,
            drop_below: 0.02,
            max_concurrent: 2,
            max_instances: 64,
            samples: 400,
            precise_log_sd: 0.03,
        }
    }
}

/// One instruction for the shadow manager.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolAction {
    /// Keep shadowing this type: it may be chosen and its measurement is not yet precise.
    Keep {
        /// Type name.
        vm_type: String,
        /// Probability it is within `within` of the cheapest.
        p_good: f64,
    },
    /// Stop shadowing this type: it is very unlikely to be chosen, or its measurement is precise
    /// enough (its evidence stays).
    Drop {
        /// Type name.
        vm_type: String,
        /// Probability it is within `within` of the cheapest.
        p_good: f64,
    },
    /// Start a shadow of this untried type next.
    Try {
        /// Type name.
        vm_type: String,
        /// Probability it is within `within` of the cheapest.
        p_good: f64,
    },
}

/// A plan for one workload's shadow pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolPlan {
    /// What to do, in order: drops, keeps, tries.
    pub actions: Vec<PoolAction>,
    /// The best measured type is good enough with probability `confidence`: the search can stop.
    pub converged: bool,
    /// The measured type with the lowest expected cost, and that cost per hour.
    pub best_measured: Option<(String, f64)>,
}

/// What other workloads taught about the catalog.
#[derive(Debug, Clone, PartialEq)]
pub struct PopulationPrior {
    /// Prior mean of `(a, b, c)`.
    mean: [f64; 3],
    /// Prior variance of `(a, b, c)` (independent).
    var: [f64; 3],
    /// Per-type effect `u_t` (shrunk towards 0), by catalog index.
    type_effect: Vec<f64>,
    /// Standard deviation of `e`.
    residual_sd: f64,
}

/// Workloads' measurements needed before their spread replaces the default prior width.
const MIN_WORKLOADS_FOR_SPREAD: usize = 10;

impl PopulationPrior {
    /// A prior that knows nothing beyond the catalog: capacity roughly proportional to the
    /// performance index, memory per vCPU of little consequence.
    pub fn uninformed(catalog: &[VmType]) -> Self {
        Self {
            mean: [0.0, 1.0, 0.0],
            var: [100.0, 0.25 * 0.25, 0.3 * 0.3],
            type_effect: vec![0.0; catalog.len()],
            residual_sd: 0.15,
        }
    }

    /// Learns `b`, `c`, `u_t` and the residual spread from other workloads' measurements.
    pub fn learn(
        catalog: &[VmType],
        workloads: &[Vec<CapacityMeasurement>],
    ) -> Result<Self, ShadowPoolError> {
        let features = Features::new(catalog)?;
        let mut prior = Self::uninformed(catalog);
        let observations: Vec<Vec<(usize, f64, f64)>> = workloads
            .iter()
            .map(|w| features.observations(w))
            .collect::<Result<_, _>>()?;
        // Two rounds: fit each workload, estimate type effects from the residuals, refit.
        for _ in 0..2 {
            let mut betas = Vec::new();
            let mut residuals = vec![Vec::new(); catalog.len()];
            for obs in observations.iter().filter(|o| !o.is_empty()) {
                let post = Posterior::new(&prior, &features, obs);
                for &(t, y, _) in obs {
                    residuals[t].push(y - prior.type_effect[t] - dot(&features.x[t], &post.mean));
                }
                betas.push(post.mean);
            }
            for (effect, r) in prior.type_effect.iter_mut().zip(&residuals) {
                // Shrink towards 0: one workload's residual is mostly its own noise.
                *effect += r.iter().sum::<f64>() / (r.len() as f64 + 5.0);
            }
            if betas.len() >= MIN_WORKLOADS_FOR_SPREAD {
                for k in 1..3 {
                    let mean = betas.iter().map(|b| b[k]).sum::<f64>() / betas.len() as f64;
                    let var = betas.iter().map(|b| (b[k] - mean).powi(2)).sum::<f64>()
                        / (betas.len() - 1) as f64;
                    prior.mean[k] = mean;
                    // Keep some width: the population is a sample, and this workload may differ.
                    prior.var[k] = var.max(0.1 * 0.1);
                }
                let all: Vec<f64> = residuals.iter().flatten().copied().collect();
                if all.len() > 10 {
                    let ss = all.iter().map(|r| r * r).sum::<f64>() / all.len() as f64;
                    // Floor: the residuals are in-sample, and a new workload is not.
                    prior.residual_sd = ss.sqrt().clamp(0.08, 0.5);
                }
            }
        }
        Ok(prior)
    }
}

/// Regression features per catalog type: `[1, ln performance, ln GiB/vCPU]`.
#[derive(Debug)]
struct Features {
    x: Vec<[f64; 3]>,
    names: Vec<String>,
}

impl Features {
    fn new(catalog: &[VmType]) -> Result<Self, ShadowPoolError> {
        if catalog.is_empty() {
            return Err(ShadowPoolError::EmptyCatalog);
        }
        for t in catalog {
            let bad = |reason| {
                Err(ShadowPoolError::BadType {
                    name: t.name.clone(),
                    reason,
                })
            };
            if t.vcpus == 0 {
                return bad("vcpus must be positive");
            }
            if !(t.memory_gib > 0.0 && t.memory_gib.is_finite()) {
                return bad("memory_gib must be positive");
            }
            if !(t.price_per_hour > 0.0 && t.price_per_hour.is_finite()) {
                return bad("price_per_hour must be positive");
            }
            if t.benchmark_score
                .is_some_and(|s| !(s > 0.0 && s.is_finite()))
            {
                return bad("benchmark_score must be positive");
            }
        }
        let mut per_vcpu: Vec<f64> = catalog
            .iter()
            .filter_map(|t| t.benchmark_score.map(|s| s / f64::from(t.vcpus)))
            .collect();
        per_vcpu.sort_by(f64::total_cmp);
        let typical = per_vcpu.get(per_vcpu.len() / 2).copied().unwrap_or(1.0);
        Ok(Self {
            x: catalog
                .iter()
                .map(|t| {
                    let performance = t.benchmark_score.unwrap_or(typical * f64::from(t.vcpus));
                    [
                        1.0,
                        performance.ln(),
                        (t.memory_gib / f64::from(t.vcpus)).ln(),
                    ]
                })
                .collect(),
            names: catalog.iter().map(|t| t.name.clone()).collect(),
        })
    }

    /// `(type index, ln capacity, measurement variance)` per measurement.
    fn observations(
        &self,
        measurements: &[CapacityMeasurement],
    ) -> Result<Vec<(usize, f64, f64)>, ShadowPoolError> {
        measurements
            .iter()
            .map(|m| {
                let t = self
                    .names
                    .iter()
                    .position(|n| *n == m.vm_type)
                    .ok_or_else(|| ShadowPoolError::UnknownType(m.vm_type.clone()))?;
                if !(m.capacity > 0.0 && m.capacity.is_finite()) {
                    return Err(ShadowPoolError::BadMeasurement(m.vm_type.clone()));
                }
                Ok((t, m.capacity.ln(), m.log_sd.max(0.0).powi(2)))
            })
            .collect()
    }
}

/// Gaussian posterior of `(a, b, c)` for one workload.
#[derive(Debug)]
struct Posterior {
    mean: [f64; 3],
    cov: [[f64; 3]; 3],
}

impl Posterior {
    fn new(prior: &PopulationPrior, features: &Features, obs: &[(usize, f64, f64)]) -> Self {
        let mut precision = [[0.0; 3]; 3];
        let mut rhs = [0.0; 3];
        for k in 0..3 {
            precision[k][k] = 1.0 / prior.var[k];
            rhs[k] = prior.mean[k] / prior.var[k];
        }
        let noise = prior.residual_sd.powi(2);
        for &(t, y, meas_var) in obs {
            let x = features.x[t];
            let w = 1.0 / (noise + meas_var);
            let target = y - prior.type_effect[t];
            for i in 0..3 {
                rhs[i] += w * x[i] * target;
                for j in 0..3 {
                    precision[i][j] += w * x[i] * x[j];
                }
            }
        }
        let cov = invert3(precision);
        let mut mean = [0.0; 3];
        for (i, m) in mean.iter_mut().enumerate() {
            *m = (0..3).map(|j| cov[i][j] * rhs[j]).sum();
        }
        Self { mean, cov }
    }
}

fn dot(a: &[f64; 3], b: &[f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

/// Inverse of a symmetric positive-definite 3×3 matrix by cofactors.
fn invert3(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let c =
        |r0: usize, r1: usize, c0: usize, c1: usize| m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0];
    let cof = [
        [c(1, 2, 1, 2), -c(1, 2, 0, 2), c(1, 2, 0, 1)],
        [-c(0, 2, 1, 2), c(0, 2, 0, 2), -c(0, 2, 0, 1)],
        [c(0, 1, 1, 2), -c(0, 1, 0, 2), c(0, 1, 0, 1)],
    ];
    let det = m[0][0] * cof[0][0] + m[0][1] * cof[0][1] + m[0][2] * cof[0][2];
    let mut inv = [[0.0; 3]; 3];
    for (i, row) in inv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            // The adjugate is the transpose of the cofactor matrix.
            *v = cof[j][i] / det;
        }
    }
    inv
}

/// Lower Cholesky factor of a symmetric positive-definite 3×3 matrix (jittered if needed).
fn cholesky3(m: [[f64; 3]; 3]) -> [[f64; 3]; 3] {
    let mut l = [[0.0; 3]; 3];
    for i in 0..3 {
        for j in 0..=i {
            let s: f64 = (0..j).map(|k| l[i][k] * l[j][k]).sum();
            if i == j {
                l[i][j] = (m[i][i] - s).max(1e-12).sqrt();
            } else {
                l[i][j] = (m[i][j] - s) / l[j][j];
            }
        }
    }
    l
}

fn standard_normal(rng: &mut rand::rngs::ChaCha8Rng) -> f64 {
    // Box–Muller; `1 - u` keeps the logarithm finite.
    let u1: f64 = 1.0 - rng.random::<f64>();
    let u2: f64 = rng.random::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Hourly cost of holding `peak` on type `t` with capacity `capacity` per instance, or `None` if
/// it would take more than `max_instances`.
fn placement_cost(peak: f64, capacity: f64, price: f64, policy: &PoolPolicy) -> Option<(u32, f64)> {
    let usable = capacity * (1.0 - policy.margin);
    if usable <= 0.0 {
        return None;
    }
    let count = (peak / usable).ceil().max(1.0);
    (count <= f64::from(policy.max_instances)).then_some((count as u32, count * price))
}

/// Plans the shadow pool of one workload.
///
/// `measured` holds this workload's capacity measurements (its live type's included), `running`
/// the types currently shadowed, `peak_load` the load to hold (exchanges/s, e.g. the forecast's
/// upper bound), `seed` the draws (identical inputs give identical plans).
pub fn plan(
    catalog: &[VmType],
    prior: &PopulationPrior,
    measured: &[CapacityMeasurement],
    running: &[String],
    peak_load: f64,
    policy: &PoolPolicy,
    seed: u64,
) -> Result<PoolPlan, ShadowPoolError> {
    let features = Features::new(catalog)?;
    let obs = features.observations(measured)?;
    let post = Posterior::new(prior, &features, &obs);
    let chol = cholesky3(post.cov);
    let noise = prior.residual_sd.powi(2);
    // For measured types, the measurement itself pins the type's own deviation: combine the
    // regression's prediction with the measurement (precision-weighted).
    let mut direct: Vec<Option<(f64, f64)>> = vec![None; catalog.len()];
    for &(t, y, meas_var) in &obs {
        let var = meas_var.max(1e-6);
        direct[t] = Some(match direct[t] {
            None => (y, var),
            Some((m0, v0)) => {
                let v = 1.0 / (1.0 / v0 + 1.0 / var);
                ((m0 / v0 + y / var) * v, v)
            }
        });
    }
    let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
    let mut good = vec![0usize; catalog.len()];
    let mut draws: Vec<(f64, Vec<f64>)> = Vec::with_capacity(policy.samples);
    let mut costs = vec![f64::INFINITY; catalog.len()];
    for _ in 0..policy.samples {
        let z = [
            standard_normal(&mut rng),
            standard_normal(&mut rng),
            standard_normal(&mut rng),
        ];
        let mut beta = post.mean;
        for (i, b) in beta.iter_mut().enumerate() {
            *b += (0..=i).map(|k| chol[i][k] * z[k]).sum::<f64>();
        }
        for (t, cost) in costs.iter_mut().enumerate() {
            let regression = dot(&features.x[t], &beta) + prior.type_effect[t];
            let log_capacity = match direct[t] {
                Some((y, v)) => {
                    // Regression draw (with the type's own noise) combined with the measurement.
                    let pv = noise;
                    let var = 1.0 / (1.0 / pv + 1.0 / v);
                    let mean = (regression / pv + y / v) * var;
                    mean + var.sqrt() * standard_normal(&mut rng)
                }
                None => regression + noise.sqrt() * standard_normal(&mut rng),
            };
            *cost = placement_cost(
                peak_load,
                log_capacity.exp(),
                catalog[t].price_per_hour,
                policy,
            )
            .map_or(f64::INFINITY, |(_, c)| c);
        }
        let cheapest = costs.iter().copied().fold(f64::INFINITY, f64::min);
        if !cheapest.is_finite() {
            continue;
        }
        for (t, &c) in costs.iter().enumerate() {
            if c <= cheapest * (1.0 + policy.within) {
                good[t] += 1;
            }
        }
        draws.push((cheapest, costs.clone()));
    }
    // The measured type with the lowest expected cost over the posterior: near an
    // instance-count boundary a point estimate flips the count on a 1 % error, the expectation
    // weighs both counts.
    let best_measured = (0..catalog.len())
        .filter(|&t| direct[t].is_some())
        .map(|t| {
            let mean = draws.iter().map(|(_, c)| c[t]).sum::<f64>() / draws.len().max(1) as f64;
            (t, mean)
        })
        .filter(|(_, c)| c.is_finite())
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let best_good = best_measured.map_or(0, |(b, _)| {
        draws
            .iter()
            .filter(|(cheapest, c)| c[b] <= cheapest * (1.0 + policy.within))
            .count()
    });
    let samples = policy.samples.max(1) as f64;
    let p_good: Vec<f64> = good.iter().map(|&g| g as f64 / samples).collect();
    let converged = best_measured.is_some() && best_good as f64 / samples >= policy.confidence;
    let mut actions = Vec::new();
    let mut kept = 0;
    for name in running {
        let Some(t) = features.names.iter().position(|n| n == name) else {
            return Err(ShadowPoolError::UnknownType(name.clone()));
        };
        let settled = direct[t].is_some_and(|(_, v)| v.sqrt() <= policy.precise_log_sd);
        let keep = !converged && !settled && p_good[t] >= policy.drop_below;
        if keep {
            kept += 1;
            actions.push(PoolAction::Keep {
                vm_type: name.clone(),
                p_good: p_good[t],
            });
        } else {
            actions.push(PoolAction::Drop {
                vm_type: name.clone(),
                p_good: p_good[t],
            });
        }
    }
    if !converged {
        let mut candidates: Vec<usize> = (0..catalog.len())
            .filter(|&t| direct[t].is_none() && !running.contains(&catalog[t].name))
            .filter(|&t| p_good[t] >= policy.drop_below)
            .collect();
        // Most promising first; among equals the cheaper instance, then the name.
        candidates.sort_by(|&a, &b| {
            p_good[b]
                .total_cmp(&p_good[a])
                .then(
                    catalog[a]
                        .price_per_hour
                        .total_cmp(&catalog[b].price_per_hour),
                )
                .then(catalog[a].name.cmp(&catalog[b].name))
        });
        for t in candidates
            .into_iter()
            .take(policy.max_concurrent.saturating_sub(kept))
        {
            actions.push(PoolAction::Try {
                vm_type: catalog[t].name.clone(),
                p_good: p_good[t],
            });
        }
    }
    Ok(PoolPlan {
        actions,
        converged,
        best_measured: best_measured.map(|(t, c)| (catalog[t].name.clone(), c)),
    })
}

/// What [`desired_types`] orders for one workload.
#[derive(Debug, Clone, Copy)]
pub struct PoolRequest<'a> {
    /// Every catalog type steering knows enough about (vCPUs, memory, a positive price).
    pub steerable: &'a [VmType],
    /// The types a shadow may be made on (the provisioner can make them, not pinned out, not
    /// live unless pinned in), each with its price per hour.
    pub candidates: &'a [(String, f64)],
    /// Types pinned in: always first.
    pub pin_in: &'a [String],
    /// The live types.
    pub live: &'a [String],
    /// Shadows the workload may run at once.
    pub count: usize,
    /// Most instances the decision may place (the live instance count): steering prices a
    /// type at the count the decision could choose, never at a scale-out it would not.
    pub max_instances: u32,
    /// Types shadowed now.
    pub running: &'a [String],
    /// Capacities measured for the workload ([`crate::capacity::CapacityModels::pool_measurements`]).
    pub measured: &'a [CapacityMeasurement],
    /// The load the pool shops for, exchanges/s per live instance: [`steering_peak`].
    pub peak: Option<f64>,
    /// Seed of the Thompson sampling.
    pub seed: u64,
}

/// The load pool steering shops for, exchanges/s per live instance: the highest live load seen,
/// or, while a degradation warning is raised, the forecast's provisioned peak when it is higher.
///
/// Why the forecast: steering climbs a ladder of bigger types once live's measured capacity is
/// below the peak, and a workload whose load plateaus at its type's knee has a seen peak at or
/// just under that capacity, so without the forecast the ladder started only after live broke
/// the SLO and the bigger types' evidence was still being gathered during the breach (`cargo
/// xtask eval decisions`, 40 workloads: SLO minutes 0.101 % -> 0.089 %). Only while warned: an
/// unwarned forecast's upper bound is routinely above the seen peak, and shopping for it would
/// pull every pool towards types the decision will not need.
pub fn steering_peak(seen: Option<f64>, warned_provisioned: Option<f64>) -> Option<f64> {
    let forecast = warned_provisioned.filter(|p| p.is_finite() && *p > 0.0);
    seen.into_iter().chain(forecast).reduce(f64::max)
}

/// A workload's VM types in the order shadows should be made: pinned-in types, then what the
/// pool steering keeps or wants tried, then the rest it does not drop, cheapest first.
///
/// The capacities are used once the live type itself is measured (they are then in
/// exchanges/s). Before that, the one fact known is that the live type holds today's load,
/// which anchors the catalog prior's scale. With room for every candidate there is nothing to
/// choose. A steering failure leaves the order cheapest first and is returned beside it.
pub fn desired_types(request: &PoolRequest<'_>) -> (Vec<String>, Option<ShadowPoolError>) {
    let mut candidates: Vec<&(String, f64)> = request.candidates.iter().collect();
    candidates.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)));
    let mut order: Vec<String> = request
        .pin_in
        .iter()
        .filter(|p| candidates.iter().any(|t| t.0 == **p))
        .cloned()
        .collect();
    let mut dropped: Vec<String> = Vec::new();
    let mut failure = None;
    // With room for every candidate, steering would only drop a running type to make room for
    // none (and the manager would re-create it on the next pass).
    let room_for_all = candidates.len() <= request.count;
    let steerable = request.steerable;
    if !steerable.is_empty() && !room_for_all {
        let known: Vec<CapacityMeasurement> = request
            .measured
            .iter()
            .filter(|m| steerable.iter().any(|t| t.name == m.vm_type))
            .cloned()
            .collect();
        let live_measured = known.iter().any(|m| request.live.contains(&m.vm_type));
        let (anchor, measured_peak) = match request.peak {
            Some(peak) if live_measured && peak > 0.0 => (known, Some(peak)),
            _ => (
                request
                    .live
                    .iter()
                    .filter(|l| steerable.iter().any(|t| t.name == **l))
                    .take(1)
                    .map(|l| CapacityMeasurement {
                        vm_type: l.clone(),
                        capacity: 100.0,
                        log_sd: 0.3,
                    })
                    .collect(),
                None,
            ),
        };
        let running: Vec<String> = request
            .running
            .iter()
            .filter(|r| steerable.iter().any(|t| t.name == **r))
            .cloned()
            .collect();
        let policy = PoolPolicy {
            margin: 0.0,
            max_concurrent: request.count,
            max_instances: request.max_instances.max(1),
            ..PoolPolicy::default()
        };
        let prior = PopulationPrior::uninformed(steerable);
        let peak = match measured_peak {
            Some(peak) => peak,
            None if anchor.is_empty() => 1.0,
            None => 100.0,
        };
        match plan(
            steerable,
            &prior,
            &anchor,
            &running,
            peak,
            &policy,
            request.seed,
        ) {
            Ok(plan) => {
                for action in plan.actions {
                    match action {
                        PoolAction::Keep { vm_type, .. } | PoolAction::Try { vm_type, .. } => {
                            order.push(vm_type);
                        }
                        PoolAction::Drop { vm_type, .. } => dropped.push(vm_type),
                    }
                }
            }
            Err(e) => failure = Some(e),
        }
    }
    // Live measured failing its peak: the vCPUs it would take are estimated from live's by the
    // share of the peak it holds, and the pool climbs a ladder from there (below), then the
    // rest is tried cheapest first among the types with that many, then the bigger-than-live
    // ones biggest first, then the others.
    // (Cheapest first over all, the pool of a failing live type filled up with small types and
    // the workload never found a way out; biggest first, it escaped to the largest type and
    // stayed there at up to four times the oracle's price.)
    let live_vcpus = steerable
        .iter()
        .filter(|t| request.live.contains(&t.name))
        .map(|t| t.vcpus)
        .max();
    let live_capacity = request
        .measured
        .iter()
        .filter(|m| request.live.contains(&m.vm_type))
        .map(|m| m.capacity)
        .fold(None, |c: Option<f64>, m| Some(c.map_or(m, |c| c.max(m))));
    let vcpus = |name: &str| steerable.iter().find(|t| t.name == name).map(|t| t.vcpus);
    if let (Some(peak), Some(live_vcpus), Some(live_capacity)) =
        (request.peak, live_vcpus, live_capacity)
        && live_capacity < peak
    {
        let needed = f64::from(live_vcpus) * peak / live_capacity;
        // A saturated live type completes only what its CPUs allow, so the peak it was measured
        // at understates the load offered and `needed` is a floor. The first shadows climb a
        // ladder, the cheapest type with at least `needed`, then `2 × needed`, `4 × needed`
        // vCPUs, so one pool pass brackets a step up to several times live's capacity instead
        // of trying three types of one size that may all fall short.
        let mut ladder: Vec<&(String, f64)> = Vec::new();
        let mut bar = needed;
        while ladder.len() < request.count {
            let Some(rung) = candidates
                .iter()
                .find(|t| f64::from(vcpus(&t.0).unwrap_or(0)) >= bar && !ladder.contains(t))
            else {
                break;
            };
            ladder.push(rung);
            bar = bar.max(f64::from(vcpus(&rung.0).unwrap_or(0))) * 2.0;
        }
        candidates.sort_by_key(|t| {
            if let Some(rung) = ladder.iter().position(|r| r == t) {
                return (0, u32::try_from(rung).unwrap_or(u32::MAX));
            }
            let v = vcpus(&t.0).unwrap_or(0);
            if f64::from(v) >= needed {
                (1, 0)
            } else if v > live_vcpus {
                (2, u32::MAX - v)
            } else {
                (3, 0)
            }
        });
        // The plan's picks were made for a live type that holds: these go first.
        order.retain(|t| request.pin_in.contains(t));
        dropped.clear();
    }
    for t in &candidates {
        if !dropped.contains(&t.0) {
            order.push(t.0.clone());
        }
    }
    let mut seen = Vec::new();
    let order = order
        .into_iter()
        .filter(|t| candidates.iter().any(|c| c.0 == *t))
        .filter(|t| request.pin_in.contains(t) || !dropped.contains(t))
        .filter(|t| {
            let new = !seen.contains(t);
            seen.push(t.clone());
            new
        })
        .collect();
    (order, failure)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Vec<VmType> {
        (0..6)
            .map(|i| VmType {
                name: format!("t{i}"),
                vcpus: 1 << (i % 3),
                memory_gib: 4.0 * f64::from(1u32 << (i % 3)),
                price_per_hour: 0.05 * f64::from(1u32 << (i % 3)) * if i < 3 { 1.0 } else { 1.3 },
                benchmark_score: Some(100.0 * f64::from(1u32 << (i % 3))),
            })
            .collect()
    }

    #[test]
    #[expect(
        clippy::needless_range_loop,
        reason = "matrix products read clearest with indices"
    )]
    fn inverse_and_cholesky_are_right() {
        let m = [[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]];
        let inv = invert3(m);
        for i in 0..3 {
            for j in 0..3 {
                let p: f64 = (0..3).map(|k| m[i][k] * inv[k][j]).sum();
                assert!((p - if i == j { 1.0 } else { 0.0 }).abs() < 1e-12);
            }
        }
        let l = cholesky3(m);
        for i in 0..3 {
            for j in 0..3 {
                let p: f64 = (0..3).map(|k| l[i][k] * l[j][k]).sum();
                assert!((p - m[i][j]).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn unknown_types_and_bad_catalogs_are_refused() {
        let prior = PopulationPrior::uninformed(&catalog());
        let m = CapacityMeasurement {
            vm_type: "nope".into(),
            capacity: 10.0,
            log_sd: 0.1,
        };
        assert_eq!(
            plan(
                &catalog(),
                &prior,
                &[m],
                &[],
                10.0,
                &PoolPolicy::default(),
                1
            ),
            Err(ShadowPoolError::UnknownType("nope".into()))
        );
        assert_eq!(
            plan(&[], &prior, &[], &[], 10.0, &PoolPolicy::default(), 1),
            Err(ShadowPoolError::EmptyCatalog)
        );
    }

    #[test]
    fn tries_the_promising_types_and_converges_once_they_are_measured() {
        let catalog = catalog();
        let prior = PopulationPrior::uninformed(&catalog);
        let policy = PoolPolicy {
            confidence: 0.9,
            ..PoolPolicy::default()
        };
        // Live on the pricier family's middle size: 100/s per instance, capacity ∝ score.
        let live = CapacityMeasurement {
            vm_type: "t4".into(),
            capacity: 100.0,
            log_sd: 0.05,
        };
        let first = plan(
            &catalog,
            &prior,
            std::slice::from_ref(&live),
            &[],
            380.0,
            &policy,
            9,
        )
        .unwrap();
        assert!(!first.converged);
        let tries: Vec<&str> = first
            .actions
            .iter()
            .filter_map(|a| match a {
                PoolAction::Try { vm_type, .. } => Some(vm_type.as_str()),
                _ => None,
            })
            .collect();
        assert!(!tries.is_empty());
        // The cheaper family is expected to win; its types come first.
        assert!(["t0", "t1", "t2"].contains(&tries[0]), "{tries:?}");
        // Measure the cheaper family exactly as the prior expects: the search settles.
        let measured: Vec<CapacityMeasurement> = [("t0", 50.0), ("t1", 100.0), ("t2", 200.0)]
            .iter()
            .map(|&(t, c)| CapacityMeasurement {
                vm_type: t.into(),
                capacity: c,
                log_sd: 0.03,
            })
            .chain(std::iter::once(live))
            .collect();
        let running = vec!["t0".to_owned(), "t1".to_owned(), "t2".to_owned()];
        let settled = plan(&catalog, &prior, &measured, &running, 350.0, &policy, 9).unwrap();
        assert!(settled.converged, "{settled:?}");
        assert!(
            !settled
                .actions
                .iter()
                .any(|a| matches!(a, PoolAction::Try { .. }))
        );
        // Identical inputs, identical plan.
        assert_eq!(
            settled,
            plan(&catalog, &prior, &measured, &running, 350.0, &policy, 9).unwrap()
        );
    }

    #[test]
    fn a_live_type_that_holds_nothing_sends_steering_to_bigger_types() {
        // Eight types, 1 to 8 vCPUs in two families; live is t1 (2 vCPUs), failing its SLO at
        // every load measured. Steering must shadow bigger types, not the cheap small ones.
        let catalog: Vec<VmType> = (0..8)
            .map(|i| VmType {
                name: format!("t{i}"),
                vcpus: 1 << (i % 4),
                memory_gib: 4.0 * f64::from(1u32 << (i % 4)),
                price_per_hour: 0.05 * f64::from(1u32 << (i % 4)) * if i < 4 { 1.0 } else { 1.2 },
                benchmark_score: None,
            })
            .collect();
        let candidates: Vec<(String, f64)> = catalog
            .iter()
            .filter(|t| t.name != "t1")
            .map(|t| (t.name.clone(), t.price_per_hour))
            .collect();
        let live = ["t1".to_owned()];
        let measured = [CapacityMeasurement {
            vm_type: "t1".into(),
            capacity: crate::capacity::pool_floor(),
            log_sd: 1.0,
        }];
        let (order, failure) = desired_types(&PoolRequest {
            steerable: &catalog,
            candidates: &candidates,
            pin_in: &[],
            live: &live,
            count: 2,
            max_instances: 1,
            running: &[],
            measured: &measured,
            peak: Some(400.0),
            seed: 3,
        });
        assert_eq!(failure, None);
        let vcpus = |name: &String| {
            catalog
                .iter()
                .find(|t| t.name == *name)
                .map_or(0, |t| t.vcpus)
        };
        assert!(
            order.iter().take(2).all(|t| vcpus(t) > 2),
            "the first two shadows {order:?} should have more vCPUs than live"
        );
    }

    /// The pool order for `families` families of 1, 2, 4, 8 and 16 vCPUs (`f{family}.{n}x`,
    /// each family 10 % dearer than the one before), live on `f0.1x` measured with a capacity
    /// of 219/s, three shadows, steering for `peak`.
    fn ladder_order(families: u32, peak: Option<f64>) -> (Vec<String>, Option<ShadowPoolError>) {
        let catalog: Vec<VmType> = (0..5 * families)
            .map(|i| VmType {
                name: format!("f{}.{}x", i / 5, 1 << (i % 5)),
                vcpus: 1 << (i % 5),
                memory_gib: 4.0,
                price_per_hour: 0.04 * f64::from(1u32 << (i % 5)) * (1.0 + 0.1 * f64::from(i / 5)),
                benchmark_score: None,
            })
            .collect();
        let candidates: Vec<(String, f64)> = catalog
            .iter()
            .filter(|t| t.name != "f0.1x")
            .map(|t| (t.name.clone(), t.price_per_hour))
            .collect();
        let measured = [CapacityMeasurement {
            vm_type: "f0.1x".into(),
            capacity: 219.0,
            log_sd: 0.1,
        }];
        desired_types(&PoolRequest {
            steerable: &catalog,
            candidates: &candidates,
            pin_in: &[],
            live: &["f0.1x".to_owned()],
            count: 3,
            max_instances: 1,
            running: &[],
            measured: &measured,
            peak,
            seed: 3,
        })
    }

    #[test]
    fn a_saturated_live_type_gets_a_ladder_of_sizes_not_three_of_one_size() {
        // Three families; live, a 1-vCPU type with a capacity of 219, was measured at 250/s:
        // it needs at least 1.14 vCPUs, and being saturated, perhaps several times that. The
        // three shadows bracket the need: 2, 4 and 8 vCPUs, each the cheapest of its size.
        let (order, failure) = ladder_order(3, Some(250.0));
        assert_eq!(failure, None);
        assert_eq!(order[..3], ["f0.2x", "f0.4x", "f0.8x"], "{order:?}");
    }

    #[test]
    fn a_warned_forecast_over_live_capacity_starts_the_ladder_before_live_breaks() {
        // Two families; live has seen 215 at most: it holds, and the pool shops among the
        // types that could replace it for less or as little. A warning whose provisioned peak
        // is 240 sends the pool up the ladder before the breach.
        let unwarned = ladder_order(2, steering_peak(Some(215.0), None)).0;
        assert!(unwarned[..3].contains(&"f1.1x".to_owned()), "{unwarned:?}");
        let warned = ladder_order(2, steering_peak(Some(215.0), Some(240.0))).0;
        assert_eq!(warned[..3], ["f0.2x", "f0.4x", "f0.8x"], "{warned:?}");
        // A forecast below what was seen, or none that makes sense, does not lower the peak.
        assert_eq!(steering_peak(Some(215.0), Some(100.0)), Some(215.0));
        assert_eq!(steering_peak(Some(215.0), Some(f64::NAN)), Some(215.0));
        assert_eq!(steering_peak(None, None), None);
    }
}
