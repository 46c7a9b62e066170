"""Quantization recipes, and the rules (as data) that pick candidates for a graph and a CPU."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Iterable, Literal, get_args

from edgepipe.runtime.hardware import CpuInfo
from edgepipe.runtime.openvino_backend import Backend

# The closed sets a recipe is made of; a value outside them is a bug, caught where it is built.
Method = Literal["dynamic", "static", "int4", "fp16"]  # int4: weight-only MatMulNBits
Format = Literal["QDQ", "QOperator"]
QuantType = Literal["U8", "S8"]
Calibration = Literal["minmax", "entropy", "percentile"]


@dataclass(frozen=True)
class Recipe:
    """One way to quantize a model with onnxruntime.quantization."""

    method: Method
    format: Format = "QDQ"  # static only
    activation_type: QuantType = "U8"  # static only
    weight_type: QuantType = "S8"
    per_channel: bool = False
    calibration: Calibration = "minmax"  # static only
    reduce_range: bool = False
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_exclude: tuple[str, ...] = ()
    backend: Backend = "onnxruntime"  # the runtime that runs the built model
    # static only: zero-point-free activations and every MatMul, attention's too (static_matmul)
    symmetric: bool = False
    # static QDQ only: Conv and Gemm biases corrected for their weights' rounding (bias_correction)
    bias_correction: bool = False
    reasons: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self):
        for value, kind in ((self.method, Method), (self.format, Format), (self.activation_type, QuantType),
                            (self.weight_type, QuantType), (self.calibration, Calibration), (self.backend, Backend)):
            if value not in get_args(kind):
                raise ValueError(f"recipe value {value!r} is not one of {', '.join(get_args(kind))}")

    @property
    def name(self) -> str:
        if self.method == "int4":
            parts = ["int4-weight-only", "MatMulNBits", "block32"]
        elif self.method == "fp16":
            parts = ["fp16", "io-fp32"]
        elif self.method == "dynamic":
            parts = ["dynamic", f"W{self.weight_type}"]
        elif self.symmetric:
            parts = [f"static-{self.format}", f"symmetric-A8W{self.weight_type}", "every-matmul", self.calibration]
        else:
            parts = [f"static-{self.format}", f"A{self.activation_type}W{self.weight_type}",
                     self.calibration]
        if self.method in ("dynamic", "static"):
            parts.append("per-channel" if self.per_channel else "per-tensor")
        if self.bias_correction:
            parts.append("bias-corrected")
        if self.reduce_range:
            parts.append("reduce-range")
        if self.nodes_to_exclude:
            parts.append(f"excl{len(self.nodes_to_exclude)}")
        if self.backend != "onnxruntime":
            parts.append(self.backend)
        return "/".join(parts)

    @property
    def file_twin(self) -> "Recipe":
        """The recipe that builds the same file: backends differ only in what runs it."""
        return replace(self, backend="onnxruntime", reasons=())

    @property
    def uncorrected(self) -> "Recipe":
        """The recipe whose file this one corrects the biases of."""
        return replace(self, bias_correction=False, reasons=())

    def to_dict(self) -> dict:
        data = asdict(self)
        data["name"] = self.name
        data["nodes_to_exclude"] = list(self.nodes_to_exclude)
        data["op_types_to_exclude"] = list(self.op_types_to_exclude)
        data["reasons"] = list(self.reasons)
        return data

    def excluding(self, nodes: Iterable[str]) -> "Recipe":
        merged = tuple(dict.fromkeys([*self.nodes_to_exclude, *nodes]))
        return replace(self, nodes_to_exclude=merged)


# Ops each method turns into integer kernels in onnxruntime 1.31 (from its quantization registry).
# Dynamic covers Gemm through a rewrite to MatMul + Add (auto.gemms_as_matmul).
DYNAMIC_OPS = frozenset({"MatMul", "Gemm", "Conv", "LSTM", "Attention", "Gather", "EmbedLayerNormalization"})
STATIC_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "LayerNormalization"})

# Graph op -> methods allowed for it, each with its reason (benchmarks/kernel_ceiling.py measures
# the kernels behind them). A recipe is a candidate when it covers at least one compute op and is
# not vetoed by any op in the graph.
VETOES = {
    # ConvInteger (dynamic Conv) is many times slower than FP32: CNNs need static QDQ.
    ("Conv", "dynamic"): "dynamic Conv (ConvInteger) is many times slower than FP32 on CPU",
    # QDQ leaves LSTM in float; only dynamic quantization has an integer LSTM kernel.
    ("LSTM", "static"): "static QDQ does not quantize LSTM (dynamic has DynamicQuantizeLSTM)",
}
COMPUTE_OPS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "LSTM", "Attention"})
# Activations the static QDQ quantizer folds into the range of the op before them, when it is
# allowed to handle them. Left out, each stays as float with its own Q/DQ pair, and ORT runs a
# DequantizeLinear + QuantizeLinear requantization per layer (34% of the INT8 MLP's time).
REMOVABLE_ACTIVATIONS = frozenset({"Relu", "Clip"})


def activation_weight_types(cpu: CpuInfo) -> tuple[str, str, bool, str]:
    """(activation, weight, reduce_range, reason) for this CPU's integer kernels."""
    if cpu.is_x86 and cpu.has_vnni:
        return "U8", "S8", False, "x86 with VNNI: U8 activations x S8 weights is the fast path"
    if cpu.is_x86:
        return "U8", "S8", True, ("x86 without VNNI: U8S8 kernels can saturate (onnxruntime #5849); "
                                  "reduce_range=True (7-bit weights)")
    return "S8", "S8", False, "ARM: S8S8 is onnxruntime's recommended QDQ format"


