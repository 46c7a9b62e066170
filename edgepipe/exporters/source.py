"""Model sources for export: an edgepipe checkpoint, or a user's `path/to/file.py:factory`."""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
                output_names: Sequence[str] | None = None) -> ModelSource:
    """Resolve a model source.

    - a checkpoint from `edgepipe train` (its input spec is stored in it);
    - `file.py:factory`, where factory() returns a module, `(module, inputs)` or
      `(module, inputs, output_names)`; `inputs` may also come from the caller (CLI --input).
    """
    if isinstance(ref, nn.Module):
        if not inputs:
            raise InputError("exporting a live module needs its input specs")
        return ModelSource(ref.eval(), _as_specs(inputs, "inputs"), list(output_names or ["output"]),
                           origin=type(ref).__name__)
    text = str(ref)
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
        names = list(output_names or declared_outputs or ["output"])
        return ModelSource(model.eval(), specs, names, origin=f"{path}:{factory_name}")
    from edgepipe.models.training import load_checkpoint

    model, meta = load_checkpoint(text)
    specs = _as_specs(inputs, text) if inputs else meta["input_specs"]
    return ModelSource(model, specs, list(output_names or ["logits"]), origin=text, meta=meta)
