"""Structured pruning of Hugging Face classifier folders: attention heads and FFN neurons of
BERT-style transformers, channels of CNNs, by Torch-Pruning's dependency graph; then recovery
by distillation from the unpruned folder on the user's rows; then the latency that bought,
measured on the exported ONNX models in onnxruntime.

The residual width (hidden size) is kept: embeddings, the classifier's outputs and protected
modules are never pruned, so token ids, labels and the tokenizer stay valid. An attention module
is pruned by whole heads (query, key and value together) when it has `query`, `key`, `value`
and `num_attention_heads`; a model with attention of another shape is refused rather than cut
across heads."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from edgepipe.artifacts import StageResult
from edgepipe.errors import InputError
from edgepipe.models import hf_pruned
from edgepipe.models.finetune import FinetuneConfig, finetune, load_classifier, read_rows
from edgepipe.models.hf_preprocess import copy_processor_files
from edgepipe.models.trainer import accuracy
from edgepipe.prune.report import PruneReport
from edgepipe.prune.structured import PruneConfig, classifier_head
from edgepipe.runtime.workdirs import work_dir


def _attention(model: nn.Module) -> dict[str, nn.Module]:
    heads, other = {}, []
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, k, None), nn.Linear) for k in ("query", "key", "value")) and hasattr(
                module, "num_attention_heads"):
            heads[name] = module
        elif type(module).__name__.endswith(("Attention", "SelfAttention")) and any(
                isinstance(m, nn.Linear) for m in module.children()):
            other.append(name)
    if other and not any(o.startswith(h) or h.startswith(o) for o in other for h in heads):
        raise InputError(f"pruning cuts whole heads of BERT-style attention (query/key/value); "
                         f"{type(model).__name__} has attention of another shape ({other[0]})")
    return heads


def _example(rows, names: list[str]) -> dict[str, torch.Tensor]:
    return {n: torch.from_numpy(rows.train[n][:2]) for n in names}


def _taylor(model: nn.Module, rows, names: list[str], batches: int = 4, size: int = 16) -> None:
    model.zero_grad()
    model.train()
    for b in range(batches):
        index = np.arange(b * size, min((b + 1) * size, len(rows.train_y)))
        if len(index):
            model(**{n: torch.from_numpy(rows.train[n][index]) for n in names},
                  labels=torch.from_numpy(rows.train_y[index])).loss.backward()


def _macs(model: nn.Module, example: dict[str, torch.Tensor]) -> int:
    import torch_pruning as tp

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # it prints its warnings
        warnings.simplefilter("ignore")
        return int(tp.utils.count_ops_and_params(model.eval(), {k: v[:1] for k, v in example.items()})[0])


def cut(model: nn.Module, rows, names: list[str], config: PruneConfig) -> dict:
    """Prune `model` in place in one step; returns the attributes its attention modules changed."""
    import torch_pruning as tp

    attention = _attention(model)
    num_heads = {getattr(m, k): m.num_attention_heads for m in attention.values() for k in ("query", "key", "value")}
    protected = [classifier_head(model), *(m for m in model.modules() if isinstance(m, nn.Embedding))]
    modules = dict(model.named_modules())
    missing = [n for n in config.protect if n not in modules]
    if missing:
        raise InputError(f"protect: no module named {', '.join(missing)}")
    protected += [modules[n] for n in config.protect]
    if config.importance == "taylor":
        _taylor(model, rows, names)
    importance = (tp.importance.GroupTaylorImportance() if config.importance == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = tp.pruner.MetaPruner(
            model, _example(rows, names), importance=importance, pruning_ratio=config.ratio,
            global_pruning=config.global_pruning, ignored_layers=protected, round_to=config.round_to,
            num_heads=num_heads, prune_num_heads=bool(num_heads), prune_head_dims=False,
            head_pruning_ratio=config.ratio if config.head_ratio is None else config.head_ratio,
            output_transform=lambda out: out.logits)
        pruner.step()
    model.zero_grad(set_to_none=True)
    changed = {}
    for name, module in attention.items():
        module.num_attention_heads = pruner.num_heads[module.query]
        module.all_head_size = module.query.out_features
        changed[name] = {"num_attention_heads": module.num_attention_heads, "all_head_size": module.all_head_size}
    return changed


def _latency(folders: dict[str, Path], rows, names: list[str], batch_sizes, work: Path) -> dict:
    """p50 of each folder's exported ONNX model in onnxruntime, interleaved, at each batch size."""
    from edgepipe.exporters import export
    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.timing import measure_interleaved

    engines = {}
    for label, folder in folders.items():
        export(folder, work / f"{label}.onnx")
        engines[label] = Engine(work / f"{label}.onnx", providers="cpu", spinning=False)
    result = {}
    for batch in batch_sizes:
        feeds = {n: np.ascontiguousarray(np.resize(rows.eval[n], (batch, *rows.eval[n].shape[1:]))) for n in names}
        stats = measure_interleaved({k: (lambda e=e: e.run(feeds)) for k, e in engines.items()}, batch, rounds=20)
        result[str(batch)] = {k: round(v.p50_ms, 4) for k, v in stats.items()}
    return result


