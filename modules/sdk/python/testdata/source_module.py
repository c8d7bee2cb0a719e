"""Test-only source module: yields SOURCE_BATCHES batches through run_source.

Batch i has columns ``seq`` (int64, [i, i]) and ``value`` (float64, [i / 2, -i]).
With SOURCE_BLOCK=1 the generator then blocks forever (to test SIGTERM); its ``finally``
writes SOURCE_CLOSED_FILE, proving the SDK closed the generator. Prints
``taken N`` on stdout when run_source returns.
"""

import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import pyarrow as pa  # noqa: E402

import weir_module  # noqa: E402


def batches():
    try:
        for i in range(int(os.environ.get("SOURCE_BATCHES", "3"))):
            yield pa.record_batch(
                [pa.array([i, i], pa.int64()), pa.array([i / 2, -float(i)], pa.float64())],
                names=["seq", "value"],
            )
        if os.environ.get("SOURCE_BLOCK") == "1":
            while True:
                time.sleep(3600)
    finally:
        closed = os.environ.get("SOURCE_CLOSED_FILE")
        if closed:
            with open(closed, "w") as marker:
                marker.write("closed")


if __name__ == "__main__":
    taken = weir_module.run_source(batches, retry_initial=0.02, retry_max=0.2)
    print(f"taken {taken}", flush=True)
