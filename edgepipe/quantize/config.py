"""The quantize stage's settings and the data it judges candidates on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgepipe.errors import ConfigError

if TYPE_CHECKING:  # its module imports onnxruntime.quantization
    from edgepipe.quantize.calibration import MeasuredRanges

MODES = ("auto", "dynamic", "static", "int4", "fp16")
# Where candidates are measured: this CPU (INT8 recipes), or the CUDA provider of onnxruntime-gpu
# (FP16 with FP32 I/O against FP32 on the same GPU; INT8 there is TensorRT's, not the CUDA
# provider's, whose integer kernels are few and whose quantized graphs fall back to the CPU).
DEVICES = ("cpu", "cuda")
CALIBRATIONS = ("minmax", "entropy", "percentile")


DEFAULT_TIME_BUDGET_S = 25.0  # a classifier's search
DECODER_TIME_BUDGET_S = 900.0  # a decoder's: each INT4 build of a large model takes minutes


@dataclass
class QuantizeConfig:
    mode: str = "auto"  # "auto": every candidate that fits the graph; or only "dynamic"/"static"
    calibration: str = "minmax"
    calibration_samples: int = 256
    batch_sizes: tuple[int, ...] = (1, 32)  # latency is judged at each of these
    max_accuracy_drop: float = 0.01  # absolute (0.01 = 1 point) vs the FP32 model
    # Ship only a drop whose whole 95% interval is within the budget. Off: a drop measured within
    # the budget whose interval straddles it ships, flagged "unresolved" with the rows needed.
    require_resolved: bool = False
    min_speedup: float = 1.0  # at every batch size; below 1.0 would allow a slower model
    nodes_to_exclude: tuple[str, ...] = ()
    op_types_to_exclude: tuple[str, ...] = ()
    threads: int | None = None
    # Time each model (FP32 and every candidate) with 1 thread and with all cores and compare
    # each at its fastest: on a small CPU the setting moves the ratio as much as the recipe, and
    # not the same way for both. The deployment (Engine.from_run) uses the recorded setting.
    tune_session: bool = True
    try_spinning: bool = False  # also all cores with spinning workers (see session_settings)
    # Also try onnxruntime.transformers' offline graph fusions on models with LayerNorm/Softmax,
    # kept only when the fused FP32 model is measured faster. Off by default: onnxruntime's own
    # session optimizer applies the common fusions (LayerNorm, GELU, attention) whenever it loads
    # a model, so the offline ones rarely add speed, while the attempt costs a timing of its own
    # and a copy of the model.
    try_fusions: bool = False
    rounds: int = 12  # interleaved latency rounds (x 10 calls) per batch size
    # A candidate must beat min_speedup by this fraction: two measurements of a ratio near 1.0
    # disagree by a few percent on a 2-core machine, so "1.01x" is not evidence of "not slower".
    speedup_margin: float = 0.05
    # Seconds the search may take (0 or None: no limit). Building stops at core.BUILD_SHARE of it
    # (the recipes left are recorded as skipped; the likeliest winners are built first), timing
    # rounds shrink to fit what is left (3 at least, so a slow model can overrun it; 2 to confirm
    # a candidate whose first figure leads by search.CLEAR_LEAD times the needed speedup),
    # confirmation takes one trial instead of two past 80% and stops at 100% once a candidate is
    # confirmed, and the accuracy fallback stops at 100%. The default is sized so that real-size
    # models (benchmarks/hf_models.py) get the model a longer budget gets, within the noise.
    time_budget_s: float | None = DEFAULT_TIME_BUDGET_S
    # Time the chosen recipe on the model's heaviest MatMul/Gemm/Conv/LSTM alone (a second or
    # two): the record then gives the model's speedup as a fraction of what the kernel can do here.
    measure_ceiling: bool = True
    # Runtimes that run candidates: onnxruntime, and openvino (its CPU plugin running static QDQ
    # models with its own INT8 kernels, measured like any other candidate and chosen only when
    # faster). Empty: onnxruntime, plus openvino when the package is installed.
    backends: tuple[str, ...] = ()
    # "cpu", or "cuda": FP16 candidates measured on the CUDA provider against FP32 there (needs
    # onnxruntime-gpu on a machine with an NVIDIA GPU; mode auto or fp16).
    device: str = "cpu"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"quantize mode '{self.mode}' unknown; choose {', '.join(MODES)}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration '{self.calibration}' unknown; choose {', '.join(CALIBRATIONS)}")
        if self.min_speedup < 1.0:
            raise ConfigError("min_speedup below 1.0 would allow a model slower than FP32")
        if self.time_budget_s is not None and self.time_budget_s < 0:
            raise ConfigError("quantize time_budget_s must be >= 0 seconds (0: no limit)")
        self.time_budget_s = self.time_budget_s or None
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ConfigError("quantize batch_sizes must be positive integers")
        self.batch_sizes = tuple(self.batch_sizes)
        self.backends = tuple(self.backends)
        from edgepipe.runtime.openvino_backend import BACKENDS, INSTALL_HINT, available

        unknown = [b for b in self.backends if b not in BACKENDS]
        if unknown:
            raise ConfigError(f"quantize backend(s) {', '.join(unknown)} unknown; choose from {', '.join(BACKENDS)}")
        if "openvino" in self.backends and not available():
            raise ConfigError(f"quantize backend 'openvino' needs the openvino package: {INSTALL_HINT}")
        self.nodes_to_exclude = tuple(self.nodes_to_exclude)
        self.op_types_to_exclude = tuple(self.op_types_to_exclude)
        self._check_device()

    def _check_device(self) -> None:
        if self.device not in DEVICES:
            raise ConfigError(f"quantize device '{self.device}' unknown; choose {', '.join(DEVICES)}")
        if self.device == "cpu":
            return
        if self.mode not in ("auto", "fp16"):
            raise ConfigError(f"quantize mode '{self.mode}' builds INT8 for CPU kernels; on device cuda choose "
                              "auto or fp16 (INT8 on NVIDIA GPUs is TensorRT's: export FP32 and let TensorRT build it)")
        if any(b != "onnxruntime" for b in self.backends):
            raise ConfigError("quantize device cuda measures on onnxruntime's CUDA provider; backend(s) "
                              f"{', '.join(self.backends)} run on the CPU")
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ConfigError(f"quantize device cuda needs onnxruntime-gpu on a machine with an NVIDIA GPU; this "
                              f"onnxruntime {ort.__version__} has {', '.join(ort.get_available_providers())} "
                              "(pip uninstall -y onnxruntime && pip install 'edgepipe[gpu]')")

    @property
    def tunes_threads(self) -> bool:
        """Whether the search times 1 thread and all cores (on a GPU they only run its CPU nodes)."""
        return self.tune_session and self.device == "cpu"

    @property
    def providers(self) -> str:
        """The execution provider every FP32 and candidate session of the search runs on."""
        return self.device

    @property
    def active_backends(self) -> tuple[str, ...]:
        """The backends this search measures candidates on."""
        from edgepipe.runtime.openvino_backend import BACKENDS, available

        if self.device != "cpu":
            return ("onnxruntime",)
        return self.backends or (BACKENDS if available() else ("onnxruntime",))


@dataclass
class EvalData:
    """Held-out inputs (name -> array) and, for classifiers, integer labels. `ranges`: activation
    ranges already measured on these rows (calibration.MeasuredRanges), when calibrating on them."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    ranges: MeasuredRanges | None = None
