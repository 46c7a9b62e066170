"""Dynamic INT8 quantization of a model's constant-weight MatMuls (and Gemms), written straight
as the kernels onnxruntime runs: the same weights, scales and zero points as
onnxruntime.quantization.quantize_dynamic, in a fraction of its time.

quantize_dynamic emits DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul per MatMul, which
onnxruntime's optimizer fuses at load into DynamicQuantizeMatMul (an activation with one
quantized consumer) or a shared DynamicQuantizeLinear feeding MatMulIntegerToFloat (one with
several: attention's Q, K and V). This module writes that fused form directly. Its cost is
loading and saving the model: quantize_dynamic also runs shape inference twice and quantizes
per-channel weights one column at a time in Python, most of its time on a large model.

Only S8 symmetric weights (the dynamic recipes' type) on 2-D float weights; `applies` says
whether a model and recipe fit, and the builder falls back to quantize_dynamic otherwise."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepipe import onnxfile
from edgepipe.onnxgraph import skeleton
from edgepipe.quantize.recipes import COMPUTE_OPS

# S8 weight ranges of onnxruntime.quantization (symmetric: -127..127; reduce_range: 7 bits)
FULL_RANGE, REDUCED_RANGE = (-127, 127), (-64, 64)


def weight_params(weight: np.ndarray, per_channel: bool, reduce_range: bool
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale, int8 zero point) of a 2-D float32 weight [K, N], symmetric,
    per tensor (scalar scale) or per output column ([N] scales): the arithmetic of
    onnxruntime.quantization's compute_scale_zp and quantize_nparray, vectorized."""
    qmin, qmax = REDUCED_RANGE if reduce_range else FULL_RANGE
    weight = np.asarray(weight, np.float32)
    axis = 0 if per_channel else None
    rmin = np.minimum(weight.min(axis=axis), np.float32(0))
    rmax = np.maximum(weight.max(axis=axis), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    scale = (absmax.astype(np.float64) * 2) / np.float64(qmax - qmin)  # rmax - rmin, in float64
    tiny = scale < np.finfo(np.float32).tiny  # an all-zero column: scale 1
    scale = np.where(tiny, 1.0, scale).astype(np.float32)
    quantized = np.clip((weight / scale).round(), -128, 127).astype(np.int8)
    return quantized, scale, np.zeros(scale.shape, np.int8)


def _transposed(node: onnx.NodeProto) -> bool:
    """Whether a Gemm reads its weight transposed ([N, K])."""
    return node.op_type == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)


