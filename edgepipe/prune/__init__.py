"""Pruning: structured (Torch-Pruning) for measured ORT latency, or unstructured for size."""

from edgepipe.prune.structured import PruneConfig, prune

__all__ = ["PruneConfig", "prune"]
