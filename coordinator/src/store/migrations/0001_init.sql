-- doppel coordinator store, version 1. Times are milliseconds since the Unix epoch.

CREATE TABLE agents (
    id            INTEGER PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,       -- certificate common name
    hostname      TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    roles         TEXT NOT NULL DEFAULT '',   -- comma-separated: live, shadow
    cert_serial   TEXT NOT NULL DEFAULT '',
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    connected     INTEGER NOT NULL DEFAULT 0,
    last_seq      INTEGER                     -- highest report sequence stored
);

CREATE TABLE workloads (
    name       TEXT PRIMARY KEY,
    spec       TEXT NOT NULL,                 -- JSON WorkloadSpec, policy included
    revision   INTEGER NOT NULL,              -- policy revision of the last change
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);

-- Every policy a workload had, newest last: what agents were told, and when.
CREATE TABLE policies (
    id         INTEGER PRIMARY KEY,
    workload   TEXT NOT NULL,
    revision   INTEGER NOT NULL,
    policy     TEXT NOT NULL,                 -- JSON Policy
    changed_ms INTEGER NOT NULL
);

-- Mirror sessions: which shadow (agent, VM type) receives a workload's sampled flows.
CREATE TABLE shadow_sessions (
    workload    TEXT NOT NULL REFERENCES workloads(name) ON DELETE CASCADE,
    vni         INTEGER NOT NULL,
    agent       TEXT NOT NULL,
    vm_type     TEXT NOT NULL,
    shadow_addr TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    PRIMARY KEY (workload, vni)
);

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (key, value) VALUES ('policy_revision', 0);

-- One row per report; (agent_id, seq) makes each report count once.
CREATE TABLE reports (
    id                  INTEGER PRIMARY KEY,
    agent_id            INTEGER NOT NULL REFERENCES agents(id),
    seq                 INTEGER NOT NULL,
    interval_start_ms   INTEGER NOT NULL,
    interval_ms         INTEGER NOT NULL,
    received_ms         INTEGER NOT NULL,
    host_cpu_time_us    INTEGER NOT NULL,
    host_cpu_capacity_millis INTEGER NOT NULL,
    host_memory_used    INTEGER NOT NULL,
    host_memory_limit   INTEGER NOT NULL,
    host_net_rx         INTEGER NOT NULL,
    host_net_tx         INTEGER NOT NULL,
    host_disk_read      INTEGER NOT NULL,
    host_disk_write     INTEGER NOT NULL,
    workload_usage      TEXT,                 -- JSON ResourceUsage, when the agent knows it
    rejected_histograms INTEGER NOT NULL DEFAULT 0,
    UNIQUE (agent_id, seq)
);
CREATE INDEX reports_by_time ON reports (interval_start_ms);
CREATE INDEX reports_by_agent_time ON reports (agent_id, interval_start_ms);

CREATE TABLE histograms (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    service   TEXT NOT NULL,
    class     INTEGER NOT NULL,
    scope     INTEGER NOT NULL,               -- 0 all flows, 1 mirrored flows
    metric    INTEGER NOT NULL,               -- 0 kernel first byte, 1 replay first, 2 replay last
    count     INTEGER NOT NULL,               -- exchanges in the interval
    hist      BLOB NOT NULL                   -- HdrHistogram V2, nanoseconds
);
CREATE INDEX histograms_by_report ON histograms (report_id);

CREATE TABLE counters (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    name      TEXT NOT NULL,
    value     INTEGER NOT NULL
);
CREATE INDEX counters_by_report ON counters (report_id);

CREATE TABLE patterns (
    report_id INTEGER NOT NULL REFERENCES reports(id) ON DELETE CASCADE,
    pattern   TEXT NOT NULL,
    flows     INTEGER NOT NULL
);

CREATE TABLE comparisons (
    id          INTEGER PRIMARY KEY,
    workload    TEXT NOT NULL,
    computed_ms INTEGER NOT NULL,
    window_ms   INTEGER NOT NULL,
    result      TEXT NOT NULL                 -- JSON Comparison
);
CREATE INDEX comparisons_by_workload ON comparisons (workload, computed_ms);

CREATE TABLE recommendations (
    id                  INTEGER PRIMARY KEY,
    workload            TEXT NOT NULL,
    created_ms          INTEGER NOT NULL,
    idempotency_key     TEXT NOT NULL UNIQUE,
    reason              TEXT NOT NULL,
    current_vm_type     TEXT NOT NULL,
    recommended_vm_type TEXT NOT NULL,
    body                TEXT NOT NULL         -- the JSON POSTed to webhooks
);

CREATE TABLE webhook_outbox (
    id              INTEGER PRIMARY KEY,
    recommendation_id INTEGER NOT NULL REFERENCES recommendations(id) ON DELETE CASCADE,
    url             TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_ms INTEGER NOT NULL,
    delivered_ms    INTEGER,
    given_up_ms     INTEGER,
    last_error      TEXT,
    UNIQUE (url, idempotency_key)
);
CREATE INDEX outbox_due ON webhook_outbox (delivered_ms, given_up_ms, next_attempt_ms);

CREATE TABLE webhook_deliveries (
    id          INTEGER PRIMARY KEY,
    outbox_id   INTEGER NOT NULL REFERENCES webhook_outbox(id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    at_ms       INTEGER NOT NULL,
    status      INTEGER,                      -- HTTP status, NULL when no response
    error       TEXT,
    duration_ms INTEGER NOT NULL
);
