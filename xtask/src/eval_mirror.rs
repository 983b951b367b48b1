//! `cargo xtask eval mirror`: the learned mirroring ([`doppel_engine::mirror`]) steering a
//! simulated live agent, scored on how representative, complete and budget-true the mirrored
//! sample is.
//!
//! # The generator
//! Each workload takes one trace's load shape (its values scaled to a mean load drawn from 30 to
//! 400 new flows/s) for a few days, one report interval per trace step, and spreads it over a
//! pattern mix:
//! - 60 to 240 patterns with Zipf shares (exponent 1.0 to 1.4): HTTP templates with and without
//!   ids, some nested under others' prefixes, and a few Redis commands; a fifth of them (past
//!   the first tenth) are rare instead: 5 to 200 flows an hour at the mean load (log-uniform),
//!   following the load's shape;
//! - shares drift: every pattern's log-weight takes a random walk (σ 0.05 an hour);
//! - a tenth of the patterns appear mid-stream, at a random time after the first day, with a tail
//!   pattern's share or (a fifth of them) a rare one's rate;
//! - bursts: about one hour in twenty starts a 5-30 minute burst that multiplies the load by
//!   1.5-4, half of the extra flows on one pattern (a flash crowd on one endpoint);
//! - each pattern's latency is drawn log-normal; a head class reports its pattern's.
//!
//! # The simulated agent
//! New flows per pattern are Poisson; each flow's first bytes are classified by the plan's rules
//! exactly as the data path does ([`doppel_engine::mirror::classify`]); a flow is sampled at its
//! class's rate and then must pass the budget's token bucket ([`FlowBucket`], the kernel's rules:
//! the boost classes' flows may take the bucket's reserve within their lane, the uniform
//! baseline has no reserve; `--mirror-bucket false` leaves the bucket out: the planner's rates
//! alone). The agent sees
//! patterns as production does: one new flow in 16 is inspected (the agent's default), and the
//! reported count is scaled back up. The planner observes each interval and plans the next.
//!
//! # The figures
//! `mirror: mix_divergence=J rare_recall=R budget_overrun_pct=O peak_share=P`
//! - J: Jensen-Shannon divergence (bits) between live's pattern mix in an hour and the mirrored
//!   mix reweighted by class (each mirrored flow counts live's flows of its class over the
//!   class's mirrored flows in its interval, what the comparison does), worst hour over hours
//!   with at least 1000 live flows. Weights per interval, not per hour: a flash crowd on one
//!   pattern falls in the intervals where the bucket cuts hardest, and an hour's ratio of sums
//!   under-counts it (0.0121 against 0.0001 on one such hour);
//! - R: share of (pattern, hour) pairs with at least 10 live flows that were mirrored at least 3
//!   times in that hour;
//! - O: the worst interval's mirrored flows over the budget, as a percentage overrun;
//! - P: mirrored flows in each workload's top 5 % load intervals over the budget of those
//!   intervals (the worst workload).
//!
//! Goals (issue 15): J <= 0.01, R >= 0.99, O <= 5 %, P >= 0.9.
//!
//! Each workload is run twice, the second time as a uniform baseline (every class at the plan's
//! typical rate, so the same budget and bucket without boosts or costly heads); its figures and
//! an ideal sampler's divergence (as many flows as were mirrored in the hour, drawn uniformly
//! from live's) are printed beside the planner's. Budgets are 5, 10 or 20 % of the mean load
//! (the default policy mirrors 10 %): at 2 %, 200 patterns cannot be shown within J <= 0.01 by
//! any sampler held to the budget second by second, the uniform one included.
//! `DOPPEL_MIRROR_DEBUG=1` prints every hour above J = 0.01 with its four most misrepresented
//! patterns.

use std::collections::HashMap;

use doppel_engine::mirror::{
    ClassLatency, ClassRole, FlowBucket, MirrorPlanner, MirrorSettings, PatternObservation,
    coverage::{js_divergence_bits, rare_recall_counts},
};
use rand::{RngExt as _, SeedableRng as _, rngs::ChaCha8Rng};

