"""Test-only transform module steered by the batches it receives.

Each input batch has a utf8 column ``command`` whose first value says what to do, so one
process can exercise every answer of the protocol:

* ``echo``        -- return ``batch_id`` (int64) and ``command`` columns;
* ``fail``        -- raise RuntimeError with a two-line message (expect 500);
* ``bad``         -- raise BadBatch (expect 400);
* ``unhealthy`` / ``healthy`` -- set_healthy(False/True), then echo;
* ``sleep:S``     -- touch $CONTROL_STARTED_FILE, sleep S seconds, then echo;
* ``empty``       -- return None (expect an empty 200 body);
* ``many``        -- return the echo batch twice, as a list;
* ``mixed``       -- return batches with two different schemas (expect 500);
* ``wrongtype``   -- return a str (expect 500).

With CONTROL_START_UNHEALTHY=1 the module starts unhealthy.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import pyarrow as pa  # noqa: E402

import weir_module  # noqa: E402


def echo_batch(batch_id, command):
    return pa.record_batch(
        [pa.array([batch_id], pa.int64()), pa.array([command], pa.string())],
        names=["batch_id", "command"],
    )


def control(batch, batch_id):
    command = batch.column(batch.schema.get_field_index("command"))[0].as_py()
    if command == "fail":
        raise RuntimeError("boom on purpose\nsecond line")
    if command == "bad":
        raise weir_module.BadBatch(f"bad on purpose in batch {batch_id}")
    if command == "unhealthy":
        weir_module.set_healthy(False)
    elif command == "healthy":
        weir_module.set_healthy(True)
    elif command.startswith("sleep:"):
        started = os.environ.get("CONTROL_STARTED_FILE")
        if started:
            with open(started, "w") as marker:
                marker.write(str(batch_id))
        time.sleep(float(command.split(":", 1)[1]))
    elif command == "empty":
        return None
    elif command == "many":
        return [echo_batch(batch_id, command), echo_batch(batch_id, command)]
    elif command == "mixed":
        other = pa.record_batch([pa.array([1.5])], names=["x"])
        return [echo_batch(batch_id, command), other]
    elif command == "wrongtype":
        return "not a batch"
    return echo_batch(batch_id, command)


if __name__ == "__main__":
    if os.environ.get("CONTROL_START_UNHEALTHY") == "1":
        weir_module.set_healthy(False)
    weir_module.serve_transform(control)
