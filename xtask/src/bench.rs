//! `cargo xtask bench TARGET`: benchmarks that print figures. Each target lives in its own module
//! and ends with one summary line (`<target>: key=value …`).

#[derive(Debug, clap::Args)]
pub(crate) struct Options {
    /// What to measure.
    #[command(subcommand)]
    target: Target,
}

#[derive(Debug, clap::Subcommand)]
enum Target {
    /// The live data path: throughput, latency added, ns per packet, agent CPU.
    Datapath(crate::bench_datapath::Options),
    /// The shadow's replay: exchanges/s one core replays with ≤ 0.1 % lost, CPU per exchange.
    Replay(crate::bench_replay::Options),
    /// The shadow against a live host of the same type: executed ratio, time dilation, latency
    /// ratios, mirror loss.
    Fidelity(crate::bench_fidelity::Options),
    /// The predictor: fit + forecast time for one workload, and a 1,000-workload refresh.
    Predictor(crate::bench_predictor::Options),
    /// The coordinator's ingest: agents held over QUIC, report-to-durable p99, CPU, merges/s.
    Ingest(crate::bench_ingest::Options),
}

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    match &options.target {
        Target::Datapath(o) => crate::bench_datapath::run(o),
        Target::Replay(o) => crate::bench_replay::run(o),
        Target::Fidelity(o) => crate::bench_fidelity::run(o),
        Target::Predictor(o) => crate::bench_predictor::run(o),
        Target::Ingest(o) => crate::bench_ingest::run(o),
    }
}

/// Pins the calling thread to `cpu`.
pub(crate) fn pin_thread(cpu: usize) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
    Ok(())
}
