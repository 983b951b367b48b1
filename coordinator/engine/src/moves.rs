//! The act policy: whether a move may follow the last one. Every recommendation passes it,
//! whichever rule advised it (the comparison's or the forecast's), before it is stored, sent or
//! acted on.
//!
//! - **One move at a time.** No new move while the last one is running or its verification is
//!   pending: until live has been measured on the new type, nothing is known that a second move
//!   could rest on (the demo once moved small -> medium and 16 s later medium -> xlarge, on a
//!   forecast made before the first move had been checked).
//! - **A cooldown after every move.** For [`ActPolicy::cooldown_secs`] after a move finished,
//!   no further move, so moves cannot be reversed inside it (flapping). One exception: a move
//!   whose verification found the SLO still broken may be followed at once by a move that
//!   escapes a broken SLO ([`crate::compare::Trigger::is_urgent`]): waiting would only prolong
//!   the breach.
//! - **A failed move** (the action's command failed) moved nothing, so it holds nothing back.
//! - **Advice without acting** (recommend mode): once a move away from a type has been advised,
//!   advice for a different move away from the same type is held for the cooldown unless it is
//!   urgent and the first was not, so the operator is not sent a new answer every minute.
//!
//! Sans-IO: the caller passes the last move as the store recorded it and the time.

use crate::Timestamp;

/// How moves may follow one another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActPolicy {
    /// No new move for this long after a move finished, seconds.
    pub cooldown_secs: u64,
}

impl Default for ActPolicy {
    fn default() -> Self {
        Self {
            cooldown_secs: 30 * 60,
        }
    }
}

/// Where the last move stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MoveOutcome {
    /// Its action is running.
    Running,
    /// Done; live's latency on the new type is not checked yet.
    AwaitingVerification,
    /// Done, and live held its SLO afterwards.
    Recovered,
    /// Done, and live still broke its SLO afterwards.
    NotRecovered,
    /// The action failed: nothing moved.
    Failed,
    /// Advised only (recommend mode): nothing is known to have moved.
    Advised {
        /// Whether the advice escaped a broken SLO.
        urgent: bool,
    },
}

/// The last move of a workload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastMove {
    /// The type it left (or was advised to leave).
    pub from: String,
    /// The type it went to (or was advised).
    pub to: String,
    /// When it finished (or was advised), seconds.
    pub at: Timestamp,
    /// Where it stands.
    pub outcome: MoveOutcome,
}

/// Why a move is held back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoveHold {
    /// The last move's action is still running.
    InFlight,
    /// The last move is not verified yet.
    AwaitingVerification,
    /// Inside the cooldown of the last move.
    Cooldown {
        /// When the cooldown ends, seconds.
        until: Timestamp,
    },
}

impl MoveHold {
    /// A short reason, as logged and shown.
    pub fn describe(&self) -> String {
        match self {
            Self::InFlight => "the last move is still running".to_owned(),
            Self::AwaitingVerification => "the last move is not verified yet".to_owned(),
            Self::Cooldown { until } => format!("cooldown after the last move until {until}"),
        }
    }
}

