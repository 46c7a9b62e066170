"""The quantize stage: build candidate INT8 models, measure each on this CPU, keep the fastest
one inside the accuracy budget — never one slower than the FP32 input."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx

from edgepipe.artifacts import StageResult, atomic_path, require_file
from edgepipe.errors import (
    AccuracyError,
    ConfigError,
    InternalError,
    LatencyError,
    QuantizationError,
)
from edgepipe.quantize.calibration import ArrayCalibrationReader
from edgepipe.quantize.recipes import COMPUTE_OPS, REMOVABLE_ACTIVATIONS, Recipe, candidate_recipes
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.hardware import CpuInfo, read_cpu
from edgepipe.runtime.profiling import (
    SessionSetting,
    fastest_per_batch,
    measure_interleaved,
    session_settings,
)
from edgepipe.runtime.spec import make_feeds

MODES = ("auto", "dynamic", "static", "int4", "fp16")
CALIBRATIONS = ("minmax", "entropy", "percentile")
# Op types that show a node really runs in integer arithmetic after quantization.
INTEGER_OPS = frozenset({"MatMulInteger", "ConvInteger", "DynamicQuantizeLSTM", "QLinearConv",
                         "QLinearMatMul", "QuantizeLinear", "DynamicQuantizeMatMul",
                         "MatMulIntegerToFloat", "QGemm", "MatMulNBits"})


@dataclass
class QuantizeConfig:
    mode: str = "auto"  # "auto": every candidate that fits the graph; or only "dynamic"/"static"
    calibration: str = "minmax"
    calibration_samples: int = 256
    batch_sizes: tuple[int, ...] = (1, 32)  # latency is judged at each of these
    max_accuracy_drop: float = 0.01  # absolute (0.01 = 1 point) vs the FP32 model
    min_speedup: float = 1.0  # at every batch size; below 1.0 would allow a slower model
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_exclude: tuple[str, ...] = ()
    threads: int | None = None
    # Time each model (FP32 and every candidate) with 1 thread and with all cores and compare
    # each at its fastest: on a small CPU the setting moves the ratio as much as the recipe, and
    # not the same way for both. The deployment (Engine.from_run) uses the recorded setting.
    tune_session: bool = True
    try_spinning: bool = False  # also all cores with spinning workers (see session_settings)
    rounds: int = 12  # interleaved latency rounds (x 10 calls) per batch size
    # A candidate must beat min_speedup by this fraction: two measurements of a ratio near 1.0
    # disagree by a few percent on a 2-core machine, so "1.01x" is not evidence of "not slower".
    speedup_margin: float = 0.05

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"quantize mode '{self.mode}' unknown; choose {', '.join(MODES)}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration '{self.calibration}' unknown; choose {', '.join(CALIBRATIONS)}")
        if self.min_speedup < 1.0:
            raise ConfigError("min_speedup below 1.0 would allow a model slower than FP32")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("quantize batch_sizes must be positive integers")
        self.batch_sizes = tuple(self.batch_sizes)
        self.nodes_to_exclude = tuple(self.nodes_to_exclude)
        self.op_types_to_exclude = tuple(self.op_types_to_exclude)


@dataclass
class EvalData:
    """Held-out inputs (name -> array) and, for classifiers, integer labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None


def by_session_rows(p50_by_setting: dict[SessionSetting, dict[int, float]]) -> list[dict]:
    """[{"threads", "spinning", "p50_ms": {batch: ms}}] for the record."""
    return [s.to_dict() | {"p50_ms": {str(b): round(v, 4) for b, v in p50.items()}}
            for s, p50 in p50_by_setting.items()]


