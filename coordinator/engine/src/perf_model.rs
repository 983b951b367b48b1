//! Performance models: a latency quantile as a function of offered load, per workload and VM
//! type, fitted from live and shadow intervals, with its uncertainty and the type's capacity at
//! the SLO.
//!
//! Shape: `latency(λ) = base + k / (C − λ)` for `λ < C`, infinite at and beyond `C`. It is the
//! M/M/1 sojourn-time quantile (`ln(1/(1−q)) / (μ − λ)`) plus a load-independent floor, the
//! queueing shape behind the Universal Scalability Law's throughput ceiling: `C` is the load at
//! which the instance saturates. With `k ≥ 0` the model can only rise with load, so more load
//! never predicts lower latency, whatever the noise in the points.
//!
//! Fit: `C` by a log-spaced grid above the highest observed load; for each `C` the model is
//! linear in `(base, k)`, solved by non-negative weighted least squares with weights `1/latency²`
//! (latency noise is multiplicative). Uncertainty: a seeded bootstrap over the points, so the
//! capacity at the SLO comes as samples the warning and the decision can use. Capacity beyond
//! the loads the type was actually driven at is an extrapolation; [`PerformanceModel`] keeps the
//! highest observed load so callers can refuse to trust more than they saw.

use rand::{RngExt as _, SeedableRng as _};

/// Why a performance model could not be fitted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PerfModelError {
    /// Too few measurements to fit three parameters.
    #[error("{have} load/latency points; at least {need} are needed")]
    TooFewPoints {
        /// Points supplied.
        have: usize,
        /// Points needed.
        need: usize,
    },
    /// A point's load or latency is not a positive finite number.
    #[error("point {index} has load {load} and latency {latency_ms} ms")]
    BadPoint {
        /// Position in the supplied points.
        index: usize,
        /// Its load.
        load: f64,
        /// Its latency.
        latency_ms: f64,
    },
    /// All points were measured at (nearly) the same load, so latency's response to load is
    /// unknown; amplified shadow replays provide the spread.
    #[error("loads span only {min_load}..{max_load} exchanges/s; need at least 10 % spread")]
    NoLoadSpread {
        /// Lowest load.
        min_load: f64,
        /// Highest load.
        max_load: f64,
    },
}

/// Where a measurement came from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PointSource {
    /// The live instance.
    Live,
    /// A shadow replaying the mirrored sample at its original pace.
    Shadow,
    /// A shadow replaying amplified (`factor` × the sample's rate) to find the knee.
    AmplifiedShadow {
        /// Amplification factor.
        factor: f64,
    },
}

/// One interval's measurement: offered load and the latency quantile at it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadLatencyPoint {
    /// Offered load on one instance (exchanges/s).
    pub load: f64,
    /// The latency quantile the SLO is stated in (e.g. p99), in milliseconds.
    pub latency_ms: f64,
    /// Where it was measured.
    pub source: PointSource,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Curve {
    base: f64,
    k: f64,
    capacity: f64,
}

impl Curve {
    fn latency(&self, load: f64) -> f64 {
        if load >= self.capacity {
            f64::INFINITY
        } else {
            self.base + self.k / (self.capacity - load.max(0.0))
        }
    }

    fn capacity_at(&self, slo_ms: f64) -> f64 {
        if slo_ms <= self.base {
            0.0
        } else {
            (self.capacity - self.k / (slo_ms - self.base)).max(0.0)
        }
    }
}

/// Bootstrap resamples; enough for a 10th percentile, cheap for hundreds of points.
const BOOTSTRAP: usize = 40;
/// Grid points for the saturation load.
const GRID: usize = 48;
/// The grid spans up to this multiple of the highest observed load.
const GRID_SPAN: f64 = 20.0;

/// A fitted latency-versus-load model for one workload on one VM type.
#[derive(Debug, Clone, PartialEq)]
pub struct PerformanceModel {
    curve: Curve,
    bootstrap: Vec<Curve>,
    max_observed_load: f64,
    min_observed_load: f64,
    /// Load up to which the curve rests on measurement: the highest observed load for a fit, the
    /// reference's scaled for a [`PerformanceModel::scaled`] one.
    evidence_load: f64,
    points: usize,
    shadow_points: usize,
}

