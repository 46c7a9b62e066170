"""The prune stage's report: accuracy, size and ORT latency before and after pruning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.reports import Report, optional


@dataclass
class PruneReport(Report):
    stage: ClassVar[str] = "prune"

    method: str
    config: dict[str, Any]
    steps: list[dict]
    accuracy_before: float
    accuracy_after: float
    accuracy_drop: float
    params_before: int
    params_after: int
    macs_before: int | None  # None where the model's operations were not counted
    macs_after: int | None
    p50_ms: dict[str, dict[str, float]]  # batch -> {"unpruned", "pruned"} ORT p50
    structure: dict | None
    seconds: float | None = None
    speedup: dict[str, float] | None = None  # structured only: zeros are not speed
    dense_latency_ratio: dict[str, float] | None = optional()  # unstructured: what ORT measured anyway
    sparsity: float | None = optional()
    compressed_bytes_before: int | None = optional()
    compressed_bytes_after: int | None = optional()
    note: str | None = optional()
    accuracy_intervals: dict | None = optional()  # folders: before, after the cut, after recovery (95%)
