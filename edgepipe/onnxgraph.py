"""An ONNX model's graph without its weights, read from disk without loading them.

`onnx.load` parses the whole file, about twice its size in memory, to learn its op types.
`skeleton` walks the file's protobuf through a memory map instead and parses
only the structure: nodes, inputs, outputs, value_info, metadata, and each initializer's name,
type and dims. Tensors whose data is small (shape constants, scales) keep it, so shape
inference still sees Reshape's target shapes; large weights come without their data, and
`initializer` reads one of them when it is needed. The pages of the skipped weights are never
touched, so they cost no memory. A skeleton is for reading: never save or run it.
"""

from __future__ import annotations

import importlib
import mmap
import os
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from edgepipe.runtime.modelfile import _varint

__all__ = ["activation_bytes", "initializer", "ort_tools_without_torch", "skeleton", "tensor_shapes",
           "with_outputs", "without_value_info"]

GRAPH, INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer
# TensorProto fields that hold data: float, int32, string, int64, raw, double, uint64
DATA_FIELDS = frozenset({4, 5, 6, 7, 9, 10, 11})
TENSOR_NAME = 8
KEEP_BYTES = 4096  # tensors with at most this much data keep it (shape constants, scales)


def _key(number: int, wire: int) -> bytes:
    return _encode(number << 3 | wire)


