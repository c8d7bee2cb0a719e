-- Each batch's directory (pipeline=P/sink=S/date=D/device=ID), kept beside its object:
-- compaction finds the directories that received batches lately by the time each batch
-- arrived, and the files of a directory that records point at. Objects written before
-- this migration are all `DIRECTORY/` + 20 digits + `.parquet` (29 characters).
ALTER TABLE hub_ingested ADD COLUMN directory TEXT NOT NULL DEFAULT '';
UPDATE hub_ingested SET directory = substr(object, 1, length(object) - 29);
CREATE INDEX hub_ingested_arrived ON hub_ingested (arrived_ms);

-- Every (pipeline, sink) devices have shipped data for: the fleet's tables, listed for
-- each query without reading hub_ingested, which grows by a row per batch.
CREATE TABLE hub_streams (
    pipeline TEXT NOT NULL,
    sink TEXT NOT NULL,
    PRIMARY KEY (pipeline, sink)
);
INSERT INTO hub_streams (pipeline, sink) SELECT DISTINCT pipeline, sink FROM hub_ingested;
