"""Training and safe checkpoints (config + state_dict; loads with torch.load(weights_only=True))."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgepipe.artifacts import StageResult, atomic_path, require_file
from edgepipe.errors import ConfigError, InputError
from edgepipe.models import zoo
from edgepipe.models.data import Dataset, load_dataset
from edgepipe.models.report import TrainReport
from edgepipe.runtime.spec import InputSpec

CHECKPOINT_FORMAT = "edgepipe.checkpoint/1"


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ConfigError(f"train config needs epochs >= 1, batch_size >= 1, lr > 0; got {self}")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)


@torch.no_grad()
def predict(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    model.eval()
    outs = [model(torch.from_numpy(x[i:i + batch_size])).numpy() for i in range(0, len(x), batch_size)]
    return np.concatenate(outs)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(-1) == y).mean())


def fit(model: nn.Module, dataset: Dataset, config: TrainConfig, progress: bool = False) -> dict:
    """Adam + cross-entropy on the training split; returns held-out metrics."""
    seed_everything(config.seed)
    x = torch.from_numpy(dataset.x_train)
    y = torch.from_numpy(dataset.y_train)
    optim = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = (len(y) + config.batch_size - 1) // config.batch_size
    generator = torch.Generator().manual_seed(config.seed)
    bar = _progress(progress, config.epochs * steps_per_epoch, f"train {dataset.name}")
    start, loss_value = time.perf_counter(), float("nan")
    for _ in range(config.epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(y), config.batch_size):
            idx = order[i:i + config.batch_size]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optim.zero_grad()
            loss.backward()
            optim.step()
            loss_value = loss.item()
            bar.advance(loss_value)
    bar.close()
    test_acc = accuracy(predict(model, dataset.x_test), dataset.y_test)
    return {"test_accuracy": test_acc, "final_loss": loss_value,
            "train_seconds": round(time.perf_counter() - start, 2)}


class _progress:
    """A rich progress bar when asked (CLI), nothing otherwise (tests, library use)."""

    def __init__(self, enabled: bool, total: int, label: str):
        self._bar = None
        if enabled:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(),
                                 transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total, loss=float("nan"))

    def advance(self, loss: float) -> None:
        if self._bar:
            self._bar.update(self._task, advance=1, loss=loss)

    def close(self) -> None:
        if self._bar:
            self._bar.stop()


def save_checkpoint(path: str | Path, *, model_name: str, model_kwargs: dict, model: nn.Module,
                    dataset: Dataset, metrics: dict, train_config: TrainConfig | None) -> Path:
    """Atomically write config + state_dict (no pickled code)."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "model": model_name,
        "model_kwargs": model_kwargs,
        "dataset": dataset.info(),
        "inputs": [spec.to_dict() for spec in dataset.input_specs()],
        "metrics": metrics,
        "train_config": asdict(train_config) if train_config else None,
        "torch": torch.__version__,
    }
    # JSON round-trip: only plain str/int/float/list/dict (+ tensors) go in, so the file loads
    # with weights_only=True and no numpy scalar or custom class can sneak in.
    payload = json.loads(json.dumps(meta, default=_plain)) | {"state_dict": model.state_dict()}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint")


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model from a checkpoint written by `save_checkpoint`. Never unpickles code."""
    path = require_file(path, "checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if "weights only load failed" in str(exc).lower():
            reason = "it contains pickled Python objects, which edgepipe never unpickles"
        else:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise InputError(f"{path} is not a loadable edgepipe checkpoint: {reason}; "
                         "create one with `edgepipe train`") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{path} is a torch file but not an edgepipe checkpoint "
                         f"(expected format '{CHECKPOINT_FORMAT}'); create one with `edgepipe train`")
    model = zoo.build(payload["model"], payload["model_kwargs"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise InputError(f"{path}: weights do not fit model '{payload['model']}': "
                         f"{str(exc).splitlines()[0]}") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    meta["input_specs"] = [InputSpec.from_dict(d) for d in payload["inputs"]]
    return model, meta


def train(model_name: str, dataset: str | Dataset, out_path: str | Path,
          config: TrainConfig | None = None, progress: bool = False) -> StageResult:
    """Stage: train zoo model `model_name` on `dataset`, write a safe checkpoint."""
    config = config or TrainConfig()
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=config.seed)
    kwargs = zoo.zoo_kwargs(model_name, data)
    seed_everything(config.seed)
    model = zoo.build(model_name, kwargs)
    metrics = fit(model, data, config, progress=progress)
    metrics["params"] = sum(p.numel() for p in model.parameters())
    out = save_checkpoint(out_path, model_name=model_name, model_kwargs=kwargs, model=model,
                          dataset=data, metrics=metrics, train_config=config)
    return StageResult("train", {"checkpoint": out},
                       TrainReport(model=model_name, dataset=data.info(), **metrics))
