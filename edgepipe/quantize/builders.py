"""Build one quantized model from one recipe with onnxruntime.quantization: a builder per
method, a fallback over source models, and what a built model contains."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from edgepipe import interrupts, onnxfile
from edgepipe.errors import InternalError, QuantizationError
from edgepipe.logs import quiet_logs
from edgepipe.onnxgraph import skeleton
from edgepipe.quantize import dynamic_matmul, static_matmul
from edgepipe.quantize.bias_correction import correct_biases
from edgepipe.quantize.calibration import ArrayCalibrationReader, calibration_rows
from edgepipe.quantize.config import EvalData
from edgepipe.quantize.recipes import COMPUTE_OPS, REMOVABLE_ACTIVATIONS, Recipe
from edgepipe.quantize.rewrites import (
    activation_matmuls,
    float_graph_outputs,
    gemms_as_matmul,
    with_activations,
)

# Op types that show a node really runs in integer arithmetic after quantization.
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QLinearConv",
                         "QLinearMatMul", "QuantizeLinear", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "QGemm", "MatMulNBits"})


def _common_options(recipe: Recipe, graph: onnx.GraphProto) -> dict:
    """Options shared by quantize_dynamic and quantize_static for `recipe` on `graph`."""
    from onnxruntime.quantization import QuantType

    graph_ops = {n.op_type for n in graph.node}
    # Only compute ops: Q/DQ around LayerNorm, Gather, Reshape … cost more than they save.
    # Dynamic leaves Conv in FP32: ConvInteger is slower than FP32 (recipes.VETOES).
    quantizable = (COMPUTE_OPS | REMOVABLE_ACTIVATIONS) if recipe.method == "static" else COMPUTE_OPS - {"Conv"}
    op_types = sorted((graph_ops & quantizable) - set(recipe.op_types_to_exclude))
    excluded = [*with_activations(graph, recipe.nodes_to_exclude), *activation_matmuls(graph)]
    return dict(per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                weight_type={"U8": QuantType.QUInt8, "S8": QuantType.QInt8}[recipe.weight_type],
                op_types_to_quantize=op_types, nodes_to_exclude=excluded or None,
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})


def _dynamic(recipe: Recipe, model_path: Path, out: Path, calibration, samples: int) -> None:
    from onnxruntime.quantization import quantize_dynamic

    if dynamic_matmul.applies(model_path, recipe):  # the same weights, written 2-6x faster
        dynamic_matmul.quantize_matmuls(model_path, out, recipe.per_channel, recipe.reduce_range,
                                        set(recipe.nodes_to_exclude))
        return
    graph = skeleton(model_path).graph
    options = _common_options(recipe, graph)
    if any(n.op_type == "Gemm" for n in graph.node):
        # once per source model and work folder: every dynamic recipe of a search builds from it
        # (a whole-model copy, even when the model's one Gemm is its classifier)
        tag = hashlib.sha256(str(Path(model_path).resolve()).encode()).hexdigest()[:12]
        as_matmul = out.with_name(f"gemm_as_matmul-{tag}.onnx")
        if as_matmul.is_file() or gemms_as_matmul(model_path, as_matmul):
            model_path = as_matmul
            options["op_types_to_quantize"] = sorted(set(options["op_types_to_quantize"]) | {"MatMul"})
    quantize_dynamic(str(model_path), str(out), use_external_data_format=onnxfile.is_large(model_path), **options)


def _static(recipe: Recipe, model_path: Path, out: Path, calibration: EvalData | None, samples: int) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if calibration is None:
        raise QuantizationError("static quantization needs calibration data: pass --calibration "
                                "data.npz (or run it in a pipeline, which uses the training data)")
    if recipe.symmetric:  # OpenVINO's layout, written directly
        static_matmul.quantize(model_path, out, calibration.inputs, samples, set(recipe.nodes_to_exclude),
                               measured=calibration.ranges)
        return
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    graph = skeleton(model_path).graph
    options = _common_options(recipe, graph)
    if recipe.calibration == "minmax":
        # One batch of intermediate tensors at a time, ranges merged (min of mins): memory bounded
        # by one batch, not the whole calibration set. (CalibMaxIntermediateOutputs would be the
        # obvious option, but onnxruntime 1.31 drops those batches without computing their ranges.)
        options["extra_options"]["CalibStridedMinMax"] = 1
    # Activation ranges depend on the source model, the method, the samples and the op types
    # calibrated, not on per-channel, format or reduce_range: the static recipes of one search
    # share them through a cache file in its work folder (one calibration instead of four).
    stat = Path(model_path).stat()  # a rewritten file at the same path is another model
    key = hashlib.sha256(repr((str(model_path), stat.st_size, stat.st_mtime_ns, recipe.calibration, samples,
                               options["op_types_to_quantize"], recipe.activation_type)).encode()).hexdigest()[:16]
    cache = out.parent / f"calibration-{key}.json"
    reader = None if cache.is_file() else ArrayCalibrationReader(
        calibration.inputs, samples, batch_size=calibration_rows(model_path, calibration.inputs))
    quantize_static(str(model_path), str(out), reader,
                    quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
                    activation_type={"U8": QuantType.QUInt8, "S8": QuantType.QInt8}[recipe.activation_type],
                    calibrate_method=methods[recipe.calibration], calibration_cache_path=cache,
                    use_external_data_format=onnxfile.is_large(model_path), **options)
    if recipe.format == "QDQ":
        float_graph_outputs(out)
    if recipe.bias_correction:
        correct_biases(out, model_path, calibration.inputs, samples, out, out.parent)


def _int4(recipe: Recipe, model_path: Path, out: Path, calibration, samples: int) -> None:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), bits=4, block_size=32, is_symmetric=True,
                                     accuracy_level=4,  # int8 activations in the kernel: fast on CPU
                                     nodes_to_exclude=list(recipe.nodes_to_exclude))
    quantizer.process()
    quantizer.model.save_model_to_file(str(out), use_external_data_format=onnxfile.is_large(model_path))


def _fp16(recipe: Recipe, model_path: Path, out: Path, calibration, samples: int) -> None:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True,
                                         node_block_list=list(recipe.nodes_to_exclude) or None)
    onnxfile.save(converted, out)


BUILDERS: dict[str, Callable[..., None]] = {"dynamic": _dynamic, "static": _static, "int4": _int4, "fp16": _fp16}


def build(recipe: Recipe, model_path: Path, out: Path, calibration: EvalData | None, samples: int) -> None:
    """Write `recipe` applied to `model_path` to `out`."""
    with quiet_logs():  # onnxruntime.quantization logs shape-inference warnings meant for its developers
        BUILDERS[recipe.method](recipe, Path(model_path), Path(out), calibration, samples)


def build_with_fallback(recipe: Recipe, models, out: Path,
                        calibration: EvalData | None, samples: int) -> str:
    """Build `recipe` from the first model in `models` (paths, or rewrites.Sources) that works;
    returns its file name. Raises the first error when all fail (a QuantizationError is never
    retried)."""
    first_error: Exception | None = None
    for model_path in models:
        with interrupts.attempt() as tried:  # onnxruntime.quantization raises many types
            build(recipe, model_path, out, calibration, samples)
            return model_path.name
        if isinstance(tried.error, QuantizationError):
            raise tried.error
        if hasattr(models, "failed"):
            models.failed(model_path, tried.error)
        first_error = first_error or tried.error
    if first_error is None:
        raise InternalError("build_with_fallback was given no model to build from")
    raise first_error


def count_integer_nodes(path: Path) -> int:
    """Nodes running in reduced precision: integer kernels, or FP16 initializers for fp16."""
    model = skeleton(path)  # op types and data types only
    fp16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return sum(n.op_type in INTEGER_OPS for n in model.graph.node) + fp16


def largest_matmul_weight(graph: onnx.GraphProto) -> int:
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    return max((sizes.get(n.input[1], 0) for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1),
               default=0)
