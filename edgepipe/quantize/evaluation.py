"""Running a model over held-out data: its outputs, accuracy against labels and top-1
agreement with a reference."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe.metrics import Interval, judged, paired_drop
from edgepipe.quantize.calibration import rows_per_batch
from edgepipe.quantize.config import EvalData
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.spec import make_feeds
from edgepipe.runtime.timing import WARMUP_S, time_call


def evaluate(engine: Engine, data: EvalData, reference: np.ndarray | None = None,
             batch_size: int | None = None, head: np.ndarray | None = None, tap=None
             ) -> tuple[np.ndarray, float | None, float | None]:
    """(first output, accuracy vs labels, top-1 agreement vs reference). `head`: the first output
    of `engine` on the first len(head) rows, already computed (those rows are not run again).
    `tap(feeds, outputs)` sees every call's feeds and outputs (calibration.MeasuredRanges)."""
    n = min(len(a) for a in data.inputs.values())
    batch_size = batch_size or rows_per_batch(data.inputs, 256)
    chunks = [] if head is None else [head]
    for i in range(0 if head is None else len(head), n, batch_size):
        feeds = {k: v[i:i + batch_size] for k, v in data.inputs.items()}
        outputs = engine.run(feeds)
        if tap is not None:
            tap(feeds, outputs)
        chunks.append(outputs[engine.output_names[0]])
    out = np.concatenate(chunks)
    acc = float(np.equal(*judged(out.argmax(-1), data.labels)).mean()) if data.labels is not None else None
    agree = float((out.argmax(-1) == reference.argmax(-1)).mean()) if reference is not None else None
    return out, acc, agree


def fidelity(out: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How closely a candidate's first output follows FP32's, independent of labels: relative L2
    error over all rows, and the mean per-row cosine similarity."""
    out = out.reshape(len(out), -1).astype(np.float64)
    ref = reference.reshape(len(reference), -1).astype(np.float64)
    rel_l2 = float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cosine = float(np.mean(np.sum(out * ref, axis=1) / np.maximum(norms, 1e-30)))
    return {"rel_l2": rel_l2, "cosine": cosine}


@dataclass(frozen=True)
class Flips:
    """Rows a candidate got wrong that FP32 got right (losses), and the reverse (gains), against
    labels, or against FP32's top-1 without labels (gains are then 0)."""

    losses: int
    gains: int
    rows: int

    @property
    def drop(self) -> float:
        return (self.losses - self.gains) / self.rows

    @property
    def interval(self) -> Interval:
        """The drop with its 95% interval (metrics.paired_drop)."""
        return paired_drop(self.losses, self.gains, self.rows)

    @property
    def drop_lower_bound(self) -> float:
        """The interval's lower end: above the budget, the candidate is worse than allowed beyond
        the noise of `rows` rows."""
        return self.interval.low


def flips(out: np.ndarray, reference: np.ndarray, labels: np.ndarray | None) -> Flips:
    mine, theirs = out.argmax(-1), reference.argmax(-1)
    if labels is None:  # every position of an output with one (token classification) counts
        return Flips(int((mine != theirs).sum()), 0, mine.size)
    (mine, truth), (theirs, _) = judged(mine, labels), judged(theirs, labels)
    return Flips(int(((theirs == truth) & (mine != truth)).sum()), int(((theirs != truth) & (mine == truth)).sum()),
                 len(mine))


def resolves(rows: int, budget: float) -> bool:
    """Whether `rows` rows can resolve an accuracy budget: one row's flip is at most half of it.
    With fewer (a 1-point budget on 32 rows makes one flip 3.1 points), a measured drop above
    the budget is judged by its confidence bound instead of its point value."""
    return budget > 0 and 1.0 / rows <= budget / 2


def generated_eval_data(onnx_path: Path, seconds: float = 3.0, max_bytes: int = 64 << 20, *,
                        engine: Engine | None = None, call_cost: dict[int, float] | None = None,
                        head: list[np.ndarray] | None = None) -> EvalData:
    """Seeded rows to judge agreement on: 512 for a cheap model, fewer for one whose evaluation
    would cost more than `seconds` per candidate or whose rows would hold more than `max_bytes`
    (32 at least). Fewer rows
    resolve a budget less finely; the accuracy rule then judges by the drop's confidence bound,
    and the record's relative L2 error and cosine against FP32 do not depend on row count.
    `engine`: the FP32 one to time (made here without it); `call_cost` gets its seconds per
    call at batch 1 and 8 (the search's own figures, not measured twice). A costly model's
    batch-8 call is timed without a warm-up of its own: the one at batch 1 set its session up,
    and a second slow call would only add its cost. The calls run the first rows
    themselves, so `head` gets the timed batch-8 call's first output: FP32's on the first 8 rows,
    which the reference then need not run again."""
    engine = engine or Engine(onnx_path, providers="cpu")
    row_bytes = sum(a.nbytes for a in make_feeds(engine.inputs, batch=1, seed=1).values())
    data = make_feeds(engine.inputs, batch=int(min(512, max(32, max_bytes / row_bytes)) // 32 * 32), seed=1)
    run_one = engine.runner({k: v[:1] for k, v in data.items()})
    run_eight = engine.runner({k: v[:8] for k, v in data.items()})
    outputs: list = []
    eight = lambda: outputs.append(run_eight()[0])  # noqa: E731  (the first output, as evaluate keeps)
    run_one()  # warm-up
    costs = {1: time_call(run_one)}
    if 8 * costs[1] < WARMUP_S:
        eight()
    costs[8] = time_call(eight)
    per_row = costs[8] / 8
    if call_cost is not None:
        call_cost.update(costs)
    if head is not None:  # a copy: onnxruntime's output is a view that keeps the session's
        head.append(outputs[-1].copy())  # arena alive through the whole search
    rows = int(min(len(next(iter(data.values()))), max(32, seconds / max(per_row, 1e-9))) // 32 * 32)
    return EvalData({k: v[:rows].copy() for k, v in data.items()})
