"""Which quantized nodes add the most error: channel-averaged noise per node, on instrumented
copies of the FP32 and quantized graphs (see edgepipe.instrument: the numbers only *rank*
nodes; every verdict is measured again on the unmodified model)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from edgepipe.instrument import ChannelNoise, after_qdq, instrumented_copy, run_in_chunks
from edgepipe.onnxgraph import skeleton
from edgepipe.quantize.recipes import COMPUTE_OPS, REMOVABLE_ACTIVATIONS


def apply_activation(node: onnx.NodeProto, x: np.ndarray, constants: Mapping[str, np.ndarray]) -> np.ndarray:
    """Relu or Clip on `x`, with Clip's bounds from its initializer inputs or (opset < 11) attributes."""
    if node.op_type == "Relu":
        return np.maximum(x, 0)
    bounds = {a.name: a.f for a in node.attribute if a.name in ("min", "max")}
    for name, index in (("min", 1), ("max", 2)):
        if len(node.input) > index and node.input[index] in constants:
            bounds[name] = float(constants[node.input[index]])
    if not bounds:
        return x
    return np.clip(x, bounds.get("min"), bounds.get("max"))


def rank_nodes(fp32_path: Path, quant_path: Path, feeds: Mapping[str, np.ndarray],
               work: Path, chunk_rows: int = 8) -> list[dict]:
    """Compute nodes of the FP32 graph, most damaging first, on a QDQ or dynamic model (a
    QOperator model renames every quantized tensor, so rank on its QDQ twin). The instrumented
    models run `chunk_rows` rows at a time with the noise accumulated per channel, so memory is
    bounded by one chunk's intermediate tensors (every tensor of a transformer for all probe rows
    at once does not fit in memory).

    A node's `added_nsr` is the noise (relative to signal) of its output as consumers see it,
    after any Q/DQ, minus that of its input as produced upstream: the error that quantizing its
    input, weights and output adds. A quantized activation tensor thus counts for both its
    producer and its consumer, and both must stay FP32 to keep it float."""
    fp32_graph = skeleton(fp32_path).graph
    quant_graph = skeleton(quant_path).graph
    quant_tensors = {out for n in quant_graph.node for out in n.output} | {i.name for i in quant_graph.input}
    post = after_qdq(quant_graph)
    consumers: dict[str, list] = {}
    for n in fp32_graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)

    def observed(node) -> str:
        """The tensor that carries the node's result in both graphs: the quantizer folds a
        Relu/Clip that follows a compute node into it, and the node then writes the activation's
        output name."""
        out = node.output[0]
        after = consumers.get(out, [])
        if out not in quant_tensors and len(after) == 1 and after[0].op_type in REMOVABLE_ACTIVATIONS:
            return after[0].output[0]
        return out

    # A folded activation's name now holds the compute node's raw result: the Relu/Clip happens
    # in the QuantizeLinear after it. Compare that tensor after applying the activation here.
    quant_producer = {out: n.op_type for n in quant_graph.node for out in n.output}
    folded = {n.output[0]: n for n in fp32_graph.node
              if n.op_type in REMOVABLE_ACTIVATIONS and quant_producer.get(n.output[0], n.op_type) != n.op_type}
    activation_inputs = {name for n in folded.values() for name in n.input[1:]}  # Clip's bounds
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in fp32_graph.initializer if i.name in activation_inputs}

    nodes = [n for n in fp32_graph.node if n.op_type in COMPUTE_OPS and n.name and observed(n) in quant_tensors]
    pairs = {}  # fp32 tensor -> quantized-model tensor to compare it with
    for node in nodes:
        out = observed(node)
        pairs[("in", node.name)] = (node.input[0], node.input[0])
        pairs[("out", node.name)] = (out, post.get(out, out))
    ref_model = instrumented_copy(fp32_path, sorted({a for a, _ in pairs.values()}), work)
    quant_model = instrumented_copy(quant_path, sorted({b for _, b in pairs.values() if b in quant_tensors}), work)
    noise: dict = {}  # key -> ChannelNoise, accumulated chunk by chunk
    exact: set = set()  # graph inputs or tensors not observable: treated as exact
    for reference, actual in zip(run_in_chunks(ref_model, feeds, chunk_rows),
                                 run_in_chunks(quant_model, feeds, chunk_rows)):
        for key, (ref_name, quant_name) in pairs.items():
            if ref_name not in reference or quant_name not in actual:
                exact.add(key)
                continue
            value = actual[quant_name]
            if key[0] == "in" and quant_name in folded:
                value = apply_activation(folded[quant_name], value, constants)
            noise.setdefault(key, ChannelNoise()).add(reference[ref_name], value)
        del reference, actual

    def nsr(key) -> float:
        return 0.0 if key in exact or key not in noise else noise[key].nsr()

    ranked = [{"node": n.name, "op": n.op_type, "nsr_in": nsr(("in", n.name)), "nsr_out": nsr(("out", n.name))}
              for n in nodes]
    for row in ranked:
        row["added_nsr"] = row["nsr_out"] - row["nsr_in"]
        row["sqnr_out_db"] = round(-10 * math.log10(max(row["nsr_out"], 1e-10)), 2)
    return sorted(ranked, key=lambda r: r["added_nsr"], reverse=True)
