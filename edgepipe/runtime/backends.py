"""The runtimes an Engine runs a model on, behind one interface. A backend makes the sessions
(one per thread setting), says which providers a made session really uses, and names the
features it has beyond `run` (IO binding, per-node placement). The Engine holds a backend and
never branches on its name: a third runtime is one class here and one entry in BACKENDS."""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar, Literal, Mapping, Protocol, Sequence

import onnxruntime as ort

from edgepipe.errors import InputError
from edgepipe.runtime.openvino_backend import BACKENDS as NAMES
from edgepipe.runtime.openvino_backend import OpenVINOSession, require_openvino
from edgepipe.runtime.sessions import (
    new_session,
    resolve_providers,
    session_providers,
    tensorrt_libraries_present,
)

Feature = Literal["io_binding", "placement"]
CPU_ONLY = ("auto", "cpu", ["cpu"])


class SessionBackend(Protocol):
    name: ClassVar[str]
    features: ClassVar[frozenset[str]]  # of Feature

    def new_session(self, threads: int | None, spinning: bool):
        """A session with `run(output_names, feeds)`, `get_inputs()`, `get_outputs()`,
        `get_modelmeta()` and `get_providers()`, as onnxruntime's InferenceSession has."""

    def check_session(self, session, allow_fallback: bool) -> None:
        """InputError when the session lost a provider that was asked for."""


class OnnxruntimeBackend:
    name = "onnxruntime"
    features = frozenset({"io_binding", "placement"})

    def __init__(self, model: str | os.PathLike | bytes, providers: str | Sequence[str],
                 provider_options: Mapping[str, Mapping] | None, allow_fallback: bool, optimization: str):
        wanted, missing = resolve_providers(providers)
        if missing and not allow_fallback:
            raise InputError(f"execution provider(s) {', '.join(missing)} not available "
                             f"(available: {', '.join(ort.get_available_providers())}); on the CLI choose an "
                             "available one with --provider (e.g. --provider cpu); in Python pass "
                             "allow_fallback=True to run on the others")
        self.source = model if isinstance(model, bytes) else str(model)
        self.wanted, self.asked = wanted, providers
        self.session_providers = session_providers(wanted, provider_options)
        self.optimization = optimization

    def new_session(self, threads: int | None, spinning: bool) -> ort.InferenceSession:
        return new_session(self.source, self.session_providers, threads=threads, spinning=spinning,
                           optimization=self.optimization)

    def check_session(self, session, allow_fallback: bool) -> None:
        used = session.get_providers()
        lost = [p for p in self.wanted if p not in used]
        if lost and not allow_fallback and self.asked != "auto":
            check = "check the CUDA/cuDNN install"
            if "TensorrtExecutionProvider" in lost and not tensorrt_libraries_present():
                check = ("TensorRT's own libraries (libnvinfer.so.10) are not installed: install TensorRT 10 for this "
                         "CUDA")
            raise InputError(f"onnxruntime could not initialise {', '.join(lost)} (running on {', '.join(used)}); "
                             f"{check}, or choose another --provider (in Python: allow_fallback=True)")


class OpenVINOBackend:
    """OpenVINO's CPU plugin on the same ONNX file (openvino_backend.OpenVINOSession)."""

    name = "openvino"
    features = frozenset()

    def __init__(self, model: str | os.PathLike | bytes, providers: str | Sequence[str],
                 provider_options: Mapping[str, Mapping] | None, allow_fallback: bool, optimization: str):
        if isinstance(model, bytes) or providers not in CPU_ONLY or provider_options:
            raise InputError("the openvino backend runs a model file on the CPU: pass a path, "
                             "providers 'cpu' (or 'auto') and no provider options")
        self.path = Path(model)

    def new_session(self, threads: int | None, spinning: bool) -> OpenVINOSession:
        return OpenVINOSession(self.path, threads=threads)  # spinning is an onnxruntime thread-pool setting

    def check_session(self, session, allow_fallback: bool) -> None:
        pass


# one entry per name of openvino_backend.Backend (the Literal the configs check against)
BACKENDS: dict[str, type] = {"onnxruntime": OnnxruntimeBackend, "openvino": OpenVINOBackend}


def make_backend(name: str, model: str | os.PathLike | bytes, *, providers: str | Sequence[str] = "auto",
                 provider_options: Mapping[str, Mapping] | None = None, allow_fallback: bool = False,
                 optimization: str = "all") -> SessionBackend:
    """The backend `name` for `model`, or InputError: unknown, not installed, or asked for what
    it cannot do."""
    if name not in NAMES:
        raise InputError(f"unknown backend '{name}'; choose one of {', '.join(NAMES)}")
    if name == "openvino":
        require_openvino()
    return BACKENDS[name](model, providers, provider_options, allow_fallback, optimization)
