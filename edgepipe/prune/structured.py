"""The prune stage: structured pruning with Torch-Pruning's dependency graph, iterative
fine-tuning, and the latency that buys measured in ONNX Runtime (not MACs)."""

from __future__ import annotations

import copy
import io
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgepipe.artifacts import StageResult
from edgepipe.errors import ConfigError, InputError
from edgepipe.models.data import Dataset, load_dataset
from edgepipe.models.training import (
    TrainConfig,
    accuracy,
    fit,
    load_checkpoint,
    predict,
    save_checkpoint,
)
from edgepipe.prune.report import PruneReport
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.timing import measure_interleaved
from edgepipe.runtime.workdirs import work_dir

IMPORTANCES = ("magnitude", "taylor")
METHODS = ("structured", "unstructured")


@dataclass
class PruneConfig:
    method: str = "structured"  # "unstructured": zeros only, never a dense speedup
    ratio: float = 0.5  # fraction of channels / neurons / FFN width (or weights) removed
    head_ratio: float | None = None  # attention heads removed (default: ratio)
    importance: str = "magnitude"  # "magnitude" (L2 of weights) or "taylor" (weight x gradient)
    global_pruning: bool = False  # rank channels across layers instead of per layer
    round_to: int | None = 8  # keep channel counts multiples of this (hardware-friendly)
    protect: tuple[str, ...] = ()  # module names never pruned; the classifier head always is
    steps: int = 2  # iterative: prune a step, fine-tune, repeat
    finetune_epochs: int = 3  # per step; 0 disables fine-tuning
    lr: float = 1e-3
    batch_sizes: tuple[int, ...] = (32,)  # ORT latency is measured at these
    seed: int = 0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ConfigError(f"prune method '{self.method}' unknown; choose {', '.join(METHODS)}")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance '{self.importance}' unknown; choose {', '.join(IMPORTANCES)}")
        if not 0 < self.ratio < 1:
            raise ConfigError(f"prune ratio must be in (0, 1), got {self.ratio}")
        if self.steps < 1 or self.finetune_epochs < 0:
            raise ConfigError("prune steps must be >= 1 and finetune_epochs >= 0")
        self.protect = tuple(self.protect)
        self.batch_sizes = tuple(self.batch_sizes)


# module, input specs, ONNX path to write, held-out inputs -> the ONNX path (parity-checked)
Exporter = Callable[[nn.Module, list, Path, dict], Path]


def classifier_head(model: nn.Module) -> nn.Module:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("model has no Linear layer to keep as its classifier head")
    return linears[-1]


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return int(macs), int(params)


def _protected(model: nn.Module, names: tuple[str, ...]) -> list[nn.Module]:
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"protect: no module named {', '.join(missing)}; modules with weights: "
                          + ", ".join(n for n, m in modules.items() if hasattr(m, "weight"))[:300])
    protected = [modules[n] for n in names] + [classifier_head(model)]
    protected += [m for m in model.modules() if isinstance(m, nn.Embedding)]  # token ids stay valid
    return protected


def _taylor_gradients(model: nn.Module, data: Dataset, batches: int = 4, batch_size: int = 64) -> None:
    model.zero_grad()
    model.train()
    for i in range(batches):
        x = torch.from_numpy(data.x_train[i * batch_size:(i + 1) * batch_size])
        y = torch.from_numpy(data.y_train[i * batch_size:(i + 1) * batch_size])
        nn.functional.cross_entropy(model(x), y).backward()


def _sync_attention(model: nn.Module, pruner) -> None:
    """Torch-Pruning removes whole heads from qkv; the attention modules must be told."""
    for module in model.modules():
        if hasattr(module, "qkv") and hasattr(module, "heads"):
            module.heads = pruner.num_heads[module.qkv]
            module.head_dim = module.qkv.out_features // (3 * module.heads)


def structured_prune(model: nn.Module, data: Dataset, config: PruneConfig,
                     log=lambda message: None, progress: bool = False) -> list[dict]:
    """Prune `model` in place over `config.steps`, fine-tuning after each; returns per-step records."""
    import torch_pruning as tp

    example = torch.from_numpy(data.x_train[:2])
    importance = (tp.importance.GroupTaylorImportance() if config.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    num_heads = {m.qkv: m.heads for m in model.modules() if hasattr(m, "qkv") and hasattr(m, "heads")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance, pruning_ratio=config.ratio,
            iterative_steps=config.steps, global_pruning=config.global_pruning,
            ignored_layers=_protected(model, config.protect), round_to=config.round_to,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=config.ratio if config.head_ratio is None else config.head_ratio)
    steps = []
    for step in range(config.steps):
        if config.importance == "taylor":
            _taylor_gradients(model, data)
        pruner.step()
        _sync_attention(model, pruner)
        model.eval()
        pruned_acc = accuracy(predict(model, data.x_test), data.y_test)
        tuned_acc = pruned_acc
        if config.finetune_epochs:
            train_config = TrainConfig(epochs=config.finetune_epochs, lr=config.lr, seed=config.seed + step)
            tuned_acc = fit(model, data, train_config, progress=progress)["test_accuracy"]
        steps.append({"step": step + 1, "accuracy_after_prune": pruned_acc,
                      "accuracy_after_finetune": tuned_acc})
        log(f"prune step {step + 1}/{config.steps}: accuracy {pruned_acc:.4f} after pruning, "
            f"{tuned_acc:.4f} after fine-tuning")
    return steps


def unstructured_prune(model: nn.Module, data: Dataset, config: PruneConfig) -> list[dict]:
    """Global L1 magnitude pruning of Linear/Conv weights; masks held while fine-tuning."""
    from torch.nn.utils import prune as torch_prune

    head = classifier_head(model)
    targets = [(m, "weight") for m in model.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d)) and m is not head]
    torch_prune.global_unstructured(targets, pruning_method=torch_prune.L1Unstructured, amount=config.ratio)
    pruned_acc = accuracy(predict(model, data.x_test), data.y_test)
    tuned_acc = pruned_acc
    if config.finetune_epochs:
        tuned_acc = fit(model, data, TrainConfig(epochs=config.finetune_epochs, lr=config.lr,
                                                 seed=config.seed))["test_accuracy"]
    for module, name in targets:
        torch_prune.remove(module, name)
    return [{"step": 1, "accuracy_after_prune": pruned_acc, "accuracy_after_finetune": tuned_acc}]


