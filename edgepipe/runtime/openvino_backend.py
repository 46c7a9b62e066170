"""OpenVINO as an Engine backend: the same ONNX file, run by OpenVINO's CPU plugin.

OpenVINO reads ONNX directly and runs a static QDQ model (QuantizeLinear/DequantizeLinear
around Conv/MatMul) with its own INT8 kernels; on CNNs those beat onnxruntime's on some CPUs
for the same file. Quantize measures it as one more candidate; a deployment records which backend won.

Optional: `pip install 'edgepipe[openvino]'`. Torch-free and onnx-free like the rest of the
runtime; the model's metadata (edgepipe's input specs) is read from the file with a small
protobuf walker, since OpenVINO does not keep ONNX metadata_props.

Float precision is pinned to f32. Left to itself, OpenVINO's CPU plugin computes float ops in
bf16 on CPUs with native bf16 (AVX512_BF16 or AMX): an FP32 model's outputs then move
visibly, and which CPU runs it changes the numbers. Parity checks and the accuracy a
quantize search measured must hold on the target, so every CPU computes float ops the same way.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass
from typing import Literal, Mapping, Sequence, get_args

import numpy as np

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.spec import METADATA_KEY, specs_from_json

Backend = Literal["onnxruntime", "openvino"]  # the runtimes an Engine runs a model on
BACKENDS: tuple[str, ...] = get_args(Backend)
PROVIDER_NAME = "OpenVINO-CPU"  # what Engine.providers reports for this backend
INSTALL_HINT = "pip install 'edgepipe[openvino]'"
FLOAT_PRECISION = "f32"  # see the module docstring: never the CPU-dependent bf16 default

# OpenVINO element types -> the ORT type strings spec.py maps to numpy.
_OV_TYPES = {"f32": "tensor(float)", "f16": "tensor(float16)", "f64": "tensor(double)",
             "i64": "tensor(int64)", "i32": "tensor(int32)", "i16": "tensor(int16)",
             "i8": "tensor(int8)", "u8": "tensor(uint8)", "boolean": "tensor(bool)"}


def available() -> bool:
    return importlib.util.find_spec("openvino") is not None


def require_openvino() -> None:
    if not available():
        raise InputError(f"the openvino backend needs the openvino package: {INSTALL_HINT} "
                         "(or run the model with backend 'onnxruntime')")


@dataclass(frozen=True)
class _Arg:  # the part of onnxruntime's NodeArg that spec.py reads
    name: str
    type: str
    shape: list


@dataclass(frozen=True)
class _Meta:
    custom_metadata_map: dict


class OpenVINOSession:
    """An ONNX model compiled by OpenVINO for the CPU, with the subset of onnxruntime's
    InferenceSession interface the Engine uses (run, get_inputs, get_outputs, get_providers,
    get_modelmeta). Safe to call from several threads: each has its own infer request."""

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        require_openvino()
        import openvino as ov

        config: dict = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": FLOAT_PRECISION}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except Exception as exc:  # OpenVINO raises RuntimeError with multi-line messages
            interrupts.reraise()  # a termination, not this call's failure
            raise InputError(f"OpenVINO cannot load {path}: {first_line(exc)}") from exc
        self._meta = _Meta(onnx_metadata(path))
        # OpenVINO drops the names of dynamic dims; the export's recorded spec has them ("batch")
        named = {s.name: s.shape for s in specs_from_json(self._meta.custom_metadata_map.get(METADATA_KEY, "[]"))}
        self._inputs = [_Arg(p.get_any_name(), self._type(p), self._shape(p, named.get(p.get_any_name())))
                        for p in self.compiled.inputs]
        self._outputs = [_Arg(p.get_any_name(), self._type(p), self._shape(p)) for p in self.compiled.outputs]
        self._local = threading.local()

    @staticmethod
    def _type(port) -> str:
        name = port.get_element_type().get_type_name()
        if name not in _OV_TYPES:
            raise InputError(f"model tensor '{port.get_any_name()}' has type {name}, which edgepipe does not feed")
        return _OV_TYPES[name]

    @staticmethod
    def _shape(port, recorded: Sequence | None = None) -> list:
        dims = [d.get_length() if d.is_static else None for d in port.get_partial_shape()]
        if recorded is not None and len(recorded) == len(dims):
            dims = [r if d is None and isinstance(r, str) else d for d, r in zip(dims, recorded)]
        return dims

    def get_inputs(self) -> list[_Arg]:
        return list(self._inputs)

    def get_outputs(self) -> list[_Arg]:
        return list(self._outputs)

    def get_providers(self) -> list[str]:
        return [PROVIDER_NAME]

    def get_modelmeta(self) -> _Meta:
        return self._meta

    def _request(self):
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self.compiled.create_infer_request()
        return request

    def run(self, output_names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        values = self._request().infer(dict(feeds)).to_tuple()  # copies: safe to keep (Engine.run words errors)
        if output_names is None:
            return list(values)
        by_name = {arg.name: value for arg, value in zip(self._outputs, values)}
        return [by_name[name] for name in output_names]
