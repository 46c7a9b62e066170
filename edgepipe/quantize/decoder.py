"""Decoder quantization: weight-only INT4 (MatMulNBits built by RTN, HQQ or GPTQ, at several
block sizes, with INT8 or FP32 compute) and dynamic INT8, each measured on this CPU for its time
per output token, and judged for quality against FP32 by

- the perplexity increase on held-out text (mean negative log-likelihood per token, in nats),
- greedy-token agreement: FP32 continues a fixed set of prompts greedily; the candidate reads
  each prompt and continuation and must predict the same next token at every position.

The search runs on the core every quantize search shares (core.py: its Clock and time budget,
when building stops, the speedup needed and the choice), with Verdicts as the classifier search
records them; what is its own is the strategy: the recipes, the Probe that measures quality and
time per output token, and the quality budgets. The fastest candidate whose quality holds and
which beats FP32 by the speedup margin is written (within the margin of it, the one with the
smallest perplexity increase); when none is, nothing is written and the error carries every
candidate's row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepipe import interrupts, onnxfile
from edgepipe.artifacts import StageResult, require_file
from edgepipe.errors import AccuracyError, InputError, LatencyError, first_line
from edgepipe.memory import PeakMemory
from edgepipe.metrics import bootstrap_mean
from edgepipe.quantize.config import DECODER_TIME_BUDGET_S
from edgepipe.quantize.core import LATE_BUILD_SHARE, Clock, needed_speedup, pick
from edgepipe.quantize.decoder_build import BY_NAME, RECIPES, DecoderRecipe, build
from edgepipe.quantize.decoder_measure import Probe, greedy_reference
from edgepipe.quantize.verdict import CHOSEN, FAILED, NOT_TRIED, OK, OUT_OF_TIME, Verdict
from edgepipe.reports import Report, optional
from edgepipe.runtime.decoder_profile import time_per_token
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import (
    DECODER_KEY,
    DecoderSpec,
)
from edgepipe.runtime.hardware import read_cpu
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.workdirs import work_dir


@dataclass
class DecoderQuantizeConfig:
    recipes: tuple[str, ...] = ()  # empty: all of RECIPES
    max_nll_increase: float = 0.1  # nats per token over FP32 on the held-out text
    min_agreement: float = 0.9  # greedy next-token agreement with FP32
    batch_sizes: tuple[int, ...] = (1,)  # time per output token at each; faster at every one
    past_length: int = 128  # cached positions when timing a decode step (capped by the context)
    text_windows: int = 8
    window: int = 128
    prompts: int = 8
    prompt_length: int = 16
    steps: int = 16
    time_budget_s: float = DECODER_TIME_BUDGET_S  # 0: no limit; no build starts past LATE_BUILD_SHARE of it
    require_faster: bool = True  # False: a candidate slower than FP32 may be chosen (for its size)
    # A candidate must beat FP32's time per token by this fraction at every batch size; speedups
    # within it of the fastest are a tie, which the smallest perplexity increase wins.
    speedup_margin: float = 0.05
    calibration_windows: int = 4  # GPTQ's calibration prefills

    def __post_init__(self):
        unknown = [r for r in self.recipes if r not in BY_NAME]
        if unknown:
            raise InputError(f"unknown decoder recipe(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
        if self.max_nll_increase < 0 or not 0 <= self.min_agreement <= 1:
            raise InputError("max_nll_increase must be >= 0 and min_agreement within 0..1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InputError("batch sizes must be positive")
        if self.speedup_margin < 0:
            raise InputError("speedup_margin must be >= 0")

    @property
    def needed(self) -> float:
        """The speedup in time per output token a candidate needs at every batch size."""
        return needed_speedup(1.0, self.speedup_margin)

    @property
    def chosen_recipes(self) -> list[DecoderRecipe]:
        """Those named, else every recipe (the opt-in ones as rows that say how to try them)."""
        return [r for r in RECIPES if r.name in self.recipes or not self.recipes]


@dataclass
class DecoderQuantizeReport(Report):
    stage = "quantize"

    source: str
    cpu: dict
    judged_on: str
    budgets: dict  # max_nll_increase, min_agreement, speedup_margin, past_length, ttft_prompt
    fp32: dict  # tpot_ms per batch, ttft_ms, nll, size_bytes
    candidates: list[dict]  # one row per recipe (DecoderCandidate.row): quality, speed, size, verdict
    chosen: str | None
    seconds: float
    phases: dict = field(default_factory=dict)
    peak_mb: float | None = None
    kind: str = "decoder"
    size_bytes: int | None = optional()


def decoder_spec_of(path: Path) -> DecoderSpec | None:
    text = onnx_metadata(path).get(DECODER_KEY)
    return None if text is None else DecoderSpec.from_json(text)


def _text(spec: DecoderSpec, config: DecoderQuantizeConfig, ids: np.ndarray | None) -> tuple[np.ndarray, str]:
    from edgepipe.models import text

    if ids is not None:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[1] < 2:
            raise InputError(f"held-out token ids must be [rows, length >= 2], got shape {list(ids.shape)}")
        if ids.min() < 0 or ids.max() >= spec.vocab_size:
            raise InputError(f"held-out token ids outside the vocabulary (0..{spec.vocab_size - 1})")
        return ids, f"{ids.size} given held-out tokens ({ids.shape[0]} rows)"
    if spec.vocab_size < 256:
        raise InputError(f"the bundled text is byte tokens (ids 0..255) but the vocabulary has {spec.vocab_size}; "
                         "give held-out token ids (--data with input_ids)")
    length = min(config.window, spec.max_positions)
    windows = text.windows(text.token_ids("heldout"), length, config.text_windows)
    return windows, f"{windows.size} tokens of bundled held-out text (bytes; {len(windows)} windows of {length})"


@dataclass
class DecoderCandidate:
    """One recipe through the search: its verdict and, once built and measured, its file and the
    Probe's figures (FP32's are the same shape)."""

    recipe: DecoderRecipe
    verdict: Verdict = field(default_factory=Verdict)
    path: Path | None = None
    measured: dict = field(default_factory=dict)  # Probe.measure: nll, perplexity, agreement, tpot_ms, ...
    build_s: float | None = None
    measure_s: float | None = None
    nll_increase: float | None = None
    nll_increase_interval: dict | None = None
    speedup: dict[str, float] = field(default_factory=dict)  # FP32's time per token / its own, per batch

    @property
    def slowest(self) -> float:
        return min(self.speedup.values())

    def row(self) -> dict:
        """As the report holds it: no path, no per-window arrays; the verdict as text."""
        row = {"recipe": self.recipe.name, "describe": self.recipe.describe}
        row |= {k: v for k, v in self.measured.items() if not k.startswith("_")}
        for key in ("build_s", "measure_s", "nll_increase", "nll_increase_interval"):
            if getattr(self, key) is not None:
                row[key] = getattr(self, key)
        if self.speedup:
            row["speedup"] = self.speedup
        return row | {"verdict": str(self.verdict)}


def _candidate(recipe: DecoderRecipe, config: DecoderQuantizeConfig, onnx_path: Path, spec: DecoderSpec, work: Path,
               calibration: np.ndarray, probe: Probe, fp32: dict, clock: Clock,
               say: Callable[[str], None]) -> DecoderCandidate:
    """One recipe: not tried, skipped for time, failed, or built, measured and judged."""
    cand = DecoderCandidate(recipe)
    if recipe.opt_in and not config.recipes:
        cand.verdict = Verdict(NOT_TRIED, detail=recipe.opt_in)
        return cand
    if clock.out_of_time(LATE_BUILD_SHARE):  # each build is measured as it is made: no timing later
        cand.verdict = Verdict(OUT_OF_TIME, threshold=clock.budget_s)
        return cand
    cand.path = work / f"{recipe.name}.onnx"
    say(f"building {recipe.name}: {recipe.describe}")
    for step in ("build", "measure"):
        began = clock.elapsed()
        with interrupts.attempt() as tried:  # the builders raise many types on shapes they do not support
            if step == "build":
                build(recipe, onnx_path, cand.path, spec, calibration)
            else:
                cand.measured = probe.measure(cand.path)
        if tried.error is not None:
            cand.verdict = Verdict(FAILED, detail=f"to {'build' if step == 'build' else 'run'}: "
                                                  f"{first_line(tried.error)[:200]}")
            return cand
        setattr(cand, f"{step}_s", round(clock.elapsed() - began, 2))
    _judge(cand, fp32, config)
    say(f"  {recipe.name}: {cand.verdict}")
    return cand


def quantize_decoder(onnx_path: str | Path, out_path: str | Path, config: DecoderQuantizeConfig | None = None, *,
                     heldout_ids: np.ndarray | None = None,
                     progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: an exported decoder -> its fastest quantized model whose quality holds. Raises
    AccuracyError / LatencyError (exit 1) with every candidate in `report` when none qualifies."""
    config = config or DecoderQuantizeConfig()
    onnx_path = require_file(onnx_path, "ONNX model")
    spec = decoder_spec_of(onnx_path)
    if spec is None:
        raise InputError(f"{onnx_path.name} is not a decoder exported by edgepipe (no '{DECODER_KEY}' metadata)")
    say = progress or (lambda message: None)
    clock = Clock(config.time_budget_s)
    windows, judged = _text(spec, config, heldout_ids)
    prompt_length = min(config.prompt_length, windows.shape[1] - 1)
    steps = max(0, min(config.steps, spec.max_positions - prompt_length - 1))
    peak = PeakMemory()
    with peak, work_dir("decq") as work:
        with Engine(onnx_path, providers="cpu") as fp32:
            prompts = windows[: config.prompts, :prompt_length] if steps else windows[:0, :prompt_length]
            sequences = greedy_reference(fp32, spec, prompts, steps)
        probe = Probe(spec, windows, sequences, prompt_length, tuple(config.batch_sizes),
                       past=min(config.past_length, spec.max_positions - 1),
                       prompt_for_ttft=min(128, spec.max_positions))
        say(f"FP32: measuring quality on {judged} and {sequences.size and len(sequences)} greedy prompts, "
            f"and time per token at batch {list(config.batch_sizes)}")
        with clock.phase("fp32"):
            fp32_row = probe.measure(onnx_path)
        calibration = windows[: config.calibration_windows]
        with clock.phase("candidates"):
            cands = [_candidate(recipe, config, onnx_path, spec, work, calibration, probe, fp32_row, clock, say)
                     for recipe in config.chosen_recipes]
        with clock.phase("fp32_again"), Engine(onnx_path, providers="cpu") as engine:  # the machine drifts
            again = {str(b): round(time_per_token(engine, spec, b, probe.past), 3) for b in config.batch_sizes}
        fp32_row["tpot_ms_first"] = fp32_row["tpot_ms"]
        fp32_row["tpot_ms"] = {b: round(min(fp32_row["tpot_ms"][b], again[b]), 3) for b in again}
        for cand in cands:
            if cand.measured:
                _judge(cand, fp32_row, config)
        chosen = pick((c for c in cands if c.verdict), 1 + config.speedup_margin,
                      speed=lambda c: c.slowest, error=lambda c: c.nll_increase)
        report = DecoderQuantizeReport(
            source=str(onnx_path), cpu=asdict(read_cpu()), judged_on=judged + (
                f"; greedy agreement over {sequences.size and len(sequences)} prompts of {prompt_length} tokens "
                f"+ {steps} FP32 greedy tokens ({sequences.size and len(sequences) * steps} predictions)"),
            budgets={"max_nll_increase": config.max_nll_increase, "min_agreement": config.min_agreement,
                     "speedup_margin": config.speedup_margin, "past_length": probe.past,
                     "ttft_prompt": probe.prompt_for_ttft},
            fp32={k: v for k, v in fp32_row.items() if not k.startswith("_")}, candidates=[],
            chosen=chosen.recipe.name if chosen else None, seconds=0.0, phases=clock.phases)
        if chosen is not None:
            chosen.verdict = Verdict(CHOSEN)
        report.candidates = [c.row() for c in cands]
        if chosen is None:
            report.seconds = round(clock.elapsed(), 2)
            raise _refusal(cands, report, config)
        out_path = onnxfile.copy(chosen.path, out_path)
        report.size_bytes = onnxfile.model_bytes(out_path)
    report.peak_mb = peak.mb
    report.seconds = round(clock.elapsed(), 2)
    return StageResult("quantize", {"onnx": out_path}, report)


