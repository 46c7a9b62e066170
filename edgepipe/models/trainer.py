"""The fine-tuning loop: AdamW with linear warm-up and decay, gradient clipping, a seed, every
epoch judged on held-out rows (accuracy with its 95% interval) and the best epoch kept; a
checkpoint (weights, optimizer, schedule, step, random state) every `checkpoint_steps` steps, at
each epoch's end and on interruption, from which `restore` continues exactly; a non-finite loss
stops with one line and keeps the last checkpoint. With QAT on, judging holds the fake
quantizers' ranges and what is kept is the model without them (models.qat)."""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from edgepipe.errors import ConfigError, InputError, TrainingError
from edgepipe.metrics import IGNORED, clustered_proportion, proportion
from edgepipe.models import qat
from edgepipe.models.distil import distillation_loss

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
    qat: bool = False  # quantization-aware: train through INT8 fake quantizers (models.qat)
    qat_activations: qat.Activations | None = None  # None: the layout quantize leads with for the task

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.checkpoint_steps < 1:
            raise ConfigError(f"fine-tuning needs epochs, batch size and checkpoint steps >= 1 and lr > 0; got "
                              f"epochs {self.epochs}, batch size {self.batch_size}, lr {self.lr}, "
                              f"checkpoint steps {self.checkpoint_steps}")
        if not 0 <= self.warmup < 1 or not 0 < self.eval_fraction < 1 or self.max_grad_norm <= 0:
            raise ConfigError("warmup must be in [0, 1), eval_fraction in (0, 1) and max_grad_norm > 0")
        if not self.temperature > 0 or not 0 <= self.distil_weight <= 1:
            raise ConfigError("distillation needs temperature > 0 and distil_weight in [0, 1]")
        if self.qat_activations not in (None, *qat.ACTIVATIONS):
            raise ConfigError(f"QAT activations '{self.qat_activations}' unknown; choose {', '.join(qat.ACTIVATIONS)}")


@dataclass
class Rows:
    train: dict[str, np.ndarray]
    train_y: np.ndarray
    eval: dict[str, np.ndarray]
    eval_y: np.ndarray
    how: str


@torch.no_grad()
def accuracy(model, names: list[str], rows: Rows, seed: int = 0) -> dict:
    """Accuracy on the held-out rows, with its 95% interval; for token classification (a label
    per token, IGNORED where none) the share of words tagged right."""
    model.eval()
    count = len(rows.eval_y)
    pred = torch.cat([model(**{n: torch.from_numpy(rows.eval[n][i:i + 64]) for n in names}).logits.argmax(-1)
                      for i in range(0, count, 64)]).numpy()
    if rows.eval_y.ndim == 2:
        tagged = rows.eval_y != IGNORED
        hits = ((pred == rows.eval_y) & tagged).sum(axis=1)
        return clustered_proportion(hits, tagged.sum(axis=1), seed=seed).to_dict()
    return proportion(int((pred == rows.eval_y).sum()), count, seed=seed).to_dict()


class Trainer:
    def __init__(self, model, names: list[str], rows: Rows, config: FinetuneConfig, out_dir: Path, say,
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
        """The held-out score that picks the best epoch, with its 95% interval."""
        model = model or self.model
        qat.observing(model, False)  # judging reads the ranges training learned, never its own rows'
        try:
            return accuracy(model, self.names, self.rows, self.config.seed)
        finally:
            qat.observing(model, True)

    def calibrate(self, batches: int = 8) -> None:
        """Give a QAT model's input quantizers their first ranges, from training rows, before it is judged."""
        self.model.eval()
        with torch.no_grad():
            for b in range(min(batches, self.per_epoch)):
                index = np.arange(b * self.config.batch_size, min((b + 1) * self.config.batch_size,
                                                                  len(self.rows.train_y)))
                self.model(**{n: torch.from_numpy(self.rows.train[n][index]) for n in self.names})

    def batch(self, index: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The model's inputs and labels for training rows `index` (a subclass may make both)."""
        return ({n: torch.from_numpy(self.rows.train[n][index]) for n in self.names},
                torch.from_numpy(self.rows.train_y[index]))

    def train_step(self, index: np.ndarray) -> float:
        feeds, labels = self.batch(index)
        out = self.model(**feeds, labels=labels)
        loss = out.loss
        if self.teacher is not None:
            with torch.no_grad():
                taught = self.teacher(**feeds).logits
            student = out.logits
            if labels.dim() == 2:  # token classification: the words' first tokens, as the task loss
                student, taught = student[labels != IGNORED], taught[labels != IGNORED]
            loss = distillation_loss(student, taught, loss, self.config.temperature, self.config.distil_weight)
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
            self.model.save_pretrained(staging,
                                       state_dict=qat.plain_state_dict(self.model) if self.config.qat else None)
            shutil.rmtree(self.state_dir / "best", ignore_errors=True)
            os.replace(staging, self.state_dir / "best")
            self.best = self.history[-1]
        self.save()
