"""A model's held-out and calibration inputs, keyed by its input names: what every reader of
user data (rows through the model's own preprocessing, or an .npz of ready inputs) returns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.artifacts import read_npz
from edgepipe.errors import InputError


@dataclass
class NamedInputs:
    """Held-out data for a model given as a source, keyed by its input names (any number of
    inputs), with optional integer labels `y`; calibration rows come from the same file."""

    name: str
    test: dict[str, np.ndarray]
    labels: np.ndarray | None
    calibration: dict[str, np.ndarray]
    split: str
    calibration_labels: np.ndarray | None = None  # the calibration rows' labels: training rows for fine-tuning


def named_inputs_npz(path: str | Path, input_names: list[str], seed: int = 0) -> NamedInputs:
    """An .npz with one array per model input (and optionally `y`): 20% of its rows (seeded) judge
    accuracy, the other 80% calibrate, unless it holds `<name>_test` arrays for the held-out rows."""
    path = Path(path)
    data = read_npz(path, "dataset file")
    missing = [n for n in input_names if n not in data.files]
    if missing:
        raise InputError(f"{path} has arrays {', '.join(data.files)}; the model's inputs are "
                         f"{', '.join(input_names)} (missing: {', '.join(missing)}); add 'y' for labels")
    arrays = {n: data[n] for n in input_names}
    rows = {len(a) for a in arrays.values()} | ({len(data["y"])} if "y" in data.files else set())
    if len(rows) != 1:
        raise InputError(f"{path}: the inputs (and y) must have the same number of rows, got {sorted(rows)}")
    labels = data["y"].astype(np.int64) if "y" in data.files else None
    if all(f"{n}_test" in data.files for n in input_names):
        test = {n: data[f"{n}_test"] for n in input_names}
        test_labels = data["y_test"].astype(np.int64) if "y_test" in data.files else None
        return NamedInputs(path.stem, test, test_labels, arrays, f"held-out rows from {path.name}'s *_test arrays")
    order = np.random.default_rng(seed).permutation(rows.pop())
    n_test = max(1, len(order) // 5)
    test_rows, calib_rows = order[:n_test], order[n_test:] if len(order) > 1 else order
    return NamedInputs(path.stem, {n: a[test_rows] for n, a in arrays.items()},
                       labels[test_rows] if labels is not None else None,
                       {n: a[calib_rows] for n, a in arrays.items()},
                       f"a seeded 80/20 split of {path.name}'s {len(order)} rows (seed {seed}): 20% judge, "
                       f"80% calibrate; add <input>_test arrays to choose the held-out rows")
