"""The time side of a quantize search: phases timed (seconds and peak memory), the budget left,
and how many timing rounds fit in it. A mixin of Search, which provides config, fp32, calibration,
sweep, started, phases, phase_peaks, rounds_used, rows, built, _call_cost and timing_feeds."""

from __future__ import annotations

import time
from contextlib import contextmanager

from edgepipe.memory import PeakMemory, return_freed_memory
from edgepipe.runtime.sessions import SessionSetting
from edgepipe.runtime.timing import BLOCK_S, WARMUP_S

# A calibration pass costs this many plain FP32 calls per row: its model outputs every
# intermediate tensor and each is copied out (BERT-base: 19.7 s for a static build on 32 rows of
# 138 ms; ViT-base about 19 s on 32 of 222 ms; with the load, rewrite and save, 3x covers both).
# The symmetric every-MatMul layout reads only MatMul inputs and writes its graph directly
# (static_matmul): 8.8 s for BERT-base and 10.5 s for ViT-base, about the load and save of a
# dynamic build plus 1.3x their calibration rows' FP32 calls.
CALIBRATION_FACTOR = {"static": 3.0, "symmetric": 1.3}
# Bias correction from a built file: one FP32 pass over the calibration rows that also outputs
# every corrected layer's input (a subset of what a calibration pass copies out), then an INT8
# pass for the layers that write a graph output, then new biases.
BIAS_CORRECTION_FACTOR = 1.5

# At a batch size whose FP32 call takes longer than this, all cores alone are timed. One thread
# won only on calls under half a millisecond here (the zoo's MLP, LSTM and transformer at batch 1,
# 0.04-0.4 ms); two were 1.4-1.9x faster from 0.7 ms up (zoo CNN at batch 32, MobileNetV2's 5 ms,
# ResNet-50's 48 and 360 ms), and timing one thread there doubled the measurement.
SWEEP_MAX_CALL_S = 0.002


class TimeBudget:
    @contextmanager
    def phase(self, name: str):
        """Time a phase (seconds add up over repeats) and record its peak RSS (the highest)."""
        return_freed_memory()  # what the phase before freed is not this phase's peak
        began = time.perf_counter()
        peak = PeakMemory()
        try:
            with peak:
                yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - began, 2)
            if peak.scope == "work" and peak.mb is not None:
                self.phase_peaks[name] = max(self.phase_peaks.get(name, 0.0), peak.mb)

    def out_of_time(self, fraction: float = 1.0, ahead: float = 0.0) -> bool:
        """Whether `fraction` of the configured time budget is spent, or would be after `ahead`
        more seconds (never, without one)."""
        budget = self.config.time_budget_s
        return budget is not None and time.perf_counter() - self.started + ahead >= fraction * budget

    def build_kind(self, recipe) -> str:
        """What building `recipe` costs like: its method ("symmetric" for static_matmul's layout),
        "twin" when another backend's recipe already built its file (copied and evaluated, not
        built again), or "bias-correction" when its uncorrected file is built (corrected from it)."""
        if recipe.backend != "onnxruntime":
            twin = self.built(recipe.file_twin)
            if twin is not None and twin.error is None:
                return "twin"
        if recipe.bias_correction:
            base = self.built(recipe.uncorrected)
            if base is not None and base.error is None:
                return "bias-correction"
        return "symmetric" if recipe.symmetric else recipe.method

    def build_estimate(self, recipe, seconds: dict[str, list[float]]) -> float:
        """Seconds building and evaluating `recipe` should take, from `seconds` (the builds so
        far, per build_kind): its kind's last; for a first twin its evaluation (the held-out
        rows at one FP32 call each), and for a first bias correction that and its pass over the
        calibration rows (BIAS_CORRECTION_FACTOR FP32 calls each); for a first static build the last build's plus its
        calibration (the calibration rows at CALIBRATION_FACTOR FP32 calls each), none for the
        every-MatMul layout when the reference pass measured its ranges."""
        kind = self.build_kind(recipe)
        if seconds.get(kind):
            return seconds[kind][-1]
        batch = min(self._call_cost, default=0)  # the smallest batch's per-row cost: the highest
        per_row = self._call_cost[batch] / batch if batch else 0.0
        rows = min(self.config.calibration_samples, min(len(v) for v in self.calibration.inputs.values()))
        if kind in ("twin", "bias-correction"):
            return (self.rows + (BIAS_CORRECTION_FACTOR * rows if kind == "bias-correction" else 0)) * per_row
        last = max((v[-1] for v in seconds.values() if v), default=0.0)
        if kind not in CALIBRATION_FACTOR or kind == "symmetric" and self.calibration.ranges is not None:
            return last  # the reference pass measured the every-MatMul layout's ranges
        return last + CALIBRATION_FACTOR[kind] * rows * per_row

    def build_fits(self, recipe, seconds: dict[str, list[float]], fraction: float) -> bool:
        """Whether `recipe`'s build would end within `fraction` of the budget (always, without one)."""
        return not self.out_of_time(fraction, ahead=self.build_estimate(recipe, seconds))

    def left(self) -> float | None:
        """Seconds of the time budget left (None without one)."""
        budget = self.config.time_budget_s
        return None if budget is None else budget - (time.perf_counter() - self.started)

    def call_cost(self) -> dict[int, float]:
        """FP32 seconds per call at each batch size (one timed call after one warm-up)."""
        for batch in self.config.batch_sizes:
            if batch not in self._call_cost:
                run = self.fp32.runner(self.timing_feeds(batch))
                run()
                began = time.perf_counter()
                run()
                self._call_cost[batch] = time.perf_counter() - began
        return {b: self._call_cost[b] for b in self.config.batch_sizes}

    def rounds_within(self, phase: str, wanted: int, models: int, settings: int | None, share: float,
                      floor: int = 3) -> int:
        """`wanted` timing rounds, or as many as fit in `share` of the budget left (`floor` at
        least: below that a ratio is noise). One round times each of `models` at `settings`
        session settings (None: those swept at each batch size) and every batch size; each costs
        a call or a block (measure_interleaved)."""
        left = self.left()
        if left is not None:
            cost = self.call_cost()
            n = {b: settings or len(self.sweep[b]) for b in cost}
            per_round = models * sum(n[b] * max(BLOCK_S, c) for b, c in cost.items())
            warm_up = models * sum(n[b] * (c if c >= WARMUP_S else 2 * c + min(WARMUP_S, 8 * c))
                                   for b, c in cost.items())
            wanted = max(min(floor, wanted), min(wanted, int((left * share - warm_up) / per_round)))
        self.rounds_used[phase] = wanted
        return wanted

    def sweep_settings(self, settings: list[SessionSetting]) -> dict[int, list[SessionSetting]]:
        """{batch: the session settings timed there}: all of `settings` where an FP32 call is
        short enough for thread hand-offs to decide (SWEEP_MAX_CALL_S), else all cores alone."""
        if len(settings) == 1 and not self.config.time_budget_s:
            return {b: list(settings) for b in self.config.batch_sizes}
        cost = self.call_cost()  # the budget needs it too
        full = max(settings, key=lambda s: (s.threads, -s.spinning))
        return {b: list(settings) if cost[b] <= SWEEP_MAX_CALL_S else [full] for b in self.config.batch_sizes}
