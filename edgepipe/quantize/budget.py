"""What timing and building cost in a classifier quantize search, against its Clock: the FP32
call cost per batch size, the timing rounds that fit in a share of the budget left, the session
settings worth sweeping, and each build's estimated seconds. A collaborator of Search
(`search.budget`), given what it reads; it never reaches into the search."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from edgepipe.quantize.config import EvalData, QuantizeConfig
from edgepipe.quantize.core import Clock
from edgepipe.runtime.sessions import SessionSetting
from edgepipe.runtime.timing import BLOCK_S, WARMUP_S

# A calibration pass costs this many plain FP32 calls per row, with the load, rewrite and save
# of a static build: its model outputs every intermediate tensor and each is copied out. The
# symmetric every-MatMul layout reads only MatMul inputs and writes its graph directly
# (static_matmul): about a dynamic build's load and save plus a little over its calibration
# rows' FP32 calls. benchmarks/hf_models.py measures the builds these factors estimate.
CALIBRATION_FACTOR = {"static": 3.0, "symmetric": 1.3}
# Bias correction from a built file: one FP32 pass over the calibration rows that also outputs
# every corrected layer's input (a subset of what a calibration pass copies out), then an INT8
# pass for the layers that write a graph output, then new biases.
BIAS_CORRECTION_FACTOR = 1.5

# At a batch size whose FP32 call takes longer than this, all cores alone are timed: one thread
# wins only on calls too short for a thread hand-off to pay, and timing it on longer calls only
# doubles the measurement (benchmarks/threads_bench.py).
SWEEP_MAX_CALL_S = 0.002


class Built(Protocol):
    """A candidate as the budget reads it: whether its file was built."""

    error: str | None


def build_kind(recipe, built: Callable[[object], Built | None]) -> str:
    """What building `recipe` costs like: its method ("symmetric" for static_matmul's layout),
    "twin" when another backend's recipe already built its file (copied and evaluated, not
    built again), or "bias-correction" when its uncorrected file is built (corrected from it).
    `built(recipe)`: the candidate built for a recipe so far, if any."""
    if recipe.backend != "onnxruntime":
        twin = built(recipe.file_twin)
        if twin is not None and twin.error is None:
            return "twin"
    if recipe.bias_correction:
        base = built(recipe.uncorrected)
        if base is not None and base.error is None:
            return "bias-correction"
    return "symmetric" if recipe.symmetric else recipe.method


@dataclass
class Budget:
    clock: Clock
    config: QuantizeConfig
    calibration: EvalData  # the calibration rows (and their ranges, when the reference pass measured them)
    rows: int  # held-out rows each evaluation runs
    fp32_runner: Callable[[int], Callable[[], object]]  # an FP32 call at a batch size, to measure its cost
    call_costs: dict[int, float] = field(default_factory=dict)  # FP32 seconds per call, per batch

    def build_estimate(self, kind: str, seconds: dict[str, list[float]]) -> float:
        """Seconds a build of `kind` (build_kind) and its evaluation should take, from `seconds`
        (the builds so far, per kind): its kind's last; for a first twin its evaluation (the
        held-out rows at one FP32 call each), and for a first bias correction that and its pass
        over the calibration rows (BIAS_CORRECTION_FACTOR FP32 calls each); for a first static
        build the last build's plus its calibration (the calibration rows at CALIBRATION_FACTOR
        FP32 calls each), none for the every-MatMul layout when the reference pass measured its
        ranges."""
        if seconds.get(kind):
            return seconds[kind][-1]
        batch = min(self.call_costs, default=0)  # the smallest batch's per-row cost: the highest
        per_row = self.call_costs[batch] / batch if batch else 0.0
        rows = min(self.config.calibration_samples, min(len(v) for v in self.calibration.inputs.values()))
        if kind in ("twin", "bias-correction"):
            return (self.rows + (BIAS_CORRECTION_FACTOR * rows if kind == "bias-correction" else 0)) * per_row
        last = max((v[-1] for v in seconds.values() if v), default=0.0)
        if kind not in CALIBRATION_FACTOR or kind == "symmetric" and self.calibration.ranges is not None:
            return last  # the reference pass measured the every-MatMul layout's ranges
        return last + CALIBRATION_FACTOR[kind] * rows * per_row

    def build_fits(self, kind: str, seconds: dict[str, list[float]], fraction: float) -> bool:
        """Whether a build of `kind` would end within `fraction` of the budget (always, without one)."""
        return not self.clock.out_of_time(fraction, ahead=self.build_estimate(kind, seconds))

    def call_cost(self) -> dict[int, float]:
        """FP32 seconds per call at each batch size (one timed call after one warm-up)."""
        for batch in self.config.batch_sizes:
            if batch not in self.call_costs:
                run = self.fp32_runner(batch)
                run()
                began = time.perf_counter()
                run()
                self.call_costs[batch] = time.perf_counter() - began
        return {b: self.call_costs[b] for b in self.config.batch_sizes}

    def rounds_within(self, phase: str, wanted: int, models: int, settings: dict[int, int], share: float,
                      floor: int = 3) -> int:
        """`wanted` timing rounds, or as many as fit in `share` of the budget left (`floor` at
        least: below that a ratio is noise). One round times each of `models` at
        `settings[batch]` session settings at every batch size; each costs a call or a block
        (measure_interleaved)."""
        left = self.clock.left()
        if left is not None:
            cost = self.call_cost()
            per_round = models * sum(settings[b] * max(BLOCK_S, c) for b, c in cost.items())
            warm_up = models * sum(settings[b] * (c if c >= WARMUP_S else 2 * c + min(WARMUP_S, 8 * c))
                                   for b, c in cost.items())
            wanted = max(min(floor, wanted), min(wanted, int((left * share - warm_up) / per_round)))
        self.clock.rounds_used[phase] = wanted
        return wanted

    def sweep_settings(self, settings: list[SessionSetting]) -> dict[int, list[SessionSetting]]:
        """{batch: the session settings timed there}: all of `settings` where an FP32 call is
        short enough for thread hand-offs to decide (SWEEP_MAX_CALL_S), else all cores alone."""
        if len(settings) == 1 and not self.clock.budget_s:
            return {b: list(settings) for b in self.config.batch_sizes}
        cost = self.call_cost()  # the budget needs it too
        full = max(settings, key=lambda s: (s.threads, -s.spinning))
        return {b: list(settings) if cost[b] <= SWEEP_MAX_CALL_S else [full] for b in self.config.batch_sizes}
