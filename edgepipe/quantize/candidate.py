"""One quantization candidate as the search sees it: its recipe, the model built from it, and
everything measured about it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from edgepipe.metrics import Interval
from edgepipe.quantize.evaluation import Flips
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.report import CandidateRow
from edgepipe.quantize.verdict import Verdict
from edgepipe.runtime.modelfile import model_bytes
from edgepipe.runtime.sessions import SessionSetting


def by_setting(p50: dict[int, dict[SessionSetting, float]], settings) -> dict[SessionSetting, dict[int, float]]:
    """{batch: {setting: ms}} -> {setting: {batch: ms}} over `settings`, each with the batch sizes
    it was timed at (the 1-thread one only where calls are short: budget.SWEEP_MAX_CALL_S)."""
    return {s: {b: row[s] for b, row in p50.items() if s in row} for s in settings}


def by_session_rows(p50_by_setting: dict[SessionSetting, dict[int, float]]) -> list[dict]:
    """[{"threads", "spinning", "p50_ms": {batch: ms}}] for the record."""
    return [s.to_dict() | {"p50_ms": {str(b): round(v, 4) for b, v in p50.items()}}
            for s, p50 in p50_by_setting.items()]


@dataclass
class Candidate:
    recipe: Recipe
    path: Path | None = None
    error: str | None = None
    integer_nodes: int = 0
    accuracy: float | None = None
    agreement: float | None = None
    accuracy_drop: float | None = None
    fidelity: dict[str, float] | None = None  # rel_l2 and cosine of the first output vs FP32's
    flips: Flips | None = None  # rows lost and gained vs FP32
    scores: dict[str, Interval] | None = None  # task metrics against labels, with intervals
    resolution: str | None = None  # the drop's interval vs the budget: within, over or unresolved
    rows_needed: int | None = None  # unresolved: about how many more rows would resolve it
    built_from: str = ""
    p50_ms: dict[int, float] = field(default_factory=dict)
    speedup: dict[int, float] = field(default_factory=dict)
    speedup_trials: dict[int, list[float]] = field(default_factory=dict)  # when confirmed
    settings: dict[int, SessionSetting] = field(default_factory=dict)  # fastest per batch size
    p50_by_setting: dict[SessionSetting, dict[int, float]] = field(default_factory=dict)
    verdict: Verdict = field(default_factory=Verdict)
    screened: bool = False  # judged on the screening pass alone (clearly slower)
    timed_as: "Candidate | None" = None  # its kernel twin, whose timing it takes (twins.py)

    @property
    def backend(self) -> str:
        return self.recipe.backend

    @property
    def score(self) -> float:
        """Geometric-mean speedup over the configured batch sizes."""
        values = list(self.speedup.values())
        return math.exp(sum(math.log(v) for v in values) / len(values)) if values else 0.0

    def row(self) -> CandidateRow:
        r = self.recipe
        return CandidateRow(
            recipe=r.name, method=r.method, format=r.format, activation_type=r.activation_type,
            weight_type=r.weight_type, per_channel=r.per_channel, calibration=r.calibration,
            reduce_range=r.reduce_range, excluded_nodes=list(r.nodes_to_exclude),
            integer_nodes=self.integer_nodes, built_from=self.built_from, accuracy=self.accuracy,
            agreement=self.agreement, accuracy_drop=self.accuracy_drop,
            rel_l2=round(self.fidelity["rel_l2"], 6) if self.fidelity else None,
            cosine=round(self.fidelity["cosine"], 6) if self.fidelity else None,
            rows_lost=self.flips.losses if self.flips else None, rows_gained=self.flips.gains if self.flips else None,
            scores={k: v.to_dict() for k, v in self.scores.items()} if self.scores else None,
            accuracy_drop_interval=self.flips.interval.to_dict() if self.flips else None,
            accuracy_resolution=self.resolution, rows_needed=self.rows_needed,
            p50_ms={str(b): round(v, 4) for b, v in self.p50_ms.items()},
            speedup={str(b): round(v, 3) for b, v in self.speedup.items()},
            speedup_trials={str(b): v for b, v in self.speedup_trials.items()} or None,
            sessions={str(b): s.to_dict() for b, s in self.settings.items()} or None,
            p50_ms_by_session=by_session_rows(self.p50_by_setting) or None,
            size_bytes=model_bytes(self.path) if self.path and self.path.exists() else None,
            error=self.error, verdict=str(self.verdict), backend=r.backend,
            timed_as=self.timed_as.recipe.name if self.timed_as else None)
