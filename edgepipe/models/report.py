"""The train stage's report: held-out accuracy, loss, time and size of the trained model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.reports import Report


@dataclass
class TrainReport(Report):
    stage: ClassVar[str] = "train"

    model: str
    dataset: dict[str, Any]
    test_accuracy: float
    final_loss: float
    train_seconds: float
    params: int
