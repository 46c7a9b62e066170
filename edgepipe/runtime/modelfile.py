"""An ONNX model on disk is one file, or, past protobuf's 2 GB limit, the graph file plus its
weights in one external-data file beside it named `<model file name>.data` (what torch.onnx
and onnxruntime's tools write). onnxruntime and OpenVINO read the sidecar by themselves; this
module only names it and counts it. Torch-free and onnx-free."""

from __future__ import annotations

import os
from pathlib import Path


def sidecar(path: str | os.PathLike) -> Path:
    """Where the external data of `path` lives, by edgepipe's convention."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def model_files(path: str | os.PathLike) -> list[Path]:
    """The model file and its external-data file, when it has one."""
    data = sidecar(path)
    return [Path(path), data] if data.is_file() else [Path(path)]


def model_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the model with its weights (graph file + external data)."""
    return sum(p.stat().st_size for p in model_files(path))
