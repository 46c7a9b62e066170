"""Lazy package exports: a package names its public objects and the module of each; a module is
imported on first use. The stage packages need torch or onnx; their reports and configs do not."""

from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, modules: dict[str, list[str]]) -> tuple[list[str], Callable[[str], object]]:
    """(`__all__`, the package's `__getattr__`) for {module: [names it provides]}."""
    where = {name: module for module, names in modules.items() for name in names}

    def __getattr__(name: str) -> object:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name]), name)

    return sorted(where), __getattr__
