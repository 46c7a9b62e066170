"""ONNX Runtime sessions, made in one place: provider choice, options, per-batch settings."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import onnxruntime as ort

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line

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
CPU = ["CPUExecutionProvider"]


_TENSORRT_LIBS: list[bool] = []
_SHARED_ARENA = {"registered": False, "depth": 0}


@contextmanager
def shared_cpu_arena() -> Iterator[None]:
    """CPU sessions made inside this block share one memory arena, registered with ONNX Runtime's
    environment once per process. Each session otherwise keeps its own arena at the peak of its
    largest run, so a search that holds a dozen sessions (candidates x thread settings) and runs
    them one at a time held a dozen peaks, where a shared arena holds one, at the same latency.
    Sessions made outside the block,
    and any made with a GPU provider, keep their own."""
    if not _SHARED_ARENA["registered"]:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        # max_mem 0: no cap; extend strategy 1: by what is asked (a session arena's default, the
        # next power of two, can hold twice a large model's need)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))
        _SHARED_ARENA["registered"] = True
    _SHARED_ARENA["depth"] += 1
    try:
        yield
    finally:
        _SHARED_ARENA["depth"] -= 1


def tensorrt_libraries_present() -> bool:
    """Whether TensorRT's own runtime (libnvinfer) can be loaded. onnxruntime-gpu lists the
    TensorRT provider whenever its bridge library ships, which it always does, but a session
    on it fails without TensorRT installed; "auto" must not pick it then."""
    if not _TENSORRT_LIBS:
        import ctypes

        names = ("nvinfer_10.dll", "nvinfer.dll") if os.name == "nt" else ("libnvinfer.so.10", "libnvinfer.so")
        found = False
        for name in names:
            try:
                ctypes.CDLL(name)
                found = True
                break
            except OSError:
                continue
        _TENSORRT_LIBS.append(found)
    return _TENSORRT_LIBS[0]


def resolve_providers(requested: str | Sequence[str]) -> tuple[list[str], list[str]]:
    """Map `"auto"`, `"cuda"`, `["cuda", "cpu"]` … to (available, missing) ORT provider names.

    Raises InputError listing what is available (and how to get GPU support) when nothing matches.
    """
    available = ort.get_available_providers()
    if isinstance(requested, str):
        requested = [requested]
    if list(requested) == ["auto"]:
        return [p for p in AUTO_ORDER if p in available
                and (p != "TensorrtExecutionProvider" or tensorrt_libraries_present())], []
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


def new_session(model: str | os.PathLike | bytes, providers: Sequence = CPU, *, threads: int | None = None,
                spinning: bool = True, optimization: str = "all",
                profile_prefix: str | None = None) -> ort.InferenceSession:
    """The one constructor of ONNX Runtime sessions in edgepipe. `providers`: what
    InferenceSession takes (see session_providers). A model ORT cannot load is an InputError."""
    if optimization not in OPTIMIZATION_LEVELS:
        raise InputError(f"unknown graph optimization level '{optimization}'; "
                         f"choose one of {', '.join(OPTIMIZATION_LEVELS)}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    if threads:
        options.intra_op_num_threads = int(threads)
    if not spinning:
        # Idle intra-op threads otherwise spin for a while after each run: right for one busy
        # session, but when models are timed against each other the spinning threads of one
        # steal cores from the next, and the ratio reads the theft, not the models.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if _SHARED_ARENA["depth"] and all((p if isinstance(p, str) else p[0]) == CPU[0] for p in providers):
        options.add_session_config_entry("session.use_env_allocators", "1")
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    options.log_severity_level = 4  # errors reach the user as InputError, once
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=options, providers=list(providers))
    except Exception as exc:  # ORT raises several private exception types for bad models
        interrupts.reraise()  # a termination, not this call's failure
        where = "<bytes>" if isinstance(model, bytes) else model
        raise InputError(f"cannot load ONNX model {where}: {first_line(exc)}") from exc


@dataclass(frozen=True)
class SessionSetting:
    """How an Engine's CPU session runs: intra-op threads and whether idle workers spin.

    On a small CPU these move an INT8/FP32 ratio as much as the recipe does, and not the same
    way for both models (2 cores: the INT8 MLP runs fastest on 1 thread, the FP32 transformer at
    batch 32 on 2), so each model is compared, and deployed, at its own fastest setting."""

    threads: int
    spinning: bool

    def to_dict(self) -> dict:
        return {"threads": self.threads, "spinning": self.spinning}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SessionSetting":
        return cls(int(data["threads"]), bool(data["spinning"]))

    def engine_options(self) -> dict:
        return {"threads": self.threads, "spinning": self.spinning}

    def __str__(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''}" + (", spinning" if self.spinning else "")


def session_settings(threads: int | None = None, cores: int | None = None,
                     spinning: bool = False) -> list[SessionSetting]:
    """The settings worth sweeping: one thread and all `cores` (or only the user's fixed
    `threads`), without spinning; with `spinning`, also all cores with spinning workers. Those
    keep a core busy ~40 ms after every run (measured here), which slows whatever else runs, so
    they are opt-in, and timing them needs a pause after each (measure_interleaved does it)."""
    n = max(1, int(threads or cores or os.cpu_count() or 1))
    settings = [SessionSetting(n, False)] if threads else list(dict.fromkeys([SessionSetting(1, False),
                                                                             SessionSetting(n, False)]))
    if spinning and n > 1:
        settings.append(SessionSetting(n, True))
    return settings


def route_batch(batches, rows: int) -> int:
    """Which configured batch size serves `rows`: the smallest >= rows, else the largest."""
    ordered = sorted(batches)
    return next((b for b in ordered if rows <= b), ordered[-1])


def fastest_per_batch(p50_by_batch: Mapping[int, Mapping[SessionSetting, float]]) -> dict[int, SessionSetting]:
    """{batch: the setting with the lowest p50 at that batch} (ties: fewer threads, no spinning)."""
    return {b: min(sorted(p50, key=lambda s: (s.threads, s.spinning)), key=lambda s: p50[s])
            for b, p50 in p50_by_batch.items()}


def parse_sessions(per_batch: Mapping | None) -> dict[int, SessionSetting]:
    """{"1": {"threads": 1, "spinning": false}, …} as recorded in a manifest -> {1: SessionSetting}."""
    return {int(b): SessionSetting.from_dict(v) for b, v in (per_batch or {}).items()}
