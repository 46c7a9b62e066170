"""Engine: build an ONNX Runtime session once, validate inputs, run many times. Torch-free."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnxruntime as ort

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line
from edgepipe.runtime.backends import make_backend
from edgepipe.runtime.deployment import MeasuredOn, choose_backend, find_deployment
from edgepipe.runtime.placement import node_times, placement_report, profile_events
from edgepipe.runtime.sessions import SessionSetting, resolve_providers, route_batch
from edgepipe.runtime.spec import make_feeds, specs_from_session
from edgepipe.runtime.validation import FeedChecker

__all__ = ["Engine", "resolve_providers"]


_STATUS = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")
_NODE = re.compile(r"Non-zero status code returned while running (\w+) node\. Name:'([^']*)' Status Message: ")
_SOURCE = re.compile(r"\S*onnxruntime_src\S*:\d+ (?:[\w:<>,*& ~]+\([^)]*\)(?: const)? )?")


def runtime_message(exc: BaseException) -> str:
    """A runtime's error as a sentence: onnxruntime's status prefix and the source file, line
    and C++ signature it quotes are left out; the node and what went wrong stay."""
    text = _SOURCE.sub("", _NODE.sub(r"\1 node '\2': ", _STATUS.sub("", first_line(exc))))
    return text.strip() or type(exc).__name__


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
    `backend`: "onnxruntime" or "openvino" (OpenVINO's CPU plugin runs the same ONNX file; needs
    `pip install 'edgepipe[openvino]'`; CPU only, no IO binding or placement). None (default):
    the backend the file's deployment record names (quantize writes one into the file it ships:
    where it was measured and judged), else onnxruntime. On the CPU, with no `threads` or
    `batch_sessions`, the record's per-batch session settings apply too (`self.measured_on` is
    the record). A backend on which the record says the file is out of its accuracy or speed
    budget is refused unless `allow_out_of_budget=True`.
    `batch_sessions`: {batch size: SessionSetting or {"threads", "spinning"}}: one session per
    setting, and `run` sends a batch of n rows to the entry with the smallest batch size >= n
    (else the largest). On 2 cores a batch of 1 runs fastest on 1 thread and a batch of 32 on
    2; quantize measures this per model and `from_run` applies it. `threads` and `spinning`
    then make no session of their own, and `session` (what `run_bound` uses) is the smallest
    batch's.
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
        backend: str | None = None,
        allow_out_of_budget: bool = False,
    ):
        self.path = None if isinstance(model, bytes) else Path(model)
        if self.path is not None and not self.path.is_file():
            raise InputError(f"ONNX model not found: {self.path}")
        self.measured_on = record = MeasuredOn.read(self.path) if self.path is not None else None
        on_cpu = providers in ("auto", "cpu", ["cpu"]) and not provider_options
        backend = choose_backend(record, backend, on_cpu, allow_out_of_budget, self.path.name if self.path else "model")
        if record is not None and record.device == "cpu" and on_cpu and backend == record.backend \
                and threads is None and not batch_sessions:
            batch_sessions = record.sessions or None  # as it was measured
        self._backend = make_backend(backend, model if isinstance(model, bytes) else self.path, providers=providers,
                                     provider_options=provider_options, allow_fallback=allow_fallback,
                                     optimization=optimization)
        self.backend = self._backend.name
        self.optimization = optimization
        self.batch_sessions: list[tuple[int, SessionSetting]] = []
        self._route_map: dict[int, ort.InferenceSession] = {}  # batch size -> its session
        if batch_sessions:  # every batch routes to one of these: no session beside them
            self.session = self._build_routes(batch_sessions)
        else:
            self.session = self._backend.new_session(threads, spinning)
        self.providers = self.session.get_providers()
        self._backend.check_session(self.session, allow_fallback)
        self.threads = threads
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        self.inputs = specs_from_session(self.session, self.metadata)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._validate = validate
        self.feeds = FeedChecker(self.inputs)
        if warmup:
            feeds = make_feeds(self.inputs, batch=1)
            for _ in range(warmup):
                self.session.run(None, feeds)

    def _build_routes(self, batch_sessions: Mapping[int, object]) -> ort.InferenceSession:
        """One session per distinct setting in `batch_sessions`; returns the smallest batch's (the
        Engine's `session`). Another for the Engine's own threads would hold a second copy of the
        weights that no batch runs on."""
        made: dict[SessionSetting, ort.InferenceSession] = {}
        for batch, setting in sorted((int(b), v) for b, v in batch_sessions.items()):
            setting = setting if isinstance(setting, SessionSetting) else SessionSetting.from_dict(setting)
            if setting not in made:
                made[setting] = self._backend.new_session(setting.threads, setting.spinning)
            self.batch_sessions.append((batch, setting))
            self._route_map[batch] = made[setting]
        return self._route_map[min(self._route_map)]

    def session_for(self, rows: int) -> ort.InferenceSession:
        """The session a batch of `rows` runs on (see `batch_sessions`)."""
        if not self._route_map:
            return self.session
        return self._route_map[route_batch(self._route_map, rows)]

    def runner(self, feeds: Mapping[str, np.ndarray]) -> Callable[[], list]:
        """A zero-argument call that runs `feeds` on the session their batch routes to, with no
        conversion or validation: what latency measurement times. Validate `feeds` once first."""
        session = self.session_for(len(next(iter(feeds.values()))) if feeds else 1)
        feeds = dict(feeds)
        return lambda: session.run(None, feeds)

    @classmethod
    def from_run(cls, run_dir: str | os.PathLike, model: str | None = None, *,
                 precision: str = "deployed", **options) -> "Engine":
        """The model a pipeline run deployed: `Engine.from_run("runs/demo", "cnn")`.

        precision: "deployed" (INT8 when the run quantized it, else FP32), "int8" or "fp32".
        On the CPU, each batch size runs on the session setting (threads, spinning) quantize
        measured fastest for that artifact (pass `threads` or `batch_sessions` to override).
        Reads only manifest.json and the ONNX file: works on a device without torch.
        """
        deployment = find_deployment(run_dir, model, precision)
        options, applied = deployment.engine_options(options)
        engine = cls(deployment.path, **options)
        engine.run_info = {"run": str(deployment.run_dir), "model": deployment.model,
                           "artifact": deployment.artifact,
                           "stages": {k: v.get("status") for k, v in deployment.stages.items()},
                           "sessions_from_run": applied}
        return engine

    def as_feeds(self, inputs) -> dict:
        """Accept a dict, a single array (one-input models) or a sequence in input order."""
        return self.feeds.as_feeds(inputs)

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputError listing every mismatch between `feeds` and the model's inputs."""
        self.feeds.validate(feeds)

    def run(self, inputs, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Run the model; returns {output name: array}."""
        feeds = self.feeds.as_feeds(inputs)
        if self._validate and not self.feeds.valid(feeds):
            self.feeds.validate(feeds)  # raises with every mismatch named
        names = list(outputs) if outputs else self.output_names
        session = self.session
        if self._route_map:
            shape = np.shape(next(iter(feeds.values()))) if feeds else ()
            session = self.session_for(shape[0] if shape else 1)
        try:
            values = session.run(None if outputs is None else names, feeds)
        except Exception as exc:
            interrupts.reraise()  # a termination, not this call's failure
            raise InputError(f"{self.backend} could not run the model on these inputs: {runtime_message(exc)}") from exc
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
        self._needs("io_binding", "run_bound (IO binding)")
        feeds = self.as_feeds(inputs)
        if self._validate and all(isinstance(v, np.ndarray) for v in feeds.values()):
            self.validate(feeds)  # OrtValues already on the device are checked by ORT itself
        binding = self.session.io_binding()
        unknown = [k for k in feeds if k not in self.feeds.names]
        missing = [k for k in self.feeds.names if k not in feeds]
        if unknown or missing:
            raise InputError(f"inputs must be exactly {', '.join(self.feeds.names)}; "
                             f"unknown: {', '.join(unknown) or '-'}, missing: {', '.join(missing) or '-'}")
        for name in self.feeds.names:
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
            interrupts.reraise()  # a termination, not this call's failure
            raise InputError(f"{self.backend} could not run the model on these inputs: {runtime_message(exc)}") from exc
        if keep_on_device:
            return dict(zip(self.output_names, binding.get_outputs()))
        return dict(zip(self.output_names, binding.copy_outputs_to_cpu()))

    def placement(self, inputs=None) -> dict:
        """Which execution provider ran each node (one profiled run of a twin session with the
        same providers and options). `fell_back` lists the nodes that did not run on the
        preferred provider, e.g. ops CUDA has no kernel for; `memcpy_nodes` counts the copies
        ORT inserted between devices because of them."""
        self._needs("placement", "placement")
        feeds = self.as_feeds(inputs) if inputs is not None else make_feeds(self.inputs, batch=1)
        events = profile_events(self._backend.source, feeds, self._backend.session_providers, threads=self.threads,
                                iterations=1)
        return placement_report(node_times(events), self.providers)

    def _needs(self, feature: str, what: str) -> None:
        if feature not in self._backend.features:
            raise InputError(f"{what} is an onnxruntime feature; this Engine runs on {self.backend} "
                             "(create it with backend='onnxruntime')")

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
            "backend": self.backend,
            "measured_on": self.measured_on.describe() if self.measured_on else None,
            "providers": list(self.providers),
            "threads": self.threads or "ort-default",
            "batch_sessions": {b: s.to_dict() for b, s in self.batch_sessions} or None,
            "optimization": self.optimization,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": self.output_names,
        }