# Signed activations on x86 without VNNI: OpenVINO's INT8 MatMul widens them to unsigned and
# multiplies pairs into 16 bits, which saturate (no 7-bit weights there), so the symmetric layout
# is both far off FP32 and slower than it (benchmarks/ records it); it is not a candidate there.
SYMMETRIC_WITHOUT_VNNI = ("x86 without VNNI: OpenVINO's INT8 MatMul saturates on signed activations and runs "
                          "slower than FP32 there, so the symmetric layout is neither faithful nor fast")

# INT4 weight-only pays when MatMul weights are large enough to be bandwidth-bound.
INT4_MIN_WEIGHT_ELEMENTS = 256 * 256


def build_order(recipes: list[Recipe], conv_heavy: bool, openvino_first: bool = False) -> list[Recipe]:
    """The order to build in, so that a time budget that stops building early has built the
    likeliest winners: on a convolutional graph (more Conv nodes than MatMul/Gemm) static QDQ
    per-channel first, else dynamic (CNNs run fastest in static QDQ per-channel, transformers in
    dynamic); full range before reduce_range (faster, and more faithful where it does not
    saturate); per-channel before per-tensor (as fast to run and to build, and more faithful:
    under a tight budget it is the one to have). The order decides nothing else: every
    candidate built is measured. `openvino_first`: OpenVINO's symmetric every-MatMul recipe
    leads (on VNNI or AMX CPUs, where it outruns onnxruntime's dynamic INT8 on transformers),
    then the first of the rest."""

    def key(r: Recipe) -> tuple[bool, bool, bool, bool]:
        static_per_channel = r.method == "static" and r.format == "QDQ" and r.per_channel
        preferred = static_per_channel if conv_heavy else r.method == "dynamic"
        return not (openvino_first and r.symmetric), not preferred, r.reduce_range, not r.per_channel

    return sorted(recipes, key=key)


def _corrected(recipe: Recipe) -> tuple[Recipe, ...]:
    """The bias-corrected twin of a static per-channel QDQ recipe (none for others)."""
    if not (recipe.method == "static" and recipe.format == "QDQ" and recipe.per_channel and not recipe.symmetric):
        return ()
    return (replace(recipe, bias_correction=True, reasons=(
        "bias correction: each Conv's and Gemm's bias absorbs the mean shift its weight rounding causes on "
        "the calibration rows; the same kernels, so it is timed with its base and ships only if more faithful",)),)