def _judge(cand: DecoderCandidate, fp32: dict, config: DecoderQuantizeConfig) -> None:
    """Its quality against the budgets, then its speed against the speedup needed."""
    row = cand.measured
    cand.nll_increase = round(row["nll"] - fp32["nll"], 4)
    cand.nll_increase_interval = bootstrap_mean(row["_nll_windows"] - fp32["_nll_windows"]).to_dict()
    cand.speedup = {b: round(fp32["tpot_ms"][b] / row["tpot_ms"][b], 3) for b in fp32["tpot_ms"]}
    slow = {b: s for b, s in cand.speedup.items() if s < config.needed}
    if cand.nll_increase > config.max_nll_increase:
        cand.verdict = Verdict.quality(f"perplexity +{cand.nll_increase:.3f} nats/token > {config.max_nll_increase}",
                                       cand.nll_increase, config.max_nll_increase)
    elif row.get("agreement", 1.0) < config.min_agreement:
        cand.verdict = Verdict.quality(f"greedy agreement {row['agreement']:.3f} < {config.min_agreement}",
                                       row["agreement"], config.min_agreement)
    elif slow and config.require_faster:
        cand.verdict = Verdict.too_slow(slow, config.needed)
    else:
        cand.verdict = Verdict(OK)


def _refusal(cands: list[DecoderCandidate], report: DecoderQuantizeReport, config: DecoderQuantizeConfig) -> Exception:
    """AccuracyError when a candidate was fast enough but lost quality, else LatencyError."""
    lines = "; ".join(f"{c.recipe.name}: {c.verdict}" for c in cands)
    if any(c.speedup and c.slowest >= config.needed for c in cands):
        return AccuracyError(f"no quantized decoder keeps its quality within budget ({lines}); raise "
                             "--max-nll-increase / lower --min-agreement, or keep FP32; nothing written", report)
    return LatencyError(f"no quantized decoder is faster than FP32 here ({lines}); nothing written", report)
