//! A one-shot timer with microsecond precision for pacing replayed messages.
//!
//! tokio's timer wheel has a 1 ms tick and rounds every deadline up to it, so a closed-loop
//! client whose next request follows its response by 100 µs would be replayed up to 1 ms late
//! on every exchange: at 500 exchanges/s per connection that alone stretches the replay by half.
//! A `timerfd` (CLOCK_MONOTONIC, the clock `Instant` reads on Linux) registered with tokio's
//! reactor wakes the task within the scheduler's latency instead.

use std::{
    os::fd::{AsFd as _, AsRawFd, RawFd},
    time::{Duration, Instant},
};

use nix::sys::{
    time::TimeSpec,
    timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags},
};
use tokio::io::unix::AsyncFd;

struct Fd(TimerFd);

impl AsRawFd for Fd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

/// A re-armable one-shot timer.
pub struct PreciseTimer {
    fd: AsyncFd<Fd>,
    armed: Option<Instant>,
}

impl std::fmt::Debug for PreciseTimer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreciseTimer")
            .field("armed", &self.armed)
            .finish_non_exhaustive()
    }
}

impl PreciseTimer {
    /// A disarmed timer. Must be called inside a tokio runtime.
    #[expect(
        deprecated,
        reason = "AsyncFd::new is deprecated because a borrowed fd could close under it; `Fd` \
                  owns its TimerFd, which lives exactly as long as the registration"
    )]
    pub fn new() -> std::io::Result<Self> {
        let fd = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )?;
        Ok(Self {
            fd: AsyncFd::new(Fd(fd))?,
            armed: None,
        })
    }

    /// The deadline armed, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.armed
    }

    /// Arms the timer for `at` (at once if it has passed), unless it already is for `at`.
    pub fn arm(&mut self, at: Instant) -> std::io::Result<()> {
        if self.armed == Some(at) {
            return Ok(());
        }
        // A zero expiration would disarm the timerfd: fire after 1 ns instead.
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_nanos(1));
        self.fd.get_ref().0.set(
            Expiration::OneShot(TimeSpec::from_duration(after)),
            TimerSetTimeFlags::empty(),
        )?;
        self.armed = Some(at);
        Ok(())
    }

    /// Disarms the timer.
    pub fn disarm(&mut self) {
        if self.armed.take().is_some() {
            let _ = self.fd.get_ref().0.unset();
        }
    }

    /// Waits until the armed deadline; pends forever when disarmed. Cancel-safe.
    pub async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        loop {
            let Ok(mut guard) = self.fd.readable().await else {
                return std::future::pending().await;
            };
            // Reading the expiration count clears readiness; EAGAIN means not yet.
            match guard.try_io(|fd| fd.get_ref().0.wait().map_err(std::io::Error::from)) {
                Ok(_) => {
                    self.armed = None;
                    return;
                }
                Err(_would_block) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_timer_fires_at_its_deadline_not_a_tick_later() {
        let mut timer = PreciseTimer::new().unwrap();
        let mut late = Vec::new();
        for _ in 0..20 {
            let at = Instant::now() + Duration::from_micros(300);
            timer.arm(at).unwrap();
            timer.fired().await;
            let now = Instant::now();
            assert!(now >= at, "fired early");
            late.push(now - at);
        }
        late.sort();
        // tokio's sleep would be up to 1 ms late on each; the median here stays well below.
        assert!(
            late[10] < Duration::from_micros(700),
            "median lateness {:?}",
            late[10]
        );
    }
}