/// Whether a move from `from` to `to` (escaping a broken SLO when `urgent`) may be advised at
/// `now`, after `last`.
pub fn may_move(
    policy: &ActPolicy,
    now: Timestamp,
    last: Option<&LastMove>,
    from: &str,
    to: &str,
    urgent: bool,
) -> Result<(), MoveHold> {
    let Some(last) = last else {
        return Ok(());
    };
    let until = last.at.saturating_add(policy.cooldown_secs);
    let cooling = now < until;
    match last.outcome {
        MoveOutcome::Running => Err(MoveHold::InFlight),
        MoveOutcome::AwaitingVerification => Err(MoveHold::AwaitingVerification),
        MoveOutcome::Failed => Ok(()),
        MoveOutcome::NotRecovered if urgent => Ok(()),
        MoveOutcome::Recovered | MoveOutcome::NotRecovered if cooling => {
            Err(MoveHold::Cooldown { until })
        }
        MoveOutcome::Recovered | MoveOutcome::NotRecovered => Ok(()),
        MoveOutcome::Advised { urgent: was_urgent } => {
            let changed_mind = last.from == from && last.to != to;
            // Advice may turn urgent; it may not otherwise change inside the cooldown.
            let escalates = urgent && !was_urgent;
            if cooling && changed_mind && !escalates {
                Err(MoveHold::Cooldown { until })
            } else {
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn last(outcome: MoveOutcome, at: Timestamp) -> LastMove {
        LastMove {
            from: "small".into(),
            to: "medium".into(),
            at,
            outcome,
        }
    }

    const POLICY: ActPolicy = ActPolicy { cooldown_secs: 600 };

    #[test]
    fn nothing_follows_a_move_before_it_is_verified() {
        for (outcome, hold) in [
            (MoveOutcome::Running, MoveHold::InFlight),
            (
                MoveOutcome::AwaitingVerification,
                MoveHold::AwaitingVerification,
            ),
        ] {
            // However long ago, however urgent.
            assert_eq!(
                may_move(
                    &POLICY,
                    1_000_000,
                    Some(&last(outcome, 0)),
                    "medium",
                    "xlarge",
                    true
                ),
                Err(hold)
            );
        }
        assert_eq!(may_move(&POLICY, 5, None, "small", "medium", false), Ok(()));
    }

    #[test]
    fn a_verified_move_cools_down_and_a_failed_one_does_not() {
        let recovered = last(MoveOutcome::Recovered, 1000);
        assert_eq!(
            may_move(&POLICY, 1599, Some(&recovered), "medium", "small", false),
            Err(MoveHold::Cooldown { until: 1600 }),
            "reversing inside the cooldown is a flap"
        );
        assert_eq!(
            may_move(&POLICY, 1599, Some(&recovered), "medium", "xlarge", true),
            Err(MoveHold::Cooldown { until: 1600 })
        );
        assert_eq!(
            may_move(&POLICY, 1600, Some(&recovered), "medium", "small", false),
            Ok(())
        );
        let failed = last(MoveOutcome::Failed, 1000);
        assert_eq!(
            may_move(&POLICY, 1001, Some(&failed), "small", "large", false),
            Ok(())
        );
    }

    #[test]
    fn a_move_that_did_not_recover_may_be_followed_only_by_an_escape() {
        let not_recovered = last(MoveOutcome::NotRecovered, 1000);
        assert_eq!(
            may_move(&POLICY, 1001, Some(&not_recovered), "medium", "large", true),
            Ok(())
        );
        assert_eq!(
            may_move(
                &POLICY,
                1001,
                Some(&not_recovered),
                "medium",
                "small",
                false
            ),
            Err(MoveHold::Cooldown { until: 1600 })
        );
    }

    #[test]
    fn advice_does_not_change_its_mind_inside_the_cooldown_unless_the_slo_now_breaks() {
        let advised = last(MoveOutcome::Advised { urgent: false }, 1000);
        // The same advice again is no change of mind.
        assert_eq!(
            may_move(&POLICY, 1100, Some(&advised), "small", "medium", false),
            Ok(())
        );
        assert_eq!(
            may_move(&POLICY, 1100, Some(&advised), "small", "large", false),
            Err(MoveHold::Cooldown { until: 1600 })
        );
        assert_eq!(
            may_move(&POLICY, 1100, Some(&advised), "small", "large", true),
            Ok(())
        );
        let urgent = last(MoveOutcome::Advised { urgent: true }, 1000);
        assert_eq!(
            may_move(&POLICY, 1100, Some(&urgent), "small", "xlarge", true),
            Err(MoveHold::Cooldown { until: 1600 })
        );
        // Once live is on another type, advice about it is new.
        assert_eq!(
            may_move(&POLICY, 1100, Some(&urgent), "medium", "large", true),
            Ok(())
        );
    }
}
