"""Gates as data: each row reads one measurement from the stage records and checks one budget."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

from edgepipe.pipeline.config import Budgets


def _int8_speedup(records: dict, deploy_batches: tuple[int, ...]) -> float | None:
    """Lowest INT8-vs-FP32 p50 ratio at the deployment batch sizes (interleaved in profile)."""
    speedups = records.get("profile", {}).get("speedup", {}).get("int8")
    if not speedups:
        return None
    chosen = [v for b, v in speedups.items() if int(b) in deploy_batches] or list(speedups.values())
    return min(chosen)


def _final_size_mb(records: dict, _: Any) -> float | None:
    for stage in ("quantize", "export"):
        if "size_bytes" in records.get(stage, {}):
            return records[stage]["size_bytes"] / 1e6
    return None


@dataclass(frozen=True)
class Gate:
    budget: str  # field of Budgets
    stage: str  # the stage whose record holds the measurement
    measure: Callable[[dict, tuple[int, ...]], float | None]
    passes: Callable[[float, float], bool]
    description: str


def _total_drop(records: dict, _: Any) -> float | None:
    """Trained FP32 accuracy minus the deployed model's (after pruning and quantization)."""
    trained = records.get("train", {}).get("test_accuracy")
    final = records.get("quantize", {}).get("chosen", {}).get("accuracy")
    if final is None:  # FP32 deployed (quantize refused with require_int8 = false)
        final = records.get("prune", {}).get("accuracy_after")
    return None if trained is None or final is None else trained - final


def _prune_speedup(records: dict, _: Any) -> float | None:
    speedup = records.get("prune", {}).get("speedup")
    return min(speedup.values()) if speedup else None


GATES = (
    Gate("min_accuracy", "train", lambda r, _: r.get("train", {}).get("test_accuracy"), operator.ge,
         "FP32 held-out accuracy"),
    Gate("max_accuracy_drop", "quantize",
         lambda r, _: r.get("quantize", {}).get("chosen", {}).get("accuracy_drop"), operator.le,
         "INT8 accuracy drop vs FP32"),
    Gate("min_int8_speedup", "profile", _int8_speedup, operator.ge,
         "INT8 vs FP32 p50 speedup at the deployment batch sizes"),
    Gate("max_model_size_mb", "quantize", _final_size_mb, operator.le, "deployed model size (MB)"),
    Gate("max_total_accuracy_drop", "quantize", _total_drop, operator.le,
         "deployed accuracy drop vs the trained FP32 model"),
    Gate("max_prune_accuracy_drop", "prune", lambda r, _: r.get("prune", {}).get("accuracy_drop"),
         operator.le, "pruned accuracy drop vs unpruned"),
    # Unstructured pruning records no speedup: a speedup budget on it is a violation, not a pass.
    Gate("min_prune_speedup", "prune", lambda r, _: _prune_speedup(r, _) or 1.0, operator.ge,
         "pruned vs unpruned ORT p50 speedup"),
)


@dataclass
class GateResult:
    gate: str
    stage: str
    measured: float | None
    budget: float
    ok: bool
    message: str

    def to_dict(self) -> dict:
        return vars(self).copy()


def check(records: dict[str, dict], budgets: Budgets, deploy_batches: tuple[int, ...],
          stages: tuple[str, ...]) -> list[GateResult]:
    """Evaluate every gate whose budget is set and whose stage ran (or was meant to run)."""
    results = []
    for gate in GATES:
        budget = getattr(budgets, gate.budget)
        if isinstance(budget, bool):
            continue
        stage = gate.stage
        if gate.budget == "max_model_size_mb" and "quantize" not in stages:
            stage = "export"
        if budget is None or stage not in records:
            continue
        measured = gate.measure(records, deploy_batches)
        if measured is None:
            continue
        ok = bool(gate.passes(measured, budget))
        relation = "within" if ok else "violates"
        results.append(GateResult(gate.budget, stage, measured, budget, ok,
                                  f"{gate.description} {measured:.4g} {relation} {gate.budget} = {budget:g}"))
    return results
