"""Engine: an ONNX Runtime session with provider choice and input validation, torch-free."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edgepipe.errors import InputError
from edgepipe.runtime.profiling import SessionSetting, route_batch
from edgepipe.runtime.spec import METADATA_KEY, ORT_TO_NUMPY, InputSpec, specs_from_json

# Lenient provider names -> ORT names, in "auto" preference order (best first).
PROVIDER_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "gpu": "CUDAExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def resolve_providers(requested: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """Map `"auto"`, `"cuda"`, `["cuda", "cpu"]` … to (available, missing) ORT provider names.

    Raises InputError listing what is available (and how to get GPU support) when nothing matches.
    """
    available = ort.get_available_providers()
    if isinstance(requested, str):
        requested = [requested]
    if list(requested) == ["auto"]:
        return [p for p in AUTO_ORDER if p in available], []
    resolved, missing = [], []
    for name in requested:
        full = PROVIDER_ALIASES.get(name.lower(), name)
        (resolved if full in available else missing).append(full)
    if not resolved:
        hint = ""
        if any(p in ("CUDAExecutionProvider", "TensorrtExecutionProvider") for p in missing):
            hint = (" For GPU providers replace onnxruntime with onnxruntime-gpu:"
                    " pip uninstall -y onnxruntime && pip install 'edgepipe[gpu]'.")
        raise InputError(
            f"execution provider(s) {', '.join(missing)} not available; this onnxruntime "
            f"{ort.__version__} has {', '.join(available)}.{hint}"
        )
    return resolved, missing


def parse_provider_options(items: Sequence[str]) -> dict[str, dict[str, str]]:
    """["cuda.device_id=0", "tensorrt.trt_fp16_enable=True"] -> {"cuda": {"device_id": "0"}, ...}."""
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        provider, dot, option = key.partition(".")
        if not (sep and dot and provider and option):
            raise InputError(f"provider option '{item}' must be PROVIDER.KEY=VALUE, e.g. cuda.device_id=0 "
                             "or tensorrt.trt_fp16_enable=True")
        options.setdefault(provider, {})[option] = value
    return options


def session_providers(names: Sequence[str], options: Mapping[str, Mapping] | None) -> list:
    """What InferenceSession takes: names, or (name, options) pairs where options were given.
    Options are keyed by alias ("cuda") or full name; options for an unused provider are an error."""
    if not options:
        return list(names)
    by_name = {PROVIDER_ALIASES.get(k.lower(), k): {str(o): str(v) for o, v in opts.items()}
               for k, opts in options.items()}
    unused = [k for k in by_name if k not in names]
    if unused:
        raise InputError(f"options given for {', '.join(unused)}, which this session does not use "
                         f"(providers: {', '.join(names)})")
    return [(n, by_name[n]) if n in by_name else n for n in names]


class Engine:
    """Build once, run many times: `Engine("model.onnx").run({"x": array}) -> {"logits": ...}`.

    `providers`: "auto" (TensorRT/CUDA when present, else CPU), a name ("cpu", "cuda") or a list
    in preference order. A requested provider that ORT drops is an error unless
    `allow_fallback=True`; `self.providers` says what is actually used.
    `run` is safe to call from several threads at once (ORT sessions are).
    `spinning=False` stops idle worker threads from busy-waiting (use it when several sessions
    share the cores, e.g. when timing models against each other).
    `provider_options`: per provider, e.g. {"cuda": {"device_id": 1}, "tensorrt":
    {"trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": "cache/"}}.
    On a GPU, `run_bound` keeps inputs/outputs on the device (IO binding) and `placement()`
    reports which nodes fell back to the CPU.
    `batch_sessions`: {batch size: SessionSetting or {"threads", "spinning"}}: one session per
    setting, and `run` sends a batch of n rows to the entry with the smallest batch size >= n
    (else the largest). On 2 cores a batch of 1 runs fastest on 1 thread and a batch of 32 on
    2; quantize measures this per model and `from_run` applies it.
    """

    def __init__(
        self,
        model: str | os.PathLike | bytes,
        *,
        providers: str | Sequence[str] = "auto",
        threads: int | None = None,
        optimization: str = "all",
        warmup: int = 0,
        allow_fallback: bool = False,
        validate: bool = True,
        spinning: bool = True,
        provider_options: Mapping[str, Mapping[str, object]] | None = None,
        batch_sessions: Mapping[int, object] | None = None,
    ):
        if optimization not in OPTIMIZATION_LEVELS:
            raise InputError(
                f"unknown graph optimization level '{optimization}'; "
                f"choose one of {', '.join(OPTIMIZATION_LEVELS)}"
            )
        self.path = None if isinstance(model, bytes) else Path(model)
        if self.path is not None and not self.path.is_file():
            raise InputError(f"ONNX model not found: {self.path}")
        wanted, missing = resolve_providers(providers)
        if missing and not allow_fallback:
            raise InputError(
                f"execution provider(s) {', '.join(missing)} not available "
                f"(available: {', '.join(ort.get_available_providers())}); "
                "pass allow_fallback=True / --allow-fallback to run on the others"
            )
        source = model if isinstance(model, bytes) else str(self.path)
        self._session_providers = session_providers(wanted, provider_options)
        self._source = source
        self.optimization = optimization
        self.session = self._new_session(threads, spinning)
        self.batch_sessions: list[tuple[int, SessionSetting]] = []
        self._route_map: dict[int, ort.InferenceSession] = {}  # batch size -> its session
        if batch_sessions:
            made = {SessionSetting(int(threads or 0), bool(spinning)): self.session}
            for batch, setting in sorted((int(b), v) for b, v in batch_sessions.items()):
                setting = setting if isinstance(setting, SessionSetting) else SessionSetting.from_dict(setting)
                if setting not in made:
                    made[setting] = self._new_session(setting.threads, setting.spinning)
                self.batch_sessions.append((batch, setting))
                self._route_map[batch] = made[setting]
        self.providers = self.session.get_providers()
        lost = [p for p in wanted if p not in self.providers]
        if lost and not allow_fallback and providers != "auto":
            raise InputError(
                f"onnxruntime could not initialise {', '.join(lost)} (running on "
                f"{', '.join(self.providers)}); check the CUDA/cuDNN install or pass allow_fallback=True"
            )
        self.threads = threads
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = self._input_specs()
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._validate = validate
        self._checks = [
            (s.name, s.np_dtype, len(s.shape), [(a, d) for a, d in enumerate(s.shape) if isinstance(d, int)])
            for s in self.inputs
        ]
        self._input_names = [s.name for s in self.inputs]
        if warmup:
            from edgepipe.runtime.spec import make_feeds

            feeds = make_feeds(self.inputs, batch=1)
            for _ in range(warmup):
                self.session.run(None, feeds)

    def _new_session(self, threads: int | None, spinning: bool) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[self.optimization]
        if threads:
            options.intra_op_num_threads = int(threads)
        if not spinning:
            # Idle intra-op threads otherwise spin ~40 ms after each run: right for one busy
            # session, but when models are timed against each other the spinning threads of
            # one steal cores from the next (a measured 1.22x read as 0.97x on 2 cores).
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 4  # errors reach the user as InputError, once
        try:
            return ort.InferenceSession(self._source, sess_options=options, providers=self._session_providers)
        except Exception as exc:  # ORT raises several private exception types for bad models
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = self.path or "<bytes>"
            raise InputError(f"cannot load ONNX model {where}: {first_line}") from exc

    def session_for(self, rows: int) -> ort.InferenceSession:
        """The session a batch of `rows` runs on (see `batch_sessions`)."""
        if not self._route_map:
            return self.session
        return self._route_map[route_batch(self._route_map, rows)]

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, model: str | None = None, *,
                 precision: str = "deployed", **options) -> "Engine":
        """The model a pipeline run deployed: `Engine.from_run("runs/demo", "cnn")`.

        precision: "deployed" (INT8 when the run quantized it, else FP32), "int8" or "fp32".
        On the CPU, each batch size runs on the session setting (threads, spinning) quantize
        measured fastest for that artifact (pass `threads` or `batch_sessions` to override). Reads only manifest.json and the ONNX file: works
        on a device without torch.
        """
        import json

        run_dir = Path(run_dir)
        manifest_path = run_dir / "manifest.json"
        if not manifest_path.is_file():
            raise InputError(f"{run_dir} is not an edgepipe run directory (no manifest.json)")
        models = json.loads(manifest_path.read_text()).get("models", {})
        if model is None:
            if len(models) != 1:
                raise InputError(f"{run_dir} holds models {', '.join(models)}: name one")
            model = next(iter(models))
        if model not in models:
            raise InputError(f"no model '{model}' in {run_dir}; it has {', '.join(models) or 'none'}")
        stages = models[model].get("stages", {})
        int8_ok = stages.get("quantize", {}).get("status") == "ok"
        if precision not in ("deployed", "int8", "fp32"):
            raise InputError(f"precision must be deployed, int8 or fp32, got '{precision}'")
        if precision == "int8" and not int8_ok:
            raise InputError(f"run {run_dir} has no INT8 model for '{model}' (quantize did not deploy one)")
        name = "model.int8.onnx" if precision == "int8" or (precision == "deployed" and int8_ok) else "model.onnx"
        # The settings quantize found fastest for this artifact per batch size, unless the caller
        # chose threads (or sessions) itself or runs on another provider.
        quant = stages.get("quantize", {}).get("record") or {}
        tuned = ((quant.get("chosen") or {}) if name == "model.int8.onnx" else quant.get("fp32", {})).get("sessions")
        applied = {}
        if (tuned and options.get("providers", "auto") in ("auto", "cpu") and options.get("threads") is None
                and not options.get("batch_sessions")):
            applied["batch_sessions"] = {int(b): SessionSetting.from_dict(v) for b, v in tuned.items()}
            if "spinning" in options:  # e.g. serve --spin/--no-spin: the caller's word on spinning
                applied["batch_sessions"] = {b: SessionSetting(v.threads, bool(options["spinning"]))
                                             for b, v in applied["batch_sessions"].items()}
        engine = cls(run_dir / model / name, **(options | applied))
        engine.run_info = {"run": str(run_dir), "model": model, "artifact": name,
                           "stages": {k: v.get("status") for k, v in stages.items()},
                           "sessions_from_run": {b: v.to_dict() for b, v in applied["batch_sessions"].items()}
                           if applied else None}
        return engine

    def _input_specs(self) -> list[InputSpec]:
        """Specs from the graph, enriched by the export metadata (value ranges, example dims)."""
        recorded = {}
        if METADATA_KEY in self.metadata:
            recorded = {s.name: s for s in specs_from_json(self.metadata[METADATA_KEY])}
        specs = []
        for arg in self.session.get_inputs():
            dtype = ORT_TO_NUMPY.get(arg.type)
            if dtype is None:
                raise InputError(f"model input '{arg.name}' has unsupported type {arg.type}")
            shape = tuple(d if isinstance(d, int) else (d or f"dim{i}") for i, d in enumerate(arg.shape))
            extra = recorded.get(arg.name)
            specs.append(InputSpec(
                name=arg.name, dtype=str(dtype), shape=shape,
                low=extra.low if extra else None, high=extra.high if extra else None,
                example=extra.example if extra else {},
            ))
        return specs

    def as_feeds(self, inputs: Mapping[str, np.ndarray] | np.ndarray | Sequence[np.ndarray]) -> dict:
        """Accept a dict, a single array (one-input models) or a sequence in input order."""
        if inputs.__class__ is dict:
            return inputs
        if isinstance(inputs, Mapping):
            return dict(inputs)
        if isinstance(inputs, np.ndarray):
            if len(self._input_names) != 1:
                raise InputError(
                    f"model has {len(self._input_names)} inputs ({', '.join(self._input_names)}); "
                    "pass a dict of name -> array"
                )
            return {self._input_names[0]: inputs}
        inputs = list(inputs)
        if len(inputs) != len(self._input_names):
            raise InputError(f"got {len(inputs)} arrays, model expects {len(self._input_names)}: "
                             f"{', '.join(self._input_names)}")
        return dict(zip(self._input_names, inputs))

    def _valid(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Allocation-free check for the common case (run's hot path); details come from validate."""
        if len(feeds) != len(self._checks):
            return False
        for name, dtype, ndim, static in self._checks:
            value = feeds.get(name)
            if value.__class__ is not np.ndarray or value.dtype != dtype or value.ndim != ndim:
                return False
            shape = value.shape
            for axis, size in static:
                if shape[axis] != size:
                    return False
        return True

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputError listing every mismatch between `feeds` and the model's inputs."""
        if self._valid(feeds):
            return
        problems = []
        unknown = [n for n in feeds if n not in self._input_names]
        if unknown:
            problems.append(f"unknown input(s) {', '.join(map(repr, unknown))} "
                            f"(model inputs: {', '.join(self._input_names)})")
        for (name, dtype, ndim, static), spec in zip(self._checks, self.inputs):
            value = feeds.get(name)
            if value is None:
                problems.append(f"missing input '{name}' (expected {spec.describe()})")
                continue
            if not isinstance(value, np.ndarray):
                problems.append(f"input '{name}' is {type(value).__name__}, expected a numpy array")
                continue
            if value.dtype != dtype:
                problems.append(f"input '{name}' has dtype {value.dtype}, model expects {dtype} "
                                f"(use .astype(np.{dtype}))")
            if value.ndim != ndim:
                problems.append(f"input '{name}' has {value.ndim} dims {list(value.shape)}, "
                                f"model expects {ndim}: {list(spec.shape)}")
                continue
            bad = [(a, d) for a, d in static if value.shape[a] != d]
            if bad:
                problems.append(f"input '{name}' has shape {list(value.shape)}, model expects "
                                f"{list(spec.shape)} (axis {bad[0][0]} must be {bad[0][1]})")
        if problems:
            raise InputError("; ".join(problems))

    def run(self, inputs, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model; returns {output name: array}."""
        feeds = self.as_feeds(inputs)
        if self._validate and not self._valid(feeds):
            self.validate(feeds)  # raises with every mismatch named
        names = list(outputs) if outputs else self.output_names
        session = self.session
        if self._route_map:
            shape = np.shape(next(iter(feeds.values()))) if feeds else ()
            session = self.session_for(shape[0] if shape else 1)
        try:
            values = session.run(None if outputs is None else names, feeds)
        except Exception as exc:
            raise InputError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
        return dict(zip(names, values))

    def to_device(self, array: np.ndarray, device: str = "cuda", device_id: int = 0) -> ort.OrtValue:
        """Copy `array` to `device` once; pass the OrtValue to `run_bound` as often as needed."""
        return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), device, device_id)

    def run_bound(self, inputs, *, device: str = "cuda", device_id: int = 0,
                  keep_on_device: bool = False) -> dict:
        """Run with IO binding: numpy inputs are copied to `device` (OrtValues from `to_device`
        or from an earlier `keep_on_device` run are used in place) and outputs are allocated
        there. Returns numpy arrays, or the OrtValues themselves with `keep_on_device=True`
        so the next model or call can take them without a round trip through host memory.
        `device="cpu"` works everywhere (same results as `run`)."""
        feeds = self.as_feeds(inputs)
        if self._validate and all(isinstance(v, np.ndarray) for v in feeds.values()):
            self.validate(feeds)  # OrtValues already on the device are checked by ORT itself
        binding = self.session.io_binding()
        unknown = [k for k in feeds if k not in self._input_names]
        missing = [k for k in self._input_names if k not in feeds]
        if unknown or missing:
            raise InputError(f"inputs must be exactly {', '.join(self._input_names)}; "
                             f"unknown: {', '.join(unknown) or '-'}, missing: {', '.join(missing) or '-'}")
        for name in self._input_names:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                value = self.to_device(value, device, device_id)
            elif not isinstance(value, ort.OrtValue):
                raise InputError(f"input '{name}' is {type(value).__name__}: pass a numpy array or an OrtValue")
            binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, device, device_id)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:
            raise InputError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0]}") from exc
        if keep_on_device:
            return dict(zip(self.output_names, binding.get_outputs()))
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def placement(self, inputs=None) -> dict:
        """Which execution provider ran each node (one profiled run of a twin session with the
        same providers and options). `fell_back` lists the nodes that did not run on the
        preferred provider, e.g. ops CUDA has no kernel for; `memcpy_nodes` counts the copies
        ORT inserted between devices because of them."""
        from edgepipe.runtime.profiling import node_times, placement_report, profile_events
        from edgepipe.runtime.spec import make_feeds

        feeds = self.as_feeds(inputs) if inputs is not None else make_feeds(self.inputs, batch=1)
        events = profile_events(self._source, feeds, self._session_providers, threads=self.threads, iterations=1)
        return placement_report(node_times(events), self.providers)

    def close(self) -> None:
        self.session = None
        self._route_map = {}

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def describe(self) -> dict:
        return {
            "model": str(self.path) if self.path else None,
            "providers": list(self.providers),
            "threads": self.threads or "ort-default",
            "batch_sessions": {b: s.to_dict() for b, s in self.batch_sessions} or None,
            "optimization": self.optimization,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": self.output_names,
        }