impl PerformanceModel {
    /// Fits the model; `seed` drives the bootstrap so identical inputs give identical models.
    pub fn fit(points: &[LoadLatencyPoint], seed: u64) -> Result<Self, PerfModelError> {
        if points.len() < 3 {
            return Err(PerfModelError::TooFewPoints {
                have: points.len(),
                need: 3,
            });
        }
        if let Some((index, p)) = points.iter().enumerate().find(|(_, p)| {
            !(p.load.is_finite() && p.load >= 0.0 && p.latency_ms.is_finite() && p.latency_ms > 0.0)
        }) {
            return Err(PerfModelError::BadPoint {
                index,
                load: p.load,
                latency_ms: p.latency_ms,
            });
        }
        let min_load = points.iter().map(|p| p.load).fold(f64::INFINITY, f64::min);
        let max_load = points.iter().map(|p| p.load).fold(0.0, f64::max);
        if max_load <= 0.0 || max_load < 1.1 * min_load {
            return Err(PerfModelError::NoLoadSpread { min_load, max_load });
        }
        let all: Vec<usize> = (0..points.len()).collect();
        let curve = fit_curve(points, &all, max_load);
        let mut rng = rand::rngs::ChaCha8Rng::seed_from_u64(seed);
        let bootstrap = (0..BOOTSTRAP)
            .map(|_| {
                let sample: Vec<usize> = (0..points.len())
                    .map(|_| rng.random_range(0..points.len()))
                    .collect();
                fit_curve(points, &sample, max_load)
            })
            .collect();
        Ok(Self {
            curve,
            bootstrap,
            max_observed_load: max_load,
            min_observed_load: min_load,
            evidence_load: max_load,
            points: points.len(),
            shadow_points: points
                .iter()
                .filter(|p| !matches!(p.source, PointSource::Live))
                .count(),
        })
    }

    /// A model for a type whose own measurements never reached its knee, transferred from
    /// `self` (a type of the same workload whose knee was measured) by `scale`, the ratio of the
    /// two types' saturation loads measured some other way (the coordinator uses the utilization
    /// law: CPUs over CPU time per exchange, each measured on its own type).
    ///
    /// The queueing term is scaled with the saturation load (`C·scale`, `k·scale`), so both types
    /// show the same latency at the same utilisation and their capacities at the SLO keep the
    /// ratio of their saturation loads; the load-independent floor is the type's own, from
    /// `points` (its measurements, all below the knee), or `self`'s when there are none. An
    /// estimate by assumption, not a fit: the caller must say so where it shows it.
    #[must_use]
    pub fn scaled(&self, scale: f64, points: &[LoadLatencyPoint]) -> Self {
        let scale = if scale.is_finite() && scale > 0.0 {
            scale
        } else {
            1.0
        };
        let scaled = |c: &Curve| Curve {
            base: c.base,
            k: c.k * scale,
            capacity: c.capacity * scale,
        };
        let mut curve = scaled(&self.curve);
        // Own floor: weighted (1/L², as in the fit) mean of what the queueing term leaves.
        let usable: Vec<&LoadLatencyPoint> = points
            .iter()
            .filter(|p| {
                p.load.is_finite()
                    && p.load >= 0.0
                    && p.load < curve.capacity
                    && p.latency_ms.is_finite()
                    && p.latency_ms > 0.0
            })
            .collect();
        if !usable.is_empty() {
            let (mut sw, mut sb) = (0.0, 0.0);
            for p in &usable {
                let w = 1.0 / (p.latency_ms * p.latency_ms);
                sw += w;
                sb += w * (p.latency_ms - curve.k / (curve.capacity - p.load));
            }
            curve.base = (sb / sw).max(0.0);
        }
        let shift = curve.base - self.curve.base;
        let bootstrap = self
            .bootstrap
            .iter()
            .map(|c| Curve {
                base: (c.base + shift).max(0.0),
                ..scaled(c)
            })
            .collect();
        let loads = usable.iter().map(|p| p.load);
        let max_observed_load = loads.clone().fold(0.0, f64::max);
        Self {
            curve,
            bootstrap,
            max_observed_load,
            // No own points: nothing was observed, the range is empty at zero.
            min_observed_load: if usable.is_empty() {
                0.0
            } else {
                loads.fold(f64::INFINITY, f64::min)
            },
            // The reference was measured up to its knee; scaled, that range is this type's.
            evidence_load: (self.evidence_load * scale).max(max_observed_load),
            points: usable.len(),
            shadow_points: usable
                .iter()
                .filter(|p| !matches!(p.source, PointSource::Live))
                .count(),
        }
    }

    /// Predicted latency quantile (ms) at `load`; infinite at or past saturation.
    pub fn latency_at(&self, load: f64) -> f64 {
        self.curve.latency(load)
    }

