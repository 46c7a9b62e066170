"""Export an NVIDIA Triton model repository: the ONNX model plus a config.pbtxt with dynamic
batching and instance groups, checked by parsing it with Triton's own protobuf schema
(`inference.ModelConfig` from tritonclient) and against the model's real inputs and outputs.

    repo/
      <name>/config.pbtxt
      <name>/<version>/model.onnx
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from edgepipe.artifacts import StageResult, atomic_path, require_file, sha256
from edgepipe.errors import ConfigError, InputError
from edgepipe.reports import Report
from edgepipe.runtime.modelfile import sidecar

# onnxruntime type strings -> Triton data types (model_config.proto, enum DataType).
TRITON_TYPES = {
    "tensor(bool)": "TYPE_BOOL", "tensor(uint8)": "TYPE_UINT8", "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32", "tensor(uint64)": "TYPE_UINT64", "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16", "tensor(int32)": "TYPE_INT32", "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16", "tensor(float)": "TYPE_FP32", "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING", "tensor(bfloat16)": "TYPE_BF16",
}


@dataclass
class TritonConfig:
    """What goes into config.pbtxt. `max_batch=0` turns Triton's batching off (full shapes)."""

    name: str = "model"
    version: int = 1
    max_batch: int = 32
    preferred_batch_sizes: tuple[int, ...] = ()   # () -> Triton picks; e.g. (8, 16, 32)
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256                     # beyond it Triton rejects instead of queueing
    instances: int = 1
    kind: str = "cpu"                             # cpu | gpu
    gpus: tuple[int, ...] = ()                    # gpu: device ids, () = all
    tensorrt_fp16: bool = False                   # gpu: ORT's TensorRT accelerator in FP16
    backend: str = "onnxruntime"                  # Triton's backend for the file: onnxruntime | openvino

    def check(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError(f"Triton model name '{self.name}' must be a plain directory name")
        if self.kind not in ("cpu", "gpu"):
            raise ConfigError(f"instance kind must be cpu or gpu, got '{self.kind}'")
        if self.kind == "cpu" and (self.gpus or self.tensorrt_fp16):
            raise ConfigError("--gpus and --tensorrt-fp16 need --kind gpu")
        if self.backend not in ("onnxruntime", "openvino") or (self.backend == "openvino" and self.kind != "cpu"):
            raise ConfigError(f"backend must be onnxruntime, or openvino with --kind cpu; got {self.backend} "
                              f"with --kind {self.kind}")
        if self.version < 1 or self.instances < 1 or self.max_batch < 0 or self.max_queue_delay_us < 0:
            raise ConfigError("version and instances must be >= 1; max batch and queue delay >= 0")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch]
        if bad:
            raise ConfigError(f"preferred batch sizes {bad} must lie in 1..max batch ({self.max_batch})")


def _io(model: Path) -> tuple[list, list]:
    """(inputs, outputs) as (name, ORT type, shape) from an ORT session: the truth Triton will see."""
    from edgepipe.runtime.sessions import new_session

    session = new_session(model)
    return ([(a.name, a.type, list(a.shape)) for a in session.get_inputs()],
            [(a.name, a.type, list(a.shape)) for a in session.get_outputs()])


def _tensor(name: str, ort_type: str, shape: list, batched: bool) -> str:
    if ort_type not in TRITON_TYPES:
        raise InputError(f"tensor '{name}' has type {ort_type}, which Triton cannot take")
    dims = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
    return (f'  {{\n    name: "{name}"\n    data_type: {TRITON_TYPES[ort_type]}\n'
            f'    dims: [ {", ".join(map(str, dims))} ]\n  }}')


def render_config(model: str | Path, config: TritonConfig) -> str:
    """config.pbtxt text for `model` under `config`. Batching needs a dynamic first dim on every
    input and output; a model with a fixed batch gets max_batch_size 0 (and says so)."""
    config.check()
    inputs, outputs = _io(Path(model))
    batched = config.max_batch > 0
    fixed = [n for n, _, shape in inputs + outputs if not shape or isinstance(shape[0], int)]
    if batched and fixed:
        raise InputError(f"tensor(s) {', '.join(fixed)} have a fixed first dim, so Triton cannot batch "
                         "this model: export it with a dynamic batch dim or pass --max-batch 0")
    runs_on = ['platform: "onnxruntime_onnx"'] if config.backend == "onnxruntime" else \
        ['backend: "openvino"', 'default_model_filename: "model.onnx"']  # Triton's OpenVINO backend reads ONNX
    lines = [f'name: "{config.name}"', *runs_on, f"max_batch_size: {config.max_batch}",
             "input [", ",\n".join(_tensor(n, t, s, batched) for n, t, s in inputs), "]",
             "output [", ",\n".join(_tensor(n, t, s, batched) for n, t, s in outputs), "]"]
    group = f"  {{\n    count: {config.instances}\n    kind: KIND_{config.kind.upper()}\n"
    if config.gpus:
        group += f"    gpus: [ {', '.join(map(str, config.gpus))} ]\n"
    lines += ["instance_group [", group + "  }", "]"]
    if batched:
        lines.append("dynamic_batching {")
        if config.preferred_batch_sizes:
            lines.append(f"  preferred_batch_size: [ {', '.join(map(str, config.preferred_batch_sizes))} ]")
        lines += [f"  max_queue_delay_microseconds: {config.max_queue_delay_us}",
                  f"  default_queue_policy {{\n    max_queue_size: {config.max_queue_size}\n  }}", "}"]
    if config.tensorrt_fp16:
        lines += ["optimization {", "  execution_accelerators {", "    gpu_execution_accelerator: [ {",
                  '      name: "tensorrt"', '      parameters { key: "precision_mode" value: "FP16" }',
                  "    } ]", "  }", "}"]
    lines.append(f"version_policy: {{ specific {{ versions: [ {config.version} ] }} }}")
    return "\n".join(lines) + "\n"


