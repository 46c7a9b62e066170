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
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepipe.artifacts import StageResult
from edgepipe.errors import ConfigError, InputError, TrainingError
from edgepipe.metrics import proportion
from edgepipe.models.data import NamedInputs
from edgepipe.models.distil import distillation_loss
from edgepipe.models.report import FinetuneReport

STATE_DIR = ".edgepipe-train"  # inside the output folder: the checkpoint and the best epoch so far


@dataclass
class FinetuneConfig:
    epochs: int = 3
    lr: float = 5e-5
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup: float = 0.1  # share of the steps over which the learning rate rises from 0
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_fraction: float = 0.2  # of the rows, seeded, when no eval data is given
    max_rows: int = 50_000  # training rows read (they are held in memory)
    max_eval_rows: int = 2_000
    checkpoint_steps: int = 50
    input_columns: tuple[str, ...] = ()
    label_column: str | None = None
    temperature: float = 2.0  # distillation: the softening of both models' logits
    distil_weight: float = 0.5  # distillation: the KL term's share of the loss (the labels' the rest)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.checkpoint_steps < 1:
            raise ConfigError(f"fine-tuning needs epochs, batch size and checkpoint steps >= 1 and lr > 0; got "
                              f"epochs {self.epochs}, batch size {self.batch_size}, lr {self.lr}, "
                              f"checkpoint steps {self.checkpoint_steps}")
        if not 0 <= self.warmup < 1 or not 0 < self.eval_fraction < 1 or self.max_grad_norm <= 0:
            raise ConfigError("warmup must be in [0, 1), eval_fraction in (0, 1) and max_grad_norm > 0")
        if not self.temperature > 0 or not 0 <= self.distil_weight <= 1:
            raise ConfigError("distillation needs temperature > 0 and distil_weight in [0, 1]")


@dataclass
class _Rows:
    train: dict[str, np.ndarray]
    train_y: np.ndarray
    eval: dict[str, np.ndarray]
    eval_y: np.ndarray
    how: str


def _load(folder: Path):
    """(model, input names, task, preprocess) of a classifier folder, or InputError."""
    from edgepipe.exporters.hf import CLASSIFIERS, is_causal_lm_folder, is_hf_folder, load_folder
    from edgepipe.runtime.preprocess import Preprocess

    if not is_hf_folder(folder):
        raise InputError(f"{folder} is not a Hugging Face model folder (no config.json): fine-tuning takes a "
                         "save_pretrained folder")
    if is_causal_lm_folder(folder):
        raise InputError(f"{folder} is a causal language model; fine-tuning takes {' or '.join(CLASSIFIERS)} "
                         "folders (train --model tiny-lm trains a small language model from scratch)")
    wrapper, _, _, meta = load_folder(folder)
    task = meta["hf"]["task"]
    if task not in CLASSIFIERS:
        raise InputError(f"{folder} is a {task} model; fine-tuning takes {' or '.join(CLASSIFIERS)} folders")
    if not meta.get("preprocess"):
        what = "preprocessor_config.json" if task == "image-classification" else "tokenizer files"
        raise InputError(f"{folder} has no {what}, so rows cannot become its inputs: save its tokenizer or "
                         "image processor into the folder (save_pretrained)")
    return wrapper.model, wrapper.names, task, Preprocess.from_json(meta["preprocess"])


def _rows(data: Path, eval_data: Path | None, pre, config: FinetuneConfig, say) -> _Rows:
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
    return _Rows(train, train_y, held.test, held.labels, how)


@torch.no_grad()
def accuracy(model, names: list[str], rows: _Rows, seed: int = 0) -> dict:
    """Accuracy on the held-out rows, with its 95% interval."""
    model.eval()
    count = len(rows.eval_y)
    pred = torch.cat([model(**{n: torch.from_numpy(rows.eval[n][i:i + 64]) for n in names}).logits.argmax(-1)
                      for i in range(0, count, 64)]).numpy()
    return proportion(int((pred == rows.eval_y).sum()), count, seed=seed).to_dict()


