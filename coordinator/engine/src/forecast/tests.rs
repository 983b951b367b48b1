use super::*;

fn daily(days: usize, m: usize) -> Vec<f64> {
    (0..days * m)
        .map(|i| {
            let phase = (i % m) as f64 / m as f64 * std::f64::consts::TAU;
            100.0 + 40.0 * phase.sin()
        })
        .collect()
}

#[test]
fn pure_seasonal_series_is_forecast_almost_exactly() {
    let config = ForecastConfig::every_five_minutes();
    let y = daily(7, 288);
    let now = (y.len() as u64 - 1) * 300;
    let model = LoadForecaster::fit(&config, &y, now).unwrap();
    assert!(matches!(model.kind(), ModelKind::SeasonalHolt { .. }));
    for h in [1, 12, 100, 288] {
        let expected = y[y.len() - 288 + (h - 1) % 288];
        let got = model.median(h);
        assert!(
            (got - expected).abs() < 0.02 * expected,
            "h={h}: {got} vs {expected}"
        );
    }
}

#[test]
fn short_history_is_a_cold_start_and_says_so() {
    let config = ForecastConfig::every_five_minutes();
    let y = daily(1, 100);
    let model = LoadForecaster::fit(&config, &y, 100 * 300).unwrap();
    assert!(matches!(
        model.kind(),
        ModelKind::ColdStart {
            history_steps: 100,
            season_steps: 288,
            ..
        }
    ));
    assert_eq!(model.forecast(3).model, model.kind());
}

#[test]
fn bad_input_is_refused() {
    let config = ForecastConfig::per_minute();
    assert_eq!(
        LoadForecaster::fit(&config, &[1.0, 2.0], 0),
        Err(ForecastError::TooLittleHistory { have: 2, need: 4 })
    );
    assert_eq!(
        LoadForecaster::fit(&config, &[1.0, 2.0, -1.0, 1.0], 0),
        Err(ForecastError::BadObservation {
            index: 2,
            value: -1.0
        })
    );
    assert!(matches!(
        LoadForecaster::fit(&config, &[1.0, f64::NAN, 1.0, 1.0], 0),
        Err(ForecastError::BadObservation { index: 1, .. })
    ));
}