def _encode(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _walk(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of the message in
    buf[start:end], without copying it."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            after = pos + size
        elif wire in (1, 5):
            after = pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, field_start, pos, after
        pos = after


def _tensor(buf, start: int, end: int, keep_bytes: int) -> bytes:
    fields = list(_walk(buf, start, end))
    data = sum(e - s for n, _, _, s, e in fields if n in DATA_FIELDS)
    if data <= keep_bytes:
        return bytes(buf[start:end])
    return b"".join(bytes(buf[f:e]) for n, _, f, _, e in fields if n not in DATA_FIELDS)


def _map(path: Path):
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError(f"{path} is empty")
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def skeleton(path: str | os.PathLike, keep_bytes: int = KEEP_BYTES) -> onnx.ModelProto:
    """The model at `path` with the data of every initializer over `keep_bytes` left out."""
    buf = _map(Path(path))
    try:
        parts = []
        for number, wire, field_start, start, end in _walk(buf, 0, len(buf)):
            if number != GRAPH or wire != 2:
                parts.append(bytes(buf[field_start:end]))
                continue
            graph = []
            for g_number, g_wire, g_start, v_start, v_end in _walk(buf, start, end):
                if g_number == INITIALIZER and g_wire == 2:
                    tensor = _tensor(buf, v_start, v_end, keep_bytes)
                    graph.append(_key(INITIALIZER, 2) + _encode(len(tensor)) + tensor)
                else:
                    graph.append(bytes(buf[g_start:v_end]))
            body = b"".join(graph)
            parts.append(_key(GRAPH, 2) + _encode(len(body)) + body)
        return onnx.ModelProto.FromString(b"".join(parts))
    finally:
        buf.close()


def initializer(path: str | os.PathLike, name: str):
    """One initializer of the model at `path` as a numpy array (external data read from beside
    the file), parsing that tensor alone."""
    path = Path(path)
    buf = _map(path)
    try:
        for number, wire, _, start, end in _walk(buf, 0, len(buf)):
            if number != GRAPH or wire != 2:
                continue
            for g_number, g_wire, _, v_start, v_end in _walk(buf, start, end):
                if g_number != INITIALIZER or g_wire != 2:
                    continue
                for t_number, _, _, s, e in _walk(buf, v_start, v_end):
                    if t_number == TENSOR_NAME and bytes(buf[s:e]).decode() == name:
                        tensor = onnx.TensorProto.FromString(bytes(buf[v_start:v_end]))
                        return numpy_helper.to_array(tensor, str(path.parent))
    finally:
        buf.close()
    raise KeyError(f"no initializer named {name!r} in {path.name}")


VALUE_INFO = 13  # GraphProto.value_info


def without_value_info(src: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Copy the model file `src` to `out` without the graph's value_info (intermediate shape
    annotations), streaming the bytes: nothing is parsed, so a model of any size costs a copy's
    time and no memory. External data stays where it is: `out` must sit beside `src`."""
    src, out = Path(src), Path(out)
    buf = _map(src)
    try:
        with open(src, "rb") as source, open(out, "wb") as f:
            def copy(s: int, e: int) -> None:
                # in the kernel where it can (the weights never pass through this process)
                f.flush()
                while s < e:
                    try:
                        done = os.copy_file_range(source.fileno(), f.fileno(), e - s, s)
                    except (AttributeError, OSError):
                        done = 0
                    if not done:
                        f.write(buf[s:e])
                        return
                    s += done
                    f.seek(0, os.SEEK_END)

            for number, wire, field_start, start, end in _walk(buf, 0, len(buf)):
                if number != GRAPH or wire != 2:
                    copy(field_start, end)
                    continue
                kept: list[list[int]] = []  # byte ranges, adjacent ones merged: one copy each
                for g_number, _, g_start, _, v_end in _walk(buf, start, end):
                    if g_number == VALUE_INFO:
                        continue
                    if kept and kept[-1][1] == g_start:
                        kept[-1][1] = v_end
                    else:
                        kept.append([g_start, v_end])
                f.write(_key(GRAPH, 2) + _encode(sum(e - s for s, e in kept)))
                for s, e in kept:
                    copy(s, e)
    finally:
        buf.close()
    return out


GRAPH_OUTPUT = 12  # GraphProto.output


def with_outputs(src: str | os.PathLike, names: list[str], out: str | os.PathLike) -> Path:
    """Copy the model file `src` to `out` with `names` added as float graph outputs, parsing
    nothing: protobuf merges a message field that appears twice, so a second `graph` field
    holding only those outputs appends them to the first's (a copy of the bytes, where onnx.load
    and save parse and write the whole model). External data stays where it is: `out` must sit beside `src`."""
    from onnx import TensorProto, helper

    shutil.copyfile(src, out)
    outputs = (helper.make_tensor_value_info(n, TensorProto.FLOAT, None).SerializeToString() for n in names)
    body = b"".join(_key(GRAPH_OUTPUT, 2) + _encode(len(v)) + v for v in outputs)
    with open(out, "ab") as f:
        f.write(_key(GRAPH, 2) + _encode(len(body)) + body)
    return Path(out)


def _fix_inputs(model: onnx.ModelProto, feeds) -> None:
    for value in model.graph.input:
        if value.name in feeds:
            dims = value.type.tensor_type.shape.dim
            for dim, size in zip(dims, feeds[value.name].shape):
                dim.Clear()
                dim.dim_value = int(size)


def _known(model: onnx.ModelProto) -> dict[str, list[int]]:
    shapes = {}
    for value in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def tensor_shapes(model: onnx.ModelProto, feeds) -> dict[str, list[int]]:
    """Every tensor's shape with the graph inputs fixed to the feeds' shapes (in `model` itself:
    no copy of a model that may weigh hundreds of MB)."""
    _fix_inputs(model, feeds)
    return _known(onnx.shape_inference.infer_shapes(model))


def activation_bytes(model: onnx.ModelProto, feeds) -> int | None:
    """Bytes of every float tensor the graph computes for `feeds` (their shapes, not their
    values), by ONNX shape inference on `model` (a skeleton will do): what a calibration
    model that outputs every intermediate tensor returns per call. None when some shapes stay
    unknown."""
    shapes = tensor_shapes(model, feeds)
    computed = [o for n in model.graph.node for o in n.output if o]
    if not computed or any(name not in shapes for name in computed):
        return None
    return 4 * sum(int(np.prod(shapes[name])) for name in computed)


def symbolic_activation_bytes(path: str | os.PathLike, feeds) -> int | None:
    """activation_bytes by onnxruntime's symbolic shape inference, which follows the Shape ->
    Gather -> Reshape arithmetic of exported transformers where ONNX's own stops at the first
    data-dependent shape (a dynamo-exported BERT-base: 35 of 397 tensors). It needs the small
    constants, so it reads a skeleton keeping tensors up to 1 MB (biases, norms, ViT's position
    embeddings). The few tensors it leaves unknown (5% at most) are counted at the mean size of
    the rest; None when more stay unknown or it fails."""
    ort_tools_without_torch()
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = skeleton(path, keep_bytes=1 << 20)
    computed = [o for n in model.graph.node for o in n.output if o]
    _fix_inputs(model, feeds)
    try:
        shapes = _known(SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True))
    except Exception:  # noqa: BLE001 - a best effort: callers fall back to a size rule
        return None
    known = [4 * int(np.prod(shapes[name])) for name in computed if name in shapes]
    if not computed or len(known) < 0.95 * len(computed):
        return None
    return int(sum(known) * len(computed) / len(known))


def ort_tools_without_torch() -> None:
    """Call before importing onnxruntime.tools (symbolic shape inference; quant_pre_process
    imports it too). Its package __init__ imports torch whenever torch is installed, for a
    torch.onnx helper edgepipe never calls: 1.1 s and about 200 MB of a quantize process on a
    machine with torch. A stand-in for that helper's module keeps torch out; the helper still
    works, imported for real on its first call."""
    name = "onnxruntime.tools.pytorch_export_helpers"
    if "onnxruntime.tools" in sys.modules or name in sys.modules:
        return
    stand_in = types.ModuleType(name)

    def infer_input_info(*args, **kwargs):
        sys.modules.pop(name, None)
        return importlib.import_module(name).infer_input_info(*args, **kwargs)

    stand_in.infer_input_info = infer_input_info
    sys.modules[name] = stand_in
