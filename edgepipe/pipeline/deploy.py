"""Which precision a pipeline deploys: INT8 when profile measured it fast enough at the
deployment batch sizes, else FP32 (when the config allows). Decided here alone; the runner
applies it and the gates read the same figure."""

from __future__ import annotations

from typing import Any


def int8_speedup(profile: Any, deploy_batches: tuple[int, ...]) -> float | None:
    """Lowest INT8-vs-FP32 p50 ratio at the deployment batch sizes (all measured batch sizes
    when none of them was profiled), from the profile stage's report; None without INT8."""
    speedups = (profile.speedup or {}).get("int8") if profile is not None else None
    if not speedups:
        return None
    chosen = [v for b, v in speedups.items() if int(b) in deploy_batches] or list(speedups.values())
    return min(chosen)


def int8_rejection(profile: Any, budgets: Any, deploy_batches: tuple[int, ...]) -> str | None:
    """Why the INT8 model must not be deployed although quantize accepted it (profile has the
    last word on speed), or None. Only when INT8 is not required and a speedup floor is set:
    otherwise the min_int8_speedup gate fails the run instead."""
    if budgets.require_int8 or budgets.min_int8_speedup is None:
        return None
    measured = int8_speedup(profile, deploy_batches)
    if measured is None or measured >= budgets.min_int8_speedup:
        return None
    return (f"INT8 measured {measured:.3f}x vs FP32 in profile (< min_int8_speedup "
            f"{budgets.min_int8_speedup}); require_int8 = false, so the FP32 model is deployed")