use crate::traces::Trace;

/// What `eval mirror` simulates.
#[derive(Debug, Clone)]
pub(crate) struct MirrorOptions<'a> {
    /// Days per workload.
    pub(crate) days: usize,
    /// Only traces whose name contains this.
    pub(crate) only: Option<&'a str>,
    /// Most workloads (one per trace).
    pub(crate) workloads: usize,
    /// One new flow in this many is inspected for its pattern.
    pub(crate) discovery_one_in: u32,
    /// Model the data path's token bucket (the budget as a hard limit where flows are sampled).
    pub(crate) bucket: bool,
}

struct Pattern {
    key: String,
    head: Vec<u8>,
    /// ln(share weight), or for a rare pattern ln(flows an hour at the mean load).
    log_weight: f64,
    rare: bool,
    born: usize,
    latency_ms: f64,
}

/// A pattern mix of `n` patterns.
fn patterns(rng: &mut ChaCha8Rng, n: usize, intervals: usize, per_day: usize) -> Vec<Pattern> {
    let exponent = rng.random_range(1.0..1.4);
    let resources = [
        "items", "users", "orders", "cart", "search", "static", "auth", "feed", "media", "admin",
    ];
    let commands = ["GET", "SET", "HGETALL", "INCR", "EXPIRE", "LPUSH", "ZADD"];
    let mut out: Vec<Pattern> = Vec::with_capacity(n);
    let mut used = std::collections::HashSet::new();
    while out.len() < n {
        let rank = out.len() + 1;
        let kind = rng.random_range(0..10);
        let (key, head) = if kind == 0 {
            let c = commands[rng.random_range(0..commands.len())];
            (
                format!("resp {c}"),
                format!(
                    "*2\r\n${}\r\n{}\r\n$3\r\nkey\r\n",
                    c.len(),
                    c.to_lowercase()
                ),
            )
        } else {
            let method = ["GET", "GET", "GET", "POST", "PUT", "DELETE"][rng.random_range(0..6)];
            let resource = resources[rng.random_range(0..resources.len())];
            let version = rng.random_range(1..4);
            let sub = rng.random_range(0..30);
            if kind < 6 {
                (
                    format!("{method} /api/v{version}/{resource}{sub}/{{n}}"),
                    format!(
                        "{method} /api/v{version}/{resource}{sub}/{} HTTP/1.1\r\n",
                        rng.random_range(1..100_000)
                    ),
                )
            } else {
                (
                    format!("{method} /api/v{version}/{resource}{sub}"),
                    format!("{method} /api/v{version}/{resource}{sub} HTTP/1.1\r\n"),
                )
            }
        };
        if !used.insert(key.clone()) {
            continue;
        }
        let born = if out.len() >= n / 10 && rng.random_range(0.0..1.0) < 0.1 {
            rng.random_range(per_day.min(intervals - 1)..intervals)
        } else {
            0
        };
        // A pattern born mid-stream takes a tail share.
        let zipf_rank = if born > 0 {
            rng.random_range(n / 2..n + 1)
        } else {
            rank
        };
        // The rare tier: a fifth of the patterns (and half of those born mid-stream) come a
        // few times an hour whatever the load level, like admin endpoints and rare commands.
        let rare = out.len() >= n / 10 && rng.random_range(0.0..1.0) < 0.2;
        let log_weight = if rare {
            rng.random_range(5.0f64.ln()..200.0f64.ln())
        } else {
            -exponent * (zipf_rank as f64).ln()
        };
        out.push(Pattern {
            key,
            head: head.into_bytes(),
            log_weight,
            rare,
            born,
            latency_ms: (rng.random_range(1.0f64..4.0) + normal(rng)).exp(),
        });
    }
    out
}

fn normal(rng: &mut ChaCha8Rng) -> f64 {
    // Box-Muller.
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    let v: f64 = rng.random_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
}