class _Trainer:
    def __init__(self, model, names: list[str], rows: _Rows, config: FinetuneConfig, out_dir: Path, say,
                 teacher=None):
        self.model, self.names, self.rows, self.config, self.say = model, names, rows, config, say
        self.teacher = teacher.eval() if teacher is not None else None
        self.state_dir = out_dir / STATE_DIR
        self.per_epoch = math.ceil(len(rows.train_y) / config.batch_size)
        self.total = self.per_epoch * config.epochs
        torch.manual_seed(config.seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        warm, total = max(1, int(config.warmup * self.total)), self.total
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: (s + 1) / warm if s < warm else max(0.0, (total - s) / max(1, total - warm)))
        self.step, self.history, self.best, self.losses = 0, [], None, []
        self.resumed_from: int | None = None

    def save(self) -> None:
        """The checkpoint, written whole or not at all."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "schedule": self.schedule.state_dict(), "step": self.step, "total": self.total,
                 "history": json.dumps(self.history), "best": json.dumps(self.best), "losses": self.losses,
                 "rng": torch.get_rng_state()}
        tmp = self.state_dir / "state.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self.state_dir / "state.pt")

    def restore(self) -> None:
        state = torch.load(self.state_dir / "state.pt", weights_only=True)
        if state["total"] != self.total:
            raise InputError(f"the interrupted run planned {state['total']} steps and this one {self.total}: resume "
                             "with the same data, --epochs and --batch-size")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.losses = state["step"], list(state["losses"])
        self.history, self.best = json.loads(state["history"]), json.loads(state["best"])
        torch.set_rng_state(state["rng"])
        self.resumed_from = self.step
        self.say(f"resuming at step {self.step} of {self.total}")

    def accuracy(self, model=None) -> dict:
        return accuracy(model or self.model, self.names, self.rows, self.config.seed)

    def train_step(self, index: np.ndarray) -> float:
        feeds = {n: torch.from_numpy(self.rows.train[n][index]) for n in self.names}
        out = self.model(**feeds, labels=torch.from_numpy(self.rows.train_y[index]))
        loss = out.loss
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.teacher(**feeds).logits
            loss = distillation_loss(out.logits, taught, loss, self.config.temperature, self.config.distil_weight)
        if not torch.isfinite(loss):
            saved = self.saved_step()
            kept = f"the checkpoint of step {saved} is kept; " if saved else ""
            raise TrainingError(f"the training loss became {loss.item()} at step {self.step + 1}: {kept}lower --lr "
                                f"(it is {self.config.lr:g}) and start again")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.schedule.step()
        self.step += 1
        return loss.item()

    def saved_step(self) -> int | None:
        path = self.state_dir / "state.pt"
        return torch.load(path, weights_only=True)["step"] if path.is_file() else None

    def run(self) -> None:
        started, first, every = time.perf_counter(), self.step, max(1, self.total // 20)
        try:
            while self.step < self.total:
                epoch, start = divmod(self.step, self.per_epoch)
                order = np.random.default_rng(self.config.seed + epoch).permutation(len(self.rows.train_y))
                self.model.train()
                for b in range(start, self.per_epoch):
                    size = self.config.batch_size
                    self.losses.append(self.train_step(order[b * size:(b + 1) * size]))
                    if self.step % every == 0 or self.step == self.total:
                        rate = (self.step - first) / max(time.perf_counter() - started, 1e-9)
                        self.say(f"epoch {epoch + 1}/{self.config.epochs} step {self.step}/{self.total}: loss "
                                 f"{np.mean(self.losses[-every:]):.4f}, ETA {(self.total - self.step) / rate:.0f} s")
                    if self.step % self.config.checkpoint_steps == 0:
                        self.save()
                self.end_epoch(epoch)
        except (KeyboardInterrupt, SystemExit):
            self.save()  # interrupted: --resume continues from here
            raise

    def end_epoch(self, epoch: int) -> None:
        accuracy = self.accuracy()
        self.history.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(self.losses)), 4),
                             "eval_accuracy": accuracy})
        self.losses = []
        self.say(f"epoch {epoch + 1}: held-out accuracy {accuracy['value']:.4f} "
                 f"[{accuracy['low']:.4f}, {accuracy['high']:.4f}]")
        if self.best is None or accuracy["value"] > self.best["eval_accuracy"]["value"]:
            import transformers

            staging = self.state_dir / "best.partial"
            shutil.rmtree(staging, ignore_errors=True)
            transformers.utils.logging.disable_progress_bar()  # reading the data may have turned it back on
            self.model.save_pretrained(staging)
            shutil.rmtree(self.state_dir / "best", ignore_errors=True)
            os.replace(staging, self.state_dir / "best")
            self.best = self.history[-1]
        self.save()


def _publish(source: Path, best: Path, out_dir: Path) -> None:
    """The kept epoch's weights and the source's tokenizer or processor files, into `out_dir`."""
    for path in best.iterdir():
        os.replace(path, out_dir / path.name)
    from edgepipe.exporters.hf_preprocess import copy_processor_files

    copy_processor_files(source, out_dir)


def _teacher(teacher: str | Path | None, task: str, pre, names: list[str], rows: _Rows, seed: int):
    """(teacher model, its record) for distillation, or (None, None); the teacher must read rows
    as the student does."""
    if teacher is None:
        return None, None
    model, teacher_names, teacher_task, teacher_pre = _load(Path(teacher))
    same = (teacher_task, teacher_pre.labels, teacher_pre.tokenizer, teacher_pre.image) == (
        task, pre.labels, pre.tokenizer, pre.image)
    if not same or teacher_names != names:
        raise InputError(f"{teacher} reads rows differently from the student (task, labels, tokenizer or image "
                         "processor, inputs): a teacher must share them")
    record = {"source": str(teacher), "params": sum(p.numel() for p in model.parameters()),
              "eval_accuracy": accuracy(model, names, rows, seed)}
    return model, record


def finetune(folder: str | Path, data: str | Path, out_dir: str | Path, config: FinetuneConfig | None = None, *,
             eval_data: str | Path | None = None, resume: bool = False, teacher: str | Path | None = None,
             progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: a Hugging Face classifier folder + labelled rows -> the fine-tuned folder, with a
    FinetuneReport (every epoch's held-out accuracy with its interval; the best one kept). With
    `teacher`, the folder is a student distilled from it (distil.distillation_loss)."""
    config = config or FinetuneConfig()
    say = progress or (lambda message: None)
    folder, data, out_dir = Path(folder), Path(data), Path(out_dir)
    if resume and not (out_dir / STATE_DIR / "state.pt").is_file():
        raise InputError(f"{out_dir} holds no interrupted fine-tuning to resume ({STATE_DIR}/state.pt): "
                         "run without --resume")
    if not resume and out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty: give a new folder, or --resume the run that was interrupted there")
    model, names, task, pre = _load(folder)
    rows = _rows(data, None if eval_data is None else Path(eval_data), pre, config, say)
    teacher_model, teacher_record = _teacher(teacher, task, pre, names, rows, config.seed)
    trainer = _Trainer(model, names, rows, config, out_dir, say, teacher_model)
    before = trainer.accuracy()
    if resume:
        trainer.restore()
    say(f"{'distilling into' if teacher else 'fine-tuning'} {folder.name} ({task}) on {len(rows.train_y)} rows, "
        f"judged on {len(rows.eval_y)}: {trainer.total} steps; held-out accuracy before {before['value']:.4f}"
        + (f", the teacher's {teacher_record['eval_accuracy']['value']:.4f}" if teacher_record else ""))
    started = time.perf_counter()
    trainer.run()
    _publish(folder, out_dir / STATE_DIR / "best", out_dir)
    report = FinetuneReport(
        source=str(folder), task=task, data=rows.how, rows={"train": len(rows.train_y), "eval": len(rows.eval_y)},
        steps=trainer.step, epochs=trainer.history, best_epoch=trainer.best["epoch"],
        eval_accuracy=trainer.best["eval_accuracy"], eval_accuracy_before=before,
        train_seconds=round(time.perf_counter() - started, 1), params=sum(p.numel() for p in model.parameters()),
        config=asdict(config), resumed_from_step=trainer.resumed_from, teacher=teacher_record)
    (out_dir / "edgepipe_train.json").write_text(json.dumps(report.to_dict(), indent=2))
    shutil.rmtree(out_dir / STATE_DIR)
    return StageResult("train", {"folder": out_dir}, report)
