"""Hugging Face folders whose layers were pruned narrower than their config.json says.

A config cannot say that layer 3 kept 5 of its 12 heads or a convolution 40 of its 64 channels,
so a pruned folder carries `edgepipe_pruned.json`: the shape of every tensor that differs from
what the config builds, and the attributes of the modules that hold them (an attention's head
count). Loading builds the model from its config, narrows those tensors and attributes, then
loads the weights strictly: a weight that does not fit is an error, never a silent re-init."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgepipe import interrupts
from edgepipe.errors import InputError, first_line

RECORD = "edgepipe_pruned.json"


def is_pruned(folder: str | Path) -> bool:
    return (Path(folder) / RECORD).is_file()


def structure(model: nn.Module, reference: nn.Module, attributes: dict[str, dict[str, Any]]) -> dict:
    """What a pruned `model` needs beyond the config that built `reference` (its unpruned twin)."""
    before = reference.state_dict()
    shapes = {k: list(v.shape) for k, v in model.state_dict().items() if before[k].shape != v.shape}
    return {"shapes": shapes, "attributes": attributes}


def _narrow(module: nn.Module, name: str, shape: list[int]) -> None:
    old = getattr(module, name)
    fresh = torch.empty(shape, dtype=old.dtype)
    if isinstance(old, nn.Parameter):
        setattr(module, name, nn.Parameter(fresh, requires_grad=old.requires_grad))
    else:
        module.register_buffer(name, fresh)
    if isinstance(module, nn.Linear) and name == "weight":
        module.out_features, module.in_features = shape
    elif isinstance(module, nn.Conv2d) and name == "weight":
        module.out_channels, module.in_channels = shape[0], shape[1] * module.groups
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and name == "weight":
        module.num_features = shape[0]
    elif isinstance(module, nn.LayerNorm) and name == "weight":
        module.normalized_shape = tuple(shape)


def apply(model: nn.Module, record: dict) -> nn.Module:
    """Narrow `model` (built from the config) to the recorded shapes and attributes, in place."""
    for key, shape in record["shapes"].items():
        owner, _, name = key.rpartition(".")
        _narrow(model.get_submodule(owner), name, shape)
    for owner, values in record["attributes"].items():
        for name, value in values.items():
            setattr(model.get_submodule(owner), name, value)
    return model


def load(auto, folder: str | Path) -> nn.Module:
    """A pruned folder's model: `auto` (a transformers Auto class) builds it from config.json."""
    import transformers
    from safetensors.torch import load_file

    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD).read_text())
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        model = apply(auto.from_config(config, attn_implementation="eager"), record)
        model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    except Exception as exc:  # a record or weights that do not match the config, a missing file
        interrupts.reraise()
        raise InputError(f"{folder}: the pruned model does not rebuild from config.json and {RECORD}: "
                         f"{first_line(exc)[:300]}") from exc
    return model.eval()