fn poisson(rng: &mut ChaCha8Rng, mean: f64) -> u64 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        return (mean + mean.sqrt() * normal(rng)).round().max(0.0) as u64;
    }
    let limit = (-mean).exp();
    let (mut k, mut p) = (0u64, 1.0);
    loop {
        p *= rng.random_range(0.0..1.0);
        if p <= limit {
            return k;
        }
        k += 1;
    }
}

fn binomial(rng: &mut ChaCha8Rng, n: u64, p: f64) -> u64 {
    if p <= 0.0 || n == 0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    if n <= 64 {
        return (0..n).filter(|_| rng.random_range(0.0..1.0) < p).count() as u64;
    }
    let (mean, var) = (n as f64 * p, n as f64 * p * (1.0 - p));
    if var > 25.0 {
        return (mean + var.sqrt() * normal(rng))
            .round()
            .clamp(0.0, n as f64) as u64;
    }
    if p < 0.5 {
        poisson(rng, mean).min(n)
    } else {
        n - poisson(rng, n as f64 * (1.0 - p)).min(n)
    }
}

#[derive(Default)]
struct Hour {
    live: HashMap<usize, f64>,
    mirrored: HashMap<usize, u64>,
    /// The mirrored flows reweighted by class, interval by interval: each mirrored flow of
    /// class `c` stands for live's flows of `c` over the mirrored flows of `c` in its interval
    /// ([`doppel_engine::mirror::class_weight`]).
    reweighted: HashMap<usize, f64>,
}

/// One workload's figures.
struct Outcome {
    name: String,
    worst_js: f64,
    /// The ideal sampler's divergence in the worst hour (sampling noise alone).
    worst_floor: f64,
    rare_pairs: u64,
    rare_hit: u64,
    worst_overrun: f64,
    peak_share: f64,
    mean_share_of_budget: f64,
    without_rule_max: usize,
    budget: f64,
    mean_load: f64,
    classes_max: usize,
    rules_max: usize,
    new_seen_within_min: Vec<f64>,
}

impl Outcome {
    fn rare_recall(&self) -> f64 {
        self.rare_hit as f64 / self.rare_pairs.max(1) as f64
    }
}

