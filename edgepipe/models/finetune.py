"""Fine-tuning a Hugging Face classifier folder (text or image) on the user's labelled rows.

Rows come in through the folder's own tokenizer or image processor (edgepipe.data), as quantize
and compare read them, so what is trained on is what the deployed model will see. The loop is
plain torch: AdamW with linear warm-up and decay, gradient clipping, a seed, evaluation on the
held-out rows after every epoch (accuracy with its 95% interval), and the best epoch kept. A
checkpoint (weights, optimizer, schedule, step, random state) is written every
`checkpoint_steps` steps, at each epoch's end and when the run is interrupted, so `resume=True`
continues where it stopped. A non-finite loss stops the run with one line; the last checkpoint
stays. The output is a save_pretrained folder with the source's tokenizer or processor files and
`edgepipe_train.json`, which `edgepipe export` takes as it is."""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from edgepipe.artifacts import StageResult
from edgepipe.data.named import NamedInputs
from edgepipe.errors import InputError
from edgepipe.models import qat
from edgepipe.models.report import FinetuneReport
from edgepipe.models.trainer import STATE_DIR, FinetuneConfig, Rows, Trainer, accuracy

__all__ = ["STATE_DIR", "FinetuneConfig", "Trainer", "finetune", "finish", "load_classifier", "read_rows"]


def load_classifier(folder: Path):
    """(model, input names, task, preprocess) of a classifier folder, or InputError."""
    from edgepipe.models.hf import LABELLED, is_causal_lm_folder, is_hf_folder, load_folder
    from edgepipe.runtime.preprocess import Preprocess

    if not is_hf_folder(folder):
        raise InputError(f"{folder} is not a Hugging Face model folder (no config.json): fine-tuning takes a "
                         "save_pretrained folder")
    if is_causal_lm_folder(folder):
        raise InputError(f"{folder} is a causal language model; fine-tuning takes {', '.join(LABELLED)} "
                         "folders (train --model tiny-lm trains a small language model from scratch)")
    wrapper, _, _, meta = load_folder(folder)
    task = meta["hf"]["task"]
    if task not in LABELLED:
        raise InputError(f"{folder} is a {task} model; fine-tuning takes {', '.join(LABELLED)} folders")
    if not meta.get("preprocess"):
        what = "preprocessor_config.json" if task == "image-classification" else "tokenizer files"
        raise InputError(f"{folder} has no {what}, so rows cannot become its inputs: save its tokenizer or "
                         "image processor into the folder (save_pretrained)")
    return wrapper.model, wrapper.names, task, Preprocess.from_json(meta["preprocess"])


def read_rows(data: Path, eval_data: Path | None, pre, config: FinetuneConfig, say) -> Rows:
    from edgepipe.data.labelled import load_labelled

    columns = {"text_columns": config.input_columns, "label_column": config.label_column, "seed": config.seed}
    if eval_data is None:
        split = load_labelled(data, pre, max_test=config.max_eval_rows, max_calibration=config.max_rows,
                              test_fraction=config.eval_fraction, say=say, **columns)
        train, train_y, how = split.calibration, split.calibration_labels, split.split.replace("calibrate", "train")
        held: NamedInputs = split
    else:
        every = load_labelled(data, pre, max_test=config.max_rows, test_fraction=1.0, say=say, **columns)
        held = load_labelled(eval_data, pre, max_test=config.max_eval_rows, test_fraction=1.0, say=say, **columns)
        train, train_y = every.test, every.labels
        how = f"{every.split} train; {held.split} judge"
    if train_y is None or held.labels is None:
        raise InputError(f"{data} has no label column: fine-tuning needs a label per row (name it with --label-column)")
    return Rows(train, train_y, held.test, held.labels, how)


def check_out_dir(out_dir: Path, resume: bool) -> None:
    """A new or empty output folder, or with `resume` the one an interrupted run left."""
    if resume and not (out_dir / STATE_DIR / "state.pt").is_file():
        raise InputError(f"{out_dir} holds no interrupted training to resume ({STATE_DIR}/state.pt): "
                         "run without --resume")
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty: give a new folder, or --resume the run that was interrupted there")


def publish(source: Path, best: Path, out_dir: Path) -> None:
    """The kept epoch's weights and the source's tokenizer or processor files, into `out_dir`."""
    for path in best.iterdir():
        os.replace(path, out_dir / path.name)
    from edgepipe.models.hf_preprocess import copy_processor_files

    copy_processor_files(source, out_dir)


