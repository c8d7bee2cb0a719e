-- Compaction looks only at the directories that received batches lately: found by the
-- time each batch arrived.
CREATE INDEX hub_ingested_arrived ON hub_ingested (arrived_ms);