/// Simulates one workload; with `uniform`, every class is mirrored at the plan's typical rate
/// (the baseline: learned classes for the weights, no boosts, no costly heads).
fn simulate(
    trace: &Trace,
    seed: u64,
    options: &MirrorOptions<'_>,
    uniform: bool,
) -> Option<Outcome> {
    let step = trace.step_secs as f64;
    let per_day = (86_400 / trace.step_secs) as usize;
    let intervals = (options.days * per_day).min(trace.values.len());
    if intervals < per_day {
        return None;
    }
    let values = &trace.values[trace.values.len() - intervals..];
    let mean_value = values.iter().sum::<f64>() / intervals as f64;
    if mean_value <= 0.0 {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mean_load = rng.random_range(30.0..400.0);
    let budget = mean_load * [0.05, 0.1, 0.2][(seed % 3) as usize];
    let n_patterns = rng.random_range(60..240);
    let mut mix = patterns(&mut rng, n_patterns, intervals, per_day);
    let mut planner = MirrorPlanner::new(MirrorSettings {
        budget_flows_per_s: budget,
        ..MirrorSettings::default()
    })
    .expect("default settings are valid");
    let mut bucket = if uniform {
        FlowBucket::without_priority(budget, 0.0)
    } else {
        FlowBucket::new(budget, 0.0)
    };
    let mut hours: Vec<Hour> = Vec::new();
    let per_hour = (3600 / trace.step_secs).max(1) as usize;
    let mut interval_loads = Vec::with_capacity(intervals);
    let mut interval_mirrored = Vec::with_capacity(intervals);
    let mut worst_overrun: f64 = 0.0;
    let (mut burst_left, mut burst_factor, mut burst_pattern) = (0usize, 1.0, 0usize);
    let mut without_rule_max = 0;
    let (mut classes_max, mut rules_max) = (0, 0);
    // When each mid-stream pattern was first mirrored, minutes after its birth.
    let mut first_mirrored: HashMap<usize, f64> = HashMap::new();
    let drift = 0.05 * (step / 3600.0).sqrt();
    for (t, &value) in values.iter().enumerate() {
        let now = (t + 1) as f64 * step;
        let plan = planner.plan();
        classes_max = classes_max.max(plan.classes.len());
        rules_max = rules_max.max(plan.rules.len());
        without_rule_max = without_rule_max.max(plan.patterns_without_rule);
        if burst_left == 0 && rng.random_range(0.0..1.0) < 0.05 * step / 3600.0 {
            burst_left = (rng.random_range(300.0..1800.0) / step).ceil() as usize;
            burst_factor = rng.random_range(1.5..4.0);
            burst_pattern = rng.random_range(0..mix.len());
        }
        let load = value / mean_value * mean_load;
        let alive: Vec<usize> = (0..mix.len()).filter(|&i| mix[i].born <= t).collect();
        let total_weight: f64 = alive
            .iter()
            .filter(|&&i| !mix[i].rare)
            .map(|&i| mix[i].log_weight.exp())
            .sum();
        let hour = hours.len().saturating_sub(1);
        if t % per_hour == 0 {
            hours.push(Hour::default());
        }
        let hour = if t % per_hour == 0 {
            hours.len() - 1
        } else {
            hour
        };
        let mut class_live: HashMap<u16, u64> = HashMap::new();
        let mut sampled: Vec<(usize, u16, u64)> = Vec::new();
        let mut observed: Vec<PatternObservation> = Vec::new();
        let mut live_total = 0u64;
        for &i in &alive {
            let mut mean = if mix[i].rare {
                mix[i].log_weight.exp() * load / mean_load * step / 3600.0
            } else {
                load * step * mix[i].log_weight.exp() / total_weight
            };
            if burst_left > 0 {
                mean *= 1.0 + 0.5 * (burst_factor - 1.0);
                if i == burst_pattern {
                    mean += 0.5 * (burst_factor - 1.0) * load * step;
                }
            }
            let flows = poisson(&mut rng, mean);
            if flows == 0 {
                continue;
            }
            live_total += flows;
            *hours[hour].live.entry(i).or_default() += flows as f64;
            let class = plan.classify(&mix[i].head);
            *class_live.entry(class).or_default() += flows;
            let rate = if uniform {
                plan.typical_rate
            } else {
                plan.rate(class)
            };
            let s = binomial(&mut rng, flows, rate);
            if s > 0 {
                sampled.push((i, class, s));
            }
            let inspected = binomial(&mut rng, flows, 1.0 / f64::from(options.discovery_one_in));
            if inspected > 0 {
                observed.push(PatternObservation {
                    pattern: mix[i].key.clone(),
                    flows: (inspected * u64::from(options.discovery_one_in)) as f64,
                });
            }
        }
        burst_left = burst_left.saturating_sub(1);
        // The token bucket admits the interval's sampled flows in arrival order, which is
        // uniform across classes: the boost classes' flows may spend the budget's reserve, and
        // within each of the two groups every class is thinned by the same share.
        let priority_class = |class: u16| {
            !uniform
                && plan
                    .classes
                    .iter()
                    .any(|c| c.id == class && c.role == ClassRole::Boost)
        };
        let wanted_in = |priority: bool| -> u64 {
            sampled
                .iter()
                .filter(|s| priority_class(s.1) == priority)
                .map(|s| s.2)
                .sum()
        };
        let wanted = [wanted_in(false), wanted_in(true)];
        let admitted = if options.bucket {
            let (priority, common) = bucket.admit_classes(now, wanted[1], wanted[0]);
            [common, priority]
        } else {
            wanted
        };
        let mut class_mirrored: HashMap<u16, u64> = HashMap::new();
        let mut mirrored_pattern: Vec<(usize, u16, u64)> = Vec::new();
        let (mut left, mut left_wanted) = (admitted, wanted);
        for (i, class, s) in sampled {
            // Which of the sampled flows the bucket admitted: a draw without replacement, so
            // the admitted total is exact.
            let g = usize::from(priority_class(class));
            let m = if left[g] >= left_wanted[g] {
                s
            } else {
                binomial(&mut rng, s, left[g] as f64 / left_wanted[g] as f64).min(left[g])
            };
            left[g] -= m;
            left_wanted[g] -= s;
            if m > 0 {
                *class_mirrored.entry(class).or_default() += m;
                mirrored_pattern.push((i, class, m));
                if mix[i].born > 0 {
                    first_mirrored
                        .entry(i)
                        .or_insert((t - mix[i].born) as f64 * step / 60.0);
                }
            }
        }
        let mirrored_total: u64 = class_mirrored.values().sum();
        for (i, class, m) in mirrored_pattern {
            *hours[hour].mirrored.entry(i).or_default() += m;
            let weight = doppel_engine::mirror::class_weight(
                class_live.get(&class).copied().unwrap_or(0),
                class_mirrored.get(&class).copied().unwrap_or(0),
            )
            .unwrap_or(0.0);
            *hours[hour].reweighted.entry(i).or_default() += m as f64 * weight;
        }
        worst_overrun = worst_overrun.max(mirrored_total as f64 / (budget * step) - 1.0);
        interval_loads.push(live_total as f64);
        interval_mirrored.push(mirrored_total as f64);
        // Heads report their pattern's latency (with noise).
        let latencies: Vec<ClassLatency> = plan
            .classes
            .iter()
            .filter_map(|c| match &c.role {
                ClassRole::Head { pattern, .. } => {
                    let i = mix.iter().position(|p| &p.key == pattern)?;
                    Some(ClassLatency {
                        class: c.id,
                        latency_ms: mix[i].latency_ms * (0.1 * normal(&mut rng)).exp(),
                    })
                }
                _ => None,
            })
            .collect();
        planner.observe(now, step, &observed, &latencies);
        for p in &mut mix {
            p.log_weight += drift * normal(&mut rng);
        }
    }
    let mut worst_js: f64 = 0.0;
    let mut worst_floor: f64 = 0.0;
    let (mut rare_pairs, mut rare_hit) = (0, 0);
    for (h, hour) in hours.iter().enumerate() {
        let live_total: f64 = hour.live.values().sum();
        if live_total >= 1000.0 {
            let js = js_divergence_bits(&hour.live, &hour.reweighted);
            // What an ideal sampler would show: as many flows, drawn uniformly from live's.
            let mirrored: u64 = hour.mirrored.values().sum();
            let (mut left, mut mass) = (mirrored, live_total);
            let mut ideal = HashMap::new();
            for (&i, &n) in &hour.live {
                let k = binomial(&mut rng, left, (n / mass).min(1.0));
                ideal.insert(i, k as f64);
                left -= k;
                mass -= n;
            }
            let floor = js_divergence_bits(&hour.live, &ideal);
            if js > worst_js {
                worst_floor = floor;
            }
            if !uniform && std::env::var_os("DOPPEL_MIRROR_DEBUG").is_some() && js > 0.01 {
                let rw_total: f64 = hour.reweighted.values().sum();
                let mut diffs: Vec<(usize, f64, f64)> = hour
                    .live
                    .iter()
                    .map(|(i, n)| {
                        (
                            *i,
                            n / live_total,
                            hour.reweighted.get(i).copied().unwrap_or(0.0) / rw_total,
                        )
                    })
                    .collect();
                diffs.sort_by(|a, b| (b.1 - b.2).abs().total_cmp(&(a.1 - a.2).abs()));
                for (i, l, m) in diffs.iter().take(4) {
                    eprintln!(
                        "   {} live={l:.4} mirrored={m:.4} n={}",
                        mix[*i].key,
                        hour.mirrored.get(i).copied().unwrap_or(0)
                    );
                }
                eprintln!(
                    "{} hour {h}: js={js:.4} ideal={floor:.4} live={live_total} \
                     mirrored={mirrored}",
                    trace.name
                );
            }
            worst_js = worst_js.max(js);
        }
        let (counted, recalled) = rare_recall_counts(&hour.live, &hour.mirrored);
        rare_pairs += counted as u64;
        rare_hit += recalled as u64;
    }
    let mut order: Vec<usize> = (0..interval_loads.len()).collect();
    order.sort_by(|&a, &b| interval_loads[b].total_cmp(&interval_loads[a]));
    let top = (order.len() / 20).max(1);
    let peak_mirrored: f64 = order[..top].iter().map(|&i| interval_mirrored[i]).sum();
    let peak_share = peak_mirrored / (budget * step * top as f64);
    let mean_share_of_budget =
        interval_mirrored.iter().sum::<f64>() / (budget * step * interval_mirrored.len() as f64);
    let mut new_seen_within_min: Vec<f64> = mix
        .iter()
        .enumerate()
        .filter(|(_, p)| p.born > 0)
        .map(|(i, _)| first_mirrored.get(&i).copied().unwrap_or(f64::INFINITY))
        .collect();
    new_seen_within_min.sort_by(f64::total_cmp);
    Some(Outcome {
        name: trace.name.clone(),
        worst_js,
        worst_floor,
        rare_pairs,
        rare_hit,
        worst_overrun,
        peak_share,
        mean_share_of_budget,
        without_rule_max,
        budget,
        mean_load,
        classes_max,
        rules_max,
        new_seen_within_min,
    })
}

/// Runs the evaluation and prints one line per workload, then the summary line.
pub(crate) fn run(options: &MirrorOptions<'_>, traces: &[Trace]) -> anyhow::Result<()> {
    let mut outcomes = Vec::new();
    for trace in traces
        .iter()
        .filter(|t| options.only.is_none_or(|o| t.name.contains(o)))
        .take(options.workloads)
    {
        // Seeded by name, so a workload is the same whichever traces run with it.
        let seed = trace.name.bytes().fold(1000u64, |h, b| {
            h.wrapping_mul(31).wrapping_add(u64::from(b))
        });
        let (Some(o), Some(base)) = (
            simulate(trace, seed, options, false),
            simulate(trace, seed, options, true),
        ) else {
            continue;
        };
        let new_median = o
            .new_seen_within_min
            .get(o.new_seen_within_min.len() / 2)
            .copied();
        println!(
            "{:<34} load={:.0}/s budget={:.1}/s js={:.4} (uniform {:.4}, ideal {:.4}) \
             rare_recall={:.3} (uniform {:.3}) overrun_pct={:.1} peak_share={:.2} \
             budget_use={:.2} classes={} rules={} unboosted={} new_first_mirrored_min={}",
            o.name,
            o.mean_load,
            o.budget,
            o.worst_js,
            base.worst_js,
            o.worst_floor,
            o.rare_recall(),
            base.rare_recall(),
            o.worst_overrun * 100.0,
            o.peak_share,
            o.mean_share_of_budget,
            o.classes_max,
            o.rules_max,
            o.without_rule_max,
            new_median.map_or("-".to_owned(), |m| format!("{m:.0}")),
        );
        outcomes.push((o, base));
    }
    anyhow::ensure!(!outcomes.is_empty(), "no trace long enough to evaluate");
    let summary = |pick: &dyn Fn(&(Outcome, Outcome)) -> &Outcome| {
        let all = || outcomes.iter().map(pick);
        let js = all().map(|o| o.worst_js).fold(0.0, f64::max);
        let rare = all().map(|o| o.rare_hit).sum::<u64>() as f64
            / all().map(|o| o.rare_pairs).sum::<u64>().max(1) as f64;
        let overrun = all().map(|o| o.worst_overrun).fold(0.0, f64::max).max(0.0) * 100.0;
        let peak = all().map(|o| o.peak_share).fold(f64::INFINITY, f64::min);
        format!(
            "mix_divergence={js:.4} rare_recall={rare:.3} budget_overrun_pct={overrun:.1} \
             peak_share={peak:.2}"
        )
    };
    println!("uniform baseline: {}", summary(&|p| &p.1));
    println!("mirror: {}", summary(&|p| &p.0));
    Ok(())
}
