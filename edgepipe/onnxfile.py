"""Saving, copying and committing ONNX models of any size (the build machine's side; the runtime
only reads them, see runtime/modelfile.py).

Protobuf cannot serialize a message over 2 GB, so a model whose tensors pass EXTERNAL_BYTES is
written as the graph file plus one external-data file `<name>.data` beside it. The tensors'
`location` entries name that file, so moving or copying such a model means rewriting them: use
`copy` and `commit` here, never a plain file copy or rename.
"""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import onnx
from onnx.external_data_helper import uses_external_data

from edgepipe.artifacts import atomic_path, make_shared
from edgepipe.runtime.modelfile import model_bytes, model_files, sidecar

__all__ = ["EXTERNAL_BYTES", "commit", "copy", "is_large", "model_bytes", "model_files", "save",
           "sidecar", "staged_model"]

# Tensor bytes above which a model is saved with external data: under protobuf's 2 GB limit
# with room for the graph itself.
EXTERNAL_BYTES = 1_800_000_000


# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 cannot load (max 13). Exports are
# pinned to IR 10, which every onnxruntime since 1.16 loads: artifacts stay deployable on older
# runtimes on the device.
MAX_IR_VERSION = 10


def tensor_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers (raw or typed fields), external ones included."""
    total = 0
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0))
        else:
            total += tensor.ByteSize()
    return total


def is_large(model: onnx.ModelProto | str | os.PathLike) -> bool:
    """Whether a model (in memory, or a file with its sidecar) needs external data."""
    if isinstance(model, onnx.ModelProto):
        return tensor_bytes(model) > EXTERNAL_BYTES
    return model_bytes(model) > EXTERNAL_BYTES


def save(model: onnx.ModelProto, path: str | os.PathLike) -> Path:
    """Write `model` to `path`; with its tensors in `<path>.data` when it is large. A stale
    sidecar from an earlier, larger model at the same path is removed."""
    path = Path(path)
    data = sidecar(path)
    if data.exists():
        data.unlink()
    if is_large(model):
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024, convert_attribute=False)
    else:
        onnx.save(model, str(path))
    return path


def _relocate(src: Path, dst: Path, location: str | None, metadata: dict[str, str] | None = None) -> None:
    """Write `src`'s graph to `dst` with its external tensors pointing at `location` (the data
    file itself is not touched) and `metadata` set in its metadata_props (replacing those keys)."""
    model = onnx.load(str(src), load_external_data=False)
    for tensor in model.graph.initializer:
        if location is not None and uses_external_data(tensor):
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = location
    if metadata:
        kept = [(p.key, p.value) for p in model.metadata_props if p.key not in metadata]
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, dict(kept) | metadata)
    onnx.save(model, str(dst))


def copy(src: str | os.PathLike, dst: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Copy a model (and its external data, relocated to `dst`'s sidecar) to `dst`, atomically:
    the sidecar first, then the graph file that points at it. `metadata`: entries to set in the
    copy's metadata_props."""
    src, dst = Path(src), Path(dst)
    if not sidecar(src).is_file():
        with atomic_path(dst) as tmp:
            if metadata:
                _relocate(src, tmp, None, metadata)
            else:
                shutil.copyfile(src, tmp)
        if sidecar(dst).exists():
            sidecar(dst).unlink()
        return dst
    with atomic_path(sidecar(dst)) as tmp:
        shutil.copyfile(sidecar(src), tmp)
    with atomic_path(dst) as tmp:
        _relocate(src, tmp, sidecar(dst).name, metadata)
    return dst


def commit(src: Path, dst: Path) -> Path:
    """Move a model written at a temporary path into place (renames, no copy of the weights)."""
    if not sidecar(src).is_file():
        os.replace(src, dst)
        if sidecar(dst).exists():
            sidecar(dst).unlink()
        return dst
    make_shared(sidecar(src))  # its writers make it 0600
    os.replace(sidecar(src), sidecar(dst))
    with atomic_path(dst) as tmp:
        _relocate(src, tmp, sidecar(dst).name)
    src.unlink()
    return dst


@contextmanager
def staged_model(target: str | os.PathLike) -> Iterator[Path]:
    """Like artifacts.atomic_path for an ONNX model that may carry external data: yields a path
    in a fresh folder beside `target`; on success the model (and sidecar) is committed to
    `target`; on failure nothing of it is left."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder = target.parent / f".{target.name}.staging"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    try:
        staged = folder / target.name
        yield staged
        commit(staged, target)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
