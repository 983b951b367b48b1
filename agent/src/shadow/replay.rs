//! Replaying one copy of one mirrored flow in real time: a fresh TCP connection to the shadow
//! workload, the client's messages written at their original offsets from the flow's start,
//! every response read, timed and thrown away. Nothing read here ever leaves this task, so no
//! shadow response can reach a real client.
//!
//! One task drives the connection with a single `select!` over the flow's events, the socket's
//! reads, pending writes, the pacing timer and the response timeout, so responses are read while
//! later messages wait for their time and nothing waits on an idle timer:
//! - **Pacing.** A message is due at `origin + (arrival - first arrival) / compression`, with
//!   `origin` the moment the flow's first message was written; a message that followed a
//!   response on the live side (its segment's ACK moved) also waits until every response the
//!   framing knows is outstanding has completed, so the shadow never sees a request before the
//!   reply the live client waited for. A shadow that falls behind sends as soon as it can and
//!   reports how late ([`ShadowStats::observe_lag`]).
//! - **Timing.** A framed exchange runs from the write of the message that the response answers
//!   to the response's first and last byte. An opaque exchange is a run of client bytes with one
//!   ACK; it is answered by the first response byte after its last write.
//! - **Ends.** The client's own close (FIN, PostgreSQL Terminate) ends the replay normally; a
//!   server that closes or resets with a response outstanding, fails to answer within the
//!   response timeout, or refuses the connection is an error. A response timeout in the middle
//!   of a flow is counted and the replay carries on with the flow's later messages.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{io::AsyncWriteExt as _, net::TcpStream, sync::mpsc};
use tracing::{debug, warn};

use super::{
    exchange::{ExchangeSplitter, Message, SegmentMeta, SplitError},
    framing::{
        Action, Completed, ErrorReply, FrameError, Login, Protocol, ResponseFraming, mysql,
        postgres::{self, Credentials},
    },
    http::HttpPolicy,
    stats::{ShadowCounter, ShadowStats},
    timer::PreciseTimer,
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
    /// Bytes before the next `Data` were lost for good: resynchronise.
    Hole,
    /// The stream ended (FIN, RST or idle): replay what is buffered, then close.
    End,
    /// The flow was given up: close at once without replaying what is buffered.
    Abandon,
}

/// How one service port is replayed.
#[derive(Debug, Default)]
pub struct ServiceReplay {
    /// The protocol, or `None` to detect it from each flow's first bytes.
    pub protocol: Option<Protocol>,
    /// Credentials for protocols whose login the replayer performs itself.
    pub credentials: Option<Credentials>,
    /// Whether the "login cannot be replayed" warning was logged (once per service).
    pub warned_login: AtomicBool,
}

/// Settings every replay task shares.
#[derive(Debug)]
pub struct ReplaySettings {
    /// Which HTTP requests are replayed.
    pub policy: Arc<HttpPolicy>,
    /// Offsets between messages are divided by this.
    pub time_compression: f64,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Time allowed for an outstanding response to make progress.
    pub response_timeout: Duration,
    /// Largest single message.
    pub max_exchange: usize,
    /// The agent's monotonic clock origin (arrival times are ns since it).
    pub epoch: Instant,
    /// Per service port.
    pub services: HashMap<u16, ServiceReplay>,
    /// Becomes true when the agent stops for good: every replay counts what it did not write
    /// and ends at once.
    pub stop: tokio::sync::watch::Receiver<bool>,
}

/// Why the replayer's own login failed, per protocol.
#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error(transparent)]
    Postgres(postgres::LoginError),
    #[error(transparent)]
    Mysql(mysql::LoginError),
}

impl LoginError {
    fn needs_credentials(&self) -> bool {
        match self {
            Self::Postgres(e) => e.needs_credentials(),
            Self::Mysql(e) => e.needs_credentials(),
        }
    }

