-- doppel coordinator store, version 2: the predictor's output (see crate::forecast).

-- The latest forecast of each workload: load forecast, performance models, warning state.
CREATE TABLE forecasts (
    workload    TEXT PRIMARY KEY,
    computed_ms INTEGER NOT NULL,
    body        TEXT NOT NULL                 -- JSON ForecastSnapshot
);

-- Degradation warnings, one row per episode: raised, updated while it stays raised, cleared.
CREATE TABLE forecast_warnings (
    id         INTEGER PRIMARY KEY,
    workload   TEXT NOT NULL,
    vm_type    TEXT NOT NULL,                 -- the live type expected to break its SLO
    raised_ms  INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    cleared_ms INTEGER,                       -- NULL while raised
    body       TEXT NOT NULL                  -- JSON of the latest evaluation while raised
);
CREATE INDEX forecast_warnings_by_workload ON forecast_warnings (workload, cleared_ms);