def _as_matmul(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """Whether a Gemm is a plain x @ W (+ bias) with a constant W."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return (node.input[1] in inits and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0)


def _targets(graph: onnx.GraphProto, excluded: set[str]) -> list[onnx.NodeProto] | None:
    """The nodes to quantize, or None when some quantizable node is outside this module's reach
    (a 3-D weight, a Gemm with alpha/transA, an LSTM …): quantize_dynamic handles those."""
    inits = {i.name: i for i in graph.initializer}
    targets = []
    for node in graph.node:
        if node.name in excluded or node.op_type not in COMPUTE_OPS - {"Conv", "ConvTranspose"}:
            continue  # dynamic recipes leave Conv in FP32 (builders._common_options)
        weight = inits.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type in ("MatMul", "Gemm") and weight is None and node.input[0] not in inits:
            continue  # activation x activation (attention scores): never quantized
        if (node.op_type not in ("MatMul", "Gemm") or weight is None or len(weight.dims) != 2
                or weight.data_type != TensorProto.FLOAT or node.input[0] in inits
                or (node.op_type == "Gemm" and not _as_matmul(node, inits))):
            return None
        targets.append(node)
    return targets


def _bias_adds(graph: onnx.GraphProto, targets: list[onnx.NodeProto], inits: dict[str, onnx.TensorProto]
               ) -> dict[int, tuple[onnx.NodeProto, str]]:
    """{id(target): (the Add after it, its bias)} for targets whose only consumer is an Add of a
    constant float [N] (N: the weight's output columns), or a Gemm's 1-D bias of [N]."""
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    outputs = {o.name for o in graph.output}
    folded = {}
    for node in targets:
        columns = inits[node.input[1]].dims[0 if _transposed(node) else 1]
        if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            c = inits.get(node.input[2])
            if c is not None and list(c.dims) == [columns] and c.data_type == TensorProto.FLOAT:
                folded[id(node)] = (None, node.input[2])
            continue
        after = readers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add" or node.output[0] in outputs:
            continue
        add = after[0]
        other = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        c = inits.get(other)
        if c is not None and list(c.dims) == [columns] and c.data_type == TensorProto.FLOAT:
            folded[id(node)] = (add, other)
    return folded


def applies(model_path: Path, recipe) -> bool:
    """Whether `recipe` on the model at `model_path` can be written by this module."""
    if recipe.method != "dynamic" or recipe.weight_type != "S8" or recipe.op_types_to_exclude:
        return False
    return _targets(skeleton(model_path).graph, set(recipe.nodes_to_exclude)) is not None


def quantize_matmuls(model_path: Path, out: Path, per_channel: bool, reduce_range: bool,
                     excluded: set[str] = frozenset()) -> int:
    """Write `model_path` with its constant-weight MatMuls and Gemms (but `excluded` node names)
    quantized; returns how many. Raises ValueError when `applies` would have said no."""
    model = onnx.load(str(model_path))
    graph = model.graph
    targets = _targets(graph, set(excluded))
    if targets is None:
        raise ValueError("the model has quantizable nodes this builder does not write")
    inits = {i.name: i for i in graph.initializer}
    chosen = {id(n) for n in targets}
    consumers: dict[str, int] = defaultdict(int)
    for node in targets:
        consumers[node.input[0]] += 1
    folded = _bias_adds(graph, targets, inits)
    skipped = {id(add) for add, _ in folded.values() if add is not None}
    weights: dict[tuple[str, bool], tuple[str, str, str]] = {}  # (name, read by a Gemm) -> q, scale, zp
    new_inits: list[onnx.TensorProto] = []
    activations: dict[str, tuple[str, str, str]] = {}  # input -> its shared DynamicQuantizeLinear
    nodes: list[onnx.NodeProto] = []
    for node in graph.node:
        if id(node) in skipped:
            continue
        if id(node) not in chosen:
            nodes.append(node)
            continue
        key = (node.input[1], node.op_type == "Gemm")
        if key not in weights:
            weight = numpy_helper.to_array(inits[node.input[1]])
            q, scale, zp = weight_params(weight.T if _transposed(node) else weight, per_channel, reduce_range)
            base = node.input[1] + ("_as_matmul" if node.op_type == "Gemm" else "")  # rewrites' name
            names = (f"{base}_quantized", f"{base}_scale", f"{base}_zero_point")
            new_inits += [numpy_helper.from_array(np.ascontiguousarray(q), names[0]),
                          numpy_helper.from_array(scale, names[1]), numpy_helper.from_array(zp, names[2])]
            weights[key] = names
        q, scale, zp = weights[key]
        # a bias the kernel takes: a following Add of a constant [N] (what onnxruntime's fusion of
        # quantize_dynamic's graph folds in too), or a Gemm's own; any other stays an Add
        add, bias = folded.get(id(node), (None, ""))
        output = add.output[0] if add is not None else node.output[0]
        extra = ""
        if id(node) not in folded and node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
            extra, output = node.input[2], f"{node.output[0]}_matmul"
        x = node.input[0]
        if consumers[x] == 1:
            nodes.append(helper.make_node("DynamicQuantizeMatMul", [x, q, scale, zp, bias], [output],
                                          name=f"{node.name}_quant", domain="com.microsoft"))
        else:
            if x not in activations:
                activations[x] = (f"{x}_quantized", f"{x}_scale", f"{x}_zero_point")
                nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(activations[x]),
                                              name=f"{x}_QuantizeLinear"))
            xq, xs, xz = activations[x]
            nodes.append(helper.make_node("MatMulIntegerToFloat", [xq, q, xs, scale, xz, zp, bias], [output],
                                          name=f"{node.name}_quant", domain="com.microsoft"))
        if extra:
            nodes.append(helper.make_node("Add", [output, extra], [node.output[0]], name=f"{node.name}_bias"))
    used = {i for n in nodes for i in n.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.node[:], graph.initializer[:]
    graph.node.extend(nodes)
    graph.initializer.extend(kept + new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnxfile.save(model, out)
    return len(targets)
