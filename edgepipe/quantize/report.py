"""The quantize stage's report: every candidate with its measurements and verdict, the FP32
baseline, and the one chosen."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgepipe.reports import Report, optional


@dataclass
class CandidateRow(Report):
    """One candidate as recorded: its recipe, accuracy, speed per batch size and verdict."""

    recipe: str
    method: str
    format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    calibration: str
    reduce_range: bool
    excluded_nodes: list[str]
    integer_nodes: int
    built_from: str
    accuracy: float | None
    agreement: float | None
    accuracy_drop: float | None
    rel_l2: float | None  # relative L2 error of the first output vs FP32 (all held-out rows)
    cosine: float | None  # mean per-row cosine similarity of the first output vs FP32
    rows_lost: int | None  # rows FP32 got right and this candidate wrong (no labels: top-1 changed)
    rows_gained: int | None  # the reverse
    p50_ms: dict[str, float]
    speedup: dict[str, float]
    speedup_trials: dict[str, list[float]] | None
    sessions: dict[str, dict] | None  # the fastest session setting per batch size
    p50_ms_by_session: list[dict] | None
    size_bytes: int | None
    error: str | None
    verdict: str
    backend: str = "onnxruntime"  # the runtime it was measured on (and is deployed with)
    timed_as: str | None = None  # a kernel twin (same kernels and shapes) whose timing it took
    # accuracy and macro_f1 against labels, each {"value", "low", "high"} (95% interval)
    scores: dict[str, dict] | None = optional()
    accuracy_drop_interval: dict | None = optional()  # the drop vs FP32 with its 95% interval
    accuracy_resolution: str | None = optional()  # within, over or unresolved (interval vs budget)
    rows_needed: int | None = optional()  # unresolved: about how many more rows would resolve it


@dataclass
class Baseline(Report):
    """The FP32 model every candidate is timed against."""

    accuracy: float | None
    p50_ms: dict[str, float]
    sessions: dict[str, dict]
    p50_ms_by_session: list[dict]
    size_bytes: int
    scores: dict[str, dict] | None = optional()  # FP32's own accuracy and macro_f1, with intervals


@dataclass
class QuantizeReport(Report):
    stage: ClassVar[str] = "quantize"

    cpu: dict[str, Any]
    recipe_reason: str
    preprocess: list[dict]
    transformer_optimizer: dict[str, Any]
    skipped_recipes: list[dict]
    fp32: Baseline
    accuracy_fallback: list[dict]
    budget: dict[str, float]
    timing: str
    judged_on: str | None = optional()  # what accuracy_drop measures, and on how many rows
    choice: str | None = optional()  # why the chosen candidate won (speed, or fidelity within the noise band)
    phases: dict[str, float] | None = optional()  # seconds per phase: build, screen, measure, confirm, fallback
    phase_peak_mb: dict[str, float] | None = optional()  # peak RSS per phase (Linux; nests in the stage's)
    rounds: dict[str, int] | None = optional()  # timing rounds per phase (a time budget can shorten them)
    # The dominant kernel's INT8/FP32 speedup on this CPU and the model's as a fraction of it
    ceiling: dict[str, Any] | None = optional()
    # where the candidates were measured, when not this CPU: {"provider", "gpu"} (--device cuda)
    device: dict[str, Any] | None = optional()
    candidates: list[CandidateRow] = field(default_factory=list)
    chosen: CandidateRow | None = optional()
    size_bytes: int | None = optional()
    seconds: float | None = None

    @property
    def deployed_sessions(self) -> dict[str, dict] | None:
        """The session settings measured fastest per batch size for the chosen model."""
        return self.chosen.sessions if self.chosen else None
