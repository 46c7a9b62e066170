"""Static INT8 QDQ of every MatMul and Gemm, laid out for OpenVINO's CPU plugin and written
directly: activations symmetric (zero point 0: S8, or U8 where calibration saw no negative value,
as after Softmax), weights symmetric S8 per output channel, and attention's activation x
activation MatMuls quantized too. Conv and every other op stay float.

Why a layout of its own: OpenVINO runs onnxruntime.quantization's QDQ models with INT8 kernels,
but an asymmetric U8 activation (onnxruntime's default) costs it a Subtract and a Convert per
quantized input, and attention stays float unless both inputs of its MatMuls are quantized.
On transformers this layout runs faster on OpenVINO than onnxruntime's QDQ does, level with
NNCF's own models (benchmarks/hf_models.py --nncf-python measures the three side by side).

It also builds in a fraction of quantize_static's time: no shape inference, per-channel weights
vectorized, and a calibration model that outputs only the MatMul inputs."""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepipe import interrupts, onnxfile
from edgepipe.errors import QuantizationError
from edgepipe.onnxgraph import skeleton, with_outputs
from edgepipe.quantize.calibration import MeasuredRanges, calibration_rows
from edgepipe.quantize.dynamic_matmul import weight_params

TARGET_OPS = ("MatMul", "Gemm")
MIN_OPSET = 13  # DequantizeLinear's axis (per-channel weights)


def _weight_axis(node: onnx.NodeProto, index: int, rank: int) -> int | None:
    """The output-channel axis of a 2-D constant operand (None: per tensor)."""
    if rank != 2:
        return None
    trans = {a.name: a.i for a in node.attribute if a.name in ("transA", "transB")}
    if index == 1:  # B is [K, N] (transB: [N, K]); the channels are N
        return 0 if trans.get("transB", 0) else 1
    return 1 if trans.get("transA", 0) else 0  # a constant A [M, K] (transA: [K, M]): rows M


def targets(graph: onnx.GraphProto) -> list[tuple[onnx.NodeProto, list[int], list[int]]]:
    """(node, indices of its activation inputs, indices of its constant float inputs) for each
    MatMul and Gemm with at least one activation input."""
    inits = {i.name: i for i in graph.initializer}
    found = []
    for node in graph.node:
        if node.op_type not in TARGET_OPS:
            continue
        pair = list(node.input[:2])
        consts = [i for i, name in enumerate(pair) if name in inits]
        if len(consts) == 2 or any(inits[pair[i]].data_type != TensorProto.FLOAT for i in consts):
            continue
        found.append((node, [i for i in range(2) if i not in consts], consts))
    return found


def activation_names(found: list) -> list[str]:
    """The activation inputs of every target `found`, excluded or not: one calibration serves
    the builds that exclude nodes later."""
    return sorted({node.input[i] for node, acts, _ in found for i in acts})


def save_tapped(model: onnx.ModelProto, names: list[str], path: Path) -> Path:
    """Write `model` with `names` (but its inputs) as extra float outputs to `path`; `model` is
    left as it was."""
    graph = model.graph
    have = {o.name for o in graph.output} | {i.name for i in graph.input}
    added = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names if n not in have]
    graph.output.extend(added)
    try:
        return onnxfile.save(model, path)
    finally:
        del graph.output[len(graph.output) - len(added):]


def activation_ranges(model: onnx.ModelProto, names: list[str], data: Mapping[str, np.ndarray],
                      samples: int, work: Path, rows_per_call: int) -> MeasuredRanges:
    """The ranges of `names` over the first `samples` rows of `data`, from a copy of `model` whose
    outputs are those tensors, run `rows_per_call` rows at a time (memory-bounded). Tensors that
    are not float32 are left out."""
    import onnxruntime as ort

    augmented = save_tapped(model, names, work / "ranges-calibration.onnx")
    session = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
    inputs = {i.name for i in model.graph.input}
    fetch = [n for n in names if n not in inputs]
    rows = min(samples, min(len(v) for v in data.values()))
    ranges = MeasuredRanges(names)
    for start in range(0, rows, rows_per_call):
        feeds = {k: np.ascontiguousarray(v[start:min(start + rows_per_call, rows)]) for k, v in data.items()}
        ranges(feeds, dict(zip(fetch, session.run(fetch, feeds))))
    del session
    for path in work.glob("ranges-calibration.onnx*"):
        path.unlink()
    return ranges


class TappedReference(NamedTuple):
    output: np.ndarray  # FP32's first output over the rows
    accuracy: float | None
    ranges: MeasuredRanges  # every target's activations over all the rows
    inputs: list  # the model's input specs (the Engine's)
    providers: list[str]


def reference_with_ranges(model_path: Path, data, work: Path, **engine_options) -> TappedReference | None:
    """evaluate's FP32 reference over `data` and the symmetric layout's calibration from the same
    calls, one pass over the rows where they made two; None
    when the tapped model fails to build or run. Tensor names survive the pre-processing the
    builds see (onnxruntime's basic optimizations); quantize uses the ranges only when they cover
    its names."""
    from edgepipe.quantize.evaluation import evaluate
    from edgepipe.runtime.engine import Engine

    try:
        graph = skeleton(model_path).graph
        ranges = MeasuredRanges(activation_names(targets(graph)))
        have = {o.name for o in graph.output} | {i.name for i in graph.input}
        extra, tapped = [n for n in ranges.names if n not in have], work / "reference-ranges.onnx"
        if any(t.data_location == TensorProto.EXTERNAL for t in graph.initializer):
            save_tapped(onnx.load(str(model_path)), extra, tapped)  # its weights where the copy is
        else:  # a copy with the outputs appended, nothing parsed
            with_outputs(model_path, extra, tapped)
        engine = Engine(tapped, validate=False, **engine_options)
        out, accuracy, _ = evaluate(engine, data, batch_size=calibration_rows(model_path, data.inputs),
                                    tap=ranges)
        return TappedReference(out, accuracy, ranges, engine.inputs, list(engine.providers))
    except Exception:  # noqa: BLE001  (a shortcut: the caller's plain reference pass decides)
        interrupts.reraise()
        return None
    finally:
        for path in work.glob("reference-ranges.onnx*"):
            path.unlink()


