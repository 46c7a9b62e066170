"""Serving: dynamic batching over an Engine, and an HTTP app (extra: edgepipe[serve])."""

from edgepipe.serve.batcher import DynamicBatcher, Overloaded

__all__ = ["DynamicBatcher", "Overloaded"]
