"""Calibration data for static quantization: numpy batches behind ORT's CalibrationDataReader."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from edgepipe import interrupts

# Input bytes per batch, at most: evaluation and calibration sessions grow their memory with
# the batch (calibration's model outputs every intermediate tensor, so its memory is the batch
# times every activation of the model).
BATCH_BYTES = 4 << 20


# Bytes of intermediate tensors per calibration call, at most: the calibration model outputs every
# one of them, and ORT holds them twice (its arena and the numpy copies). A CNN on full-size images
# computes far more activation bytes per row than its input holds, so rows per call are bounded by
# these bytes, not only by BATCH_BYTES.
ACTIVATION_BYTES = 128 << 20
# Rows per calibration call for a model over this size whose intermediate shapes cannot be
# inferred (a transformer's activations per sequence run to tens of megabytes).
UNKNOWN_LARGE_ROWS, LARGE_MODEL_BYTES = 8, 100_000_000


def calibration_rows(model_path, data: Mapping[str, np.ndarray], cap: int = 32) -> int:
    """Rows per calibration call for `model_path`: as many as keep its intermediate tensors
    within ACTIVATION_BYTES (by shape inference on its graph, without its weights), within the
    input cap of rows_per_batch too."""
    from edgepipe.onnxgraph import activation_bytes, skeleton, symbolic_activation_bytes
    from edgepipe.runtime.modelfile import model_bytes

    cap = rows_per_batch(data, cap)
    row = {k: v[:1] for k, v in data.items()}
    try:
        per_row = activation_bytes(skeleton(model_path), row)
    except Exception:  # shape inference gives up on some graphs: symbolic, then judged by size
        interrupts.reraise()
        per_row = None
    if per_row is None:
        per_row = symbolic_activation_bytes(model_path, row)
    if per_row:
        return max(1, min(cap, ACTIVATION_BYTES // per_row))
    return min(cap, UNKNOWN_LARGE_ROWS) if model_bytes(model_path) > LARGE_MODEL_BYTES else cap


def rows_per_batch(data: Mapping[str, np.ndarray], cap: int, max_bytes: int = BATCH_BYTES) -> int:
    """Up to `cap` rows, but no more than `max_bytes` of input (1 at least)."""
    row_bytes = sum(a[:1].nbytes for a in data.values()) or 1
    return max(1, min(cap, max_bytes // row_bytes))


class ArrayCalibrationReader(CalibrationDataReader):
    """Feeds `samples` rows of `data` (name -> array) in batches; rewindable for repeated use."""

    def __init__(self, data: Mapping[str, np.ndarray], samples: int = 256, batch_size: int = 32):
        self.data = {name: np.ascontiguousarray(a[:samples]) for name, a in data.items()}
        self.count = min(len(a) for a in self.data.values())
        self.batch_size = rows_per_batch(self.data, batch_size)  # batch_size: see calibration_rows
        self._iter: Iterator[dict] | None = None
        self._range = (0, len(self))

    def __len__(self) -> int:
        """Batches: ORT's strided calibration (CalibStridedMinMax) walks them a range at a time,
        so only one range's intermediate tensors are held at once."""
        return -(-self.count // self.batch_size)

    def set_range(self, start_index: int, end_index: int) -> None:
        self._range, self._iter = (start_index, end_index), None

    def _batches(self) -> Iterator[dict]:
        start, end = self._range
        for i in range(start * self.batch_size, min(end * self.batch_size, self.count), self.batch_size):
            yield {name: a[i:i + self.batch_size] for name, a in self.data.items()}

    def get_next(self) -> dict | None:
        if self._iter is None:
            self._iter = self._batches()
        return next(self._iter, None)

    def rewind(self) -> None:
        self._iter, self._range = None, (0, len(self))


@dataclass
class MeasuredRanges:
    """The running (min, max) of named float32 tensors over the calls recorded, and how many rows
    those calls held: what the symmetric every-MatMul layout calibrates on (static_matmul).
    Called as `ranges(feeds, outputs)` after each run; a name is read from the outputs, else
    from the feeds (a MatMul reading a graph input). Min and max ignore a row seen twice."""

    names: list[str]
    rows: int = 0
    values: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __call__(self, feeds: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        for name in self.names:
            value = outputs[name] if name in outputs else feeds.get(name)
            if value is None or value.dtype != np.float32 or not value.size:
                continue
            low, high = float(value.min()), float(value.max())
            seen = self.values.get(name)
            self.values[name] = (low, high) if seen is None else (min(seen[0], low), max(seen[1], high))
        self.rows += min((len(v) for v in feeds.values()), default=0)

    def covers(self, names, rows: int) -> bool:
        """Whether these ranges are a calibration of `names` over exactly `rows` rows."""
        return self.rows == rows and all(n in self.values for n in names)
