"""Model sources for export: an edgepipe checkpoint, or a user's `path/to/file.py:factory`."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from edgepipe.errors import InputError
from edgepipe.runtime.spec import InputSpec


@dataclass
class ModelSource:
    """A live torch model plus what the exporter needs to know about its inputs and outputs."""

    model: nn.Module
    inputs: list[InputSpec]
    output_names: list[str]
    origin: str
    meta: dict[str, Any] = field(default_factory=dict)


def _as_specs(items: Sequence[Any], where: str) -> list[InputSpec]:
    specs = []
    for item in items:
        if isinstance(item, InputSpec):
            specs.append(item)
        elif isinstance(item, dict):
            specs.append(InputSpec.from_dict(item))
        elif isinstance(item, str):
            specs.append(InputSpec.parse(item))
        else:
            raise InputError(f"{where}: input spec {item!r} is not an InputSpec, dict or "
                             "'name:dtype:dims' string")
    return specs


def load_factory(ref: str) -> tuple[Any, Path, str]:
    """Import `file.py` and return (result of factory(), file path, factory name)."""
    file_part, _, factory_name = ref.rpartition(":")
    path = Path(file_part)
    if not file_part or not factory_name:
        raise InputError(f"model source '{ref}' must be a checkpoint path or path/to/file.py:factory")
    if not path.is_file():
        raise InputError(f"model file not found: {path} (from '{ref}')")
    module_name = f"edgepipe_user_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"cannot import {path}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise InputError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        callables = [n for n, v in vars(module).items()
                     if callable(v) and not n.startswith("_") and getattr(v, "__module__", "") == module_name]
        raise InputError(f"{path} has no callable '{factory_name}'; "
                         f"callables defined there: {', '.join(callables) or 'none'}")
    try:
        result = factory()
    except Exception as exc:
        raise InputError(f"{ref}() raised {type(exc).__name__}: {exc}") from exc
    return result, path, factory_name


def load_source(ref: str | Path | nn.Module, inputs: Sequence[Any] | None = None,
                output_names: Sequence[str] | None = None, task: str | None = None) -> ModelSource:
    """Resolve a model source.

    - a Hugging Face folder written by `save_pretrained` (config.json + weights), loaded
      offline; `task` picks the head (inferred from the config's architectures when None);
    - a checkpoint from `edgepipe train` (its input spec is stored in it);
    - `file.py:factory`, where factory() returns a module, `(module, inputs)` or
      `(module, inputs, output_names)`; `inputs` may also come from the caller (CLI --input).
    """
    if isinstance(ref, nn.Module):
        if not inputs:
            raise InputError("exporting a live module needs its input specs")
        return with_flat_outputs(ModelSource(ref.eval(), _as_specs(inputs, "inputs"), list(output_names or []),
                                             origin=type(ref).__name__))
    text = str(ref)
    from edgepipe.models import hf

    if hf.is_hf_folder(text):
        model, specs, origin, meta = hf.load_folder(text, task)
        specs = _as_specs(inputs, text) if inputs else specs
        return with_flat_outputs(ModelSource(model, specs, list(output_names or []), origin=origin, meta=meta))
    if task is not None:
        raise InputError(f"--task applies to Hugging Face model folders (with config.json); {text} is not one")
    if text.endswith(".py"):
        raise InputError(f"{text} is Python source: name the function that builds the model, "
                         f"e.g. {text}:build")
    if ":" in Path(text).name and text.split(":")[0].endswith(".py"):
        result, path, factory_name = load_factory(text)
        model, declared, declared_outputs = result, None, None
        if isinstance(result, tuple):
            model, declared = result[0], result[1] if len(result) > 1 else None
            declared_outputs = result[2] if len(result) > 2 else None
        if not isinstance(model, nn.Module):
            raise InputError(f"{text}() returned {type(model).__name__}, expected a torch.nn.Module "
                             "(or a tuple (module, inputs[, output_names]))")
        specs = inputs or declared
        if not specs:
            raise InputError(f"{text} declares no inputs: return (model, inputs) from the factory "
                             "or pass --input name:dtype:dims (e.g. --input x:float32:batch,3,32,32)")
        sig_params = [p for p in inspect.signature(model.forward).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        specs = _as_specs(specs, text)
        if len(specs) > len(sig_params) and not any(
                p.kind == p.VAR_POSITIONAL for p in inspect.signature(model.forward).parameters.values()):
            raise InputError(f"{text}: {len(specs)} inputs declared but forward() takes {len(sig_params)}")
        return with_flat_outputs(ModelSource(model.eval(), specs, list(output_names or declared_outputs or []),
                                             origin=f"{path}:{factory_name}"))
    from edgepipe.models.training import load_checkpoint

    model, meta = load_checkpoint(text)
    specs = _as_specs(inputs, text) if inputs else meta["input_specs"]
    return ModelSource(model, specs, list(output_names or ["logits"]), origin=text, meta=meta)


def state_digest(model: nn.Module) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes, values): what a
    factory really built, whatever files it read its weights from."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


class FlatOutputs(nn.Module):
    """Wraps a model whose forward returns a dict, a ModelOutput (Hugging Face) or a tuple so it
    returns a tuple of tensors in `keys` order: what ONNX exporters and parity checks take."""

    def __init__(self, model: nn.Module, keys: list):
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *args):
        out = self.model(*args)
        return tuple(out[k] for k in self.keys)


def with_flat_outputs(source: ModelSource) -> ModelSource:
    """Run the model once on example inputs and name its outputs: a tensor keeps the declared name
    (default "output"); a dict or ModelOutput gives its tensor-valued keys; a tuple gives the
    declared names or output_0, output_1 … Non-tensor values (None, nested caches) are left out."""
    from collections.abc import Mapping

    from edgepipe.runtime.spec import make_feeds

    feeds = make_feeds(source.inputs, batch=2)
    with torch.no_grad():
        try:
            out = source.model(*[torch.from_numpy(feeds[s.name]) for s in source.inputs])
        except Exception as exc:
            raise InputError(f"{source.origin}: forward() failed on example inputs "
                             f"({', '.join(s.describe() for s in source.inputs)}): {type(exc).__name__}: "
                             f"{exc}") from exc
    if isinstance(out, torch.Tensor):
        source.output_names = source.output_names[:1] or ["output"]
        return source
    if isinstance(out, Mapping):
        keys = [k for k, v in out.items() if isinstance(v, torch.Tensor)]
        names = [str(k) for k in keys]
    elif isinstance(out, (tuple, list)):
        keys = [i for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
        names = [f"output_{i}" for i in keys]
    else:
        raise InputError(f"{source.origin}: forward() returned {type(out).__name__}; edgepipe exports "
                         "tensors, tuples of tensors, dicts of tensors or Hugging Face ModelOutputs")
    if not keys:
        raise InputError(f"{source.origin}: forward() returned no tensor")
    if source.output_names and len(source.output_names) != len(keys):
        raise InputError(f"{source.origin}: {len(source.output_names)} output name(s) declared "
                         f"({', '.join(source.output_names)}) but forward() returns {len(keys)} tensor(s): "
                         f"{', '.join(names)}")
    source.model = FlatOutputs(source.model, keys).eval()
    source.output_names = source.output_names or names
    return source
