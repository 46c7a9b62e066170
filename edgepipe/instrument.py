"""Instrumented runs of ONNX graphs: intermediate tensors made graph outputs, compared with a
reference by SQNR and channel-averaged noise. Used by `compare` (where two graphs diverge) and
by the quantizer (which nodes add the most error).

Marking intermediate tensors as outputs changes what onnxruntime fuses (a QDQ model ran 3.6x
slower and changed its outputs), so these numbers only *locate* and *rank*; every verdict is
measured again on the unmodified model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from edgepipe import onnxfile
from edgepipe.runtime.sessions import new_session

CAP_DB = 100.0  # SQNR of an exact tensor (graph inputs): large, finite


def sqnr_db(reference: np.ndarray, actual: np.ndarray) -> float:
    signal = float(np.sum(np.square(reference, dtype=np.float64)))
    noise = float(np.sum(np.square(reference.astype(np.float64) - actual.astype(np.float64))))
    if noise == 0.0:
        return CAP_DB
    if signal == 0.0:
        return -CAP_DB
    return min(CAP_DB, 10.0 * math.log10(signal / noise))


class ChannelNoise:
    """Per-channel signal and noise energy, accumulated over chunks of rows: the same figure as
    one pass over all rows, with one chunk's tensors in memory."""

    def __init__(self) -> None:
        self.signal: np.ndarray | None = None
        self.noise: np.ndarray | None = None
        self.mismatch = False

    def add(self, reference: np.ndarray, actual: np.ndarray) -> "ChannelNoise":
        if reference.shape != actual.shape or reference.ndim == 0:
            self.mismatch = True
            return self
        axis = 1 if reference.ndim == 4 else reference.ndim - 1
        ref = np.moveaxis(reference.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
        act = np.moveaxis(actual.astype(np.float64), axis, 0).reshape(reference.shape[axis], -1)
        signal, noise = np.sum(ref ** 2, axis=1), np.sum((ref - act) ** 2, axis=1)
        self.signal = signal if self.signal is None else self.signal + signal
        self.noise = noise if self.noise is None else self.noise + noise
        return self

    def nsr(self) -> float:
        if self.mismatch or self.signal is None:
            return 1.0
        live = self.signal > 0
        if not live.any():
            return float(self.noise.sum() > 0)
        return float(np.mean(np.minimum(self.noise[live] / self.signal[live], 1.0)))


def channel_nsr(reference: np.ndarray, actual: np.ndarray) -> float:
    """Noise-to-signal ratio averaged over channels (axis 1 of 4-D, else the last axis).

    Whole-tensor SQNR is dominated by the largest channel: per-tensor quantization that wipes
    out every channel but one outlier still scores ~40 dB. Averaging per channel does not hide it.
    """
    return ChannelNoise().add(reference, actual).nsr()


def instrumented_copy(path: Path, names: list[str], work: Path) -> Path:
    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    out = work / f"instrumented_{path.name}"
    onnxfile.save(model, out)
    return out


def run_all(path: Path, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = new_session(path)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, dict(feeds))))


def run_in_chunks(path: Path, feeds: Mapping[str, np.ndarray], rows: int):
    """Every output of `path` for `rows` rows at a time (one session): what an instrumented
    model holds at once stays bounded by a chunk, not by the whole probe."""
    session = new_session(path)
    names = [o.name for o in session.get_outputs()]
    total = min(len(v) for v in feeds.values())
    for start in range(0, total, rows):
        yield dict(zip(names, session.run(names, {k: v[start:start + rows] for k, v in feeds.items()})))


def after_qdq(graph: onnx.GraphProto) -> dict[str, str]:
    """tensor -> the DequantizeLinear output that replaces it downstream (QDQ models keep the
    original name for the value *before* quantization)."""
    quantized = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    dequantized = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    return {t: dequantized[q] for t, q in quantized.items() if q in dequantized}
