-- doppel coordinator store, version 5: learned mirroring (crate::mirror).

-- The latest mirror plan of each workload that learns its mirroring: the classes, rules and
-- rates its agents were last sent, and the pattern mix they were learned from.
CREATE TABLE mirror_plans (
    workload   TEXT PRIMARY KEY,
    revision   INTEGER NOT NULL,              -- policy revision that carried it to the agents
    changed_ms INTEGER NOT NULL,
    body       TEXT NOT NULL                  -- JSON StoredMirrorPlan
);
