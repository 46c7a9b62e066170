"""The edgepipe runtime: run exported models with only numpy + onnxruntime (no torch, no onnx)."""

from edgepipe.runtime.engine import Engine
from edgepipe.runtime.hardware import CpuInfo, fingerprint, read_cpu
from edgepipe.runtime.preprocess import Preprocess, TextClassifier, WordTagger
from edgepipe.runtime.profiling import compare_models, profile_model
from edgepipe.runtime.sessions import (
    SessionSetting,
    fastest_per_batch,
    new_session,
    resolve_providers,
    session_settings,
)
from edgepipe.runtime.spec import InputSpec, make_feeds
from edgepipe.runtime.timing import LatencyStats, measure, measure_interleaved

__all__ = [
    "CpuInfo",
    "Engine",
    "InputSpec",
    "LatencyStats",
    "Preprocess",
    "SessionSetting",
    "TextClassifier",
    "WordTagger",
    "compare_models",
    "fastest_per_batch",
    "fingerprint",
    "make_feeds",
    "measure",
    "measure_interleaved",
    "new_session",
    "profile_model",
    "read_cpu",
    "resolve_providers",
    "session_settings",
]