def _readers(graph: onnx.GraphProto, counts: dict[str, int]) -> dict[str, int]:
    """How many node inputs read each name, subgraphs (If, Loop, Scan bodies) included."""
    for node in graph.node:
        for name in node.input:
            counts[name] += 1
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _readers(sub, counts)
    return counts


def _activation_params(low: float, high: float) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point 0) of a tensor seen in [low, high]: U8 when never negative, else S8."""
    if low >= 0:
        return np.array(max(high, 1e-12) / 255, np.float32), np.array(0, np.uint8)
    return np.array(max(-low, high, 1e-12) / 127, np.float32), np.array(0, np.int8)


def _weight_params(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weight, scale, int8 zero points) symmetric over -127..127, per channel on `axis` of a
    2-D weight (None: per tensor): the dynamic recipes' arithmetic, which works per column."""
    if axis == 0:  # rows are the channels: quantize the transpose's columns
        q, scale, zp = weight_params(weight.T, per_channel=True, reduce_range=False)
        return np.ascontiguousarray(q.T), scale, zp
    return weight_params(weight, per_channel=axis == 1, reduce_range=False)


def quantize(model_path: Path, out: Path, data: Mapping[str, np.ndarray], samples: int,
             excluded: set[str] = frozenset(), measured: MeasuredRanges | None = None) -> int:
    """Write `model_path` with its MatMuls and Gemms (but `excluded` names) in QDQ as the module
    docstring says; returns how many. Activation ranges are cached beside `out` (by the source
    file's identity and `samples`) for builds that exclude nodes later. `measured`: ranges
    already taken over the same rows (reference_with_ranges), used when they cover every name."""
    opset = next((o.version for o in skeleton(model_path).opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET:
        raise QuantizationError(f"{Path(model_path).name} has opset {opset}: per-channel QDQ needs "
                                f"{MIN_OPSET} or later (export again with a newer opset)")
    model = onnx.load(str(model_path))
    graph = model.graph
    found = targets(graph)
    names = activation_names(found)
    stat = Path(model_path).stat()
    key = hashlib.sha256(repr((str(model_path), stat.st_size, stat.st_mtime_ns, samples, names)).encode())
    cache = out.parent / f"ranges-{key.hexdigest()[:16]}.json"
    rows = min(samples, min(len(v) for v in data.values()))
    if cache.is_file():
        ranges = {k: tuple(v) for k, v in json.loads(cache.read_text()).items()}
    else:
        if measured is None or not measured.covers(names, rows):
            measured = activation_ranges(model, names, data, samples, out.parent, calibration_rows(model_path, data))
        ranges = {n: measured.values[n] for n in names if n in measured.values}
        cache.write_text(json.dumps(ranges))
    inits = {i.name: i for i in graph.initializer}
    readers = _readers(graph, defaultdict(int))
    weights: dict[tuple[str, int | None], str] = {}
    activations: dict[str, str] = {}
    new_inits: list[TensorProto] = []
    head: list[onnx.NodeProto] = []  # weight DequantizeLinears, ahead of every node
    before: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # activation Q/DQ, before their first reader
    done = 0
    for node, acts, consts in found:
        if node.name in excluded:
            continue
        if not all(node.input[i] in ranges for i in acts):
            continue  # a tensor calibration could not read as float32: left float
        for i in consts:
            weight = numpy_helper.to_array(inits[node.input[i]])
            axis = _weight_axis(node, i, weight.ndim)
            if (node.input[i], axis) not in weights:
                q, scale, zp = _weight_params(weight, axis)
                base = f"{node.input[i]}_{'' if axis is None else axis}"
                names3 = [f"{base}_quantized", f"{base}_scale", f"{base}_zero_point"]
                new_inits += [numpy_helper.from_array(a, n) for a, n in zip((q, scale, zp), names3)]
                attrs = {} if axis is None else {"axis": axis}
                head.append(helper.make_node("DequantizeLinear", names3, [f"{base}_dequantized"],
                                             name=f"{base}_DequantizeLinear", **attrs))
                weights[(node.input[i], axis)] = f"{base}_dequantized"
            readers[node.input[i]] -= 1
            node.input[i] = weights[(node.input[i], axis)]
        for i in acts:
            x = node.input[i]
            if x not in activations:
                scale, zp = _activation_params(*ranges[x])
                names3 = [x, f"{x}_act_scale", f"{x}_act_zero_point"]
                new_inits += [numpy_helper.from_array(scale, names3[1]), numpy_helper.from_array(zp, names3[2])]
                before[id(node)] += [
                    helper.make_node("QuantizeLinear", names3, [f"{x}_act_quantized"], name=f"{x}_QuantizeLinear"),
                    helper.make_node("DequantizeLinear", [f"{x}_act_quantized", *names3[1:]], [f"{x}_act_dequantized"],
                                     name=f"{x}_DequantizeLinear")]
                activations[x] = f"{x}_act_dequantized"
            node.input[i] = activations[x]
        done += 1
    if not done:
        raise QuantizationError("no MatMul or Gemm with a float activation input to quantize")
    nodes = head + [n for node in graph.node for n in (*before.get(id(node), ()), node)]
    kept = [i for i in graph.initializer if readers.get(i.name, 0) > 0]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + new_inits)
    onnxfile.save(model, out)
    return done
