-- The device registry, deployments and the hub's settings.
--
-- Written in the SQL that SQLite and PostgreSQL share: the hub runs the same migrations
-- and the same queries on both. Times are milliseconds since the Unix epoch; JSON is
-- kept as text; flags are 0 or 1.

CREATE TABLE devices (
    id TEXT PRIMARY KEY,
    -- The device's tags, a JSON object of strings.
    tags TEXT NOT NULL,
    -- Random, per device: keys are derived from it, so a device deleted and created
    -- again under the same id gets new keys.
    nonce TEXT NOT NULL,
    -- Bumped to rotate (and so revoke) one key.
    primary_generation BIGINT NOT NULL,
    secondary_generation BIGINT NOT NULL,
    enabled BIGINT NOT NULL,
    created_ms BIGINT NOT NULL,
    last_seen_ms BIGINT,
    -- The device's last report, as JSON, and when it came.
    report TEXT,
    reported_ms BIGINT
);

CREATE TABLE deployments (
    name TEXT PRIMARY KEY,
    -- 1 when created, one more on each update.
    version BIGINT NOT NULL,
    -- The fleet's change generation this version was written at: unique across
    -- deployments, even one deleted and created again, so it names exactly one
    -- desired state.
    revision BIGINT NOT NULL,
    priority BIGINT NOT NULL,
    target_condition TEXT NOT NULL,
    -- The pipeline documents, a JSON array of {"name", "yaml"}.
    pipelines TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE hub_settings (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- One row: bumped by every change that can move a device's desired state, so hubs
-- sharing the database notice each other's changes by reading one number.
CREATE TABLE hub_changes (
    id BIGINT PRIMARY KEY,
    generation BIGINT NOT NULL
);

INSERT INTO hub_changes (id, generation) VALUES (1, 0);
