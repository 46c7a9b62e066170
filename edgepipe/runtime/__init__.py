"""The edgepipe runtime: run exported models with only numpy + onnxruntime (no torch, no onnx)."""

from edgepipe.runtime.engine import Engine, resolve_providers
from edgepipe.runtime.hardware import CpuInfo, fingerprint, read_cpu
from edgepipe.runtime.profiling import (
    LatencyStats,
    SessionSetting,
    compare_models,
    fastest_per_batch,
    measure,
    measure_interleaved,
    profile_model,
    session_settings,
)
from edgepipe.runtime.spec import InputSpec, make_feeds

__all__ = [
    "CpuInfo",
    "Engine",
    "InputSpec",
    "LatencyStats",
    "SessionSetting",
    "compare_models",
    "fastest_per_batch",
    "fingerprint",
    "make_feeds",
    "measure",
    "measure_interleaved",
    "profile_model",
    "read_cpu",
    "resolve_providers",
    "session_settings",
]