def triton_schema():
    """Triton's `model_config_pb2` module. Loaded from tritonclient's file directly, so only
    protobuf is needed (tritonclient's package __init__ wants grpc and rapidjson)."""
    module = sys.modules.get("tritonclient.grpc.model_config_pb2")
    if module is not None:
        return module
    spec = importlib.util.find_spec("tritonclient")
    path = Path(spec.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py" if spec else None
    if path is None or not path.is_file():
        raise InputError("checking against Triton's schema needs tritonclient's model_config_pb2: "
                         "pip install --no-deps tritonclient (or pass --no-validate)")
    name = "edgepipe._triton_model_config_pb2"
    if name not in sys.modules:
        loader = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def validate_config(text: str, model: str | Path) -> dict:
    """Parse `text` with Triton's ModelConfig schema (unknown fields, bad enums, wrong types
    fail), then check it against the model: platform, every input/output name, type and dims.
    Returns the parsed config as a dict; raises InputError naming the first problem."""
    from google.protobuf import json_format, text_format

    schema = triton_schema()
    try:
        parsed = text_format.Parse(text, schema.ModelConfig())
    except text_format.ParseError as exc:
        raise InputError(f"config.pbtxt does not match Triton's ModelConfig schema: {exc}") from None
    if parsed.platform != "onnxruntime_onnx" and parsed.backend not in ("onnxruntime", "openvino"):
        raise InputError(f"config.pbtxt platform '{parsed.platform}' is not onnxruntime_onnx (nor backend "
                         "onnxruntime or openvino)")
    inputs, outputs = _io(Path(model))
    batched = parsed.max_batch_size > 0
    type_names = schema.DataType.Name
    for kind, declared, actual in (("input", parsed.input, inputs), ("output", parsed.output, outputs)):
        by_name = {t.name: t for t in declared}
        if set(by_name) != {n for n, _, _ in actual}:
            raise InputError(f"config.pbtxt {kind}s {sorted(by_name)} differ from the model's "
                             f"{sorted(n for n, _, _ in actual)}")
        for name, ort_type, shape in actual:
            tensor = by_name[name]
            if type_names(tensor.data_type) != TRITON_TYPES.get(ort_type):
                raise InputError(f"config.pbtxt {kind} '{name}' is {type_names(tensor.data_type)}, "
                                 f"the model has {ort_type}")
            want = [d if isinstance(d, int) else -1 for d in (shape[1:] if batched else shape)]
            if list(tensor.dims) != want:
                raise InputError(f"config.pbtxt {kind} '{name}' dims {list(tensor.dims)} differ from the "
                                 f"model's {want}")
    sizes = list(parsed.dynamic_batching.preferred_batch_size)
    if any(s > parsed.max_batch_size for s in sizes):
        raise InputError(f"preferred batch sizes {sizes} exceed max_batch_size {parsed.max_batch_size}")
    return json_format.MessageToDict(parsed, preserving_proto_field_name=True)


@dataclass
class TritonReport(Report):
    """What `edgepipe triton` wrote into a model repository."""

    stage: ClassVar[str] = "triton"

    repository: str
    model_name: str
    version: int
    source: str
    sha256: str
    config: dict[str, Any]
    validated_with: str | None
    parsed: dict | None  # the config as Triton's own schema read it


def export_triton(model: str | Path, repo: str | Path, config: TritonConfig | None = None,
                  validate: bool = True) -> StageResult:
    """Write `repo/<name>/config.pbtxt` and `repo/<name>/<version>/model.onnx` (atomically)."""
    config = config or TritonConfig()
    model = require_file(model, "ONNX model")
    text = render_config(model, config)
    parsed = validate_config(text, model) if validate else None
    folder = Path(repo) / config.name
    target = folder / str(config.version) / "model.onnx"
    if sidecar(model).is_file():  # external data: copied beside it, its location rewritten
        from edgepipe import onnxfile

        onnxfile.copy(model, target)
    else:
        with atomic_path(target) as tmp:
            shutil.copyfile(model, tmp)
    with atomic_path(folder / "config.pbtxt") as tmp:
        tmp.write_text(text)
    report = TritonReport(
        repository=str(repo), model_name=config.name, version=config.version, source=str(model),
        sha256=sha256(target), config=asdict(config),
        validated_with="tritonclient model_config_pb2 (inference.ModelConfig)" if validate else None,
        parsed=parsed)
    return StageResult("triton", {"config": folder / "config.pbtxt", "onnx": target}, report)
