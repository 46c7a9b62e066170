"""Distillation: a smaller student learns the teacher's logits as well as the labels.

The student is a classifier folder of its own (any size, from a config), or is cut from the
teacher by keeping every k-th transformer layer (weights copied: embeddings, the kept layers,
pooler and head), which is where a distilled student starts best. The loss is the task's
cross-entropy blended with the temperature-scaled KL divergence from the teacher's softened
logits (Hinton et al.), scaled by T² so its gradients keep their size as T changes."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch.nn import functional as F

from edgepipe.errors import InputError
from edgepipe.models.hf_preprocess import copy_processor_files

_LAYER = re.compile(r"\.(layer|layers)\.(\d+)\.")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, task_loss: torch.Tensor, temperature: float,
                      weight: float) -> torch.Tensor:
    """(1 - weight) * task loss + weight * T² * KL(teacher_T || student_T)."""
    kl = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                  log_target=True, reduction="batchmean")
    return (1 - weight) * task_loss + weight * temperature ** 2 * kl


def student_from_teacher(teacher: str | Path, out: str | Path, keep_every: int) -> Path:
    """A student folder at `out`: the teacher with every `keep_every`-th layer kept (0, k, 2k, ...),
    their weights and everything outside the layer stack copied, and the teacher's tokenizer or
    image processor files beside them."""
    import transformers

    from edgepipe.models.hf import TASKS, infer_task, read_config
    from edgepipe.models.hf_pruned import is_pruned

    teacher, out = Path(teacher), Path(out)
    if is_pruned(teacher):
        raise InputError(f"{teacher} is a pruned folder, whose layers its config no longer describes: cut the student "
                         "from the unpruned teacher, or give a student FOLDER of your own")
    config = transformers.AutoConfig.from_pretrained(str(teacher), local_files_only=True)
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or keep_every < 2 or layers < keep_every:
        raise InputError(f"{teacher}: a student keeps every k-th of a transformer's layers (k >= 2, at most its "
                         f"{layers or 'unknown number of'} layers); give a student folder of your own for this model")
    auto = getattr(transformers, TASKS[infer_task(read_config(teacher), teacher)].auto_class)
    model = auto.from_pretrained(str(teacher), local_files_only=True)
    kept = list(range(0, layers, keep_every))
    config.num_hidden_layers = len(kept)
    student = auto.from_config(config)
    source = model.state_dict()
    weights = {}
    for key in student.state_dict():
        match = _LAYER.search(key)
        name = key if match is None else key.replace(match.group(0),
                                                     f".{match.group(1)}.{kept[int(match.group(2))]}.", 1)
        weights[key] = source[name]
    student.load_state_dict(weights)
    student.save_pretrained(out)
    copy_processor_files(teacher, out)
    return out
