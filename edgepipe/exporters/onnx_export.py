"""Export torch -> ONNX: dynamo first, TorchScript as fallback, each attempt judged by parity."""

from __future__ import annotations

import inspect
import io
import time
import warnings
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnx
import torch

from edgepipe import interrupts, onnxfile
from edgepipe.artifacts import StageResult
from edgepipe.errors import ConfigError, ExportError, InputError, ParityError
from edgepipe.exporters.failures import error_line, is_io_error
from edgepipe.exporters.genai_route import ROUTES as DECODER_ROUTES
from edgepipe.exporters.report import ExportReport
from edgepipe.exporters.source import ModelSource, load_source
from edgepipe.logs import quiet_logs
from edgepipe.models.hf import is_causal_lm_folder
from edgepipe.parity import ParityCase, ParityReport, diff_outputs
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.preprocess import PREPROCESS_KEY
from edgepipe.runtime.spec import METADATA_KEY, InputSpec, make_feeds, specs_to_json

EXPORTERS = ("dynamo", "torchscript")


@dataclass
class ExportConfig:
    """How to export and how strictly to judge the result."""

    exporters: tuple[str, ...] = EXPORTERS  # tried in order; the first that passes parity wins
    opset: int | None = None  # None: each exporter's default (dynamo 18, TorchScript 17)
    atol: float = 1e-4
    rtol: float = 1e-3
    parity_batches: tuple[int, ...] = (1, 7)  # batch 1 and one >= 3 catch 0/1 specialization
    example_batch: int = 2  # never 1: the dynamo exporter would bake batch=1 in
    route: str = "auto"  # causal LM folders only: dynamo, genai or auto (exporters.decoder)

    def __post_init__(self):
        unknown = [e for e in self.exporters if e not in EXPORTERS]
        if unknown or not self.exporters:
            raise ConfigError(f"unknown exporter(s) {unknown}; choose from {', '.join(EXPORTERS)}")
        if self.example_batch < 2:
            raise ConfigError("export example_batch must be >= 2 (batch 1 gets specialised)")
        if self.route not in DECODER_ROUTES:
            raise ConfigError(f"unknown decoder route '{self.route}'; choose one of {', '.join(DECODER_ROUTES)}")
        if self.atol < 0 or self.rtol < 0:
            raise ConfigError("export tolerances atol/rtol must be >= 0")
        self.exporters = tuple(self.exporters)
        self.parity_batches = tuple(self.parity_batches)