def prune_folder(folder: str | Path, data: str | Path, out_dir: str | Path, config: PruneConfig | None = None, *,
                 eval_data: str | Path | None = None, recovery: FinetuneConfig | None = None,
                 log: Callable[[str], None] = lambda message: None) -> StageResult:
    """Stage: a fine-tuned Hugging Face classifier folder + labelled rows -> a pruned folder
    (recovered by distillation from the source when `config.finetune_epochs` > 0), with a
    PruneReport: held-out accuracy before, after the cut and after recovery, parameters, and the
    onnxruntime p50 of both exported models."""
    config = config or PruneConfig()
    folder, out_dir = Path(folder), Path(out_dir)
    if config.method != "structured" or config.steps != 1:
        raise InputError("a Hugging Face folder is pruned structurally in one step, then recovered: use "
                         "--steps 1 and no --unstructured")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} is not empty: give a new folder")
    started = time.perf_counter()
    model, names, task, pre = load_classifier(folder)
    recovery = recovery or FinetuneConfig(epochs=max(config.finetune_epochs, 1), seed=config.seed)  # reads rows too
    rows = read_rows(Path(data), None if eval_data is None else Path(eval_data), pre, recovery, log)
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    params_before = sum(p.numel() for p in model.parameters())
    before, macs_before = accuracy(model, names, rows, config.seed), _macs(model, _example(rows, names))
    attributes = cut(model, rows, names, config)
    params_after = sum(p.numel() for p in model.parameters())
    if params_after == params_before:
        raise InputError(f"Torch-Pruning found nothing to prune in {folder} at ratio {config.ratio} (round_to "
                         f"{config.round_to}; the classifier head, embeddings and protected modules are kept)")
    cut_accuracy = accuracy(model, names, rows, config.seed)
    log(f"pruned {params_before:,} -> {params_after:,} parameters: held-out accuracy {before['value']:.4f} -> "
        f"{cut_accuracy['value']:.4f} before recovery")
    record = {"shapes": {k: list(v.shape) for k, v in model.state_dict().items()
                         if reference_state[k].shape != v.shape}, "attributes": attributes}
    import transformers

    transformers.utils.logging.disable_progress_bar()  # reading the rows may have turned it back on
    with work_dir("prune") as work:
        cut_folder = work / "cut"
        model.save_pretrained(cut_folder)
        (cut_folder / hf_pruned.RECORD).write_text(json.dumps(record, indent=1))
        copy_processor_files(folder, cut_folder)
        recovered = None
        if config.finetune_epochs:
            recovered = finetune(cut_folder, data, out_dir, recovery, eval_data=eval_data, teacher=folder,
                                 progress=log).report
        else:
            shutil.copytree(cut_folder, out_dir, dirs_exist_ok=True)
        latency = _latency({"unpruned": folder, "pruned": out_dir}, rows, names, config.batch_sizes, work)
    after = recovered.eval_accuracy if recovered else cut_accuracy
    report = PruneReport(
        method="structured", config=asdict(config),
        steps=[{"step": 1, "accuracy_after_prune": cut_accuracy["value"],
                "accuracy_after_finetune": after["value"]}],
        accuracy_before=before["value"], accuracy_after=after["value"],
        accuracy_drop=before["value"] - after["value"], params_before=params_before, params_after=params_after,
        macs_before=macs_before, macs_after=_macs(model, _example(rows, names)), p50_ms=latency,
        structure={"attention": attributes, "task": task},
        seconds=round(time.perf_counter() - started, 2),
        speedup={b: round(v["unpruned"] / v["pruned"], 3) for b, v in latency.items()},
        accuracy_intervals={"before": before, "after_cut": cut_accuracy, "after": after})
    (out_dir / "edgepipe_prune.json").write_text(json.dumps(report.to_dict(), indent=2))
    return StageResult("prune", {"folder": out_dir}, report)
