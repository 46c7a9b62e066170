"""Bias correction for static QDQ models: each quantized Conv's and Gemm's int32 bias absorbs
the mean shift that rounding its weights causes on the calibration rows.

A Conv's output with weights W on input x, averaged over the rows and output positions, is the
sum over kernel offsets of W[o, :, i, j] times the mean of the input window at that offset (zeros
where the window reads padding); a Gemm's is W[o, :] times the mean input row. Rounding W to W_q
shifts that mean by the same sum with W - W_q, so adding it to the bias removes the shift
exactly, from one pass of the FP32 model over the calibration rows. The layers that write a graph
output then have their output means matched to FP32's on the corrected model's own pass (a
classifier without a bias gets one). Only biases change: the corrected model runs the same
kernels as the plain one (a kernel twin, timed once: twins.BIASED), and the search ships it only
where it is more faithful.

On a model whose outputs barely depend on the input the weight-rounding correction can make
them worse, which is why it is a candidate beside the plain build, judged like it, not a step
of it."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, NamedTuple

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepipe import onnxfile
from edgepipe.errors import QuantizationError
from edgepipe.onnxgraph import skeleton, with_outputs
from edgepipe.quantize.calibration import calibration_rows

QUANTIZED = "_quantized"  # onnxruntime.quantization's suffix for a quantized initializer
TAPPED = "bias-correction.onnx"


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _plain_gemm(a: dict) -> bool:
    """Whether a Gemm with attributes `a` computes x @ W (+ b): its input not transposed, no
    scaling (the layouts the correction reads)."""
    return not a.get("transA", 0) and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0


def _row_batches(data: Mapping[str, np.ndarray], rows: int, step: int):
    """The first `rows` rows of `data`, `step` at a time, as feeds."""
    for start in range(0, rows, step):
        yield {k: np.ascontiguousarray(v[start:min(start + step, rows)]) for k, v in data.items()}


def window_means(x: np.ndarray, node: onnx.NodeProto) -> np.ndarray:
    """[channels, kh, kw]: the sum over rows of the mean over output positions of the input
    window at each kernel offset of 2-D Conv `node`, padding read as zeros."""
    a = _attrs(node)
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    dh, dw = a.get("dilations", [1, 1])
    top, left, bottom, right = a.get("pads", [0, 0, 0, 0])
    _, _, h, w = x.shape
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    padded = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (top, bottom), (left, right)))
    out = np.empty((x.shape[1], kh, kw))
    for i in range(kh):
        for j in range(kw):
            window = padded[:, :, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw]
            out[:, i, j] = window.sum(axis=(0, 2, 3)) / (oh * ow)
    return out


class Target(NamedTuple):
    node: onnx.NodeProto
    x: str  # the float tensor its quantized input was quantized from
    weight: onnx.NodeProto  # the weight's DequantizeLinear
    bias: onnx.NodeProto  # the bias's DequantizeLinear
    float_weight: str  # the weight's name in the source model


def targets(graph: onnx.GraphProto, source_weights) -> list[Target]:
    """The Convs (2-D, explicit padding) and Gemms (input not transposed) whose activation,
    weight and bias all come through DequantizeLinear, with the weight's float original in
    `source_weights` (names)."""
    made = {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        a = _attrs(node)
        if node.op_type == "Conv":
            if len(a.get("kernel_shape", ())) != 2 or a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
                continue
        elif node.op_type != "Gemm" or not _plain_gemm(a):
            continue
        feeders = [made.get(name) for name in node.input[:3]]
        if len(feeders) < 3 or not all(f is not None and f.op_type == "DequantizeLinear" for f in feeders):
            continue
        x_dq, w_dq, b_dq = feeders
        quantize = made.get(x_dq.input[0])
        float_weight = w_dq.input[0][:-len(QUANTIZED)] if w_dq.input[0].endswith(QUANTIZED) else ""
        if quantize is None or quantize.op_type != "QuantizeLinear" or float_weight not in source_weights:
            continue
        found.append(Target(node, quantize.input[0], w_dq, b_dq, float_weight))
    return found


def correctable(qdq_path: Path, source: Path) -> int:
    """How many layers of `qdq_path` correct_biases would correct (both graphs read without
    their weights)."""
    graph = skeleton(qdq_path).graph
    inits = {i.name: i for i in graph.initializer}
    found = targets(graph, {i.name for i in skeleton(source).graph.initializer})
    return len({t.node.name for t in found if _per_output_channel(t, inits)} | {n.name for n in output_layers(graph)})


def source_of(search, cand) -> Path:
    """The source model (of `search.sources`) that candidate `cand` was built from."""
    return next(p for p in search.sources if p.name == cand.built_from)


def nothing_to_correct(search, recipe) -> bool:
    """Whether `recipe` would correct the biases of a file `search` built that has none to correct
    (a CNN exported without biases): it is skipped rather than listed as failed."""
    base = search.built(recipe.uncorrected) if recipe.bias_correction else None
    if base is None or base.error is not None:
        return False
    return not correctable(base.path, source_of(search, base))


def _channel_sums(x: np.ndarray) -> np.ndarray:
    """Per channel (axis 1): the sum over everything else, divided by what a row holds of it."""
    x = x.astype(np.float64)
    return x.sum(axis=tuple(i for i in range(x.ndim) if i != 1)) * x.shape[0] / (x.size / x.shape[1])


def fp32_means(source: Path, found: list[Target], outputs: list[str], data: Mapping[str, np.ndarray],
               rows: int, step: int, work: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Over `rows` rows of `data`, from one pass of `source` with the targets' inputs as extra
    outputs, `step` rows per call: {node name: the mean of what its weights
    multiply} (window means for a Conv, [channels, kh, kw]; the mean input row for a Gemm, [K]),
    and {graph output in `outputs`: its mean per channel}."""
    import onnxruntime as ort

    inputs = set(data)
    fetch = list(dict.fromkeys([*(t.x for t in found if t.x not in inputs), *outputs]))
    tapped = with_outputs(source, [n for n in fetch if n not in outputs], work / TAPPED)
    sums: dict[str, np.ndarray | float] = {t.node.name: 0.0 for t in found} | {o: 0.0 for o in outputs}
    try:
        session = ort.InferenceSession(str(tapped), providers=["CPUExecutionProvider"])
        for feeds in _row_batches(data, rows, step):
            values = dict(zip(fetch, session.run(fetch, feeds))) | feeds
            for t in found:
                x = values[t.x]
                sums[t.node.name] = sums[t.node.name] + (
                    window_means(x, t.node) if t.node.op_type == "Conv" else x.astype(np.float64).sum(axis=0))
            for name in outputs:
                sums[name] = sums[name] + _channel_sums(values[name])
        del session
    finally:
        for path in work.glob(TAPPED + "*"):
            path.unlink()
    means = {name: total / rows for name, total in sums.items()}
    return {t.node.name: means[t.node.name] for t in found}, {o: means[o] for o in outputs}