def parity_cases(specs: Sequence[InputSpec], batches: Sequence[int]) -> list[dict[str, int]]:
    """Input sizes to verify: every batch at the example sizes, plus a second size for each
    other dynamic dim (e.g. seq) at the largest batch."""
    named = {d for s in specs for d in s.dynamic_dims.values() if d != "batch"}
    example = {d: next((s.example[d] for s in specs if d in s.example), 16) for d in named}
    cases = [{"batch": b, **example} for b in batches]
    for dim in sorted(named):
        other = max(2, example[dim] // 2 + 1)
        cases.append({"batch": max(batches), **example, dim: other})
    return cases


def case_feeds(specs: Sequence[InputSpec], sizes: Mapping[str, int],
               data: Mapping[str, np.ndarray] | None, seed: int) -> dict[str, np.ndarray]:
    """Real held-out rows when `data` has them (sliced to the case's sizes), else seeded inputs."""
    generated = make_feeds(specs, batch=sizes["batch"], dims=sizes, seed=seed)
    if not data:
        return generated
    feeds = {}
    for spec in specs:
        array = data.get(spec.name)
        want = generated[spec.name].shape
        if array is None or array.ndim != len(want) or any(a < w for a, w in zip(array.shape, want)):
            feeds[spec.name] = generated[spec.name]
            continue
        feeds[spec.name] = np.ascontiguousarray(array[tuple(slice(0, w) for w in want)]).astype(spec.np_dtype)
    return feeds


@torch.no_grad()
def torch_outputs(model: torch.nn.Module, feeds: Mapping[str, np.ndarray],
                  specs: Sequence[InputSpec], names: Sequence[str]) -> dict[str, np.ndarray]:
    out = model(*[torch.from_numpy(feeds[s.name]) for s in specs])
    out = out if isinstance(out, (tuple, list)) else (out,)
    return {name: o.detach().numpy() for name, o in zip(names, out)}


def check_parity(source: ModelSource, onnx_path: Path, config: ExportConfig,
                 data: Mapping[str, np.ndarray] | None = None, seed: int = 0) -> ParityReport:
    """ORT vs PyTorch on real (or seeded) inputs, at every parity case. A verdict, not a warning."""
    report = ParityReport(atol=config.atol, rtol=config.rtol)
    with interrupts.attempt() as tried:  # a model ORT cannot load is this attempt's verdict
        engine = Engine(onnx_path, providers="cpu")
    if tried.error is not None:
        report.error = str(tried.error)
        return report
    for sizes in parity_cases(source.inputs, config.parity_batches):
        label = " ".join(f"{k}={v}" for k, v in sizes.items())
        feeds = case_feeds(source.inputs, sizes, data, seed)
        expected = torch_outputs(source.model, feeds, source.inputs, source.output_names)
        with interrupts.attempt() as tried:
            actual = engine.run(feeds)
        if tried.error is not None:
            report.error = f"{label}: onnxruntime rejected the input: {tried.error}"
            return report
        report.cases.append(ParityCase(label, diff_outputs(expected, actual, config.atol, config.rtol)))
    return report


def _dynamo_export(source: ModelSource, example: tuple, path: Path, opset: int | None) -> None:
    from torch.export import Dim

    dims: dict[str, object] = {}
    dynamic_shapes = tuple(
        {axis: dims.setdefault(name, Dim(name, min=1)) for axis, name in s.dynamic_dims.items()} or None
        for s in source.inputs)
    params = inspect.signature(source.model.forward).parameters.values()
    if any(p.kind == p.VAR_POSITIONAL for p in params):  # forward(*args): the inputs are one packed arg
        dynamic_shapes = (dynamic_shapes,)
    large = _weight_bytes(source.model) > onnxfile.EXTERNAL_BYTES  # weights in <name>.data beside it
    program = torch.onnx.export(
        source.model, example, dynamo=True, input_names=[s.name for s in source.inputs],
        output_names=source.output_names, dynamic_shapes=dynamic_shapes, opset_version=opset,
        external_data=large, verbose=False)
    program.save(str(path), external_data=large)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _torchscript_export(source: ModelSource, example: tuple, path: Path, opset: int | None) -> None:
    if _weight_bytes(source.model) > onnxfile.EXTERNAL_BYTES:
        raise ExportError("the TorchScript exporter writes a model past 2 GB as one file per tensor, which "
                          "edgepipe does not move or hash; use the dynamo exporter (one external-data file)")
    dynamic_axes = {s.name: dict(s.dynamic_dims) for s in source.inputs if s.dynamic_dims}
    for name in source.output_names:
        dynamic_axes[name] = {0: "batch"}
    torch.onnx.export(
        source.model, example, str(path), dynamo=False, input_names=[s.name for s in source.inputs],
        output_names=source.output_names, dynamic_axes=dynamic_axes, opset_version=opset or 17,
        do_constant_folding=True)


def finalize_graph(path: Path, source: ModelSource, exporter: str) -> onnx.ModelProto:
    """Name dynamic dims as the spec does (the dynamo exporter writes s0, s1 …), drop the weights'
    copies in value_info, record the spec and provenance in metadata, pin an IR version ORT can
    load, and run the ONNX checker."""
    model = onnx.load(str(path))
    renames: dict[str, str] = {}
    graph_inputs = {i.name: i for i in model.graph.input}
    for spec in source.inputs:
        value = graph_inputs.get(spec.name)
        if value is None:
            raise ExportError(f"exported graph has no input '{spec.name}' (inputs: "
                              f"{', '.join(graph_inputs)}); does forward() use every declared input?")
        for axis, name in spec.dynamic_dims.items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param and dim.dim_param != name:
                renames[dim.dim_param] = name
            elif not dim.dim_param:
                raise ExportError(f"exporter '{exporter}' made axis {axis} of '{spec.name}' static "
                                  f"({dim.dim_value}) although it is declared dynamic ('{name}')")
    # the dynamo exporter also lists every weight in value_info; the initializer already carries
    # its shape, and onnxruntime's quantize_dynamic refuses such a file (its shape inference
    # meets the copy after transposing a Gemm weight: "Inferred shape and existing shape differ")
    weights = {t.name for t in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    if len(kept) < len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    for value in list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in renames:
                dim.dim_param = renames[dim.dim_param]
    meta = {p.key: p for p in model.metadata_props}
    entries = [(METADATA_KEY, specs_to_json(source.inputs)), ("edgepipe.exporter", exporter),
               ("edgepipe.source", source.origin)]
    if source.meta.get("preprocess"):  # a Hugging Face classifier's tokenizer or image settings
        entries.append((PREPROCESS_KEY, source.meta["preprocess"]))
    for key, value in entries:
        entry = meta.get(key) or model.metadata_props.add()
        entry.key, entry.value = key, value
    model.ir_version = min(model.ir_version, onnxfile.MAX_IR_VERSION)
    if onnxfile.is_large(model):  # the checker cannot hold it in memory: it reads the files
        onnxfile.save(model, path)
        onnx.checker.check_model(str(path), full_check=True)
    else:
        onnx.checker.check_model(model, full_check=True)
        onnxfile.save(model, path)
    return model


class _Rejected(Exception):
    """An export attempt failed or missed parity; the next exporter is tried."""


def _attempt(src: ModelSource, exporter: str, example: tuple, tmp: Path, config: ExportConfig,
             data: Mapping[str, np.ndarray] | None, seed: int, attempts: list[dict]) -> ExportReport:
    """Export with one exporter into `tmp` and judge it; appends to `attempts`, raises _Rejected."""
    started = time.perf_counter()
    with interrupts.attempt() as tried:  # exporters raise many types; each is recorded, the next is tried
        with _quiet_exporters():
            (_dynamo_export if exporter == "dynamo" else _torchscript_export)(src, example, tmp, config.opset)
        graph = finalize_graph(tmp, src, exporter)
    if tried.error is not None:
        exc = tried.error
        if is_io_error(exc, tmp):  # the disk, not the exporter: another exporter would hide it
            raise InputError(f"export could not write {exc.filename or tmp.parent}: {exc.strerror or exc}") from exc
        message = error_line(exc)
        attempts.append({"exporter": exporter, "ok": False, "error": f"{type(exc).__name__}: {message[:300]}",
                         "seconds": round(time.perf_counter() - started, 2)})
        raise _Rejected from exc
    seconds = round(time.perf_counter() - started, 2)
    report = check_parity(src, tmp, config, data, seed)
    attempts.append({"exporter": exporter, "ok": bool(report), "parity": report.summary(), "seconds": seconds})
    if not report:
        raise _Rejected
    return ExportReport(
        exporter=exporter, attempts=attempts, parity=report.to_dict(),
        opset=max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        ir_version=graph.ir_version, size_bytes=onnxfile.model_bytes(tmp),
        inputs=[s.to_dict() for s in src.inputs], outputs=list(src.output_names), source=src.origin)


@contextmanager
def _quiet_exporters():
    """The exporters print progress, warnings and log lines (e.g. 'torchvision is not installed');
    the stage reports what matters itself."""
    with warnings.catch_warnings(), redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()), quiet_logs():
        warnings.simplefilter("ignore")
        yield


def export(source: str | Path | ModelSource, out_path: str | Path, config: ExportConfig | None = None,
           *, inputs: Sequence | None = None, data: Mapping[str, np.ndarray] | None = None,
           seed: int = 0, task: str | None = None) -> StageResult:
    """Stage: export `source` to ONNX at `out_path`, proving parity; the first exporter that
    passes wins and is recorded. A causal LM folder becomes a decoder with its KV cache, proven
    on prefill and cached greedy steps (`config.route` picks the graph). Raises ParityError /
    ExportError naming every attempt. `task` picks a Hugging Face folder's head (default: from
    its config.json; "text-generation" asks for the decoder)."""
    config = config or ExportConfig()
    if not isinstance(source, ModelSource) and (task == "text-generation" or (
            task is None and inputs is None and is_causal_lm_folder(source))):
        from edgepipe.exporters.decoder import export_decoder

        return export_decoder(source, out_path, atol=max(config.atol, 1e-3), rtol=config.rtol, route=config.route)
    src = source if isinstance(source, ModelSource) else load_source(source, inputs, task=task)
    example_feeds = case_feeds(src.inputs, {"batch": config.example_batch}, data, seed)
    example = tuple(torch.from_numpy(example_feeds[s.name]) for s in src.inputs)
    attempts: list[dict] = []
    out_path = Path(out_path)
    for exporter in config.exporters:
        try:
            with onnxfile.staged_model(out_path) as tmp:  # committed only if the attempt is not rejected
                record = _attempt(src, exporter, example, tmp, config, data, seed, attempts)
        except _Rejected:
            continue
        return StageResult("export", {"onnx": out_path}, record)
    parity_failures = [a for a in attempts if "parity" in a]
    detail = "; ".join(f"{a['exporter']}: {a.get('parity') or a.get('error')}" for a in attempts)
    if parity_failures:
        raise ParityError(f"no exporter produced an ONNX model matching PyTorch: {detail}")
    raise ExportError(f"every exporter failed for {src.origin}: {detail}")


def export_module(module: torch.nn.Module, specs: Sequence[InputSpec], out_path: Path,
                  data: Mapping[str, np.ndarray] | None = None) -> Path:
    """A classifier module (output "logits") to ONNX with TorchScript, parity-checked: how stages
    that compare torch modules in ONNX Runtime (prune) get their models. Returns the path."""
    source = ModelSource(module, list(specs), ["logits"], origin=Path(out_path).stem)
    return export(source, out_path, ExportConfig(exporters=("torchscript",)), data=data).artifacts["onnx"]
