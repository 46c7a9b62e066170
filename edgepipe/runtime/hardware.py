"""Hardware fingerprint: CPU model and ISA features, cores, OS, onnxruntime build. Torch-free."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnxruntime as ort

# /proc/cpuinfo flag -> feature name edgepipe reasons about (quantization recipes, reports).
CPU_FLAGS = {
    "avx2": "avx2",
    "fma": "fma",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512_vnni": "avx512_vnni",
    "avx_vnni": "avx_vnni",
    "avx512_bf16": "avx512_bf16",
    "amx_int8": "amx_int8",
    "amx_bf16": "amx_bf16",
    "f16c": "f16c",
    # ARM (Features line)
    "asimd": "neon",
    "asimddp": "arm_dotprod",
    "i8mm": "arm_i8mm",
    "sve": "sve",
}


@dataclass
class CpuInfo:
    model: str
    arch: str
    features: list[str] = field(default_factory=list)
    logical_cores: int = 1

    @property
    def has_vnni(self) -> bool:
        """INT8 dot-product instructions: U8S8 kernels do not saturate (AVX2-only x86 CPUs can)."""
        return bool({"avx512_vnni", "avx_vnni", "amx_int8", "arm_dotprod"} & set(self.features))

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in ("x86_64", "amd64", "i686", "x86")


def read_cpu(cpuinfo_path: str | os.PathLike = "/proc/cpuinfo") -> CpuInfo:
    """Read the CPU model and ISA features (Linux /proc/cpuinfo; best effort elsewhere)."""
    model, flags = platform.processor() or "unknown", set()
    path = Path(cpuinfo_path)
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "hardware", "cpu model") and value.strip():
                model = value.strip()
            elif key in ("flags", "features"):
                flags.update(value.split())
    features = sorted({name for flag, name in CPU_FLAGS.items() if flag in flags})
    return CpuInfo(model=model, arch=platform.machine(), features=features,
                   logical_cores=os.cpu_count() or 1)


def fingerprint() -> dict:
    """Everything that makes a latency number comparable (or not) across machines."""
    cpu = read_cpu()
    return {
        "cpu": asdict(cpu) | {"vnni": cpu.has_vnni},
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "hostname": platform.node(),
    }


def read_gpu() -> str | None:
    """The first NVIDIA GPU as nvidia-smi names it: model, memory, driver (None without one)."""
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None
