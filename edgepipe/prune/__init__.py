"""Pruning: structured (Torch-Pruning) for measured ORT latency, or unstructured for size."""

import importlib

# Imported on first use: the stage modules need torch or onnx, the reports do not.
_WHERE = {
    "PruneConfig": "edgepipe.prune.structured",
    "prune": "edgepipe.prune.structured",
    "PruneReport": "edgepipe.prune.report",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
