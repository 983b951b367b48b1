//! `cargo xtask bench predictor`: time the predictor's hot paths on one thread.
//!
//! Only the sans-IO engine runs, so this needs no eBPF toolchain and does not run `setup`.
//! The engine is built with `opt-level = 3` even in dev builds (see the root `Cargo.toml`).

use std::time::Instant;

use doppel_engine::eval::synthetic_load;
use doppel_engine::{ForecastConfig, LoadForecaster};

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// Workloads in the refresh benchmark.
    #[arg(long, default_value_t = 1000)]
    workloads: usize,
}

/// Days of one-minute history per workload, as the issue states the budget.
const HISTORY_DAYS: usize = 14;
/// The refresh must fit in one coordinator cycle.
const CYCLE_SECS: f64 = 300.0;

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let config = ForecastConfig::per_minute();
    let history = synthetic_load(HISTORY_DAYS, 1);
    let now = (history.len() as u64 - 1) * config.step_secs;
    // One workload, repeated so the figure is not one cold cache.
    let runs = 10;
    let started = Instant::now();
    for _ in 0..runs {
        let model = LoadForecaster::fit(&config, &history, now)?;
        std::hint::black_box(model.forecast(config.max_horizon));
    }
    let one = started.elapsed().as_secs_f64() / f64::from(runs);
    println!(
        "bench predictor: fit+forecast(1 day) of one workload with {HISTORY_DAYS} days of 1-min history ({} points): {:.1} ms",
        history.len(),
        one * 1e3
    );
    let workloads: Vec<Vec<f64>> = (0..options.workloads)
        .map(|i| synthetic_load(HISTORY_DAYS, i as u64 + 100))
        .collect();
    let started = Instant::now();
    for series in &workloads {
        let model = LoadForecaster::fit(&config, series, now)?;
        std::hint::black_box(model.forecast(60));
    }
    let refresh = started.elapsed().as_secs_f64();
    println!(
        "bench predictor: refresh of {} workloads on one thread: {refresh:.1} s ({:.1} ms each; {:.0} % of a {CYCLE_SECS:.0} s cycle)",
        options.workloads,
        refresh * 1e3 / options.workloads as f64,
        100.0 * refresh / CYCLE_SECS
    );
    anyhow::ensure!(
        one < 1.0,
        "one workload took {one:.2} s, over the 1 s budget"
    );
    anyhow::ensure!(
        refresh < CYCLE_SECS,
        "the refresh took {refresh:.0} s, over the {CYCLE_SECS:.0} s cycle"
    );
    Ok(())
}
