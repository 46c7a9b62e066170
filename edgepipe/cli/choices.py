"""Fixed choices of CLI options, as Enums: `--help` lists them and a typo is refused before any work."""

from __future__ import annotations

from enum import Enum


class QuantizeMode(str, Enum):
    auto = "auto"  # every recipe that fits the graph and the CPU
    dynamic = "dynamic"
    static = "static"
    int4 = "int4"
    fp16 = "fp16"


class Backend(str, Enum):
    onnxruntime = "onnxruntime"
    openvino = "openvino"  # needs the openvino extra


class QuantizeDevice(str, Enum):
    cpu = "cpu"
    cuda = "cuda"  # needs onnxruntime-gpu and an NVIDIA GPU


class Calibration(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Importance(str, Enum):
    magnitude = "magnitude"  # L2 norm of the weights
    taylor = "taylor"  # weight x gradient


class ServeBackend(str, Enum):
    http = "http"
    ray = "ray"


class QatActivations(str, Enum):
    symmetric = "symmetric"  # zero-point-free INT8: the every-MatMul layout
    asymmetric = "asymmetric"  # UINT8 with a zero point: onnxruntime's static default
