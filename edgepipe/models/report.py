"""The train stage's report: held-out accuracy, loss, time and size of the trained model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.reports import Report, optional


@dataclass
class TrainReport(Report):
    stage: ClassVar[str] = "train"

    model: str
    dataset: dict[str, Any]
    test_accuracy: float
    final_loss: float
    train_seconds: float
    params: int


@dataclass
class FinetuneReport(Report):
    stage: ClassVar[str] = "train"

    source: str
    task: str
    data: str  # which rows trained and which judged
    rows: dict[str, int]
    steps: int
    epochs: list[dict]  # per epoch: mean train loss, eval accuracy with its interval
    best_epoch: int
    eval_accuracy: dict  # of the kept (best) epoch
    eval_accuracy_before: dict  # the source folder's, on the same rows
    train_seconds: float
    params: int
    config: dict
    resumed_from_step: int | None = optional()
    teacher: dict | None = optional()  # distillation: the teacher's source, size and accuracy on the same rows
    # quantization-aware training: the layout trained for, and the FP32 accuracy before it (the
    # accuracies above are then simulated INT8: before is what post-training rounding gives)
    qat: dict | None = optional()
    perplexity: dict | None = optional()  # causal LM: held-out perplexity before and after

    @property
    def test_accuracy(self) -> float:
        """The kept epoch's held-out accuracy: what the pipeline's gates and table read."""
        return self.eval_accuracy["value"]
