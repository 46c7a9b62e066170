"""What every stage's result depends on besides its config and its input files: the weights the
model really has (a factory's built state, not only its .py file, which may load them from
anywhere), the data file's content, the declared inputs and the versions of the tools. A change
in any of them means no stage of the model is reused."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from edgepipe.artifacts import sha256, tree_digest
from edgepipe.pipeline.config import ModelConfig
from edgepipe.pipeline.manifest import tool_versions


def fingerprint(model: ModelConfig, source: Callable[[], Any]) -> dict:
    """`source()` loads the model's source (once, by the caller's cache) where its state is needed."""
    weights = None
    if model.source and ".py:" in model.source:
        from edgepipe.exporters.source import state_digest

        weights = "state " + state_digest(source().model)
    elif model.source and Path(model.source).is_file():
        weights = "file " + sha256(Path(model.source))
    elif model.source and Path(model.source).is_dir():  # a Hugging Face folder: its config and weights
        from edgepipe.models.hf import folder_digest

        weights = "folder " + folder_digest(Path(model.source))
    dataset = model.dataset
    data = ("file " + sha256(Path(dataset)) if dataset and Path(dataset).is_file() else
            "folder " + tree_digest(Path(dataset)) if dataset and Path(dataset).is_dir() else dataset)
    # a causal LM's inputs (ids and its KV cache) follow from its config.json, in the weights' digest
    inputs = [s.to_dict() for s in source().inputs] if model.source and not model.causal_lm else list(model.inputs)
    return {"weights": weights, "data": data, "inputs": inputs, "versions": tool_versions()}