    /// The `q` quantile over the bootstrap of the predicted latency at `load` (0.9 = a
    /// pessimistic estimate).
    pub fn latency_quantile_at(&self, load: f64, q: f64) -> f64 {
        let mut values: Vec<f64> = self.bootstrap.iter().map(|c| c.latency(load)).collect();
        values.sort_by(f64::total_cmp);
        values[((values.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize]
    }

    /// Load (exchanges/s per instance) at which the predicted latency reaches `slo_ms`.
    pub fn capacity_at(&self, slo_ms: f64) -> f64 {
        self.curve.capacity_at(slo_ms)
    }

    /// Bootstrap samples of the capacity at `slo_ms`, sorted.
    pub fn capacity_samples(&self, slo_ms: f64) -> Vec<f64> {
        let mut samples: Vec<f64> = self
            .bootstrap
            .iter()
            .map(|c| c.capacity_at(slo_ms))
            .collect();
        samples.sort_by(f64::total_cmp);
        samples
    }

    /// Load at which the instance saturates (latency unbounded).
    pub fn saturation_load(&self) -> f64 {
        self.curve.capacity
    }

    /// Highest load the type was measured at: beyond it, the model extrapolates.
    pub fn max_observed_load(&self) -> f64 {
        self.max_observed_load
    }

    /// Load up to which the curve rests on measurement rather than extrapolation: the highest
    /// observed load for a fitted model, the reference's scaled for a scaled one.
    pub fn evidence_load(&self) -> f64 {
        self.evidence_load
    }

    /// How much of the way from its low-load latency to `slo_ms` the fitted latency rises over
    /// the measured loads: 0 when latency is flat across them, 1 or more when the measurements
    /// reach the SLO. A type measured only where its latency is flat has an unidentified knee:
    /// the fit then puts saturation anywhere above the highest load (the data cannot tell), so
    /// its capacity is a guess, and callers should not warn or choose on it.
    pub fn knee_evidence(&self, slo_ms: f64) -> f64 {
        let low = self.curve.latency(self.min_observed_load);
        let high = self.curve.latency(self.max_observed_load);
        if slo_ms <= low {
            return 1.0;
        }
        ((high - low) / (slo_ms - low)).max(0.0)
    }

    /// Points the fit used.
    pub fn points(&self) -> usize {
        self.points
    }

    /// Of which measured on shadows (plain or amplified).
    pub fn shadow_points(&self) -> usize {
        self.shadow_points
    }
}

fn fit_curve(points: &[LoadLatencyPoint], sample: &[usize], max_load: f64) -> Curve {
    let lowest = max_load * (1.0 + 1e-3);
    let ratio = GRID_SPAN.powf(1.0 / (GRID - 1) as f64);
    let fit_at = |capacity: f64| {
        let (base, k) = nonnegative_least_squares(points, sample, capacity);
        let curve = Curve { base, k, capacity };
        let sse: f64 = sample
            .iter()
            .map(|&i| {
                let p = points[i];
                let r = (curve.latency(p.load) - p.latency_ms) / p.latency_ms;
                r * r
            })
            .sum();
        (sse, curve)
    };
    // Coarse: a log-spaced grid from just above the highest load to GRID_SPAN times it.
    let mut best = (f64::INFINITY, 0usize);
    for g in 0..GRID {
        let (sse, _) = fit_at(lowest * ratio.powi(g as i32));
        if sse < best.0 {
            best = (sse, g);
        }
    }
    // Fine: golden-section search in log capacity between the best point's neighbours. The
    // grid alone moves the capacity in 6 % steps, enough to flip an instance count.
    let golden = 0.618_033_988_749_895;
    let mut lo = (lowest * ratio.powi(best.1 as i32 - 1)).max(lowest).ln();
    let mut hi = (lowest * ratio.powi(best.1 as i32 + 1)).ln();
    let mut a = hi - golden * (hi - lo);
    let mut b = lo + golden * (hi - lo);
    let (mut fa, mut fb) = (fit_at(a.exp()).0, fit_at(b.exp()).0);
    for _ in 0..24 {
        if fa <= fb {
            hi = b;
            b = a;
            fb = fa;
            a = hi - golden * (hi - lo);
            fa = fit_at(a.exp()).0;
        } else {
            lo = a;
            a = b;
            fa = fb;
            b = lo + golden * (hi - lo);
            fb = fit_at(b.exp()).0;
        }
    }
    let refined = fit_at(f64::midpoint(lo, hi).exp());
    let coarse = fit_at(lowest * ratio.powi(best.1 as i32));
    if refined.0 <= coarse.0 {
        refined.1
    } else {
        coarse.1
    }
}

/// Minimises Σ w (base + k·u − L)² with u = 1/(C − λ), w = 1/L², over base, k ≥ 0.
fn nonnegative_least_squares(
    points: &[LoadLatencyPoint],
    sample: &[usize],
    capacity: f64,
) -> (f64, f64) {
    let (mut sw, mut su, mut sl, mut suu, mut sul) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &i in sample {
        let p = points[i];
        let w = 1.0 / (p.latency_ms * p.latency_ms);
        let u = 1.0 / (capacity - p.load);
        sw += w;
        su += w * u;
        sl += w * p.latency_ms;
        suu += w * u * u;
        sul += w * u * p.latency_ms;
    }
    let det = sw * suu - su * su;
    if det.abs() > 1e-300 {
        let base = (sl * suu - su * sul) / det;
        let k = (sw * sul - su * sl) / det;
        if base >= 0.0 && k >= 0.0 {
            return (base, k);
        }
    }
    // One constraint binds: the better of k = 0 (flat) and base = 0 (pure queueing).
    let flat = (sl / sw, 0.0);
    let queue = (0.0, (sul / suu).max(0.0));
    let sse = |(b, k): (f64, f64)| {
        sample
            .iter()
            .map(|&i| {
                let p = points[i];
                let r = (b + k / (capacity - p.load) - p.latency_ms) / p.latency_ms;
                r * r
            })
            .sum::<f64>()
    };
    if sse(flat) <= sse(queue) { flat } else { queue }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_knee_is_identified_only_once_latency_has_risen_over_the_measured_loads() {
        let curve = Curve {
            base: 20.0,
            k: 2000.0,
            capacity: 250.0,
        };
        let noise = [0.03, -0.02, 0.01, -0.04, 0.02];
        // 60..68/s: latency ~28.5 ms throughout, the knee (SLO 100 ms at 225/s) is a guess.
        let flat: Vec<f64> = (0..20).map(|i| 60.0 + 0.4 * f64::from(i)).collect();
        let flat = PerformanceModel::fit(&points(curve, &flat, &noise), 1).expect("fit");
        assert!(
            flat.knee_evidence(100.0) < 0.2,
            "{}",
            flat.knee_evidence(100.0)
        );
        // 60..200/s: latency rises from 30 to 60 ms, half way to the SLO.
        let rising: Vec<f64> = (0..20).map(|i| 60.0 + 7.0 * f64::from(i)).collect();
        let rising = PerformanceModel::fit(&points(curve, &rising, &noise), 1).expect("fit");
        let evidence = rising.knee_evidence(100.0);
        assert!((0.3..0.8).contains(&evidence), "{evidence}");
        assert!(
            (rising.capacity_at(100.0) - 225.0).abs() < 25.0,
            "{}",
            rising.capacity_at(100.0)
        );
    }

    fn points(curve: Curve, loads: &[f64], noise: &[f64]) -> Vec<LoadLatencyPoint> {
        loads
            .iter()
            .zip(noise.iter().cycle())
            .map(|(&load, &n)| LoadLatencyPoint {
                load,
                latency_ms: curve.latency(load) * (1.0 + n),
                source: PointSource::Shadow,
            })
            .collect()
    }

    #[test]
    fn recovers_a_known_knee_and_capacity() {
        let truth = Curve {
            base: 20.0,
            k: 2000.0,
            capacity: 100.0,
        };
        let loads: Vec<f64> = (1..=18).map(|i| f64::from(i) * 5.0).collect();
        let model = PerformanceModel::fit(&points(truth, &loads, &[0.02, -0.02, 0.0]), 7).unwrap();
        // Truth: 20 + 2000 / (100 − 80) = 120 ms at 80/s; capacity at 120 ms is 80/s.
        assert!((model.capacity_at(120.0) - 80.0).abs() < 4.0, "{model:?}");
        assert!((model.latency_at(80.0) - 120.0).abs() < 12.0);
        let samples = model.capacity_samples(120.0);
        assert!(samples[0] <= samples[samples.len() - 1]);
        assert!(
            samples[0] > 60.0 && samples[samples.len() - 1] < 100.0,
            "{samples:?}"
        );
    }

    #[test]
    fn refuses_what_it_cannot_fit() {
        let p = LoadLatencyPoint {
            load: 10.0,
            latency_ms: 5.0,
            source: PointSource::Live,
        };
        assert_eq!(
            PerformanceModel::fit(&[p, p], 1),
            Err(PerfModelError::TooFewPoints { have: 2, need: 3 })
        );
        assert_eq!(
            PerformanceModel::fit(&[p, p, p], 1),
            Err(PerfModelError::NoLoadSpread {
                min_load: 10.0,
                max_load: 10.0
            })
        );
        let bad = LoadLatencyPoint {
            latency_ms: -1.0,
            ..p
        };
        assert!(matches!(
            PerformanceModel::fit(&[p, bad, p], 1),
            Err(PerfModelError::BadPoint { index: 1, .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// More load never predicts lower latency, whatever the points.
        #[test]
        fn more_load_never_predicts_lower_latency(
            raw in prop::collection::vec((0.1f64..500.0, 0.1f64..1000.0), 3..30),
            a in 0.0f64..600.0,
            b in 0.0f64..600.0,
        ) {
            let pts: Vec<LoadLatencyPoint> = raw
                .iter()
                .map(|&(load, latency_ms)| LoadLatencyPoint { load, latency_ms, source: PointSource::Live })
                .collect();
            if let Ok(model) = PerformanceModel::fit(&pts, 3) {
                let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
                prop_assert!(model.latency_at(lo) <= model.latency_at(hi));
                prop_assert!(model.latency_quantile_at(lo, 0.9) <= model.latency_quantile_at(hi, 0.9));
            }
        }

        /// A model fitted to monotone data is monotone, and close to it.
        #[test]
        fn monotone_data_gives_a_monotone_model(
            base in 1.0f64..50.0,
            k in 10.0f64..5000.0,
            capacity in 50.0f64..2000.0,
        ) {
            let truth = Curve { base, k, capacity };
            let loads: Vec<f64> = (1..=12).map(|i| capacity * f64::from(i) / 14.0).collect();
            let model = PerformanceModel::fit(&points(truth, &loads, &[0.0]), 11).unwrap();
            let mut previous = 0.0;
            for i in 0..=40 {
                let load = capacity * f64::from(i) / 40.0 * 0.95;
                let latency = model.latency_at(load);
                prop_assert!(latency >= previous);
                previous = latency;
            }
            for &load in &loads {
                let rel = (model.latency_at(load) - truth.latency(load)).abs() / truth.latency(load);
                prop_assert!(rel < 0.1, "at {load}: {} vs {}", model.latency_at(load), truth.latency(load));
            }
        }

        /// Identical inputs give identical output.
        #[test]
        fn fitting_is_deterministic(
            raw in prop::collection::vec((0.1f64..500.0, 0.1f64..1000.0), 3..20),
            seed in any::<u64>(),
        ) {
            let pts: Vec<LoadLatencyPoint> = raw
                .iter()
                .map(|&(load, latency_ms)| LoadLatencyPoint { load, latency_ms, source: PointSource::Shadow })
                .collect();
            prop_assert_eq!(PerformanceModel::fit(&pts, seed), PerformanceModel::fit(&pts, seed));
        }
    }

    #[test]
    fn a_scaled_model_keeps_the_capacity_ratio_and_its_own_floor() {
        // Reference: saturates at 100/s, 2 ms floor, measured up to its knee.
        let reference: Vec<LoadLatencyPoint> = (1..=18)
            .map(|i| {
                let load = f64::from(i) * 5.0;
                LoadLatencyPoint {
                    load,
                    latency_ms: 2.0 + 200.0 / (100.0 - load),
                    source: PointSource::Live,
                }
            })
            .collect();
        let model = PerformanceModel::fit(&reference, 7).expect("fit");
        // The other type: twice the saturation load, a 3 ms floor, measured only where flat.
        let own: Vec<LoadLatencyPoint> = (1..=6)
            .map(|i| {
                let load = f64::from(i) * 10.0;
                LoadLatencyPoint {
                    load,
                    latency_ms: 3.0 + 400.0 / (200.0 - load),
                    source: PointSource::Shadow,
                }
            })
            .collect();
        let scaled = model.scaled(2.0, &own);
        let ratio = scaled.capacity_at(50.0) / model.capacity_at(50.0);
        assert!((ratio - 2.0).abs() < 0.1, "capacity ratio {ratio}");
        assert!(
            (scaled.latency_at(10.0) - (3.0 + 400.0 / 190.0)).abs() < 0.3,
            "own floor: {}",
            scaled.latency_at(10.0)
        );
        assert_eq!(scaled.max_observed_load(), 60.0);
        // Still monotone in load.
        let mut last = 0.0;
        for i in 0..200 {
            let l = scaled.latency_at(f64::from(i));
            assert!(l >= last, "latency fell at {i}");
            last = l;
        }
    }
}
