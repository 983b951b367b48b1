//! Replaying one copy of one mirrored flow: a fresh TCP connection to the shadow workload, the
//! client's exchanges written with the original pacing, every response read completely, timed
//! and thrown away. Nothing read here ever leaves this task, so no shadow response can reach a
//! real client.

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    sync::mpsc,
};
use tracing::debug;

use super::{
    exchange::{Exchange, ExchangeSplitter, Protocol, SegmentMeta, Step},
    http::{HttpPolicy, ResponseFramer},
    stats::{ShadowCounter, ShadowStats},
};

/// Stream bytes in flight from the receiver to a replay task, charged to the shadow's memory
/// budget until the task has consumed them (or dropped them, e.g. when the task failed).
#[derive(Debug)]
pub struct Charged {
    data: Arc<[u8]>,
    budget: Arc<AtomicUsize>,
}

impl Charged {
    /// Charges `data` to `budget`.
    pub fn new(data: Arc<[u8]>, budget: &Arc<AtomicUsize>) -> Self {
        budget.fetch_add(data.len(), Ordering::Relaxed);
        Self {
            data,
            budget: Arc::clone(budget),
        }
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.fetch_sub(self.data.len(), Ordering::Relaxed);
    }
}

/// What the receiver tells a replay task.
#[derive(Debug)]
pub enum FlowEvent {
    /// Contiguous stream bytes.
    Data(Charged, SegmentMeta),
    /// The stream ended (FIN, RST or idle): replay what is buffered, then close.
    End,
    /// The flow was given up: close at once without replaying what is buffered.
    Abandon,
}

/// Settings every replay task shares.
#[derive(Debug)]
pub struct ReplaySettings {
    /// Which HTTP requests are replayed.
    pub policy: Arc<HttpPolicy>,
    /// Gaps between exchanges are divided by this.
    pub time_compression: f64,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Response timeout (first byte, and between bytes).
    pub response_timeout: Duration,
    /// Idle time that completes an opaque response or an opaque run.
    pub opaque_idle: Duration,
    /// Largest single exchange.
    pub max_exchange: usize,
    /// The agent's monotonic clock origin (arrival times are ns since it).
    pub epoch: Instant,
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("connecting to the workload timed out")]
    ConnectTimeout,
    #[error("connecting to the workload failed")]
    Connect(#[source] std::io::Error),
    #[error("the workload reset or closed the connection")]
    Reset(#[source] std::io::Error),
    #[error("no response within the timeout")]
    ResponseTimeout,
    #[error("the flow cannot be cut into requests")]
    Split(#[source] super::exchange::SplitError),
    #[error("the response is not HTTP")]
    Response(#[source] super::http::HttpError),
    #[error("the flow was abandoned")]
    Abandoned,
}

/// Replays one flow copy until its stream ends.
pub async fn replay_flow(
    settings: Arc<ReplaySettings>,
    stats: Arc<ShadowStats>,
    target: SocketAddr,
    class: u16,
    mut events: mpsc::UnboundedReceiver<FlowEvent>,
) {
    let outcome = run(&settings, &stats, target, class, &mut events).await;
    let counter = match &outcome {
        Ok(()) => None,
        Err(ReplayError::ConnectTimeout) => Some(ShadowCounter::ConnectTimeouts),
        Err(ReplayError::Connect(_)) => Some(ShadowCounter::ConnectFailures),
        Err(ReplayError::Reset(_)) => Some(ShadowCounter::ReplayResets),
        Err(ReplayError::ResponseTimeout) => Some(ShadowCounter::ResponseTimeouts),
        Err(ReplayError::Split(_) | ReplayError::Response(_)) => Some(ShadowCounter::AbandonedHttp),
        Err(ReplayError::Abandoned) => None,
    };
    if let Some(counter) = counter {
        stats.inc(counter);
    }
    if let Err(e) = outcome {
        debug!(%target, error = %crate::datapath::error_chain(&e), "replay stopped");
    }
    // Dropping the receiver makes the receiver's next send fail, so it stops buffering for this
    // copy at once: a failing workload costs nothing per later packet.
}

async fn run(
    settings: &ReplaySettings,
    stats: &ShadowStats,
    target: SocketAddr,
    class: u16,
    events: &mut mpsc::UnboundedReceiver<FlowEvent>,
) -> Result<(), ReplayError> {
    let mut conn =
        match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(target)).await {
            Err(_) => return Err(ReplayError::ConnectTimeout),
            Ok(Err(e)) => return Err(ReplayError::Connect(e)),
            Ok(Ok(conn)) => conn,
        };
    stats.inc(ShadowCounter::Connections);
    let _ = conn.set_nodelay(true);
    let mut splitter = ExchangeSplitter::new(Arc::clone(&settings.policy), settings.max_exchange);
    let mut ended = false;
    // With time compression the whole flow is gathered first: gaps can only shrink if the
    // later exchanges are already here.
    let compress = settings.time_compression > 1.0;
    let mut replay = Replay {
        settings,
        stats,
        conn: &mut conn,
        buf: vec![0u8; 16 * 1024],
        class,
        previous: None,
    };
    loop {
        if ended || !compress {
            match splitter.next(ended).map_err(ReplayError::Split)? {
                Some(step) => {
                    replay.step(step).await?;
                    continue;
                }
                None if ended => break,
                None => {}
            }
        }
        let opaque_pending = splitter.protocol() != Some(Protocol::Http) && splitter.buffered() > 0;
        let event = if opaque_pending && !compress {
            match tokio::time::timeout(settings.opaque_idle, events.recv()).await {
                Ok(event) => event,
                Err(_) => {
                    // Nothing followed the run for a while: it is a whole exchange.
                    if let Some(step) = splitter.next(true).map_err(ReplayError::Split)? {
                        replay.step(step).await?;
                    }
                    continue;
                }
            }
        } else {
            events.recv().await
        };
        match event {
            Some(FlowEvent::Data(data, meta)) => splitter.push(&data.data, meta),
            Some(FlowEvent::End) | None => ended = true,
            Some(FlowEvent::Abandon) => return Err(ReplayError::Abandoned),
        }
    }
    let _ = conn.shutdown().await;
    Ok(())
}

/// The state of one replay connection between exchanges.
struct Replay<'a> {
    settings: &'a ReplaySettings,
    stats: &'a ShadowStats,
    conn: &'a mut TcpStream,
    buf: Vec<u8>,
    class: u16,
    /// Arrival time and replay start of the previous exchange.
    previous: Option<(u64, Instant)>,
}

impl Replay<'_> {
    async fn step(&mut self, step: Step) -> Result<(), ReplayError> {
        match step {
            Step::Denied(_) => self.stats.inc(ShadowCounter::RequestsDenied),
            Step::Replay(exchange) => {
                pace(self.settings, &mut self.previous, &exchange).await;
                exchange_once(
                    self.settings,
                    self.stats,
                    self.conn,
                    &mut self.buf,
                    self.class,
                    &exchange,
                )
                .await?;
            }
        }
        Ok(())
    }
}

