-- Compaction looks only at the directories that received batches lately: found by the
-- time each batch arrived.
CREATE INDEX hub_ingested_arrived ON hub_ingested (arrived_ms);

-- Every (pipeline, sink) devices have shipped data for: the fleet's tables, listed for
-- each query without reading hub_ingested, which grows by a row per batch.
CREATE TABLE hub_streams (
    pipeline TEXT NOT NULL,
    sink TEXT NOT NULL,
    PRIMARY KEY (pipeline, sink)
);
INSERT INTO hub_streams (pipeline, sink) SELECT DISTINCT pipeline, sink FROM hub_ingested;
