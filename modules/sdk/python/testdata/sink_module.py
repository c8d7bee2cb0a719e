"""Test-only sink module: appends ``<batch_id> <rows> <sum of value>`` per batch to SINK_OUT.

It returns the batch it got, to prove serve_sink ignores return values (the answer must
be an empty 200).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import pyarrow.compute as pc  # noqa: E402

import weir_module  # noqa: E402


def write(batch, batch_id):
    total = pc.sum(batch.column(batch.schema.get_field_index("value"))).as_py()
    with open(os.environ["SINK_OUT"], "a") as out:
        out.write(f"{batch_id} {batch.num_rows} {total}\n")
    return batch


if __name__ == "__main__":
    weir_module.serve_sink(write)
