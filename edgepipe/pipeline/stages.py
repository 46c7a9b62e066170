"""The stage table: each pipeline stage's function, the files it reads and writes, its config
and its report type. A new stage is one row here (and its function)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepipe.artifacts import StageResult
from edgepipe.exporters.report import ExportReport
from edgepipe.models.report import TrainReport
from edgepipe.pipeline.profile_stage import ProfileReport, profile_stage
from edgepipe.pipeline.stage_context import StageRun
from edgepipe.prune.report import PruneReport
from edgepipe.quantize.report import QuantizeReport
from edgepipe.reports import Report


def train_stage(run: StageRun) -> StageResult:
    from edgepipe.models.training import train

    return train(run.model.name, run.dataset, run.path("train"), run.settings["train"], progress=False)


def prune_stage(run: StageRun) -> StageResult:
    from edgepipe.exporters import export_module
    from edgepipe.prune import prune

    return prune(run.model.source or run.path("train"), run.path("prune"), run.settings["prune"],
                 exporter=export_module, dataset=run.dataset, log=run.log)


def export_stage(run: StageRun) -> StageResult:
    return run.export(run.export_source(), run.path("export"), inputs=run.model.inputs or None)


def quantize_stage(run: StageRun) -> StageResult:
    from edgepipe.quantize import quantize

    eval_data, calibration = run.eval_sets()
    return quantize(run.path("export"), run.path("quantize"), run.settings["quantize"],
                    eval_data=eval_data, calibration=calibration, progress=run.log)


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[StageRun], StageResult]
    reads: tuple[str, ...]  # stages whose artifacts this one reads (their hashes decide reuse)
    writes: str  # artifact file name in the model's directory
    config: str  # the config section it takes ([train], [quantize] …)
    report: type[Report]


TABLE = (
    Stage("train", train_stage, (), "checkpoint.pt", "train", TrainReport),
    Stage("prune", prune_stage, ("train",), "pruned.pt", "prune", PruneReport),
    Stage("export", export_stage, ("prune",), "model.onnx", "export", ExportReport),
    Stage("quantize", quantize_stage, ("export",), "model.int8.onnx", "quantize", QuantizeReport),
    Stage("profile", profile_stage, ("export", "quantize"), "profile.json", "profile", ProfileReport),
)
STAGES = {stage.name: stage for stage in TABLE}
# Files that are not a stage's own output: the unpruned model profile exports as the baseline.
EXTRA_ARTIFACTS = {"unpruned": "unpruned.onnx"}


def artifact_name(stage: str) -> str:
    return STAGES[stage].writes if stage in STAGES else EXTRA_ARTIFACTS[stage]


def load_report(stage: str, record: dict | None) -> Report:
    """A manifest record back as its stage's typed report."""
    return STAGES[stage].report.from_dict(record or {})


def model_reports(model_entry: dict) -> dict[str, Report]:
    """The typed reports of one model's manifest entry (stages that left a record)."""
    return {stage: load_report(stage, entry["record"])
            for stage, entry in model_entry.get("stages", {}).items() if entry.get("record")}


def reads_paths(run: StageRun, stage: str) -> list[Path]:
    """The files `stage` reads for this model, for the reuse check (missing ones are the
    stage's own error to report)."""
    reads = list(STAGES[stage].reads)
    if stage == "export" and "prune" not in run.config.stages:
        reads = ["train"]
    paths = [run.path(s) for s in reads]
    if stage == "export" and run.model.source and "prune" not in run.config.stages:
        paths = [Path(run.model.source.split(":")[0])]  # checkpoint, or the factory's file
        if paths[0].is_dir():  # a Hugging Face folder (its weights are in the run's fingerprint)
            paths = [paths[0] / "config.json"]
    return [p for p in paths if p.exists()]
