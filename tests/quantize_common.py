"""What several quantize test modules share: CPUs to plan recipes for, and a zoo model's
held-out and calibration rows, and a search's timing budget with its costs stood in for."""

from __future__ import annotations

from edgepipe.quantize import EvalData
from edgepipe.runtime import CpuInfo

VNNI_X86 = CpuInfo("fake Xeon", "x86_64", ["avx2", "avx512f", "avx512_vnni"], 2)
AVX2_ONLY = CpuInfo("fake AVX2 host", "x86_64", ["avx2", "fma"], 2)
ARM = CpuInfo("fake Neoverse", "aarch64", ["neon", "arm_dotprod"], 2)


def eval_sets(model):
    data = model.dataset
    return EvalData({data.input_name: data.x_test}, data.y_test), EvalData({data.input_name: data.x_train})

def timing_budget(config, *, spent: float = 0.0, call_costs: dict | None = None, calibration=None, rows: int = 0):
    """A classifier search's Budget with `spent` seconds of its clock gone and FP32 call costs
    stood in for (no model is run)."""
    import time

    import numpy as np

    from edgepipe.quantize.budget import Budget
    from edgepipe.quantize.config import EvalData
    from edgepipe.quantize.core import Clock

    clock = Clock(config.time_budget_s, started=time.perf_counter() - spent)
    calibration = calibration if calibration is not None else EvalData({"x": np.zeros((1, 1), np.float32)})

    def no_model(batch):
        raise AssertionError(f"the test stood in every call cost; batch {batch} has none")

    return Budget(clock, config, calibration, rows, no_model, dict(call_costs or {}))
