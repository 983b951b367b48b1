//! The candidate filter: which VM types a decision may name. Both decision paths (the
//! comparison's [`crate::compare::advise`] and the forecast's
//! [`crate::decision::DecisionState::decide`], through [`crate::capacity::CapacityModels`]) use
//! it, so a type excluded here is excluded everywhere.
//!
//! A type is a candidate when the budget allows its price and it does not fail clearly more of
//! its exchanges than its peers.

/// How many more of its replayed exchanges a shadow type may fail than the shadow type failing
/// least (5xx, resets, timeouts, refused connections: the shadow agent's `exchange_errors`) and
/// still be recommended. A type that fails requests answers them fast, so without this its
/// latency would argue for it. The bar is relative because every shadow replays the same
/// requests: those the workload fails anywhere (a 5xx it also returns live) fail on every type
/// alike, and only the excess is the type's own.
pub const MAX_EXCESS_ERROR_RATE: f64 = 0.01;

/// Whether a type with `error_rate` fails clearly more than the best of `shadow_rates` (the
/// error rates of every measured shadow type, its own included).
pub fn fails_more_than_its_peers(
    error_rate: Option<f64>,
    shadow_rates: impl IntoIterator<Item = f64>,
) -> bool {
    let best = shadow_rates.into_iter().fold(f64::INFINITY, f64::min);
    error_rate.is_some_and(|e| e > best + MAX_EXCESS_ERROR_RATE)
}

/// Whether a type priced `price` per hour (per instance) fits a budget of `max_cost_per_hour`.
/// A budget with an unknown price cannot be shown to fit.
pub fn within_budget(max_cost_per_hour: Option<f64>, price: Option<f64>) -> bool {
    match (max_cost_per_hour, price) {
        (None, _) => true,
        (Some(max), Some(price)) => price <= max,
        (Some(_), None) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_excess_over_the_best_peer_counts() {
        assert!(!fails_more_than_its_peers(Some(0.05), [0.05, 0.045]));
        assert!(fails_more_than_its_peers(Some(0.07), [0.05, 0.07]));
        assert!(!fails_more_than_its_peers(None, [0.0]));
    }

    #[test]
    fn an_unknown_price_never_fits_a_budget() {
        assert!(within_budget(None, None));
        assert!(within_budget(Some(0.2), Some(0.2)));
        assert!(!within_budget(Some(0.2), Some(0.21)));
        assert!(!within_budget(Some(0.2), None));
    }
}