def _teacher(teacher: str | Path | None, task: str, pre, names: list[str], rows: Rows, seed: int):
    """(teacher model, its record) for distillation, or (None, None); the teacher must read rows
    as the student does."""
    if teacher is None:
        return None, None
    model, teacher_names, teacher_task, teacher_pre = load_classifier(Path(teacher))
    same = (teacher_task, teacher_pre.labels, teacher_pre.tokenizer, teacher_pre.image) == (
        task, pre.labels, pre.tokenizer, pre.image)
    if not same or teacher_names != names:
        raise InputError(f"{teacher} reads rows differently from the student (task, labels, tokenizer or image "
                         "processor, inputs): a teacher must share them")
    record = {"source": str(teacher), "params": sum(p.numel() for p in model.parameters()),
              "eval_accuracy": accuracy(model, names, rows, seed)}
    return model, record


def _prepare_qat(model, names: list[str], rows: Rows, task: str, config: FinetuneConfig) -> dict:
    """Fake quantizers on `model` (in place); the record of what was prepared, with the FP32
    accuracy before them."""
    fp32 = accuracy(model, names, rows, config.seed)
    activations = config.qat_activations or qat.default_activations(task)
    return {"activations": activations, "layers": qat.prepare(model, activations), "fp32_eval_accuracy": fp32,
            "weights": "symmetric per channel [-127, 127]"}


def finetune(folder: str | Path, data: str | Path, out_dir: str | Path, config: FinetuneConfig | None = None, *,
             eval_data: str | Path | None = None, resume: bool = False, teacher: str | Path | None = None,
             progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: a Hugging Face classifier folder + labelled rows -> the fine-tuned folder, with a
    FinetuneReport (every epoch's held-out accuracy with its interval; the best one kept). With
    `teacher`, the folder is a student distilled from it (distil.distillation_loss)."""
    config = config or FinetuneConfig()
    say = progress or (lambda message: None)
    folder, data, out_dir = Path(folder), Path(data), Path(out_dir)
    check_out_dir(out_dir, resume)
    model, names, task, pre = load_classifier(folder)
    rows = read_rows(data, None if eval_data is None else Path(eval_data), pre, config, say)
    teacher_model, teacher_record = _teacher(teacher, task, pre, names, rows, config.seed)
    quantization = _prepare_qat(model, names, rows, task, config) if config.qat else None
    trainer = Trainer(model, names, rows, config, out_dir, say, teacher_model)
    if quantization:
        trainer.calibrate()
    before = trainer.accuracy()
    if quantization:
        say(f"quantization-aware: {quantization['layers']} layers train through INT8 fake quantizers "
            f"({quantization['activations']} activations); held-out accuracy in FP32 "
            f"{quantization['fp32_eval_accuracy']['value']:.4f}, simulated INT8 before training {before['value']:.4f}")
    if resume:
        trainer.restore()
    say(f"{'distilling into' if teacher else 'fine-tuning'} {folder.name} ({task}) on {len(rows.train_y)} rows, "
        f"judged on {len(rows.eval_y)}: {trainer.total} steps; held-out accuracy before {before['value']:.4f}"
        + (f", the teacher's {teacher_record['eval_accuracy']['value']:.4f}" if teacher_record else ""))
    started = time.perf_counter()
    trainer.run()
    publish(folder, out_dir / STATE_DIR / "best", out_dir)
    return finish(trainer, folder, task, before, started, out_dir, teacher=teacher_record, qat=quantization)


def finish(trainer: Trainer, source: Path, task: str, before: dict, started: float, out_dir: Path,
           **extra) -> StageResult:
    """The run's FinetuneReport, written beside the folder (edgepipe_train.json); the checkpoint goes."""
    rows = trainer.rows
    report = FinetuneReport(
        source=str(source), task=task, data=rows.how, rows={"train": len(rows.train_y), "eval": len(rows.eval_y)},
        steps=trainer.step, epochs=trainer.history, best_epoch=trainer.best["epoch"],
        eval_accuracy=trainer.best["eval_accuracy"], eval_accuracy_before=before,
        train_seconds=round(time.perf_counter() - started, 1),
        params=sum(p.numel() for p in trainer.model.parameters()), config=asdict(trainer.config),
        resumed_from_step=trainer.resumed_from, **extra)
    (out_dir / "edgepipe_train.json").write_text(json.dumps(report.to_dict(), indent=2))
    shutil.rmtree(out_dir / STATE_DIR)
    return StageResult("train", {"folder": out_dir}, report)