def sparsity(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    total = sum(w.numel() for w in weights)
    return float(sum((w == 0).sum().item() for w in weights) / total)


def compressed_bytes(model: nn.Module) -> int:
    """Size of the state_dict after zlib: what unstructured zeros actually save."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return len(zlib.compress(buffer.getvalue(), 6))


def ort_latency(models: dict[str, nn.Module], data: Dataset, specs, batch_sizes, work: Path,
                exporter: Exporter) -> dict:
    """Export each model with `exporter` (parity-checked) and time them interleaved in ORT."""
    engines = {}
    for label, model in models.items():
        path = exporter(model.eval(), specs, work / f"{label}.onnx", {data.input_name: data.x_test})
        engines[label] = Engine(path, providers="cpu", spinning=False)
    result = {}
    for batch in batch_sizes:
        x = np.ascontiguousarray(data.x_test[:batch])
        stats = measure_interleaved({k: (lambda e=e: e.run(x)) for k, e in engines.items()}, batch, rounds=20)
        result[str(batch)] = {k: round(v.p50_ms, 4) for k, v in stats.items()}
    return result


def prune(checkpoint: str | Path, out_path: str | Path, config: PruneConfig | None = None, *,
          exporter: Exporter, dataset: str | Dataset | None = None, log=lambda message: None,
          progress: bool = False) -> StageResult:
    """Stage: prune a trained checkpoint, fine-tune, measure accuracy and ORT latency against the
    unpruned model, and write a safe checkpoint that rebuilds the pruned shapes.
    `exporter(module, input_specs, onnx_path, data) -> onnx_path` makes the ONNX models timed
    (edgepipe.exporters.export_module in the pipeline and CLI): pruning does not export itself."""
    config = config or PruneConfig()
    started = time.perf_counter()
    if ".py:" in str(checkpoint):
        raise InputError(f"pruning needs a checkpoint from `edgepipe train` (to rebuild the pruned "
                         f"shapes safely), not a factory ({checkpoint})")
    model, meta = load_checkpoint(checkpoint)
    if dataset is None:
        dataset = meta["dataset"]["name"]
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset, seed=config.seed)
    torch.manual_seed(config.seed)
    baseline = copy.deepcopy(model).eval()
    example = torch.from_numpy(data.x_train[:1])
    macs_before, params_before = count_macs_params(baseline, example)
    acc_before = accuracy(predict(baseline, data.x_test), data.y_test)
    if config.method == "structured":
        steps = structured_prune(model, data, config, log, progress)
    else:
        steps = unstructured_prune(model, data, config)
    model.eval()
    macs_after, params_after = count_macs_params(model, example)
    if config.method == "structured" and params_after == params_before:
        raise InputError(f"Torch-Pruning found no prunable channel group in model '{meta['model']}' "
                         "(the classifier head, embeddings and protected layers are kept); "
                         "nothing was pruned")
    acc_after = accuracy(predict(model, data.x_test), data.y_test)
    with work_dir("prune") as tmp:
        latency = ort_latency({"unpruned": baseline, "pruned": model}, data, meta["input_specs"],
                              config.batch_sizes, tmp, exporter)
    speedup = {b: round(v["unpruned"] / v["pruned"], 3) for b, v in latency.items()}
    report = PruneReport(
        method=config.method, config=asdict(config), steps=steps,
        accuracy_before=acc_before, accuracy_after=acc_after, accuracy_drop=acc_before - acc_after,
        params_before=params_before, params_after=params_after, macs_before=macs_before, macs_after=macs_after,
        p50_ms=latency, structure=model.structure() if hasattr(model, "structure") else None)
    if config.method == "structured":
        report.speedup = speedup
    else:  # zeros, not speed: report sparsity and compressed size, never a speedup
        report.dense_latency_ratio, report.sparsity = speedup, sparsity(model)
        report.compressed_bytes_before = compressed_bytes(baseline)
        report.compressed_bytes_after = compressed_bytes(model)
        report.note = "unstructured pruning makes zeros, not dense speed: ORT runs the same kernels"
    kwargs = meta["model_kwargs"] | (model.structure() if hasattr(model, "structure") else {})
    out = save_checkpoint(out_path, model_name=meta["model"], model_kwargs=kwargs, model=model,
                          dataset=data, metrics={"test_accuracy": acc_after, "pruning": {
                              "method": report.method, "params_before": params_before, "params_after": params_after}},
                          train_config=None)
    report.seconds = round(time.perf_counter() - started, 2)
    return StageResult("prune", {"checkpoint": out}, report)
