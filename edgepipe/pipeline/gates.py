"""Gates as data: each row reads one measurement from the stages' typed reports (and the run's
deployment decision, pipeline.deploy) and checks one budget."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

from edgepipe.pipeline.config import Budgets
from edgepipe.pipeline.deploy import Decision, int8_speedup


@dataclass(frozen=True)
class Facts:
    """What a gate reads: the stages' reports, the deployment batch sizes and the decision."""

    reports: dict[str, Any]
    batches: tuple[int, ...]
    deployed: Decision


def _chosen(facts: Facts):
    """The deployed INT8 candidate's row (a decoder search names its recipe instead: None here)."""
    quant = facts.reports.get("quantize")
    chosen = quant.chosen if quant is not None and facts.deployed.int8 else None
    return None if isinstance(chosen, str) else chosen


def _int8_speedup(facts: Facts) -> float | None:
    return int8_speedup(facts.reports.get("profile"), facts.batches) if facts.deployed.int8 else None


def _final_size_mb(facts: Facts) -> float | None:
    for stage in ("quantize", "export") if facts.deployed.int8 else ("export",):
        size = getattr(facts.reports.get(stage), "size_bytes", None)
        if size is not None:
            return size / 1e6
    return None


def _total_drop(facts: Facts) -> float | None:
    """Trained FP32 accuracy minus the deployed model's (after pruning and quantization)."""
    reports = facts.reports
    trained = getattr(reports.get("train"), "test_accuracy", None)
    chosen = _chosen(facts)
    final = chosen.accuracy if chosen is not None else None
    if final is None:  # FP32 deployed (quantize refused, or profile measured INT8 too slow)
        final = getattr(reports.get("prune"), "accuracy_after", trained)
    return None if trained is None or final is None else trained - final


def _prune_speedup(facts: Facts) -> float:
    # Unstructured pruning records no speedup: a speedup budget on it is a violation, not a pass.
    speedup = getattr(facts.reports.get("prune"), "speedup", None)
    return min(speedup.values()) if speedup else 1.0


@dataclass(frozen=True)
class Gate:
    budget: str  # field of Budgets
    stage: str  # the stage whose report holds the measurement
    measure: Callable[[Facts], float | None]
    passes: Callable[[float, float], bool]
    description: str


GATES = (
    Gate("min_accuracy", "train", lambda f: getattr(f.reports.get("train"), "test_accuracy", None), operator.ge,
         "FP32 held-out accuracy"),
    Gate("max_accuracy_drop", "quantize", lambda f: getattr(_chosen(f), "accuracy_drop", None), operator.le,
         "INT8 accuracy drop vs FP32"),
    Gate("min_int8_speedup", "profile", _int8_speedup, operator.ge,
         "INT8 vs FP32 p50 speedup at the deployment batch sizes"),
    Gate("max_model_size_mb", "quantize", _final_size_mb, operator.le, "deployed model size (MB)"),
    Gate("max_total_accuracy_drop", "quantize", _total_drop, operator.le,
         "deployed accuracy drop vs the trained FP32 model"),
    Gate("max_prune_accuracy_drop", "prune", lambda f: getattr(f.reports.get("prune"), "accuracy_drop", None),
         operator.le, "pruned accuracy drop vs unpruned"),
    Gate("min_prune_speedup", "prune", _prune_speedup, operator.ge, "pruned vs unpruned ORT p50 speedup"),
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


def check(reports: dict[str, Any], budgets: Budgets, deploy_batches: tuple[int, ...],
          stages: tuple[str, ...], deployed: Decision) -> list[GateResult]:
    """Evaluate every gate whose budget is set and whose stage ran (or was meant to run)."""
    facts = Facts(reports, deploy_batches, deployed)
    results = []
    for gate in GATES:
        budget = getattr(budgets, gate.budget)
        if isinstance(budget, bool):
            continue
        stage = gate.stage
        if gate.budget == "max_model_size_mb" and "quantize" not in stages:
            stage = "export"
        if budget is None or stage not in reports:
            continue
        measured = gate.measure(facts)
        if measured is None:
            continue
        ok = bool(gate.passes(measured, budget))
        relation = "within" if ok else "violates"
        results.append(GateResult(gate.budget, stage, measured, budget, ok,
                                  f"{gate.description} {measured:.4g} {relation} {gate.budget} = {budget:g}"))
    return results