def output_layers(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The Convs and Gemms (input not transposed) that write a graph output, their activation and
    weight behind DequantizeLinear, their bias (if any) too."""
    made = {o: n for n in graph.node for o in n.output}
    outputs = {o.name for o in graph.output}
    found = []
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm") or node.output[0] not in outputs or len(node.input) not in (2, 3):
            continue
        if node.op_type == "Gemm" and not _plain_gemm(_attrs(node)):
            continue
        if all(made.get(n) is not None and made[n].op_type == "DequantizeLinear" for n in node.input):
            found.append(node)
    return found


def quantized_output_means(path: Path, outputs: list[str], data: Mapping[str, np.ndarray], rows: int,
                           step: int) -> dict[str, np.ndarray]:
    """{graph output: its mean per channel} over `rows` rows of `data`, run by onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray | float] = {o: 0.0 for o in outputs}
    for feeds in _row_batches(data, rows, step):
        for name, value in zip(outputs, session.run(outputs, feeds)):
            sums[name] = sums[name] + _channel_sums(value)
    return {name: total / rows for name, total in sums.items()}


def _add_to_bias(graph: onnx.GraphProto, inits: dict, made: dict, node: onnx.NodeProto, shift: np.ndarray) -> None:
    """Add `shift` (float, per output channel) to `node`'s int32 bias; a node without one gets one
    (zero, at its activation scale times its weight scale, as onnxruntime quantizes biases).
    `inits` and `made` (tensor name -> initializer, -> the node that makes it) are kept current."""
    if len(node.input) == 2:
        x_scale, w_scale = (numpy_helper.to_array(inits[made[n].input[1]]).astype(np.float64) for n in node.input)
        base = node.output[0] + "_correction_bias"
        names = [base + "_quantized", base + "_scale"]
        scale = np.broadcast_to(x_scale * w_scale, shift.shape).astype(np.float32)
        added = [numpy_helper.from_array(np.zeros(shift.shape, np.int32), names[0]),
                 numpy_helper.from_array(scale, names[1])]
        graph.initializer.extend(added)
        inits.update({t.name: graph.initializer[-len(added) + i] for i, t in enumerate(added)})
        graph.node.insert(0,
                          helper.make_node("DequantizeLinear", names, [base], name=base + "_DequantizeLinear", axis=0))
        node.input.append(base)
        made[base] = graph.node[0]
    bias_dq = made[node.input[2]]
    bias_q = numpy_helper.to_array(inits[bias_dq.input[0]]).astype(np.int64)
    bias_scale = numpy_helper.to_array(inits[bias_dq.input[1]]).astype(np.float64)
    limits = np.iinfo(np.int32)
    corrected = np.clip(bias_q + np.round(shift / bias_scale), limits.min, limits.max).astype(np.int32)
    inits[bias_dq.input[0]].CopyFrom(numpy_helper.from_array(corrected, bias_dq.input[0]))