/// Waits until the exchange is due: as long after the previous exchange's start as its mirror
/// copy arrived after the previous one's (divided by the compression), never earlier.
async fn pace(
    settings: &ReplaySettings,
    previous: &mut Option<(u64, Instant)>,
    exchange: &Exchange,
) {
    if let Some((arrival_ns, sent_at)) = *previous {
        let gap_ns =
            exchange.arrival_ns.saturating_sub(arrival_ns) as f64 / settings.time_compression;
        let due = sent_at + Duration::from_nanos(gap_ns as u64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
    }
    *previous = Some((exchange.arrival_ns, Instant::now()));
}

/// Writes one exchange and reads its whole response, timing both ends.
async fn exchange_once(
    settings: &ReplaySettings,
    stats: &ShadowStats,
    conn: &mut TcpStream,
    buf: &mut [u8],
    class: u16,
    exchange: &Exchange,
) -> Result<(), ReplayError> {
    conn.write_all(&exchange.bytes)
        .await
        .map_err(ReplayError::Reset)?;
    let written = Instant::now();
    stats.add(ShadowCounter::BytesReplayed, exchange.bytes.len() as u64);
    let mut framer = exchange
        .request
        .as_ref()
        .map(|r| ResponseFramer::new(r.response_has_no_body()));
    let mut first: Option<Instant> = None;
    let mut last = written;
    loop {
        let wait = match (&framer, first) {
            // Opaque: after the first byte, silence for `opaque_idle` ends the response.
            (None, Some(_)) => settings.opaque_idle,
            _ => settings.response_timeout,
        };
        let n = match tokio::time::timeout(wait, conn.read(buf)).await {
            Err(_) if framer.is_none() && first.is_some() => break,
            Err(_) => return Err(ReplayError::ResponseTimeout),
            Ok(Err(e)) => return Err(ReplayError::Reset(e)),
            Ok(Ok(0)) => {
                // Closed: the end of a close-delimited response, or a reset mid-response.
                let complete =
                    framer.as_ref().is_none_or(ResponseFramer::until_close) && first.is_some();
                if !complete {
                    return Err(ReplayError::Reset(std::io::ErrorKind::UnexpectedEof.into()));
                }
                break;
            }
            Ok(Ok(n)) => n,
        };
        let now = Instant::now();
        first.get_or_insert(now);
        last = now;
        stats.add(ShadowCounter::BytesDiscarded, n as u64);
        if let Some(framer) = &mut framer
            && framer
                .feed(&buf[..n])
                .map_err(ReplayError::Response)?
                .is_some()
        {
            break;
        }
    }
    let first = first.unwrap_or(last);
    stats.record(
        class,
        first.duration_since(written).as_nanos() as u64,
        last.duration_since(written).as_nanos() as u64,
    );
    stats.inc(ShadowCounter::Exchanges);
    if let Some(status) = framer.as_ref().and_then(ResponseFramer::status) {
        stats.inc(match status / 100 {
            1 => ShadowCounter::Status1xx,
            2 => ShadowCounter::Status2xx,
            3 => ShadowCounter::Status3xx,
            4 => ShadowCounter::Status4xx,
            _ => ShadowCounter::Status5xx,
        });
    }
    Ok(())
}
