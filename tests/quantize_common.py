"""What several quantize test modules share: CPUs to plan recipes for, and a zoo model's
held-out and calibration rows."""

from __future__ import annotations

from edgepipe.quantize import EvalData
from edgepipe.runtime import CpuInfo

VNNI_X86 = CpuInfo("fake Xeon", "x86_64", ["avx2", "avx512f", "avx512_vnni"], 2)
AVX2_ONLY = CpuInfo("fake AVX2 host", "x86_64", ["avx2", "fma"], 2)
ARM = CpuInfo("fake Neoverse", "aarch64", ["neon", "arm_dotprod"], 2)


def eval_sets(model):
    data = model.dataset
    return EvalData({data.input_name: data.x_test}, data.y_test), EvalData({data.input_name: data.x_train})
