"""Reference zoo, offline datasets and training."""

import importlib

# Imported on first use: the stage modules need torch or onnx, the reports do not.
_WHERE = {
    "Dataset": "edgepipe.models.data",
    "load_dataset": "edgepipe.models.data",
    "TrainConfig": "edgepipe.models.training",
    "load_checkpoint": "edgepipe.models.training",
    "save_checkpoint": "edgepipe.models.training",
    "train": "edgepipe.models.training",
    "TrainReport": "edgepipe.models.report",
    "ZOO": "edgepipe.models.zoo",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