def candidate_recipes(graph_ops: set[str], cpu: CpuInfo, calibration: str = "minmax",
                      allow_dynamic: bool = True, allow_static: bool = True,
                      largest_matmul_weight: int = 0, mode: str = "auto",
                      backends: tuple[str, ...] = ("onnxruntime",), conv_heavy: bool | None = None,
                      ) -> tuple[list[Recipe], list[dict]]:
    """The recipes worth measuring for a graph with `graph_ops` on `cpu`, and those skipped (why).

    `largest_matmul_weight`: elements of the biggest constant MatMul weight (INT4 candidates).
    `conv_heavy`: whether Conv carries the graph (more Conv nodes than MatMul/Gemm; None: any
    Conv does): it orders the builds, and only then is dynamic vetoed for its ConvInteger.
    `backends`: with "openvino", a static QDQ recipe run by OpenVINO too (its CPU plugin has its
    own INT8 kernels): on a convolutional graph per-channel at full range, the same file as
    onnxruntime's twin; on others the symmetric every-MatMul layout (static_matmul), which runs
    attention in INT8 there. On a convolutional graph each static per-channel QDQ recipe has a
    bias-corrected twin beside it (bias_correction.py), built after it from its file.
    """
    act, weight, reduce_range, cpu_reason = activation_weight_types(cpu)
    if mode == "fp16":
        return [Recipe("fp16", reasons=("FP16 with FP32 inputs/outputs, for GPU targets",))], []
    proposals, skipped = [], []
    if allow_dynamic:
        proposals += [Recipe("dynamic", weight_type="S8", per_channel=pc, reduce_range=reduce_range,
                             reasons=(cpu_reason,)) for pc in (False, True)]
    if allow_static:
        proposals += [Recipe("static", "QDQ", act, weight, per_channel=pc, calibration=calibration,
                             reduce_range=reduce_range, reasons=(cpu_reason,)) for pc in (True, False)]
        proposals.append(Recipe("static", "QOperator", act, weight, per_channel=True, calibration=calibration,
                                reduce_range=reduce_range, reasons=(cpu_reason,)))
    if reduce_range:  # measure the saturation risk rather than assume it: full-range twins too
        full = ("full range (8-bit weights) beside reduce_range: U8S8 saturation costs accuracy on some "
                "models only, and the accuracy check sees it")
        proposals += [replace(r, reduce_range=False, reasons=(full,)) for r in proposals
                      if r.method == "dynamic" or (r.format == "QDQ" and r.per_channel)]
    if "onnxruntime" not in backends:
        proposals = []
    conv_heavy = "Conv" in graph_ops if conv_heavy is None else conv_heavy
    if allow_static and "openvino" in backends and conv_heavy:
        proposals.append(Recipe("static", "QDQ", act, weight, per_channel=True, calibration=calibration,
                                backend="openvino", reasons=(
                                    "OpenVINO's CPU plugin runs the QDQ model with its own INT8 kernels "
                                    "(full range: it handles U8S8 itself); kept only if measured faster",)))
    elif allow_static and "openvino" in backends and graph_ops & {"MatMul", "Gemm"}:
        symmetric = Recipe("static", "QDQ", "S8", "S8", per_channel=True, calibration="minmax",
                           backend="openvino", symmetric=True, reasons=(
                               "OpenVINO's CPU plugin runs every MatMul in INT8, attention's too, when "
                               "activations have no zero point; kept only if measured faster",))
        if cpu.is_x86 and not cpu.has_vnni:
            skipped.append({"recipe": symmetric.name, "why": SYMMETRIC_WITHOUT_VNNI})
        else:
            proposals.append(symmetric)
    if allow_static and conv_heavy:  # each per-channel QDQ file again, its biases corrected
        proposals = [r for base in proposals for r in (base, *_corrected(base))]
    if mode in ("auto", "int4") and "onnxruntime" in backends:
        if largest_matmul_weight >= INT4_MIN_WEIGHT_ELEMENTS:
            proposals.append(Recipe("int4", reasons=("large MatMul weights: 4-bit blocks, int8 compute",)))
        else:
            skipped.append({"recipe": "int4-weight-only/MatMulNBits/block32",
                            "why": f"largest constant MatMul weight has {largest_matmul_weight} elements "
                                   f"(< {INT4_MIN_WEIGHT_ELEMENTS}): too small to be bandwidth-bound"})
    kept = []
    for recipe in build_order(proposals, conv_heavy, openvino_first=cpu.is_x86 and cpu.has_vnni):
        if recipe.method == "int4":
            kept.append(recipe)
            continue
        # dynamic never quantizes a Conv (builders leave it FP32): where Conv does not carry the
        # graph (ViT's patch embedding) the MatMuls are worth it and the veto does not apply
        supported = (DYNAMIC_OPS - {"Conv"}) if recipe.method == "dynamic" else STATIC_OPS
        vetoes = [VETOES[(op, recipe.method)] for op in sorted(graph_ops) if (op, recipe.method) in VETOES
                  and not (op == "Conv" and not conv_heavy)]
        if vetoes:
            skipped.append({"recipe": recipe.name, "why": "; ".join(vetoes)})
        elif not (graph_ops & supported & COMPUTE_OPS):
            skipped.append({"recipe": recipe.name,
                            "why": f"no op it quantizes among {', '.join(sorted(graph_ops & COMPUTE_OPS)) or 'none'}"})
        else:
            kept.append(recipe)
    return kept, skipped
