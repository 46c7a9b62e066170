"""Graph rewrites around quantization: pre-processing with fallbacks, Gemm -> MatMul, float
graph outputs, shape annotations stripped, onnxruntime.transformers fusions. Each takes a model
file and writes one; none judges whether the result is better (the search does)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import onnx

from edgepipe import interrupts, onnxfile
from edgepipe.logs import quiet_logs
from edgepipe.onnxgraph import ort_tools_without_torch, skeleton, without_value_info
from edgepipe.quantize.recipes import REMOVABLE_ACTIVATIONS

TRANSFORMER_OPS = frozenset({"LayerNormalization", "Softmax"})


# Models larger than this are pre-processed the lean way (lean_preprocess).
LEAN_PREPROCESS_BYTES = 100_000_000


def lean_preprocess(model_path: Path, out: Path) -> Path:
    """What quant_pre_process does that the quantizers need, at the cost of one onnxruntime
    session: the value_info stripped (a streamed copy) and onnxruntime's basic graph
    optimizations (constant folding, redundant nodes removed) written to `out`. It skips
    symbolic and ONNX shape inference, which the quantizers run themselves, and holds no copy
    of the model in Python (quant_pre_process does, and its symbolic shape inference gives up on
    some exported transformers)."""
    import onnxruntime as ort

    stripped = strip_value_info(model_path, out.with_name(out.stem + ".in.onnx"))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(out)
    if onnxfile.is_large(stripped):
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         onnxfile.sidecar(out).name)
    ort.InferenceSession(str(stripped), options, providers=["CPUExecutionProvider"])
    return out


def preprocess(model_path: Path, work_dir: Path) -> tuple[Path, list[dict]]:
    """quant_pre_process, then without symbolic shape inference, then the raw model; for a
    model over LEAN_PREPROCESS_BYTES, lean_preprocess, then the raw model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    ort_tools_without_torch()  # quant_pre_process imports onnxruntime.tools
    attempts = []
    model_path, work_dir = Path(model_path).resolve(), Path(work_dir).resolve()
    if onnxfile.model_bytes(model_path) > LEAN_PREPROCESS_BYTES:
        with interrupts.attempt() as tried:
            out = lean_preprocess(model_path, work_dir / "pre_lean.onnx")
            attempts.append({"step": "lean", "ok": True})
            return out, attempts
        attempts.append({"step": "lean", "ok": False, "error": _failure(tried.error)})
        attempts.append({"step": "raw", "ok": True})
        return model_path, attempts
    for label, kwargs in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True})):
        out = work_dir / f"pre_{label}.onnx"
        if onnxfile.is_large(model_path):  # one external-data file named as edgepipe names it
            kwargs |= {"save_as_external_data": True, "all_tensors_to_one_file": True,
                       "external_data_location": onnxfile.sidecar(out).name}
        with interrupts.attempt() as tried:
            # When symbolic shape inference gives up, ORT saves sym_shape_infer_temp.onnx plus
            # a uuid-named .data file into the current directory: keep that in work_dir.
            with contextlib.chdir(work_dir), quiet_logs():  # its shape warnings are not the user's
                quant_pre_process(str(model_path), str(out), **kwargs)
            attempts.append({"step": label, "ok": True})
            return out, attempts
        attempts.append({"step": label, "ok": False, "error": _failure(tried.error)})
    attempts.append({"step": "raw", "ok": True})
    return model_path, attempts


def _failure(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def with_activations(graph: onnx.GraphProto, excluded) -> list[str]:
    """`excluded` plus the Relu/Clip right after an excluded node: left quantizable, such an
    activation would get its own Q/DQ pair and put the FP32 node's output through INT8 anyway."""
    names = list(excluded)
    producer = {out: node.name for node in graph.node for out in node.output}
    for node in graph.node:
        if node.op_type in REMOVABLE_ACTIVATIONS and node.input and producer.get(node.input[0]) in names:
            names.append(node.name)
    return names


def activation_matmuls(graph: onnx.GraphProto) -> list[str]:
    """MatMuls with no constant operand (attention's Q@K^T, P@V): quantizing them adds two
    runtime quantize ops and saves no weight bandwidth, so they stay FP32."""
    constants = {init.name for init in graph.initializer}
    constants |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    return [n.name for n in graph.node
            if n.op_type == "MatMul" and not any(i in constants for i in n.input)]


def gemms_as_matmul(model_path: Path, out: Path) -> int:
    """Write `model_path` to `out` with each Gemm that has a constant weight as MatMul (+ Add for
    the bias), and return how many were rewritten. onnxruntime's dynamic quantizer only handles
    MatMul, and torch exports nn.Linear on 2-D input as Gemm: without this the dynamic recipe
    quantizes nothing in an MLP. The MatMul keeps the Gemm's name (exclusion lists still apply)
    and the Add its output name."""
    from onnx import helper, numpy_helper

    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    rewritten, nodes = 0, []
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
                or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        weight = weight.T if attrs.get("transB", 0) else weight
        name = f"{node.input[1]}_as_matmul"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight), name))
        has_bias = len(node.input) > 2 and node.input[2]
        product = f"{node.output[0]}_matmul" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], name], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=f"{node.name}_bias"))
        rewritten += 1
    if rewritten:
        used = {i for n in nodes for i in n.input}
        kept = [init for init in graph.initializer if init.name in used]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(nodes)
        graph.initializer.extend(kept)
        onnxfile.save(model, out)
    return rewritten


