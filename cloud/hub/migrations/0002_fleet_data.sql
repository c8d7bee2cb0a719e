-- The batches devices have shipped, one row per (device, pipeline, sink, sequence): a
-- batch sent again is found here and acknowledged without being stored twice.
CREATE TABLE hub_ingested (
    device TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    sink TEXT NOT NULL,
    seq BIGINT NOT NULL,
    rows BIGINT NOT NULL,
    object TEXT NOT NULL,
    arrived_ms BIGINT NOT NULL,
    PRIMARY KEY (device, pipeline, sink, seq)
);
CREATE INDEX hub_ingested_stream ON hub_ingested (pipeline, sink);
