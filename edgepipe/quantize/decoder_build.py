"""The candidates of decoder quantization and how each is built: weight-only INT4 (onnxruntime's
MatMulNBits quantizer: RTN, HQQ or GPTQ, at a block size, with INT8 or FP32 compute) and dynamic
INT8 of the MatMuls."""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe import onnxfile
from edgepipe.errors import QuantizationError
from edgepipe.runtime.generate import DecoderSpec, prefill_feeds


@dataclass(frozen=True)
class DecoderRecipe:
    name: str
    algorithm: str  # rtn | hqq | gptq | int8-dynamic
    block_size: int = 0
    accuracy_level: int = 0  # MatMulNBits compute: 4 = INT8 activations, 0 = FP32
    opt_in: str = ""  # why it is tried only when named (--recipe)

    @property
    def describe(self) -> str:
        if self.algorithm == "int8-dynamic":
            return "dynamic INT8 MatMul (weights per tensor, activations quantized at run time)"
        compute = "INT8 compute" if self.accuracy_level == 4 else "FP32 compute"
        return f"INT4 weight-only {self.algorithm.upper()}, blocks of {self.block_size}, {compute}"


# In the order they are built: the likeliest winners first, the slowest to build (GPTQ) last.
RECIPES = (
    DecoderRecipe("int4-rtn-b32-acc4", "rtn", 32, 4),
    DecoderRecipe("int4-rtn-b128-acc4", "rtn", 128, 4),
    DecoderRecipe("int4-hqq-b64-acc4", "hqq", 64, 4,
                  opt_in="HQQ's float zero points miss onnxruntime's fast INT4 kernels (measured on an AVX2 CPU: "
                         "5x slower per token than FP32, and 110 s to build for a 0.3B model); name it with "
                         "--recipe int4-hqq-b64-acc4"),
    DecoderRecipe("int4-rtn-b32", "rtn", 32, 0),
    DecoderRecipe("int8-dynamic", "int8-dynamic"),
    DecoderRecipe("int4-gptq-b128-acc4", "gptq", 128, 4,
                  opt_in="GPTQ runs on the CPU in numpy and takes many minutes on a model of hundreds of millions "
                         "of parameters; name it with --recipe int4-gptq-b128-acc4"),
)
BY_NAME = {r.name: r for r in RECIPES}


class _Prefills:
    """GPTQ's calibration reader: prefills of held-out windows (iterable, as the builder wants)."""

    def __init__(self, spec: DecoderSpec, windows: np.ndarray):
        self.feeds = [prefill_feeds(spec, w[None]) for w in windows]
        self._it = iter(self.feeds)

    def __iter__(self):
        return iter(self.feeds)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):
        self._it = iter(self.feeds)


@contextlib.contextmanager
def _quiet_builders():
    """onnxruntime's quantizers log every node at INFO (and set the root logger to print it), and
    GPTQ prints a progress bar to stdout: keep both out of edgepipe's output."""
    loggers = [logging.getLogger(), logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def build(recipe: DecoderRecipe, src: Path, out: Path, spec: DecoderSpec, calibration: np.ndarray) -> None:
    """Write `recipe`'s model of `src` to `out` (external data beside it when large)."""
    with _quiet_builders():
        _build(recipe, src, out, spec, calibration)


def constant_matmuls(model) -> int:
    """Rewrite, in place, the weights the INT4 quantizer would not see as MatMuls with constant
    weights: Gemm with a constant B (GPT-2's Conv1D layers) becomes MatMul (+ Add of its bias),
    and a Transpose of an initializer feeding a MatMul (a tied LM head) becomes a transposed
    initializer. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    nodes, rewritten, dead = [], 0, set()  # dead: ids of Transposes whose only reader moved
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (node.op_type == "Gemm" and node.input[1] in inits and not attrs.get("transA", 0)
                and attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0):
            weight = node.input[1]
            if attrs.get("transB", 0):
                flipped = numpy_helper.from_array(numpy_helper.to_array(inits[weight]).T.copy(), f"{weight}_t")
                graph.initializer.append(flipped)
                weight = flipped.name
            product = f"{node.output[0]}_matmul" if len(node.input) > 2 and node.input[2] else node.output[0]
            nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_matmul"))
            if product != node.output[0]:
                nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                              name=f"{node.name}_bias"))
            rewritten += 1
            continue
        source = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if (source is not None and source.op_type == "Transpose" and source.input[0] in inits
                and len(inits[source.input[0]].dims) == 2):
            name = f"{source.input[0]}_transposed"
            if name not in inits:
                inits[name] = numpy_helper.from_array(numpy_helper.to_array(inits[source.input[0]]).T.copy(), name)
                graph.initializer.append(inits[name])
            node.input[1] = name
            readers[source.output[0]] -= 1
            if not readers[source.output[0]]:
                dead.add(id(source))
            rewritten += 1
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(n for n in nodes if id(n) not in dead)
    return rewritten


def _build(recipe: DecoderRecipe, src: Path, out: Path, spec: DecoderSpec, calibration: np.ndarray) -> None:
    import onnx

    model = onnx.load(str(src))
    if constant_matmuls(model):  # Gemm / tied-head weights the quantizers would skip
        src = out.with_name(out.stem + ".matmuls.onnx")
        onnxfile.save(model, src)
    del model
    if recipe.algorithm == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(out), op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                         use_external_data_format=onnxfile.is_large(str(src)))
        return
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    if recipe.algorithm == "rtn":
        algo = nbits.DefaultWeightOnlyQuantConfig(block_size=recipe.block_size, is_symmetric=False,
                                                  accuracy_level=recipe.accuracy_level or None)
    elif recipe.algorithm == "hqq":
        algo = nbits.HQQWeightOnlyQuantConfig(block_size=recipe.block_size)
    else:
        algo = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Prefills(spec, calibration),
                                               block_size=recipe.block_size)
    quantizer = nbits.MatMulNBitsQuantizer(str(src), block_size=recipe.block_size, is_symmetric=False,
                                           accuracy_level=recipe.accuracy_level or None, algo_config=algo)
    quantizer.process()
    model = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    packed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            packed += 1
            if recipe.accuracy_level:  # not every algorithm passes it on
                kept = [a for a in node.attribute if a.name != "accuracy_level"]
                del node.attribute[:]
                node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", recipe.accuracy_level)])
    if not packed:
        raise QuantizationError("no MatMul with constant weights was quantized to INT4")
    onnxfile.save(model, out)


