"""Pruning: structured (Torch-Pruning) for measured ORT latency, or unstructured for size."""

from edgepipe.lazy import lazy_exports

# Imported on first use (the stage modules need torch or onnx; reports and configs do not).
__all__, __getattr__ = lazy_exports(__name__, {
    "edgepipe.prune.structured": ["PruneConfig", "prune"],
    "edgepipe.prune.report": ["PruneReport"],
})
