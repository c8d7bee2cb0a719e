"""Weir transform module that multiplies one float64 column by a constant.

It proves the data really went through Python: the output differs from the input in a
way the test (or a pipeline) can check. Configuration comes from the environment, which
the runtime passes through to the module process:

* ``SCALE_COLUMN`` -- the float64 column to scale (default ``value``);
* ``SCALE_FACTOR`` -- the multiplier (default ``2``).

A batch without that column, or with it in another type, is a bad batch (``400``): it
will never succeed, so the runtime dead-letters it rather than retrying.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

import weir_module  # noqa: E402


def read_config():
    """Reads SCALE_COLUMN and SCALE_FACTOR, exiting with a clear message when invalid."""
    column = os.environ.get("SCALE_COLUMN", "value")
    factor_text = os.environ.get("SCALE_FACTOR", "2")
    try:
        factor = float(factor_text)
    except ValueError:
        sys.stderr.write(f"scale.py: SCALE_FACTOR={factor_text!r} is not a number\n")
        sys.exit(2)
    return column, factor


COLUMN, FACTOR = read_config()


def scale(batch: pa.RecordBatch) -> pa.RecordBatch:
    """Returns the batch with COLUMN multiplied by FACTOR; other columns untouched."""
    index = batch.schema.get_field_index(COLUMN)
    if index < 0:
        raise weir_module.BadBatch(
            f"scale.py: column {COLUMN!r} is missing; the batch has {batch.schema.names}"
        )
    field = batch.schema.field(index)
    if field.type != pa.float64():
        raise weir_module.BadBatch(
            f"scale.py: column {COLUMN!r} is {field.type}, expected double (float64)"
        )
    columns = list(batch.columns)
    columns[index] = pc.multiply(batch.column(index), pa.scalar(FACTOR, pa.float64()))
    return pa.RecordBatch.from_arrays(columns, schema=batch.schema)


if __name__ == "__main__":
    weir_module.serve_transform(scale)
