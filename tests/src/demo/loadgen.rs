//! The demo's load generator: an open-loop HTTP client whose request rate follows a schedule.
//!
//! Open loop because a closed-loop client (wrk, a fixed set of connections) slows down when the
//! server does, so it can never show a server falling behind its offered load. Arrivals are
//! Poisson within each step, every request is a new TCP connection (the agent samples whole
//! flows, so one request per flow lets the sample rate mean what it says), and latency runs from
//! the *scheduled* send time: a request that waited for a free worker counts its wait, which is
//! what a user would have seen.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use crate::testbed::Host;
use hdrhistogram::Histogram;
use rand::{RngExt as _, SeedableRng as _};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The live service.
    pub target: SocketAddr,
    /// The request path.
    pub path: String,
    /// Length of one schedule step.
    pub step: Duration,
    /// Requests per second in each step.
    pub rates: Vec<f64>,
    /// Concurrent requests at most (queued requests wait, and their wait counts).
    pub workers: usize,
    /// A request not answered within this is a failure.
    pub timeout: Duration,
}

/// What the client saw in one step.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Requests scheduled.
    pub offered: u64,
    /// Complete `200` responses.
    pub ok: u64,
    /// Refused, reset, timed out or not `200`.
    pub failed: u64,
    /// Response bytes received (headers and body).
    pub bytes: u64,
    /// Latency of the `ok` requests from their scheduled time, microseconds.
    pub latency_us: Histogram<u64>,
}

impl StepStats {
    fn new() -> Self {
        Self {
            offered: 0,
            ok: 0,
            failed: 0,
            bytes: 0,
            latency_us: Histogram::new_with_bounds(1, 120_000_000, 2).expect("valid bounds"),
        }
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Self) {
        self.offered += other.offered;
        self.ok += other.ok;
        self.failed += other.failed;
        self.bytes += other.bytes;
        self.latency_us.add(&other.latency_us).expect("same bounds");
    }

    /// A latency quantile in milliseconds (0 without responses).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latency_us.is_empty() {
            return 0.0;
        }
        self.latency_us.value_at_quantile(q) as f64 / 1000.0
    }
}

/// A running load generator; dropping it stops scheduling.
#[derive(Debug)]
pub struct LoadGenerator {
    stats: Arc<Mutex<Vec<StepStats>>>,
    stop: Arc<AtomicBool>,
    started: Instant,
    step: Duration,
    dispatcher: Option<thread::JoinHandle<()>>,
    /// The workers, which end when the dispatcher is done and the queue is empty.
    workers: Vec<thread::JoinHandle<()>>,
}

struct Job {
    step: usize,
    due: Instant,
}

impl LoadGenerator {
    /// Starts sending from inside `client`'s network namespace.
    pub fn start(client: &Host, spec: LoadSpec, seed: u64) -> anyhow::Result<Self> {
        let stats = Arc::new(Mutex::new(
            (0..spec.rates.len())
                .map(|_| StepStats::new())
                .collect::<Vec<_>>(),
        ));
        let stop = Arc::new(AtomicBool::new(false));
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        let netns = client.netns().to_owned();
        let mut workers = Vec::with_capacity(spec.workers);
        for _ in 0..spec.workers {
            let queue = Arc::clone(&queue);
            let stats = Arc::clone(&stats);
            let netns = netns.clone();
            let (target, path, timeout) = (spec.target, spec.path.clone(), spec.timeout);
            let worker = thread::Builder::new()
                .name("loadgen".into())
                .spawn(move || {
                    if let Err(e) = enter_netns(&netns) {
                        eprintln!("loadgen: cannot enter {netns}: {e}");
                        return;
                    }
                    loop {
                        let job = match queue.lock().expect("queue lock").recv() {
                            Ok(job) => job,
                            Err(_) => return, // the dispatcher is done
                        };
                        let outcome = request(target, &path, timeout);
                        let mut stats = stats.lock().expect("stats lock");
                        let step = &mut stats[job.step];
                        match outcome {
                            Ok(bytes) => {
                                step.ok += 1;
                                step.bytes += bytes;
                                let us = job.due.elapsed().as_micros().max(1);
                                step.latency_us
                                    .saturating_record(u64::try_from(us).unwrap_or(u64::MAX));
                            }
                            Err(_) => step.failed += 1,
                        }
                    }
                })?;
            workers.push(worker);
        }
        let started = Instant::now();
        let step = spec.step;
        let dispatcher = {
            let stats = Arc::clone(&stats);
            let stop = Arc::clone(&stop);
            thread::Builder::new()
                .name("loadgen-dispatch".into())
                .spawn(move || dispatch(&spec, started, seed, &jobs, &stats, &stop))?
        };
        Ok(Self {
            stats,
            stop,
            started,
            step,
            dispatcher: Some(dispatcher),
            workers,
        })
    }

    /// The schedule step now running (may be past the end).
    pub fn current_step(&self) -> usize {
        (self.started.elapsed().as_secs_f64() / self.step.as_secs_f64()) as usize
    }

    /// Whether every request has been scheduled.
    pub fn is_done(&self) -> bool {
        self.dispatcher
            .as_ref()
            .is_none_or(thread::JoinHandle::is_finished)
    }

    /// Everything the client saw in steps `range`, merged.
    pub fn merged(&self, range: std::ops::Range<usize>) -> StepStats {
        let stats = self.stats.lock().expect("stats lock");
        let mut total = StepStats::new();
        for s in stats.get(range).unwrap_or_default() {
            total.add(s);
        }
        total
    }

    /// Stops scheduling (requests in flight finish on their own).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(dispatcher) = self.dispatcher.take() {
            let _ = dispatcher.join();
        }
    }

    /// Stops scheduling and waits until every request in flight has ended, answered or timed
    /// out: the figures are then final.
    pub fn finish(&mut self) {
        self.stop();
        for worker in self.workers.drain(..) {
            let _ = worker.join();
        }
    }
}

impl Drop for LoadGenerator {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Schedules every request: Poisson arrivals at each step's rate.
fn dispatch(
    spec: &LoadSpec,
    started: Instant,
    seed: u64,
    jobs: &mpsc::Sender<Job>,
    stats: &Mutex<Vec<StepStats>>,
    stop: &AtomicBool,
) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut at = Duration::ZERO;
    for (i, &rate) in spec.rates.iter().enumerate() {
        let step_end = spec.step * (i as u32 + 1);
        if rate <= 0.0 {
            at = step_end;
            continue;
        }
        loop {
            // Exponential gap: -ln(U)/rate, U in (0, 1].
            let u: f64 = 1.0 - rng.random::<f64>();
            at += Duration::from_secs_f64(-u.ln() / rate);
            if at >= step_end {
                at = step_end;
                break;
            }
            let due = started + at;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
            stats.lock().expect("stats lock")[i].offered += 1;
            if jobs.send(Job { step: i, due }).is_err() {
                return;
            }
        }
    }
}

/// One request on its own connection; the response's size in bytes when it is a complete `200`.
pub fn request(target: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<u64> {
    let mut stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = Vec::with_capacity(64 * 1024);
    stream.read_to_end(&mut response)?;
    if !response.starts_with(b"HTTP/1.1 200") {
        return Err(std::io::Error::other("not a 200 response"));
    }
    Ok(response.len() as u64)
}

/// Moves the calling thread into the named network namespace for the rest of its life.
pub(crate) fn enter_netns(name: &str) -> std::io::Result<()> {
    let file = std::fs::File::open(format!("/run/netns/{name}"))?;
    nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
}