@dataclass
class Candidate:
    recipe: Recipe
    path: Path | None = None
    error: str | None = None
    integer_nodes: int = 0
    accuracy: float | None = None
    agreement: float | None = None
    accuracy_drop: float | None = None
    built_from: str = ""
    p50_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    speedup_trials: dict[int, list[float]] = field(default_factory=dict)  # when confirmed
    settings: dict[int, SessionSetting] = field(default_factory=dict)  # fastest per batch size
    p50_by_setting: dict[SessionSetting, dict[int, float]] = field(default_factory=dict)
    verdict: str = ""

    @property
    def score(self) -> float:
        """Geometric-mean speedup over the configured batch sizes."""
        values = list(self.speedup.values())
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0

    def row(self) -> dict:
        return {"recipe": self.recipe.name, "method": self.recipe.method, "format": self.recipe.format,
                "activation_type": self.recipe.activation_type, "weight_type": self.recipe.weight_type,
                "per_channel": self.recipe.per_channel, "calibration": self.recipe.calibration,
                "reduce_range": self.recipe.reduce_range,
                "excluded_nodes": list(self.recipe.nodes_to_exclude),
                "integer_nodes": self.integer_nodes, "built_from": self.built_from, "accuracy": self.accuracy,
                "agreement": self.agreement, "accuracy_drop": self.accuracy_drop,
                "p50_ms": {str(b): round(v, 4) for b, v in self.p50_ms.items()},
                "speedup": {str(b): round(v, 3) for b, v in self.speedup.items()},
                "speedup_trials": {str(b): v for b, v in self.speedup_trials.items()} or None,
                "sessions": {str(b): s.to_dict() for b, s in self.settings.items()} or None,
                "p50_ms_by_session": by_session_rows(self.p50_by_setting) or None,
                "size_bytes": self.path.stat().st_size if self.path and self.path.exists() else None,
                "error": self.error, "verdict": self.verdict}