def _output_axis(node: onnx.NodeProto) -> int:
    """The axis of a Conv's or Gemm's weight that holds its output channels."""
    return 1 if node.op_type == "Gemm" and not _attrs(node).get("transB", 0) else 0


def _per_output_channel(target: Target, inits) -> bool:
    """Whether the weight is quantized per tensor or along its output channels (DequantizeLinear's
    axis defaults to 1), the layouts the correction reads."""
    scale = inits.get(target.weight.input[1])
    if scale is None or target.weight.input[0] not in inits:
        return False
    return len(scale.dims) == 0 or _attrs(target.weight).get("axis", 1) == _output_axis(target.node)


def _shift(target: Target, w: np.ndarray, delta: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Per output channel: how much rounding the weights moved the mean output."""
    if target.node.op_type == "Gemm":
        return (delta if _attrs(target.node).get("transB", 0) else delta.T) @ means
    per_group = w.shape[0] // _attrs(target.node).get("group", 1)
    width = w.shape[1]
    return np.array([np.sum(delta[o] * means[(o // per_group) * width:(o // per_group + 1) * width])
                     for o in range(w.shape[0])])


def correct_biases(qdq_path: Path, source: Path, data: Mapping[str, np.ndarray], samples: int, out: Path,
                   work: Path) -> int:
    """Write `qdq_path` (built from `source` by onnxruntime.quantization: weights and int32
    biases behind DequantizeLinear) to `out` with each quantized Conv's and Gemm's bias corrected
    for its weight rounding, measured on the first `samples` rows of `data`. Then each of those
    layers that writes a graph output has its output's mean per channel matched to FP32's on the
    corrected model's own pass over the rows: the rounding of every layer before it adds up
    there, and a mean offset of the logits is most of a random-weight CNN's error (MobileNetV2:
    relL2 0.022-0.029 -> 0.016-0.020 on five sets of rows it never saw; NNCF 0.018-0.021). Returns
    how many layers were corrected; raises QuantizationError when there is none to correct."""
    model = onnx.load(str(qdq_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    weights = {i.name: i for i in onnx.load(str(source)).graph.initializer}
    found = [t for t in targets(graph, weights) if _per_output_channel(t, inits)]
    last = output_layers(graph)
    if not found and not last:
        raise QuantizationError("bias correction found no quantized Conv or Gemm with a bias to correct")
    rows, step = min(samples, min(len(v) for v in data.values())), calibration_rows(source, data)
    outputs = [n.output[0] for n in last]
    made = {o: n for n in graph.node for o in n.output}
    means, fp32_out = fp32_means(Path(source), found, outputs, data, rows, step, Path(work))
    for t in found:
        w = numpy_helper.to_array(weights[t.float_weight]).astype(np.float64)
        q, scale, zero = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in t.weight.input[:3])
        shape = [1] * w.ndim
        shape[_output_axis(t.node)] = -1
        delta = w - (q - zero.reshape(shape)) * scale.reshape(shape)
        _add_to_bias(graph, inits, made, t.node, _shift(t, w, delta, means[t.node.name]))
    if last:  # the output layers, on the corrected model's own outputs
        onnxfile.save(model, out)
        measured = quantized_output_means(out, outputs, data, rows, step)
        for node in last:
            _add_to_bias(graph, inits, made, node, fp32_out[node.output[0]] - measured[node.output[0]])
    onnxfile.save(model, out)
    return len({t.node.name for t in found} | {n.name for n in last})
