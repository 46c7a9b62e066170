"""How much faster INT8 can be than FP32 for a model's dominant kernel, on the CPU at hand: the
ceiling its speedup is judged against. A 1.3x model is weak on a CPU where its heaviest MatMul
runs 2.5x faster in INT8 (VNNI, AMX), and near the limit where it runs 1.4x (AVX2 only).

The dominant kernel is the MatMul/Gemm/Conv/LSTM node with the most multiply-adds at the largest
configured batch size (shapes from ONNX shape inference), leaving out one that reads the raw
graph input when another exists (a stem conv on 3 input channels gains little or nothing in
INT8 while the model's other convs gain the most). It is cut out of the model with its
real weights and attributes, quantized with the chosen recipe, and timed against its FP32 self
with the chosen model's session setting."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepipe.onnxgraph import initializer, skeleton, tensor_shapes
from edgepipe.quantize.builders import build
from edgepipe.quantize.config import EvalData
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.spec import InputSpec, make_feeds
from edgepipe.runtime.timing import measure_interleaved

KERNEL_OPS = ("MatMul", "Gemm", "Conv", "LSTM")


def _macs(node: onnx.NodeProto, shapes: dict[str, list[int]], inits: dict[str, onnx.TensorProto]) -> int:
    """Multiply-adds of a kernel node whose weight is a constant (0 when unknown)."""
    weight = inits.get(node.input[1]) if len(node.input) > 1 else None
    x = shapes.get(node.input[0])
    if weight is None or x is None:
        return 0
    w = list(weight.dims)
    if node.op_type in ("MatMul", "Gemm"):
        return int(np.prod(x[:-1])) * int(np.prod(w))
    if node.op_type == "Conv":
        out = shapes.get(node.output[0])
        return int(np.prod(out)) * int(np.prod(w[1:])) if out else 0
    if node.op_type == "LSTM":  # input and recurrent GEMMs per step
        recurrent = inits.get(node.input[2])
        return x[0] * x[1] * (int(np.prod(w)) + (int(np.prod(recurrent.dims)) if recurrent is not None else 0))
    return 0


def dominant_kernel(model: onnx.ModelProto, specs: list[InputSpec], batch: int
                    ) -> tuple[onnx.NodeProto, dict, float] | None:
    """(node, shapes, its share of the kernel multiply-adds), or None without such a node.
    `specs`: the model's inputs (Engine.inputs), which size its dynamic dims."""
    inits = {i.name: i for i in model.graph.initializer}
    shapes = tensor_shapes(model, make_feeds(specs, batch=batch))
    nodes = list(model.graph.node)
    macs = {i: _macs(n, shapes, inits) for i, n in enumerate(nodes) if n.op_type in KERNEL_OPS}
    total = sum(macs.values())
    if not total:
        return None
    # A kernel reading the raw graph input (a stem conv on 3 image channels) is not what the
    # model's INT8 time is made of: it is chosen only when nothing else carries weight.
    graph_inputs = {i.name for i in model.graph.input}
    inner = {i: m for i, m in macs.items() if m and nodes[i].input[0] not in graph_inputs}
    heaviest = max(inner or macs, key=(inner or macs).get)
    return nodes[heaviest], shapes, macs[heaviest] / total


def kernel_model(node: onnx.NodeProto, model: onnx.ModelProto, shapes: dict[str, list[int]], model_path: Path
                 ) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The node alone, with its real constant inputs (read from `model_path`: `model` may be its
    skeleton), and seeded feeds for the rest. An optional input computed in the graph with no
    static shape (an LSTM's initial state built from the batch size) is left out: the op's
    default (zeros) stands in for it."""
    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    inputs, constants, feeds = [], [], {}
    node = onnx.NodeProto.FromString(node.SerializeToString())
    for position, name in enumerate(node.input):
        if position > 0 and name and name not in inits and name not in shapes:
            node.input[position] = ""
    for name in node.input:
        if not name:
            continue
        if name in inits:
            constants.append(numpy_helper.from_array(initializer(model_path, name), name))
        elif name not in feeds:
            shape = shapes[name]
            # dim 0 left free: calibration feeds as many rows as fit in its batches
            # (calibration.BATCH_BYTES), and a fixed dim would refuse them
            inputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, ["n", *shape[1:]]))
            feeds[name] = rng.standard_normal(shape).astype(np.float32)
    outputs = [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, None) for o in node.output if o]
    graph = helper.make_graph([node], "kernel", inputs, outputs, constants)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
    kernel = helper.make_model(graph, opset_imports=opsets)
    kernel.ir_version = model.ir_version
    return kernel, feeds


def measure_ceiling(model_path: Path, specs: list[InputSpec], recipe, batch: int, session, work: Path,
                    rounds: int = 8) -> dict:
    """The dominant kernel's INT8-vs-FP32 speedup with `recipe` at `batch`, and what it is."""
    model = skeleton(model_path)  # the graph and the weights' shapes, not their data
    found = dominant_kernel(model, specs, batch)
    if found is None:
        return {"error": "no MatMul/Gemm/Conv/LSTM with a constant weight"}
    node, shapes, share = found
    kernel, feeds = kernel_model(node, model, shapes, model_path)
    stem = f"ceiling-{node.op_type}-{abs(hash(node.name)) % 10**8}"
    fp32, int8 = work / f"{stem}.fp32.onnx", work / f"{stem}.int8.onnx"
    onnx.save(kernel, str(fp32))
    # calibrated on the timing feeds themselves: the kernel's inputs have fixed shapes
    build(replace(recipe, nodes_to_exclude=()), fp32, int8, EvalData(feeds), batch)
    options = session.engine_options()
    # FP32 on onnxruntime, as the model's baseline; INT8 on the backend the recipe runs on
    calls = {name: Engine(path, providers="cpu", backend=backend, **options).runner(feeds)
             for name, path, backend in (("fp32", fp32, "onnxruntime"), ("int8", int8, recipe.backend))}
    stats = measure_interleaved(calls, batch, rounds=rounds)
    return {"op": node.op_type, "node": node.name, "input_shape": shapes.get(node.input[0]),
            "weight_shape": next((list(i.dims) for i in kernel.graph.initializer if i.name == node.input[1]), None),
            "share_of_macs": round(share, 3), "batch": batch, "recipe": recipe.name, "session": session.to_dict(),
            "kernel_speedup": round(stats["fp32"].p50_ms / stats["int8"].p50_ms, 3)}


def ceiling_record(measured: dict, model_speedup: float | None) -> dict:
    """The measured ceiling plus the model's speedup at the same batch as a fraction of it."""
    if "error" in measured or model_speedup is None:
        return measured
    return measured | {"model_speedup": round(model_speedup, 3),
                       "fraction_of_ceiling": round(model_speedup / measured["kernel_speedup"], 3)}