def preprocess(model_path: Path, work_dir: Path) -> tuple[Path, list[dict]]:
    """quant_pre_process, then without symbolic shape inference, then the raw model."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    attempts = []
    model_path, work_dir = Path(model_path).resolve(), Path(work_dir).resolve()
    for label, kwargs in (("full", {}), ("skip_symbolic_shape", {"skip_symbolic_shape": True})):
        out = work_dir / f"pre_{label}.onnx"
        try:
            # When symbolic shape inference gives up, ORT saves sym_shape_infer_temp.onnx plus
            # a uuid-named .data file into the current directory: keep that in work_dir.
            with contextlib.chdir(work_dir):
                quant_pre_process(str(model_path), str(out), **kwargs)
            attempts.append({"step": label, "ok": True})
            return out, attempts
        except Exception as exc:
            attempts.append({"step": label, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
    attempts.append({"step": "raw", "ok": True})
    return model_path, attempts


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
        onnx.save(model, str(out))
    return rewritten


def build(recipe: Recipe, model_path: Path, out: Path, calibration: EvalData | None,
          samples: int) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    types = {"U8": QuantType.QUInt8, "S8": QuantType.QInt8}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    graph_ops = {n.op_type for n in graph.node}
    # Only compute ops: Q/DQ around LayerNorm, Gather, Reshape … cost more than they save
    # (a Transformer went 0.7x with every supported op quantized).
    quantizable = COMPUTE_OPS | (REMOVABLE_ACTIVATIONS if recipe.method == "static" else frozenset())
    op_types = sorted((graph_ops & quantizable) - set(recipe.op_types_to_exclude))
    common = dict(per_channel=recipe.per_channel, reduce_range=recipe.reduce_range,
                  weight_type=types[recipe.weight_type], op_types_to_quantize=op_types,
                  nodes_to_exclude=[*with_activations(graph, recipe.nodes_to_exclude), *activation_matmuls(graph)] or None,
                  extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    if recipe.method == "dynamic":
        if "Gemm" in graph_ops:
            as_matmul = out.with_name(out.stem + ".gemm_as_matmul.onnx")
            if gemms_as_matmul(model_path, as_matmul):
                model_path = as_matmul
                common["op_types_to_quantize"] = sorted(set(op_types) | {"MatMul"})
        quantize_dynamic(str(model_path), str(out), **common)
        return
    if recipe.method == "int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(model_path)), bits=4, block_size=32, is_symmetric=True,
                                         accuracy_level=4,  # int8 activations in the kernel: fast on CPU
                                         nodes_to_exclude=list(recipe.nodes_to_exclude))
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), use_external_data_format=False)
        return
    if recipe.method == "fp16":
        from onnxruntime.transformers.float16 import convert_float_to_float16

        converted = convert_float_to_float16(onnx.load(str(model_path)), keep_io_types=True,
                                             node_block_list=list(recipe.nodes_to_exclude) or None)
        onnx.save(converted, str(out))
        return
    if calibration is None:
        raise QuantizationError("static quantization needs calibration data: pass --calibration "
                                "data.npz (or run it in a pipeline, which uses the training data)")
    methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
               "percentile": CalibrationMethod.Percentile}
    quantize_static(str(model_path), str(out), ArrayCalibrationReader(calibration.inputs, samples),
                    quant_format=QuantFormat.QDQ if recipe.format == "QDQ" else QuantFormat.QOperator,
                    activation_type=types[recipe.activation_type],
                    calibrate_method=methods[recipe.calibration], **common)
    if recipe.format == "QDQ":
        float_graph_outputs(out)


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
        if source is None or source.op_type not in COMPUTE_OPS or consumers.get(q.input[0]) != 1 \
                or q.input[0] in outputs:
            continue
        source.output[0] = dq.output[0]
        graph.node.remove(q)
        graph.node.remove(dq)
        changed.append(source.name)
    if changed:
        onnx.save(model, str(path))
    return changed


def strip_value_info(model_path: Path, out: Path) -> Path:
    """The raw model without intermediate shape annotations: exporters' stale value_info makes
    ONNX shape inference inside quantization fail ("Inferred shape and existing shape differ")."""
    model = onnx.load(str(model_path))
    del model.graph.value_info[:]
    onnx.save(model, str(out))
    return out


TRANSFORMER_OPS = frozenset({"LayerNormalization", "Softmax"})


def transformer_optimize(search: "_Search", work: Path) -> tuple[Path | None, dict]:
    """onnxruntime.transformers graph fusions for transformer-like graphs, kept only when the
    fused FP32 model matches the original and is measurably faster (it often is not)."""
    from onnxruntime.transformers.optimizer import optimize_model

    record: dict = {"tried": True}
    out = work / "transformer_optimized.onnx"
    try:
        with _quiet():
            optimized = optimize_model(str(search.onnx_path), model_type="bert", num_heads=0, hidden_size=0,
                                       opt_level=0)
            optimized.save_model_to_file(str(out), use_external_data_format=False)
        engine = Engine(out, providers="cpu", threads=search.config.threads, spinning=False)
        got, _, _ = evaluate(engine, search.eval_data)
    except Exception as exc:
        return None, record | {"kept": False, "why": f"{type(exc).__name__}: {str(exc)[:200]}"}
    if not np.allclose(got, search.reference, atol=1e-3, rtol=1e-3):
        return None, record | {"kept": False, "why": "fused model's outputs differ from the original"}
    batch = max(search.config.batch_sizes)
    feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in search.eval_data.inputs.items()}
    stats = measure_interleaved({"fp32": lambda: search.fp32.session.run(None, feeds),
                                 "fused": lambda: engine.session.run(None, feeds)}, batch, rounds=search.config.rounds)
    speedup = stats["fp32"].p50_ms / stats["fused"].p50_ms
    kept = speedup >= 1 + search.config.speedup_margin
    fused = sorted({n.op_type for n in onnx.load(str(out)).graph.node} - {n.op_type for n in onnx.load(
        str(search.onnx_path)).graph.node})
    return (out if kept else None), record | {"kept": kept, "fused_ops": fused, "speedup_fp32": round(speedup, 3),
                                              "why": "faster" if kept else "not measurably faster"}


@contextlib.contextmanager
def _quiet():
    import logging

    level = logging.root.level
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
        logging.root.setLevel(level)


def build_with_fallback(recipe: Recipe, models: list[Path], out: Path,
                        calibration: EvalData | None, samples: int) -> str:
    """Build `recipe` from the first model in `models` that works; returns its file name.
    Raises the first error when all fail (a QuantizationError is never retried)."""
    first_error: Exception | None = None
    for model_path in models:
        try:
            build(recipe, model_path, out, calibration, samples)
            return model_path.name
        except QuantizationError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises many types
            first_error = first_error or exc
    if first_error is None:
        raise InternalError("build_with_fallback was given no model to build from")
    raise first_error


def evaluate(engine: Engine, data: EvalData, reference: np.ndarray | None = None,
             batch_size: int = 256) -> tuple[np.ndarray, float | None, float | None]:
    """(first output, accuracy vs labels, top-1 agreement vs reference)."""
    n = min(len(a) for a in data.inputs.values())
    chunks = []
    for i in range(0, n, batch_size):
        feeds = {k: v[i:i + batch_size] for k, v in data.inputs.items()}
        chunks.append(engine.run(feeds)[engine.output_names[0]])
    out = np.concatenate(chunks)
    acc = float((out.argmax(-1) == data.labels[:n]).mean()) if data.labels is not None else None
    agree = float((out.argmax(-1) == reference.argmax(-1)).mean()) if reference is not None else None
    return out, acc, agree


def count_integer_nodes(path: Path) -> int:
    """Nodes running in reduced precision: integer kernels, or FP16 initializers for fp16."""
    model = onnx.load(str(path))
    fp16 = sum(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    return sum(n.op_type in INTEGER_OPS for n in model.graph.node) + fp16


def largest_matmul_weight(graph: onnx.GraphProto) -> int:
    sizes = {t.name: int(np.prod(t.dims)) for t in graph.initializer}
    return max((sizes.get(n.input[1], 0) for n in graph.node if n.op_type == "MatMul" and len(n.input) > 1),
               default=0)


class _Search:
    """One quantize run: the FP32 reference, the data, and every candidate tried."""

    def __init__(self, onnx_path: Path, config: QuantizeConfig, eval_data: EvalData,
                 calibration: EvalData, work: Path, say):
        self.onnx_path, self.config, self.eval_data, self.calibration = onnx_path, config, eval_data, calibration
        self.work, self.say = work, say
        self.fp32 = Engine(onnx_path, providers="cpu", threads=config.threads, spinning=False)
        self.reference, self.fp32_accuracy, _ = evaluate(self.fp32, eval_data)
        self.settings = (session_settings(config.threads, spinning=config.try_spinning) if config.tune_session
                         else [SessionSetting(config.threads or os.cpu_count() or 1, False)])
        self.fp32_settings: dict[int, SessionSetting] = {}
        self.fp32_p50: dict[int, float] = {}
        self.fp32_p50_by_setting: dict[SessionSetting, dict[int, float]] = {}
        self.timers: dict[object, dict[SessionSetting, Engine]] = {}  # model key -> a session per setting
        self.candidates: list[Candidate] = []
        self.engines: dict[int, Engine] = {}
        self.sources: list[Path] = []

    def build(self, recipe: Recipe) -> Candidate:
        """Build and check accuracy (latency comes later, for all candidates together)."""
        cand = Candidate(recipe, path=self.work / f"cand{len(self.candidates)}.onnx")
        index = len(self.candidates)
        self.candidates.append(cand)
        self.say(f"building {recipe.name}")
        try:
            cand.built_from = build_with_fallback(recipe, self.sources, cand.path, self.calibration,
                                                  self.config.calibration_samples)
            cand.integer_nodes = count_integer_nodes(cand.path)
            if cand.integer_nodes == 0:
                raise QuantizationError("quantized no node")
            engine = Engine(cand.path, providers="cpu", threads=self.config.threads, spinning=False)
            _, cand.accuracy, cand.agreement = evaluate(engine, self.eval_data, self.reference)
        except Exception as exc:
            cand.error = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
            cand.verdict = "failed"
            return cand
        cand.accuracy_drop = (self.fp32_accuracy - cand.accuracy if self.fp32_accuracy is not None
                              else 1.0 - cand.agreement)
        self.engines[index] = engine
        return cand

    def timing_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """`batch` held-out rows, or generated inputs when there are fewer."""
        feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in self.eval_data.inputs.items()}
        if min(len(v) for v in feeds.values()) < batch:
            feeds = make_feeds(self.fp32.inputs, batch=batch, seed=2)
        return feeds

    def sessions(self, key, path: Path) -> dict[SessionSetting, Engine]:
        if key not in self.timers:
            self.timers[key] = {s: Engine(path, providers="cpu", **s.engine_options()) for s in self.settings}
        return self.timers[key]

    def measure(self, indices: list[int]) -> None:
        """Time candidates `indices` interleaved with FP32 at every configured batch size and
        session setting; each model is then judged at its own fastest setting per batch size, so
        neither side is handicapped by a setting that suits only the other."""
        models = {"fp32": self.sessions("fp32", self.fp32.path)}
        models |= {i: self.sessions(i, self.candidates[i].path) for i in indices}
        p50: dict = {key: {} for key in models}  # key -> batch -> setting -> ms
        for batch in self.config.batch_sizes:
            feeds = self.timing_feeds(batch)
            fns = {(key, s): (lambda e=e, f=feeds: e.session.run(None, f))
                   for key, engines in models.items() for s, e in engines.items()}
            stats = measure_interleaved(fns, batch, rounds=self.config.rounds,
                                        spinning={key for key in fns if key[1].spinning})
            for (key, s), st in stats.items():
                p50[key].setdefault(batch, {})[s] = st.p50_ms

        def by_setting(key) -> dict[SessionSetting, dict[int, float]]:
            return {s: {b: p50[key][b][s] for b in p50[key]} for s in self.settings}

        self.fp32_settings = fastest_per_batch(p50["fp32"])
        self.fp32_p50 = {b: p50["fp32"][b][s] for b, s in self.fp32_settings.items()}
        self.fp32_p50_by_setting = by_setting("fp32")
        for i in indices:
            cand = self.candidates[i]
            cand.settings = fastest_per_batch(p50[i])
            cand.p50_by_setting = by_setting(i)
            cand.p50_ms = {b: p50[i][b][s] for b, s in cand.settings.items()}
            cand.speedup = {b: self.fp32_p50[b] / cand.p50_ms[b] for b in cand.p50_ms}

    def confirm(self, cand: Candidate, trials: int = 2) -> bool:
        """Re-time an accepted candidate against FP32 in `trials` more trials, each with fresh
        sessions, and judge it on the median trial per batch size. One trial can mislead: on 2
        cores a session pair sometimes lands in a slow thread hand-off state for its whole life
        (a 0.72x model once read >= 1.05x), and a slower model must never ship: the median must
        clear the margin and no trial may read below min_speedup."""
        seen = {b: [s] for b, s in cand.speedup.items()}
        for _ in range(trials):
            fp32 = Engine(self.fp32.path, providers="cpu", batch_sessions=self.fp32_settings)
            mine = Engine(cand.path, providers="cpu", batch_sessions=cand.settings)
            for batch in self.config.batch_sizes:
                feeds = self.timing_feeds(batch)
                spinning = {k for k, s in (("fp32", self.fp32_settings[batch]), ("cand", cand.settings[batch]))
                            if s.spinning}
                stats = measure_interleaved({"fp32": lambda f=feeds, s=fp32.session_for(batch): s.run(None, f),
                                             "cand": lambda f=feeds, s=mine.session_for(batch): s.run(None, f)},
                                            batch, rounds=self.config.rounds, spinning=spinning)
                seen[batch].append(stats["fp32"].p50_ms / stats["cand"].p50_ms)
        cand.speedup = {b: float(np.median(v)) for b, v in seen.items()}
        cand.speedup_trials = {b: [round(x, 3) for x in v] for b, v in seen.items()}
        cand.p50_ms = {b: self.fp32_p50[b] / cand.speedup[b] for b in cand.speedup}
        self.judge(cand)
        slower = {b: min(v) for b, v in seen.items() if min(v) < self.config.min_speedup}
        if cand.verdict == "ok" and slower:  # no trial may have measured it slower than FP32
            cand.verdict = "slower than FP32 in one trial at batch " + ", ".join(
                f"{b} ({s:.2f}x)" for b, s in slower.items())
        if cand.verdict != "ok":
            cand.verdict = f"not confirmed in {trials} more trials: {cand.verdict}"
        return cand.verdict == "ok"

    def judge(self, cand: Candidate) -> None:
        needed = self.config.min_speedup * (1 + self.config.speedup_margin)
        slow = {b: s for b, s in cand.speedup.items() if s < needed}
        if cand.accuracy_drop > self.config.max_accuracy_drop:
            cand.verdict = f"accuracy drop {cand.accuracy_drop:.4f} > {self.config.max_accuracy_drop}"
        elif slow:
            cand.verdict = (f"not clearly faster (needs >= {needed:.2f}x) at batch "
                            + ", ".join(f"{b} ({s:.2f}x)" for b, s in slow.items()))
        else:
            cand.verdict = "ok"

    def fast_enough(self, cand: Candidate) -> bool:
        needed = self.config.min_speedup * (1 + self.config.speedup_margin)
        return bool(cand.speedup) and all(s >= needed for s in cand.speedup.values())

    def ranking_model(self, cand: Candidate, step: int) -> Path:
        """The model to rank nodes on: QOperator renames every tensor it quantizes (X ->
        X_quantized), so nothing in it can be compared with FP32 by name; its QDQ twin (same
        types, scales and exclusions) keeps the names and carries the same quantization error."""
        recipe = cand.recipe
        if not (recipe.method == "static" and recipe.format == "QOperator"):
            return cand.path
        twin = self.work / f"rank_twin{step}.onnx"
        build_with_fallback(replace(recipe, format="QDQ"), self.sources, twin, self.calibration,
                            self.config.calibration_samples)
        return twin

    def accuracy_fallback(self, max_steps: int = 8) -> tuple[Candidate | None, list[dict]]:
        """The fastest candidate misses only the accuracy budget: return its most damaging
        nodes to FP32 until the budget holds. Each step re-ranks on the current model (excluding
        one node moves the damage to the next) and excludes 1, 2, 4 … more nodes."""
        from edgepipe.quantize.sensitivity import rank_nodes

        inaccurate = [c for c in self.candidates if self.fast_enough(c) and c.verdict.startswith("accuracy")]
        if not inaccurate:
            return None, []
        base = current = max(inaccurate, key=lambda c: c.score)
        probe = {k: v[:64] for k, v in self.eval_data.inputs.items()}
        excluded: list[str] = []
        history: list[dict] = []
        noise: dict[str, float] = {}  # excluded node -> noise it added when it was ranked
        for step in range(max_steps):
            ranking = [r for r in rank_nodes(self.onnx_path, self.ranking_model(current, step), probe, self.work)
                       if r["node"] not in excluded]
            if not ranking:
                break
            # Only nodes that add real noise (>= 1% of the worst); a harmless one stays INT8.
            damaging = [r for r in ranking if r["added_nsr"] >= max(1e-4, 0.01 * ranking[0]["added_nsr"])]
            new = [r["node"] for r in (damaging or ranking[:1])[: 2 ** step]]
            history.append({"step": step + 1, "ranking": ranking[:10], "excluded": new})
            self.say(f"accuracy fallback step {step + 1}: keeping {', '.join(new)} in FP32 "
                     f"(output SQNR {ranking[0]['sqnr_out_db']} dB)")
            excluded += new
            noise.update({r["node"]: r["added_nsr"] for r in ranking if r["node"] in new})
            cand = self.build(base.recipe.excluding(excluded))
            if cand.error is not None:
                break
            if cand.accuracy_drop <= self.config.max_accuracy_drop:
                cand, trim = self.trim(base.recipe, excluded, noise, cand)
                if trim["tried"]:
                    history.append(trim)
                self.measure([self.candidates.index(cand)])
                self.judge(cand)
                return (cand if cand.verdict == "ok" and self.confirm(cand) else None), history
            cand.verdict = f"accuracy drop {cand.accuracy_drop:.4f} > {self.config.max_accuracy_drop}"
            current = cand
        return None, history

    def built(self, recipe: Recipe) -> Candidate | None:
        """The candidate already built for `recipe` (exclusions compared as a set), if any."""
        def key(r: Recipe) -> tuple:
            return replace(r, nodes_to_exclude=()), frozenset(r.nodes_to_exclude)

        return next((c for c in self.candidates if key(c.recipe) == key(recipe)), None)

    def trim(self, recipe: Recipe, excluded: list[str], noise: dict[str, float], cand: Candidate,
             max_tries: int = 6) -> tuple[Candidate, dict]:
        """Steps exclude 1, 2, 4 … nodes at a time, so the set that meets the budget can hold
        nodes it does not need (on a CPU without VNNI, 7-bit weights make a harmless layer's
        noise look damaging). Put each excluded node back into INT8, least noisy first, and keep
        it there when the budget still holds: fewer FP32 nodes, a faster model."""
        keep = list(excluded)
        tried, back = [], []
        for node in sorted(excluded, key=lambda n: noise.get(n, 0.0))[:max_tries]:
            if len(keep) == 1:
                break
            trial = [n for n in keep if n != node]
            attempt = self.built(recipe.excluding(trial))
            if attempt is None:
                self.say(f"accuracy fallback trim: trying {node} back in INT8")
                attempt = self.build(recipe.excluding(trial))
            ok = attempt.error is None and attempt.accuracy_drop <= self.config.max_accuracy_drop
            tried.append({"node": node, "accuracy_drop": attempt.accuracy_drop, "back_in_int8": ok})
            if ok:
                cand.verdict = f"superseded: {node} can stay INT8"
                keep, cand = trial, attempt
                back.append(node)
            elif attempt.error is None:
                attempt.verdict = (f"accuracy drop {attempt.accuracy_drop:.4f} > "
                                   f"{self.config.max_accuracy_drop}: {node} stays FP32")
        return cand, {"step": "trim", "tried": tried, "back_in_int8": back, "excluded": keep}


def quantize(onnx_path: str | Path, out_path: str | Path, config: QuantizeConfig | None = None, *,
             eval_data: EvalData | None = None, calibration: EvalData | None = None,
             cpu: CpuInfo | None = None, progress=None) -> StageResult:
    """Stage: FP32 ONNX -> the fastest INT8 model within the accuracy budget, with the table of
    every candidate. Raises LatencyError/AccuracyError (exit 1) when no candidate qualifies."""
    config = config or QuantizeConfig()
    onnx_path = require_file(onnx_path, "ONNX model")
    cpu = cpu or read_cpu()
    say = progress or (lambda message: None)
    started = time.perf_counter()
    if eval_data is None:  # no held-out data: judge agreement with FP32 on seeded inputs
        specs = Engine(onnx_path, providers="cpu").inputs
        eval_data = EvalData(make_feeds(specs, batch=512, seed=1))
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    graph_ops = {n.op_type for n in graph.node}
    recipes, skipped = candidate_recipes(graph_ops, cpu, config.calibration,
                                         allow_dynamic=config.mode in ("auto", "dynamic"),
                                         allow_static=config.mode in ("auto", "static"),
                                         largest_matmul_weight=largest_matmul_weight(graph), mode=config.mode)
    recipes = [replace(r.excluding(config.nodes_to_exclude), op_types_to_exclude=config.op_types_to_exclude)
               for r in recipes]
    if not recipes:
        raise QuantizationError(f"no quantization recipe applies to {onnx_path.name} (ops: "
                                f"{', '.join(sorted(graph_ops))}): "
                                + "; ".join(f"{s['recipe']}: {s['why']}" for s in skipped))
    with tempfile.TemporaryDirectory(prefix="edgepipe-quant-") as tmp:
        work = Path(tmp)
        search = _Search(onnx_path, config, eval_data, calibration or eval_data, work, say)
        optimizer_record: dict = {"tried": False}
        if graph_ops & TRANSFORMER_OPS and config.mode != "fp16":
            say("trying onnxruntime.transformers graph fusions")
            fused, optimizer_record = transformer_optimize(search, work)
            if fused is not None:
                onnx_path_for_quant = fused
            else:
                onnx_path_for_quant = onnx_path
        else:
            onnx_path_for_quant = onnx_path
        model_in, pre_attempts = preprocess(onnx_path_for_quant, work)
        # Fallbacks per candidate: the pre-processed model (weights constant-folded), the same
        # without exporter/shape-inference value_info, then the raw model without it.
        search.sources = list(dict.fromkeys([model_in, strip_value_info(model_in, work / "pre_stripped.onnx"),
                                             strip_value_info(onnx_path_for_quant, work / "raw_stripped.onnx")]))
        for recipe in recipes:
            search.build(recipe)
        if not search.engines:
            raise QuantizationError("every quantization recipe failed: " + "; ".join(
                f"{c.recipe.name}: {c.error}" for c in search.candidates))
        say(f"measuring {len(search.engines)} candidate(s) against FP32 at batch {list(config.batch_sizes)}")
        search.measure(sorted(search.engines))
        for i in search.engines:
            search.judge(search.candidates[i])
        accepted = sorted((c for c in search.candidates if c.verdict == "ok"), key=lambda c: c.score, reverse=True)
        chosen = next((c for c in accepted if search.confirm(c)), None)
        sensitivity: list[dict] = []  # accuracy-fallback steps: ranking and nodes kept in FP32
        if chosen is None:
            chosen, sensitivity = search.accuracy_fallback()
        record = {
            "cpu": {"model": cpu.model, "features": cpu.features, "vnni": cpu.has_vnni},
            "recipe_reason": recipes[0].reasons[0] if recipes[0].reasons else "",
            "preprocess": pre_attempts,
            "transformer_optimizer": optimizer_record,
            "skipped_recipes": skipped,
            "fp32": {"accuracy": search.fp32_accuracy,
                     "p50_ms": {str(b): round(v, 4) for b, v in search.fp32_p50.items()},
                     "sessions": {str(b): s.to_dict() for b, s in search.fp32_settings.items()},
                     "p50_ms_by_session": by_session_rows(search.fp32_p50_by_setting),
                     "size_bytes": onnx_path.stat().st_size},
            "accuracy_fallback": sensitivity,
            "budget": {"max_accuracy_drop": config.max_accuracy_drop, "min_speedup": config.min_speedup,
                       "speedup_margin": config.speedup_margin},
            "timing": ("interleaved with FP32 at each session setting (" + "; ".join(map(str, search.settings))
                       + "); each model judged at its fastest per batch size (recorded in 'sessions')"),
        }
        if chosen is None:
            record |= {"candidates": [c.row() for c in search.candidates],
                       "seconds": round(time.perf_counter() - started, 2)}
            measured = [c for c in search.candidates if c.speedup]
            accurate = [c for c in measured if c.accuracy_drop <= config.max_accuracy_drop]
            # Name the candidate that came closest: the fastest accurate one when there is one
            # (it missed on speed), else the fastest one (it missed on accuracy).
            best = max(accurate or measured, key=lambda c: c.score)
            error_cls = LatencyError if accurate else AccuracyError
            error = error_cls(f"no quantized candidate is both faster than FP32 and within the accuracy "
                              f"budget (drop <= {config.max_accuracy_drop}); best was {best.recipe.name}: "
                              f"{best.verdict}. Keep the FP32 model or relax the budget")
            error.record = record
            raise error
        chosen.verdict = "chosen"
        out_path = Path(out_path)
        with atomic_path(out_path) as tmp_out:
            shutil.copyfile(chosen.path, tmp_out)
        record |= {"candidates": [c.row() for c in search.candidates], "chosen": chosen.row(),
                   "size_bytes": out_path.stat().st_size,
                   "seconds": round(time.perf_counter() - started, 2)}
    return StageResult("quantize", {"onnx": out_path}, record)
