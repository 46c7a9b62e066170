"""An ONNX model on disk is one file, or, past protobuf's 2 GB limit, the graph file plus its
weights in one external-data file beside it named `<model file name>.data` (what torch.onnx
and onnxruntime's tools write). onnxruntime and OpenVINO read the sidecar by themselves; this
module names it and counts it, and reads a model's metadata without loading its graph.
Torch-free and onnx-free."""

from __future__ import annotations

import os
from pathlib import Path

from edgepipe.errors import InputError


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


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of one protobuf message: ints, or bytes for wire type 2."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos:pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def onnx_metadata(path: str | os.PathLike) -> dict[str, str]:
    """ModelProto.metadata_props (field 14) of an ONNX file, reading past the graph (field 7)
    without loading it: cheap for a model of any size."""
    found: dict[str, str] = {}
    with open(path, "rb") as f:
        while True:
            head = f.read(10)
            if not head:
                return found
            key, used = _varint(head, 0)
            number, wire = key >> 3, key & 7
            f.seek(used - len(head), os.SEEK_CUR)
            if wire == 0:
                head = f.read(10)
                _, used = _varint(head, 0)
                f.seek(used - len(head), os.SEEK_CUR)
            elif wire == 2:
                head = f.read(10)
                size, used = _varint(head, 0)
                f.seek(used - len(head), os.SEEK_CUR)
                if number == 14:
                    entry = {n: v.decode() for n, _, v in _fields(f.read(size))}
                    found[entry.get(1, "")] = entry.get(2, "")
                else:
                    f.seek(size, os.SEEK_CUR)
            elif wire in (1, 5):
                f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
            else:
                raise InputError(f"{path} is not an ONNX model (protobuf wire type {wire} at top level)")
