-- Act mode: one scale action per recommendation acted on, its outcome, and whether latency
-- came back under the SLO afterwards.
CREATE TABLE actions (
    id                INTEGER PRIMARY KEY,
    workload          TEXT NOT NULL,
    recommendation_id INTEGER NOT NULL UNIQUE REFERENCES recommendations(id) ON DELETE CASCADE,
    action            TEXT NOT NULL,          -- the serve config's action name
    from_vm_type      TEXT NOT NULL,
    to_vm_type        TEXT NOT NULL,
    state             TEXT NOT NULL,          -- running, failed, done, verified, not_recovered
    started_ms        INTEGER NOT NULL,
    finished_ms       INTEGER,
    verified_ms       INTEGER,
    detail            TEXT NOT NULL DEFAULT '', -- exit status and output tail, or why it failed
    live_latency_ms   REAL                    -- live's SLO percentile when verified
);
CREATE INDEX actions_by_workload ON actions (workload, id);