    const fn protocol(&self) -> &'static str {
        match self {
            Self::Postgres(_) => "PostgreSQL",
            Self::Mysql(_) => "MySQL",
        }
    }
}

/// Why a replay stopped early.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("connecting to the workload timed out")]
    ConnectTimeout,
    #[error("connecting to the workload failed")]
    Connect(#[source] std::io::Error),
    #[error("the workload reset or closed the connection with a response outstanding")]
    Reset(#[source] std::io::Error),
    #[error("no response progress within the timeout")]
    ResponseTimeout,
    #[error("the flow cannot be cut into messages")]
    Split(#[source] SplitError),
    #[error("the workload's responses break the protocol")]
    Response(#[source] FrameError),
    #[error("the replayer's own login failed")]
    Login(#[source] LoginError),
    #[error("the flow was abandoned")]
    Abandoned,
    #[error("the agent stopped")]
    Stopped,
    #[error("the pacing timer failed")]
    Timer(#[source] std::io::Error),
}

/// Replays one flow copy until its stream ends.
pub async fn replay_flow(
    settings: Arc<ReplaySettings>,
    stats: Arc<ShadowStats>,
    target: SocketAddr,
    class: u16,
    events: mpsc::UnboundedReceiver<FlowEvent>,
) {
    let _running = stats.replay_running();
    let outcome = Replay::connect(&settings, &stats, target, class, events).await;
    let outcome = match outcome {
        Ok(mut replay) => {
            let result = replay.run().await;
            let skipped = replay.splitter.skipped();
            stats.add(ShadowCounter::Resyncs, skipped.resyncs);
            stats.add(ShadowCounter::BytesSkipped, skipped.bytes);
            result
        }
        Err(e) => Err(e),
    };
    let counter = match &outcome {
        Ok(()) => None,
        Err(ReplayError::ConnectTimeout) => Some(ShadowCounter::ConnectTimeouts),
        Err(ReplayError::Connect(_)) => Some(ShadowCounter::ConnectFailures),
        Err(ReplayError::Reset(_)) => Some(ShadowCounter::ReplayResets),
        Err(ReplayError::ResponseTimeout) => Some(ShadowCounter::ResponseTimeouts),
        Err(ReplayError::Split(_) | ReplayError::Response(_)) => {
            Some(ShadowCounter::AbandonedProtocol)
        }
        Err(ReplayError::Login(e)) if e.needs_credentials() => {
            Some(ShadowCounter::AuthNotReplayable)
        }
        Err(ReplayError::Login(_)) => Some(ShadowCounter::LoginFailures),
        Err(ReplayError::Abandoned | ReplayError::Stopped | ReplayError::Timer(_)) => None,
    };
    if let Some(counter) = counter {
        stats.inc(counter);
    }
    if let Err(e) = outcome {
        if let ReplayError::Login(login) = &e
            && let Some(service) = settings.services.get(&target.port())
            && !service.warned_login.swap(true, Ordering::Relaxed)
        {
            warn!(
                service = %target,
                protocol = login.protocol(),
                error = %crate::datapath::error_chain(login),
                "sessions to this service cannot be replayed: the replayer logs in itself (a \
                 challenge cannot be replayed); set user and password on the service in the \
                 shadow config"
            );
        }
        debug!(%target, error = %crate::datapath::error_chain(&e), "replay stopped");
    }
    // Dropping the receiver makes the receiver's next send fail, so it stops buffering for this
    // copy at once: a failing workload costs nothing per later packet.
}

/// One response the replay waits for.
#[derive(Debug)]
struct Awaited {
    /// When the message it answers was completely written.
    written: Instant,
    first: Option<Instant>,
    /// The HTTP/2 stream it answers (responses of other protocols complete in order).
    stream: Option<u32>,
}

/// The run of opaque client bytes last written, and whether the server answered it.
#[derive(Debug)]
struct OpaqueRun {
    ack: u32,
    written: Instant,
    first: Option<Instant>,
    last: Instant,
}

/// One replay connection.
struct Replay<'a> {
    settings: &'a ReplaySettings,
    stats: &'a ShadowStats,
    target: SocketAddr,
    class: u16,
    events: mpsc::UnboundedReceiver<FlowEvent>,
    conn: TcpStream,
    splitter: ExchangeSplitter,
    /// Messages cut and not yet written, in order.
    queue: VecDeque<Message>,
    responses: Option<Box<dyn ResponseFraming>>,
    awaited: VecDeque<Awaited>,
    opaque: Option<OpaqueRun>,
    /// Bytes to write, with (end offset, responses, stream) of each message in them.
    out: Vec<u8>,
    out_marks: VecDeque<(usize, u32, Option<u32>)>,
    /// The flow's first arrival and when its first message was written.
    origin: Option<(u64, Instant)>,
    last_ack: Option<u32>,
    /// Last time an outstanding response made progress (or was asked for).
    progress: Instant,
    ended: bool,
    terminated: bool,
    timer: PreciseTimer,
    stop: tokio::sync::watch::Receiver<bool>,
    stop_gone: bool,
    /// A hole came since the last message written.
    after_hole: bool,
    buf: Vec<u8>,
    done: Vec<Completed>,
    started: Vec<u32>,
}

impl<'a> Replay<'a> {
    async fn connect(
        settings: &'a ReplaySettings,
        stats: &'a ShadowStats,
        target: SocketAddr,
        class: u16,
        events: mpsc::UnboundedReceiver<FlowEvent>,
    ) -> Result<Self, ReplayError> {
        let conn = match tokio::time::timeout(settings.connect_timeout, TcpStream::connect(target))
            .await
        {
            Err(_) => return Err(ReplayError::ConnectTimeout),
            Ok(Err(e)) => return Err(ReplayError::Connect(e)),
            Ok(Ok(conn)) => conn,
        };
        stats.inc(ShadowCounter::Connections);
        let _ = conn.set_nodelay(true);
        let protocol = settings
            .services
            .get(&target.port())
            .and_then(|s| s.protocol);
        Ok(Self {
            settings,
            stats,
            target,
            class,
            events,
            conn,
            splitter: ExchangeSplitter::new(
                Arc::clone(&settings.policy),
                protocol,
                settings.max_exchange,
            ),
            queue: VecDeque::new(),
            responses: None,
            awaited: VecDeque::new(),
            opaque: None,
            out: Vec::new(),
            out_marks: VecDeque::new(),
            origin: None,
            last_ack: None,
            progress: Instant::now(),
            ended: false,
            terminated: false,
            timer: PreciseTimer::new().map_err(ReplayError::Timer)?,
            stop: settings.stop.clone(),
            stop_gone: false,
            after_hole: false,
            buf: vec![0u8; 64 * 1024],
            done: Vec::new(),
            started: Vec::new(),
        })
    }

    fn knows_completeness(&self) -> bool {
        self.responses
            .as_ref()
            .is_some_and(|r| r.knows_completeness())
    }

    fn multiplexed(&self) -> bool {
        self.responses.as_ref().is_some_and(|r| r.multiplexed())
    }

    /// Whether everything the flow asked for has been written (and the framed responses read).
    fn all_written(&self) -> bool {
        self.ended && self.queue.is_empty() && self.splitter.buffered() == 0 && self.out.is_empty()
    }

    /// Whether the opaque run written last has had no response byte yet.
    fn opaque_unanswered(&self) -> bool {
        !self.knows_completeness() && self.opaque.as_ref().is_some_and(|r| r.first.is_none())
    }

    /// Whether the flow's last opaque run still waits for its first response byte.
    fn last_run_unanswered(&self) -> bool {
        self.all_written() && self.opaque.as_ref().is_some_and(|r| r.first.is_none())
    }

    async fn run(&mut self) -> Result<(), ReplayError> {
        // With time compression the whole flow is gathered first: offsets can only shrink if
        // the later messages are already here.
        let gather = self.settings.time_compression > 1.0;
        loop {
            if !gather || self.ended {
                self.cut()?;
                self.send_due().await?;
            }
            if self.all_written() && self.awaited.is_empty() && !self.last_run_unanswered() {
                break;
            }
            // A multiplexed stream may stay quiet for as long as its client lets it (a gRPC
            // watch, a long poll) while the connection carries on: its responses are only
            // timed out once the client's side has ended.
            let waiting = !self.awaited.is_empty() && (self.ended || !self.multiplexed());
            let opaque_held = !self.queue.is_empty() && self.opaque_unanswered();
            let timeout_at =
                (waiting || self.out_pending() || self.last_run_unanswered() || opaque_held)
                    .then(|| self.progress + self.settings.response_timeout);
            tokio::select! {
                event = self.events.recv(), if !self.ended => match event {
                    Some(FlowEvent::Data(data, meta)) => self.splitter.push(&data.data, meta),
                    Some(FlowEvent::Hole) => {
                        self.splitter.hole();
                        if let Some(responses) = self.responses.as_mut() {
                            responses.hole();
                        }
                        // Lost bytes may have held the request whose response moved the ACK:
                        // the next message does not wait for an answer to what came before.
                        self.after_hole = true;
                    }
                    Some(FlowEvent::End) | None => self.ended = true,
                    Some(FlowEvent::Abandon) => return Err(ReplayError::Abandoned),
                },
                // Nothing is read before the flow's protocol is known: a server that speaks
                // first (MySQL's greeting) is read by the replayer's own login.
                readable = self.conn.readable(), if self.responses.is_some() => {
                    readable.map_err(ReplayError::Reset)?;
                    match self.conn.try_read(&mut self.buf) {
                        Ok(0) => return self.server_closed(),
                        Ok(n) => self.on_response_bytes(n)?,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(ReplayError::Reset(e)),
                    }
                }
                writable = self.conn.writable(), if !self.out.is_empty() => {
                    writable.map_err(ReplayError::Reset)?;
                    match self.conn.try_write(&self.out) {
                        Ok(n) => self.on_written(n),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(ReplayError::Reset(e)),
                    }
                }
                () = self.timer.fired() => {}
                changed = self.stop.changed(), if !self.stop_gone => {
                    if changed.is_err() {
                        // The agent's sender is gone: no stop will come.
                        self.stop_gone = true;
                    } else if *self.stop.borrow() {
                        self.count_unreplayed();
                        return Err(ReplayError::Stopped);
                    }
                }
                () = sleep_until(timeout_at) => {
                    if self.all_written() && self.awaited.is_empty() {
                        // An opaque flow's last bytes had no answer: some protocols send none.
                        break;
                    }
                    if !self.out_pending() && !self.all_written() {
                        // Mid-flow, the workload left responses unanswered (it is stuck, or the
                        // requests were ones it never answers): counted, and the rest of the
                        // flow is still replayed rather than dropped.
                        self.stats.inc(ShadowCounter::ResponseTimeouts);
                        self.awaited.clear();
                        // An opaque run left unanswered is no longer waited for either.
                        self.opaque = None;
                        self.progress = Instant::now();
                        continue;
                    }
                    return Err(ReplayError::ResponseTimeout);
                }
            }
        }
        self.close_opaque_run();
        // The client's close: a FIN to the workload, as the live client's.
        let _ = self.conn.shutdown().await;
        if !self.knows_completeness() {
            self.drain_after_close().await;
        }
        Ok(())
    }

    /// After the client's FIN on a flow whose responses are not framed: reads (and discards)
    /// until the workload closes its side or goes quiet for the response timeout. Closing the
    /// socket at once would make the workload's next write fail with a reset, and a server
    /// such as memcached then drops the requests it had not yet executed; the live client
    /// waited for its last responses, so the shadow lets the workload finish too.
    async fn drain_after_close(&mut self) {
        loop {
            let read = tokio::time::timeout(
                self.settings.response_timeout,
                tokio::io::AsyncReadExt::read(&mut self.conn, &mut self.buf),
            )
            .await;
            match read {
                Ok(Ok(n)) if n > 0 => self.stats.add(ShadowCounter::BytesDiscarded, n as u64),
                _ => return,
            }
        }
    }

    /// The agent stopped with this flow's backlog unwritten: counts its messages and bytes.
    fn count_unreplayed(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            if let FlowEvent::Data(data, meta) = event {
                self.splitter.push(&data.data, meta);
            }
        }
        let mut messages = self.out_marks.len() as u64;
        let mut bytes = self.out.len() as u64;
        let cut = std::iter::from_fn(|| self.splitter.next(true).ok().flatten());
        for message in self.queue.drain(..).chain(cut) {
            if message.is_written() {
                messages += 1;
                bytes += message.bytes.len() as u64;
            }
        }
        bytes += self.splitter.buffered() as u64;
        self.stats.add(ShadowCounter::ExchangesUnreplayed, messages);
        self.stats.add(ShadowCounter::BytesUnreplayed, bytes);
    }

    fn out_pending(&self) -> bool {
        !self.out.is_empty()
    }

    /// Moves whole messages from the splitter to the queue.
    fn cut(&mut self) -> Result<(), ReplayError> {
        while let Some(message) = self.splitter.next(self.ended).map_err(ReplayError::Split)? {
            if self.responses.is_none()
                && let Some(protocol) = self.splitter.protocol()
            {
                self.responses = Some(protocol.response_framing());
            }
            self.queue.push_back(message);
        }
        Ok(())
    }

    /// Writes (or starts writing) every queued message that is due and not held back.
    async fn send_due(&mut self) -> Result<(), ReplayError> {
        while let Some(message) = self.queue.front() {
            let now = Instant::now();
            let followed_a_response = self.last_ack.is_some_and(|ack| ack != message.ack);
            let held = if self.knows_completeness() {
                message.frame.gated
                    && followed_a_response
                    && (!self.awaited.is_empty() || !self.out.is_empty())
            } else {
                // Opaque: the live client had response bytes before sending this, so the
                // shadow waits for the first response byte of the run before it too. A lagging
                // replay then keeps live's order instead of writing a burst, and every run is
                // timed.
                followed_a_response
                    && !self.after_hole
                    && (self.opaque_unanswered() || !self.out.is_empty())
            };
            if held {
                // Waits for the responses outstanding; their reads wake the loop.
                self.timer.disarm();
                return Ok(());
            }
            let due = match self.origin {
                None => now,
                Some((arrival, written)) => {
                    let offset = message.arrival_ns.saturating_sub(arrival) as f64
                        / self.settings.time_compression;
                    written + Duration::from_nanos(offset as u64)
                }
            };
            if due > now + Duration::from_micros(20) {
                self.timer.arm(due).map_err(ReplayError::Timer)?;
                return Ok(());
            }
            self.timer.disarm();
            if self.origin.is_some() {
                self.stats.observe_lag(now.saturating_duration_since(due));
            }
            let Some(message) = self.queue.pop_front() else {
                break;
            };
            self.origin.get_or_insert((message.arrival_ns, now));
            self.after_hole = false;
            match &message.frame.action {
                Action::Replay | Action::Terminate | Action::Cancel(_) => self.write(&message),
                Action::Denied(_) => self.stats.inc(ShadowCounter::RequestsDenied),
                Action::Handshake => {}
                Action::Login(login) => self.login(login).await?,
            }
        }
        self.timer.disarm();
        Ok(())
    }

    /// Performs the login the client's first message asked for. A MySQL login negotiates
    /// how result sets end, so the session's response framing is made from it.
    async fn login(&mut self, login: &Login) -> Result<(), ReplayError> {
        let credentials = self
            .settings
            .services
            .get(&self.target.port())
            .and_then(|s| s.credentials.as_ref());
        let timeout = self.settings.response_timeout;
        let result = match login {
            Login::Postgres(params) => tokio::time::timeout(
                timeout,
                postgres::login(&mut self.conn, params, credentials),
            )
            .await
            .map(|r| r.map_err(LoginError::Postgres)),
            Login::Mysql(handshake) => tokio::time::timeout(
                timeout,
                mysql::login(&mut self.conn, handshake, credentials),
            )
            .await
            .map(|r| {
                r.map(|negotiated| {
                    self.responses = Some(Box::new(mysql::MysqlResponses::new(negotiated)));
                })
                .map_err(LoginError::Mysql)
            }),
        };
        match result {
            Err(_) => Err(ReplayError::ResponseTimeout),
            Ok(Err(e)) => Err(ReplayError::Login(e)),
            Ok(Ok(())) => {
                self.stats.inc(ShadowCounter::Logins);
                Ok(())
            }
        }
    }

    /// Queues a message's bytes and what the server owes for them.
    fn write(&mut self, message: &Message) {
        match message.frame.action {
            Action::Terminate => self.terminated = true,
            Action::Cancel(stream) => {
                // The client gave up on the stream: its response is no longer awaited.
                self.awaited.retain(|a| a.stream != Some(stream));
                for mark in &mut self.out_marks {
                    if mark.2 == Some(stream) {
                        mark.1 = 0;
                    }
                }
            }
            _ => {}
        }
        let start = self.out.len();
        self.out.extend_from_slice(&message.bytes);
        if let Some(responses) = self.responses.as_mut() {
            if !responses.rewrite(&message.frame, &mut self.out[start..]) {
                // It names what the shadow cannot run (a MySQL statement prepared in a hole,
                // or whose parameter types were lost): never sent to mean something else.
                self.out.truncate(start);
                self.stats.inc(ShadowCounter::StatementsSkipped);
                return;
            }
            responses.expect(&message.frame);
        }
        if !self.knows_completeness() && self.opaque.as_ref().is_none_or(|r| r.ack != message.ack) {
            // A new opaque run: the live client had seen a response (or this is the first).
            self.close_opaque_run();
        }
        self.last_ack = Some(message.ack);
        self.stats
            .add(ShadowCounter::BytesReplayed, message.bytes.len() as u64);
        self.out_marks.push_back((
            self.out.len(),
            message.frame.responses,
            message.frame.stream,
        ));
        if self.awaited.is_empty() {
            self.progress = Instant::now();
        }
        // Loopback sockets take the bytes at once; only a full send buffer leaves any for the
        // select loop.
        match self.conn.try_write(&self.out) {
            Ok(n) => self.on_written(n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // The next write in the loop reports it.
            Err(_) => {}
        }
    }

    /// `n` bytes of `out` reached the socket.
    fn on_written(&mut self, n: usize) {
        let now = Instant::now();
        self.out.drain(..n);
        while let Some(&(end, responses, stream)) = self.out_marks.front() {
            if end > n {
                break;
            }
            self.out_marks.pop_front();
            for _ in 0..responses {
                self.awaited.push_back(Awaited {
                    written: now,
                    first: None,
                    stream,
                });
            }
            if !self.knows_completeness() {
                let ack = self.last_ack.unwrap_or_default();
                match &mut self.opaque {
                    Some(run) => run.written = now,
                    None => {
                        self.opaque = Some(OpaqueRun {
                            ack,
                            written: now,
                            first: None,
                            last: now,
                        });
                    }
                }
            }
        }
        for mark in &mut self.out_marks {
            mark.0 -= n;
        }
    }

    fn on_response_bytes(&mut self, n: usize) -> Result<(), ReplayError> {
        let now = Instant::now();
        self.progress = now;
        self.stats.add(ShadowCounter::BytesDiscarded, n as u64);
        let Some(responses) = self.responses.as_mut() else {
            return Ok(());
        };
        if !responses.knows_completeness() {
            if let Some(run) = &mut self.opaque {
                run.first.get_or_insert(now);
                run.last = now;
            }
            return Ok(());
        }
        self.done.clear();
        if responses.multiplexed() {
            responses
                .feed(&self.buf[..n], &mut self.done)
                .map_err(ReplayError::Response)?;
            responses.take_started(&mut self.started);
            self.on_streams(now);
            return Ok(());
        }
        if let Some(front) = self.awaited.front_mut() {
            front.first.get_or_insert(now);
        }
        responses
            .feed(&self.buf[..n], &mut self.done)
            .map_err(ReplayError::Response)?;
        for i in 0..self.done.len() {
            let completed = self.done[i];
            let Some(awaited) = self.awaited.pop_front() else {
                break;
            };
            self.record(&awaited, now, completed);
            if completed.end < n
                && let Some(next) = self.awaited.front_mut()
            {
                next.first.get_or_insert(now);
            }
        }
        Ok(())
    }

    /// Applies what a multiplexed protocol's responses said: streams whose first bytes arrived
    /// and streams completed, each matched to its own awaited response.
    fn on_streams(&mut self, now: Instant) {
        for stream in self.started.drain(..) {
            if let Some(a) = self.awaited.iter_mut().find(|a| a.stream == Some(stream)) {
                a.first.get_or_insert(now);
            }
        }
        for i in 0..self.done.len() {
            let completed = self.done[i];
            let Some(at) = self
                .awaited
                .iter()
                .position(|a| a.stream == completed.stream)
            else {
                continue;
            };
            let Some(awaited) = self.awaited.remove(at) else {
                continue;
            };
            if !completed.unanswered {
                self.record(&awaited, now, completed);
            }
        }
    }

    fn record(&self, awaited: &Awaited, now: Instant, completed: Completed) {
        let first = awaited.first.unwrap_or(now);
        self.stats.record(
            self.class,
            first.saturating_duration_since(awaited.written).as_nanos() as u64,
            now.saturating_duration_since(awaited.written).as_nanos() as u64,
        );
        self.stats.inc(ShadowCounter::Exchanges);
        if let Some(status) = completed.status {
            self.stats.inc(match status / 100 {
                1 => ShadowCounter::Status1xx,
                2 => ShadowCounter::Status2xx,
                3 => ShadowCounter::Status3xx,
                4 => ShadowCounter::Status4xx,
                _ => ShadowCounter::Status5xx,
            });
        }
        if completed.error == Some(ErrorReply::Protocol) {
            self.stats.inc(ShadowCounter::ErrorReplies);
        }
    }

    /// Ends the opaque run in progress, recording it if the server answered it.
    fn close_opaque_run(&mut self) {
        if let Some(run) = self.opaque.take()
            && let Some(first) = run.first
        {
            self.stats.record(
                self.class,
                first.saturating_duration_since(run.written).as_nanos() as u64,
                run.last.saturating_duration_since(run.written).as_nanos() as u64,
            );
            self.stats.inc(ShadowCounter::Exchanges);
        }
    }

    /// The workload closed the connection.
    fn server_closed(&mut self) -> Result<(), ReplayError> {
        let now = Instant::now();
        if let Some(completed) = self.responses.as_mut().and_then(|r| r.close_completes())
            && let Some(awaited) = self.awaited.pop_front()
        {
            self.record(&awaited, now, completed);
        }
        self.close_opaque_run();
        if self.awaited.is_empty() || self.terminated {
            // After the client's Terminate, or with nothing outstanding (an HTTP
            // `Connection: close`, an idle timeout): the normal end of a session.
            return Ok(());
        }
        Err(ReplayError::Reset(std::io::ErrorKind::UnexpectedEof.into()))
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}
