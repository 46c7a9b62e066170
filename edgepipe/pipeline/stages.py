"""The stage table: each pipeline stage's function, the files it reads and writes, its config
and its report type. A new stage is one row here (and its function)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgepipe.artifacts import StageResult
from edgepipe.errors import InputError
from edgepipe.exporters.report import ExportReport
from edgepipe.models.report import FinetuneReport, TrainReport
from edgepipe.pipeline.profile_stage import ProfileReport, profile_stage
from edgepipe.pipeline.stage_context import StageRun
from edgepipe.prune.report import PruneReport
from edgepipe.quantize.decoder import DecoderQuantizeReport
from edgepipe.quantize.report import QuantizeReport
from edgepipe.reports import Report


def train_stage(run: StageRun) -> StageResult:
    if run.model.fine_tunes:  # a Hugging Face folder on the user's rows (a language model on text)
        from edgepipe.models.clm import finetune_lm
        from edgepipe.models.finetune import finetune

        out = _fresh(run.path("train"))
        train = finetune_lm if run.model.causal_lm else finetune
        report = train(run.model.source, run.model.dataset, out, run.settings["train"], progress=run.log).report
        return StageResult("train", {"weights": out / "model.safetensors", "record": out / "edgepipe_train.json"},
                           report)
    from edgepipe.models.training import train

    return train(run.model.name, run.dataset, run.path("train"), run.settings["train"], progress=False)


def prune_stage(run: StageRun) -> StageResult:
    if run.model.hf_folder:  # cut, then recovered by distillation from the unpruned folder
        from edgepipe.models.finetune import FinetuneConfig
        from edgepipe.prune.hf import prune_folder

        settings, out = run.settings["prune"], _fresh(run.path("prune"))
        recovery = FinetuneConfig(epochs=max(settings.finetune_epochs, 1), lr=settings.lr, seed=settings.seed)
        unpruned = run.path("train") if "train" in run.reports else Path(run.model.source)
        report = prune_folder(unpruned, run.model.dataset, out, settings, recovery=recovery, log=run.log).report
        return StageResult("prune", {"weights": out / "model.safetensors", "record": out / "edgepipe_prune.json"},
                           report)
    from edgepipe.exporters import export_module
    from edgepipe.prune import prune

    return prune(run.model.source or run.path("train"), run.path("prune"), run.settings["prune"],
                 exporter=export_module, dataset=run.dataset, log=run.log)


def _fresh(folder: Path) -> Path:
    """A stage's output folder, emptied: a stage that runs again starts clean."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


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
    reports: tuple[type[Report], ...]  # what its record may be (train: a zoo model's, or a folder's fine-tuning)


TABLE = (
    Stage("train", train_stage, (), "checkpoint.pt", "train", (TrainReport, FinetuneReport)),
    Stage("prune", prune_stage, ("train",), "pruned.pt", "prune", (PruneReport,)),
    Stage("export", export_stage, ("prune",), "model.onnx", "export", (ExportReport,)),
    Stage("quantize", quantize_stage, ("export",), "model.int8.onnx", "quantize",
          (QuantizeReport, DecoderQuantizeReport)),
    Stage("profile", profile_stage, ("export", "quantize"), "profile.json", "profile", (ProfileReport,)),
)
STAGES = {stage.name: stage for stage in TABLE}
# Files that are not a stage's own output: the unpruned model profile exports as the baseline.
EXTRA_ARTIFACTS = {"unpruned": "unpruned.onnx"}
# What a Hugging Face folder's train and prune stages write instead of a checkpoint: a folder.
FOLDERS = {"train": "tuned", "prune": "pruned"}


def artifact_name(stage: str, folder: bool = False) -> str:
    if folder and stage in FOLDERS:
        return FOLDERS[stage]
    return STAGES[stage].writes if stage in STAGES else EXTRA_ARTIFACTS[stage]


def load_report(stage: str, record: dict | None) -> Report:
    """A manifest record back as its stage's typed report (the first kind it fits)."""
    *others, last = STAGES[stage].reports
    for kind in others:
        try:
            return kind.from_dict(record or {})
        except InputError:
            continue
    return last.from_dict(record or {})


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
    if stage == "export" and run.model.source and "prune" not in run.config.stages and not (
            run.model.fine_tunes and "train" in run.config.stages):
        paths = [Path(run.model.source.split(":")[0])]  # checkpoint, or the factory's file
        if paths[0].is_dir():  # a Hugging Face folder (its weights are in the run's fingerprint)
            paths = [paths[0] / "config.json"]
    paths = [p / "model.safetensors" if p.is_dir() else p for p in paths]  # a stage's folder: its weights
    return [p for p in paths if p.exists()]
