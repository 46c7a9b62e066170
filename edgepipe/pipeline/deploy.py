"""Which precision a pipeline deploys, decided here alone: INT8 when quantize chose an INT8 model
and profile (which has the last word on speed) measured it fast enough at the deployment batch
sizes; else FP32, with the reason. The runner records the decision once per model in the
manifest (`deployment`), and the gates, the run table, `Engine.from_run` and serve read it there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Precision = Literal["int8", "fp32"]


@dataclass(frozen=True)
class Decision:
    precision: Precision
    why: str | None = None  # why FP32 is deployed although the run quantized

    @property
    def int8(self) -> bool:
        return self.precision == "int8"

    def to_dict(self) -> dict:
        return {"precision": self.precision, "why": self.why}


def int8_speedup(profile: Any, deploy_batches: tuple[int, ...]) -> float | None:
    """Lowest INT8-vs-FP32 p50 ratio at the deployment batch sizes (all measured batch sizes
    when none of them was profiled), from the profile stage's report; None without INT8."""
    speedups = (profile.speedup or {}).get("int8") if profile is not None else None
    if not speedups:
        return None
    chosen = [v for b, v in speedups.items() if int(b) in deploy_batches] or list(speedups.values())
    return min(chosen)


def int8_rejection(profile: Any, budgets: Any, deploy_batches: tuple[int, ...]) -> str | None:
    """Why the INT8 model must not be deployed although quantize accepted it, or None. Only when
    INT8 is not required and a speedup floor is set: otherwise the min_int8_speedup gate fails
    the run instead."""
    if budgets.require_int8 or budgets.min_int8_speedup is None:
        return None
    measured = int8_speedup(profile, deploy_batches)
    if measured is None or measured >= budgets.min_int8_speedup:
        return None
    return (f"INT8 measured {measured:.3f}x vs FP32 in profile (< min_int8_speedup "
            f"{budgets.min_int8_speedup}); require_int8 = false, so the FP32 model is deployed")


def decide(reports: dict[str, Any], budgets: Any, deploy_batches: tuple[int, ...],
           refusal: str | None = None) -> Decision:
    """The deployed precision from the stages' reports so far. `refusal`: why quantize refused
    to ship INT8 when the run went on with FP32 (require_int8 = false)."""
    quant = reports.get("quantize")
    if quant is None:
        return Decision("fp32")
    if quant.chosen is None:
        return Decision("fp32", refusal or "quantize chose no INT8 model")
    why = int8_rejection(reports.get("profile"), budgets, deploy_batches)
    return Decision("fp32", why) if why else Decision("int8")
