-- Each fleet table's columns as the hub has taken them: the Arrow schema of every column
-- its batches brought (the hub's own hub_* columns aside), as a base64 Arrow IPC schema
-- message. A batch whose column has another type than the table's is refused (422), so
-- one device cannot break every query of a table others ship to. Tables shipped to
-- before this migration get their row from their next batch.
CREATE TABLE hub_stream_columns (
    pipeline TEXT NOT NULL,
    sink TEXT NOT NULL,
    columns TEXT NOT NULL,
    PRIMARY KEY (pipeline, sink)
);
