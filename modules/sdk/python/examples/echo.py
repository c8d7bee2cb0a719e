"""Weir transform module that returns every batch unchanged.

The smallest useful module: it shows the wiring (environment, socket, health, Arrow IPC
bodies) with no logic in the way, so a pipeline can test the module path end to end.

Run by the Weir runtime as a process module, e.g.

    transforms:
      echo:
        kind: module
        inputs: [sensors]
        config: {command: [python3, modules/sdk/python/examples/echo.py]}
"""

import os
import sys

# weir_module.py is one directory up; a module copied elsewhere ships it alongside.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

import weir_module  # noqa: E402


def echo(batch):
    """Returns the input batch as the output batch."""
    return batch


if __name__ == "__main__":
    weir_module.serve_transform(echo)
