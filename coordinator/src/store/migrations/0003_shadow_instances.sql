-- doppel coordinator store, version 2: the Shadow Instance Manager's instances and their history.
-- Times are milliseconds since the Unix epoch.

CREATE TABLE shadow_instances (
    id             TEXT PRIMARY KEY,            -- 8 hex digits; names the netns, cgroup, agent
    workload       TEXT NOT NULL,               -- no foreign key: an instance outlives its workload
                                                -- until it is destroyed
    vm_type        TEXT NOT NULL,
    provisioner    TEXT NOT NULL,               -- local, exec
    origin         TEXT NOT NULL,               -- auto (the manager's), manual (doppel shadows create)
    state          TEXT NOT NULL,               -- creating, running, paused, destroying, destroyed, failed
    vni            INTEGER NOT NULL,
    agent          TEXT NOT NULL,
    addr           TEXT,                        -- VXLAN endpoint, once created
    price_per_hour REAL NOT NULL,               -- catalog price when created
    handle         TEXT NOT NULL DEFAULT 'null', -- the provisioner's JSON handle
    error          TEXT,                        -- why it failed or was replaced
    created_ms     INTEGER NOT NULL,
    running_ms     INTEGER,                     -- when it started running
    updated_ms     INTEGER NOT NULL
);
CREATE INDEX shadow_instances_by_state ON shadow_instances (state, workload);

-- Every state change of every instance, oldest first.
CREATE TABLE shadow_events (
    id          INTEGER PRIMARY KEY,
    instance_id TEXT NOT NULL,
    at_ms       INTEGER NOT NULL,
    state       TEXT NOT NULL,
    detail      TEXT
);
CREATE INDEX shadow_events_by_instance ON shadow_events (instance_id, id);
