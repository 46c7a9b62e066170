"""Running a model over held-out data: its outputs, accuracy against labels and top-1
agreement with a reference."""

from __future__ import annotations

import numpy as np

from edgepipe.quantize.config import EvalData
from edgepipe.runtime.engine import Engine


def evaluate(engine: Engine, data: EvalData, reference: np.ndarray | None = None,
             batch_size: int = 256) -> tuple[np.ndarray, float | None, float | None]:
    """(first output, accuracy vs labels, top-1 agreement vs reference)."""
    n = min(len(a) for a in data.inputs.values())
    chunks = []
    for i in range(0, n, batch_size):
        feeds = {k: v[i:i + batch_size] for k, v in data.inputs.items()}
        chunks.append(engine.run(feeds)[engine.output_names[0]])
    out = np.concatenate(chunks)
    acc = float((out.argmax(-1) == data.labels[:n]).mean()) if data.labels is not None else None
    agree = float((out.argmax(-1) == reference.argmax(-1)).mean()) if reference is not None else None
    return out, acc, agree
