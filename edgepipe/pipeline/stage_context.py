"""What a stage function may ask of the run it belongs to: the contract between the stage
table (stages.py, profile_stage.py) and the runner (runner.ModelRun implements it). Stages
type against this Protocol, not against the runner, so the pipeline has no import circle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np

from edgepipe.artifacts import StageResult
from edgepipe.pipeline.config import ModelConfig, PipelineConfig
from edgepipe.reports import Report


class StageRun(Protocol):
    model: ModelConfig  # the model's entry in the config: name, source, dataset, inputs
    config: PipelineConfig  # the whole run's config: stages, seed, out_dir
    settings: dict[str, Any]  # typed config per section (train, prune, export, quantize, profile, budgets)
    reports: dict[str, Report]  # the reports of the stages that ran so far, by stage name
    log: Callable[[str], None]

    def path(self, stage: str) -> Path:
        """Where `stage` writes its artifact."""

    @property
    def dataset(self) -> Any:
        """The model's data (a Dataset to train on, or NamedInputs for a source)."""

    def eval_sets(self) -> tuple[Any, Any]:
        """(held-out EvalData, calibration EvalData), or (None, None)."""

    def source(self) -> Any:
        """The model source, loaded once per run."""

    def held_out(self) -> Mapping[str, np.ndarray] | None:
        """Held-out inputs by name, or None."""

    def export(self, source: Any, out: Path, inputs: Any = None) -> StageResult:
        """Export with this run's export settings and held-out data."""

    def trained_source(self) -> Any:
        """What training left: the fine-tuned folder, the source, or the trained checkpoint."""

    def export_source(self) -> Any:
        """What the export stage exports: the pruned model, else what training left."""

    def export_to(self, out: Path, source: Any) -> Path:
        """Export `source` to `out` as the export stage would; returns the ONNX path."""