def float_graph_outputs(path: Path) -> list[str]:
    """Drop the Q -> DQ pair between a compute node and a graph output: rounding the logits to
    8 bits helps nobody, and without it ORT fuses the node into a QGemm/QLinear kernel with a
    float output and no DequantizeLinear after it (MLP b32: 1.90x -> 1.98x vs FP32, same
    accuracy). Rewrites `path` in place; returns the nodes that now write a graph output."""
    model = onnx.load(str(path))
    graph = model.graph
    outputs = {o.name for o in graph.output}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    changed = []
    for dq in [n for n in graph.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs]:
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0]) != 1:
            continue
        source = producer.get(q.input[0])
        # MatMul/Gemm only: ORT has integer kernels with a float output for them (QGemm,
        # MatMulIntegerToFloat); a Conv without the Q after it is not fused to QLinearConv and
        # runs in float on dequantized inputs, slower than FP32
        if source is None or source.op_type not in ("MatMul", "Gemm") or consumers.get(q.input[0]) != 1 \
                or q.input[0] in outputs:
            continue
        source.output[0] = dq.output[0]
        graph.node.remove(q)
        graph.node.remove(dq)
        changed.append(source.name)
    if changed:
        onnxfile.save(model, path)
    return changed


class Sources:
    """The models a candidate can be built from, in fallback order: the pre-processed model
    (weights constant-folded), the same without exporter/shape-inference value_info, then the raw
    model without it. Each is written only when a build first needs it (a stripped copy costs a
    whole-model write), and one that failed ONNX shape inference is not tried again:
    onnxruntime's quantizers all run it first, so it fails the same way for every recipe."""

    def __init__(self, pre: Path, raw: Path, work: Path):
        self._steps = [(pre, None), (work / "pre_stripped.onnx", pre)]
        if Path(raw).resolve() != Path(pre).resolve():
            self._steps.append((work / "raw_stripped.onnx", raw))
        self._written: set[Path] = set()
        self._broken: set[Path] = set()

    @property
    def first(self) -> Path:
        return self._steps[0][0]

    def __iter__(self):
        for out, stripped_from in self._steps:
            if out in self._broken:
                continue
            if stripped_from is not None and out not in self._written:
                strip_value_info(stripped_from, out)
                self._written.add(out)
            yield out

    def failed(self, path: Path, exc: Exception) -> None:
        if "ShapeInferenceError" in str(exc) or type(exc).__name__ == "InferenceError":
            self._broken.add(path)


def strip_value_info(model_path: Path, out: Path) -> Path:
    """The raw model without intermediate shape annotations: exporters' stale value_info makes
    ONNX shape inference inside quantization fail ("Inferred shape and existing shape differ").
    A streamed copy (no parse); a model with external data is re-saved so its tensors follow."""
    if onnxfile.model_files(model_path)[1:]:
        model = onnx.load(str(model_path))
        del model.graph.value_info[:]
        onnxfile.save(model, out)
        return out
    return without_value_info(model_path, out)


def transformer_fusions(model_path: Path, out: Path) -> list[str]:
    """onnxruntime.transformers graph fusions (BERT-like patterns) of `model_path` into `out`;
    returns the op types the fusions added. Whether to keep them is measured by the caller."""
    from onnxruntime.transformers.optimizer import optimize_model

    with quiet_logs():
        optimized = optimize_model(str(model_path), model_type="bert", num_heads=0, hidden_size=0, opt_level=0)
        optimized.save_model_to_file(str(out), use_external_data_format=onnxfile.is_large(model_path))
    before = {n.op_type for n in skeleton(model_path).graph.node}
    return sorted({n.op_type for n in skeleton(out).graph.node} - before)
