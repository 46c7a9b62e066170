"""Input validation for Engine: an allocation-free check on the hot path, and one error that
names every mismatch when it fails. Torch-free."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.spec import InputSpec


class FeedChecker:
    """Checks feeds against a model's input specs (names, dtypes, ranks, static dims)."""

    def __init__(self, specs: Sequence[InputSpec]):
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        self._checks = [
            (s.name, s.np_dtype, len(s.shape), [(a, d) for a, d in enumerate(s.shape) if isinstance(d, int)])
            for s in self.specs
        ]

    def as_feeds(self, inputs: Mapping[str, np.ndarray] | np.ndarray | Sequence[np.ndarray]) -> dict:
        """Accept a dict, a single array (one-input models) or a sequence in input order."""
        if inputs.__class__ is dict:
            return inputs
        if isinstance(inputs, Mapping):
            return dict(inputs)
        if isinstance(inputs, np.ndarray):
            if len(self.names) != 1:
                raise InputError(
                    f"model has {len(self.names)} inputs ({', '.join(self.names)}); "
                    "pass a dict of name -> array"
                )
            return {self.names[0]: inputs}
        inputs = list(inputs)
        if len(inputs) != len(self.names):
            raise InputError(f"got {len(inputs)} arrays, model expects {len(self.names)}: "
                             f"{', '.join(self.names)}")
        return dict(zip(self.names, inputs))

    def valid(self, feeds: Mapping[str, np.ndarray]) -> bool:
        """Allocation-free check for the common case (run's hot path); details come from validate."""
        if len(feeds) != len(self._checks):
            return False
        for name, dtype, ndim, static in self._checks:
            value = feeds.get(name)
            if value.__class__ is not np.ndarray or value.dtype != dtype or value.ndim != ndim:
                return False
            shape = value.shape
            for axis, size in static:
                if shape[axis] != size:
                    return False
        return True

    def validate(self, feeds: Mapping[str, np.ndarray]) -> None:
        """Raise InputError listing every mismatch between `feeds` and the model's inputs."""
        if self.valid(feeds):
            return
        problems = []
        unknown = [n for n in feeds if n not in self.names]
        if unknown:
            problems.append(f"unknown input(s) {', '.join(map(repr, unknown))} "
                            f"(model inputs: {', '.join(self.names)})")
        for (name, dtype, ndim, static), spec in zip(self._checks, self.specs):
            value = feeds.get(name)
            if value is None:
                problems.append(f"missing input '{name}' (expected {spec.describe()})")
                continue
            if not isinstance(value, np.ndarray):
                problems.append(f"input '{name}' is {type(value).__name__}, expected a numpy array")
                continue
            if value.dtype != dtype:
                problems.append(f"input '{name}' has dtype {value.dtype}, model expects {dtype} "
                                f"(use .astype(np.{dtype}))")
            if value.ndim != ndim:
                problems.append(f"input '{name}' has {value.ndim} dims {list(value.shape)}, "
                                f"model expects {ndim}: {list(spec.shape)}")
                continue
            bad = [(a, d) for a, d in static if value.shape[a] != d]
            if bad:
                problems.append(f"input '{name}' has shape {list(value.shape)}, model expects "
                                f"{list(spec.shape)} (axis {bad[0][0]} must be {bad[0][1]})")
        if problems:
            raise InputError("; ".join(problems))
