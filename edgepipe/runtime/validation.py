"""Input validation for Engine: an allocation-free check on the hot path, and one error that
names every mismatch when it fails. Torch-free."""

from __future__ import annotations

import re
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
        # (input, axis, other input, other axis, dim name): inputs that name the same dynamic dim
        # (ids and their mask along "seq") must agree on its size. "dimN" is what a graph without
        # dim names reads as (specs_from_session): no promise that two such dims agree.
        seen: dict[str, tuple[str, int]] = {}
        self._shared = []
        for spec in self.specs:
            for axis, dim in spec.dynamic_dims.items():
                if re.fullmatch(r"dim\d+", dim):
                    continue
                if dim in seen:
                    self._shared.append((spec.name, axis, *seen[dim], dim))
                else:
                    seen[dim] = (spec.name, axis)
        # (input, vocab, [(axis, most, dim name)]): value and size limits from the model's config
        self._limits = [(s.name, s.vocab, [(a, s.max_dims[d], d) for a, d in s.dynamic_dims.items() if d in s.max_dims])
                        for s in self.specs if s.vocab is not None or s.max_dims]

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
        for name, axis, other, other_axis, _ in self._shared:
            if feeds[name].shape[axis] != feeds[other].shape[other_axis]:
                return False
        for name, vocab, most in self._limits:
            value = feeds[name]
            if any(value.shape[axis] > limit for axis, limit, _ in most):
                return False
            if vocab is not None and (value.size == 0 or value.min() < 0 or value.max() >= vocab):
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
        if not problems:
            problems = self._value_problems(feeds)
        if problems:
            raise InputError("; ".join(problems))

    def _value_problems(self, feeds: Mapping[str, np.ndarray]) -> list[str]:
        """Shared dims that disagree, dims past the model's limit, values outside its range (feeds
        whose names, dtypes and ranks are right)."""
        problems = []
        for name, axis, other, other_axis, dim in self._shared:
            size, other_size = feeds[name].shape[axis], feeds[other].shape[other_axis]
            if size != other_size:
                problems.append(f"input '{name}' has {dim} = {size} but '{other}' has {dim} = {other_size}: "
                                f"they must match (shapes {list(feeds[name].shape)} and {list(feeds[other].shape)})")
        for name, vocab, most in self._limits:
            value = feeds[name]
            for axis, limit, dim in most:
                if value.shape[axis] > limit:
                    problems.append(f"input '{name}' has {dim} = {value.shape[axis]}, more than the model's "
                                    f"{limit} (its position embeddings): shorten it to at most {limit}")
            if vocab is None:
                continue
            if value.size == 0:
                problems.append(f"input '{name}' is empty (shape {list(value.shape)}): it needs at least one value")
                continue
            low, high = value.min(), value.max()
            if low < 0 or high >= vocab:
                problems.append(f"input '{name}' holds {int(low if low < 0 else high)}, outside the "
                                f"model's range 0..{vocab - 1}" + (" (its vocabulary)" if vocab > 2 else ""))
        return problems
