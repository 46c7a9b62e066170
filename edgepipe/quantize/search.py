"""The timing search: build candidates, time them interleaved with FP32 at every session
setting, judge each, and confirm an accepted one in fresh trials before it can ship."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from edgepipe import interrupts, onnxfile
from edgepipe.errors import QuantizationError
from edgepipe.memory import return_freed_memory
from edgepipe.metrics import scores
from edgepipe.quantize.bias_correction import correct_biases, source_of
from edgepipe.quantize.budget import Budget, build_kind
from edgepipe.quantize.builders import build_with_fallback, count_integer_nodes
from edgepipe.quantize.candidate import Candidate, by_setting
from edgepipe.quantize.config import EvalData, QuantizeConfig
from edgepipe.quantize.core import Clock
from edgepipe.quantize.evaluation import evaluate, fidelity
from edgepipe.quantize.judging import Judge
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.rewrites import Sources
from edgepipe.quantize.static_matmul import reference_with_ranges
from edgepipe.quantize.verdict import FAILED, SPEED, Verdict
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.sessions import SessionSetting, fastest_per_batch, session_settings
from edgepipe.runtime.spec import make_feeds
from edgepipe.runtime.timing import measure_interleaved

# Candidates are timed one at a time when a joint measurement would hold more weights than this
# (once per setting): that costs more time, so small models are timed all at once, and large ones
# apart, so that every candidate's sessions need not sit in memory together.
PAIRWISE_BYTES = 1 << 30

# Readings all this far above the needed speedup, agreeing within CLEAR_AGREE: one trial confirms.
CLEAR_LEAD, CLEAR_AGREE = 1.2, 1.15


class Search:
    """One classifier quantize run: the FP32 reference, the data, and every candidate tried. Its
    collaborators: the clock (core.Clock), what timing and building cost (budget.Budget) and the
    judge (judging.Judge)."""

    def __init__(self, onnx_path: Path, config: QuantizeConfig, eval_data: EvalData,
                 calibration: EvalData, work: Path, say: Callable[[str], None], *,
                 fp32: Engine | None = None, call_cost: dict[int, float] | None = None,
                 fp32_head: np.ndarray | None = None, tap_ranges: bool = False, clock: Clock | None = None):
        self.onnx_path, self.config, self.eval_data, self.calibration = onnx_path, config, eval_data, calibration
        self.work, self.say = work, say
        self.clock = clock or Clock(config.time_budget_s)
        self._fp32: Engine | None = fp32  # the FP32 evaluation Engine, when the caller has one open
        # tap_ranges: the calibration rows are these; the symmetric layout's ranges come from the
        # reference's calls (its build then runs no calibration pass), unless that fails
        tapped = None
        if tap_ranges:
            self.drop_fp32()  # the tapped model is a second copy of the weights
            tapped = reference_with_ranges(onnx_path, eval_data, work, providers=config.providers,
                                           threads=config.threads, spinning=False)
            if not tapped:
                say("the reference pass could not measure activation ranges: the every-MatMul build calibrates")
        if tapped:
            self.reference, self.fp32_accuracy = tapped.output, tapped.accuracy
            self.calibration = replace(calibration, ranges=tapped.ranges)
            self.inputs, self.fp32_providers = tapped.inputs, tapped.providers
        else:  # fp32_head: FP32's output on the first rows, when sizing the generated rows ran them
            self.reference, self.fp32_accuracy, _ = evaluate(self.fp32, eval_data, head=fp32_head)
            self.inputs = self.fp32.inputs
            self.fp32_providers = list(self.fp32.providers)  # where the search runs (CUDA first on device cuda)
        self.rows = len(self.reference)
        labels = eval_data.labels
        self.fp32_scores = scores(self.reference.argmax(-1), labels[:self.rows]) if labels is not None else None
        self.judging = Judge.of(config, self.reference, labels)
        self.budget = Budget(self.clock, config, self.calibration, self.rows,
                             lambda batch: self.fp32.runner(self.timing_feeds(batch)), dict(call_cost or {}))
        tuned = session_settings(config.threads, spinning=config.try_spinning) if config.tunes_threads else None
        self.sweep = self.budget.sweep_settings(tuned or [SessionSetting(config.threads or os.cpu_count() or 1, False)])
        self.settings = list(dict.fromkeys(s for b in config.batch_sizes for s in self.sweep[b]))  # any batch's
        self.drop_fp32()  # timing makes sessions of its own; building needs the memory
        self.fp32_settings: dict[int, SessionSetting] = {}
        self.fp32_p50: dict[int, float] = {}
        self.fp32_p50_by_setting: dict[SessionSetting, dict[int, float]] = {}
        self.timers: dict[object, dict[SessionSetting, Engine]] = {}  # model key -> a session per setting
        self.candidates: list[Candidate] = []
        self.usable: list[int] = []  # candidates built and evaluated (their sessions released)
        self.sources: Sources | None = None  # set by stage.prepare
        self.choice: str | None = None  # why the chosen one won (set by stage.choose)

    @property
    def fp32(self) -> Engine:
        """The FP32 model's evaluation session, made again when needed after drop_fp32."""
        if self._fp32 is None:
            self._fp32 = self.engine(self.onnx_path, threads=self.config.threads, spinning=False)
        return self._fp32

    def engine(self, path: Path, **options) -> Engine:  # on the CPU, or the GPU with device cuda
        return Engine(path, providers=self.config.providers, **options)

    def drop_fp32(self) -> None:
        """Release the evaluation session (a copy of the weights) while candidates are built."""
        self._fp32 = None
        return_freed_memory()

    # --- building ------------------------------------------------------------------------
    def build(self, recipe: Recipe) -> Candidate:
        """Build and check accuracy (latency comes later, for all candidates together)."""
        cand = Candidate(recipe, path=self.work / f"cand{len(self.candidates)}.onnx")
        index = len(self.candidates)
        twin = self.built(recipe.file_twin) if recipe.backend != "onnxruntime" else None
        twin = twin if twin is not None and twin.error is None else None
        base = self.built(recipe.uncorrected) if recipe.bias_correction and twin is None else None
        base = base if base is not None and base.error is None else None
        self.candidates.append(cand)
        self.say(f"{recipe.name}: the file of {twin.recipe.name}, run by {recipe.backend}" if twin else
                 f"{recipe.name}: the file of {base.recipe.name}, its biases corrected" if base else
                 f"building {recipe.name}")
        with interrupts.attempt() as tried:  # a recipe that fails is recorded; the search goes on
            if twin:  # same file, another runtime: no second build
                onnxfile.copy(twin.path, cand.path)
                cand.built_from, cand.integer_nodes = twin.built_from, twin.integer_nodes
            elif base:  # its file, one FP32 pass over the calibration rows and new bias values
                correct_biases(base.path, source_of(self, base), self.calibration.inputs,
                               self.config.calibration_samples, cand.path, self.work)
                cand.built_from, cand.integer_nodes = base.built_from, base.integer_nodes
            else:
                cand.built_from = build_with_fallback(recipe, self.sources, cand.path, self.calibration,
                                                      self.config.calibration_samples)
                cand.integer_nodes = count_integer_nodes(cand.path)
            if cand.integer_nodes == 0:
                raise QuantizationError("quantized no node")
            engine = self.engine(cand.path, threads=self.config.threads, spinning=False, backend=recipe.backend)
            out, cand.accuracy, cand.agreement = evaluate(engine, self.eval_data, self.reference)
            cand.fidelity = fidelity(out, self.reference)
            self.judging.rate(cand, out)
        if tried.error is not None:
            cand.error = f"{type(tried.error).__name__}: {str(tried.error).strip()[:200]}"
            cand.verdict = Verdict(FAILED)
            return cand
        cand.accuracy_drop = (self.fp32_accuracy - cand.accuracy if self.fp32_accuracy is not None
                              else 1.0 - cand.agreement)
        self.usable.append(index)
        return cand

    def build_kind(self, recipe: Recipe) -> str:
        return build_kind(recipe, self.built)

    def built(self, recipe: Recipe) -> Candidate | None:
        """The candidate already built for `recipe` (exclusions compared as a set), if any."""
        def key(r: Recipe) -> tuple:
            return replace(r, nodes_to_exclude=()), frozenset(r.nodes_to_exclude)

        return next((c for c in self.candidates if key(c.recipe) == key(recipe)), None)

    # --- timing --------------------------------------------------------------------------
    def timing_feeds(self, batch: int) -> dict[str, np.ndarray]:
        """`batch` held-out rows, or generated inputs when there are fewer."""
        feeds = {k: np.ascontiguousarray(v[:batch]) for k, v in self.eval_data.inputs.items()}
        if min(len(v) for v in feeds.values()) < batch:
            feeds = make_feeds(self.inputs, batch=batch, seed=2)
        return feeds

    def sessions(self, key, path: Path, backend: str = "onnxruntime") -> dict[SessionSetting, Engine]:
        if key not in self.timers:
            self.timers[key] = {s: self.engine(path, backend=backend, **s.engine_options())
                                for s in self.settings}
        return self.timers[key]

    def screen(self, indices: list[int]) -> list[int]:
        """A cheap first pass (a quarter of the rounds): the candidates worth timing in full. One
        clearly slower than FP32 (below 80% of the needed speedup at some batch size, past a short
        measurement's noise) keeps its screening figures and verdict, so a search costs what its
        survivors cost. With two candidates or one it cannot pay (FP32 is timed again)."""
        if len(indices) <= 2:
            return indices
        rounds = self.budget.rounds_within("screen", max(2, self.config.rounds // 4), 1 + len(indices),
                                           self.swept(), share=0.25, floor=2)
        self.say(f"screening {len(indices)} candidate(s) against FP32 ({rounds} rounds)")
        self.measure(indices, rounds=rounds)
        floor = 0.8 * self.judging.needed
        kept = []
        for i in indices:
            cand = self.candidates[i]
            slow = {b: v for b, v in cand.speedup.items() if v < floor}
            if slow:
                self.release(i)
                self.judging.judge(cand)
                if cand.verdict.kind == SPEED:
                    cand.verdict = replace(cand.verdict, detail=cand.verdict.detail + " in the screening pass")
                cand.screened = True
            else:
                kept.append(i)
        return kept

    def swept(self, settings: int | None = None) -> dict[int, int]:
        """{batch: session settings timed there}: `settings` at every batch size, or those swept."""
        return {b: settings or len(self.sweep[b]) for b in self.config.batch_sizes}

    def release(self, *keys) -> None:
        """Drop these candidates' timing sessions (weights and an arena for the biggest batch)."""
        for key in keys:
            self.timers.pop(key, None)
        return_freed_memory()

    def measure(self, indices: list[int], rounds: int | None = None) -> None:
        """Time candidates `indices` interleaved with FP32 at every configured batch size and
        session setting; each model is then judged at its own fastest setting per batch size, so
        neither side is handicapped by a setting that suits only the other. Past PAIRWISE_BYTES
        (timed_apart) each candidate is timed with FP32 alone and judged against that timing."""
        large = self.timed_apart(indices)
        groups = [[i] for i in indices] if large else [indices]
        if rounds is None:
            rounds = self.budget.rounds_within("measure", self.config.rounds, sum(1 + len(g) for g in groups),
                                               self.swept(), share=0.5)
        fp32_runs = []
        for group in groups:
            p50 = self.measure_group(group, rounds)
            fp32_runs.append(p50["fp32"])
            fp32_best = {b: p50["fp32"][b][s] for b, s in fastest_per_batch(p50["fp32"]).items()}
            for i in group:
                cand = self.candidates[i]
                cand.settings = fastest_per_batch(p50[i])
                cand.p50_by_setting = by_setting(p50[i], self.settings)
                cand.p50_ms = {b: p50[i][b][s] for b, s in cand.settings.items()}
                cand.speedup = {b: fp32_best[b] / cand.p50_ms[b] for b in cand.p50_ms}
            if large:
                self.release(*group)
        fp32 = {b: {s: float(np.median([run[b][s] for run in fp32_runs])) for s in self.sweep[b]}
                for b in self.config.batch_sizes}
        self.fp32_settings = fastest_per_batch(fp32)
        self.fp32_p50 = {b: fp32[b][s] for b, s in self.fp32_settings.items()}
        self.fp32_p50_by_setting = by_setting(fp32, self.settings)

    def timed_apart(self, indices: list[int]) -> bool:
        """Whether FP32 and `indices` together would hold over PAIRWISE_BYTES of weights."""
        paths = [self.onnx_path, *(self.candidates[i].path for i in indices)]
        return len(indices) > 1 and sum(map(onnxfile.model_bytes, paths)) * len(self.settings) > PAIRWISE_BYTES

    def measure_group(self, indices: list[int], rounds: int | None) -> dict:
        """{"fp32" or index: {batch: {setting: p50 ms}}}, all interleaved in one measurement."""
        models = {"fp32": self.sessions("fp32", self.onnx_path)}
        models |= {i: self.sessions(i, self.candidates[i].path, self.candidates[i].backend) for i in indices}
        p50: dict = {key: {} for key in models}
        for batch in self.config.batch_sizes:
            feeds = self.timing_feeds(batch)
            fns = {(key, s): e.runner(feeds) for key, engines in models.items() for s, e in engines.items()
                   if s in self.sweep[batch]}
            stats = measure_interleaved(fns, batch, rounds=rounds or self.config.rounds,
                                        spinning={key for key in fns if key[1].spinning})
            for (key, s), st in stats.items():
                p50[key].setdefault(batch, {})[s] = st.p50_ms
        return p50

    def confirm(self, cand: Candidate, trials: int = 2, share: float = 0.5) -> bool:
        """Re-time an accepted candidate against FP32 in `trials` more trials, each with fresh
        sessions, and judge it on the median trial per batch size. One trial can mislead: on a
        small CPU a session pair sometimes lands in a slow thread hand-off state for its whole
        life, so a slower model can read as faster, and a slower model must never ship: the
        median must clear the margin and no trial may read below min_speedup. A first trial that
        agrees with the screening figure by a wide lead (clear_lead) ends it. When the time
        budget holds fewer rounds than wanted, a candidate whose first figure already leads that
        widely is re-timed over 2, not 3 (a misleading trial reads far off, not within
        CLEAR_AGREE)."""
        seen = {b: [s] for b, s in cand.speedup.items()}
        rounds = self.budget.rounds_within("confirm", self.config.rounds, 2 * trials, self.swept(1), share=share,
                                           floor=2 if self.clear_lead(seen) else 3)
        for trial in range(trials):
            if trial and self.clear_lead(seen):
                break
            fp32 = self.engine(self.onnx_path, batch_sessions=self.fp32_settings)
            mine = self.engine(cand.path, batch_sessions=cand.settings, backend=cand.backend)
            for batch in self.config.batch_sizes:
                feeds = self.timing_feeds(batch)
                spinning = {k for k, s in (("fp32", self.fp32_settings[batch]), ("cand", cand.settings[batch]))
                            if s.spinning}
                stats = measure_interleaved({"fp32": fp32.runner(feeds), "cand": mine.runner(feeds)},
                                            batch, rounds=rounds, spinning=spinning)
                seen[batch].append(stats["fp32"].p50_ms / stats["cand"].p50_ms)
            del fp32, mine  # else their weights sit beside the next trial's
        cand.speedup = {b: float(np.median(v)) for b, v in seen.items()}
        cand.speedup_trials = {b: [round(x, 3) for x in v] for b, v in seen.items()}
        cand.p50_ms = {b: self.fp32_p50[b] / cand.speedup[b] for b in cand.speedup}
        self.judging.judge(cand)
        slower = {b: min(v) for b, v in seen.items() if min(v) < self.config.min_speedup}
        if cand.verdict and slower:  # no trial may have measured it slower than FP32
            cand.verdict = Verdict.slower_in_a_trial(slower, self.config.min_speedup)
        if not cand.verdict:
            cand.verdict = cand.verdict.unconfirmed(len(next(iter(seen.values()))) - 1)
        return bool(cand.verdict)

    def clear_lead(self, seen: dict[int, list[float]]) -> bool:
        """Whether every reading at every batch size clears the needed speedup by CLEAR_LEAD and
        the readings of each batch size agree within CLEAR_AGREE."""
        return all(min(v) >= self.judging.needed * CLEAR_LEAD and max(v) <= min(v) * CLEAR_AGREE for v in seen.values())
