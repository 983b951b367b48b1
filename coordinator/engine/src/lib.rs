//! doppel's predictor engine: sans-IO and deterministic.
//!
//! It turns measurements the coordinator already stores (exchanges/s per workload, latency
//! quantiles of live and shadow instances at their offered load) into decisions: a load forecast
//! with prediction intervals ([`forecast`]), a latency-versus-load model per workload and VM type
//! ([`perf_model`]), a warning before the SLO breaks ([`warning`]), the VM type and count to run
//! ([`decision`]), which traffic to mirror ([`mirror`]) and which types deserve shadow time
//! ([`shadow_pool`]). [`predictor`] ties the first four into one state machine per workload. [`eval`] measures all of it on in-memory series so `cargo xtask eval
//! predictor` can replay real traces.
//!
//! Nothing here reads a clock, a file or a socket: time is always an argument ([`Timestamp`]) and
//! randomness always comes from a caller-supplied seed, so identical inputs give identical output.

#![forbid(unsafe_code)]

pub mod assess;
pub mod candidates;
pub mod capacity;
pub mod compare;
pub mod decision;
pub mod eval;
pub mod fleet;
pub mod forecast;
pub mod mirror;
pub mod moves;
pub mod perf_model;
pub mod predictor;
pub mod shadow_pool;
pub mod warning;

pub use decision::{
    Candidate, Decision, DecisionPolicy, DecisionState, Evidence, HoldReason, Placement,
};
pub use forecast::{ForecastConfig, ForecastError, LoadForecast, LoadForecaster, ModelKind};
pub use mirror::{MirrorPlan, MirrorPlanner, MirrorSettings};
pub use perf_model::{LoadLatencyPoint, PerfModelError, PerformanceModel, PointSource};
pub use predictor::{PredictorEvent, WorkloadPredictor};
pub use shadow_pool::{
    CapacityMeasurement, PoolAction, PoolPlan, PoolPolicy, PopulationPrior, ShadowPoolError, VmType,
};
pub use warning::{BreachCombine, DegradationWarning, LiveRule, WarningPolicy, WarningState};

/// Seconds since the Unix epoch. The engine never asks the system for it.
pub type Timestamp = u64;
