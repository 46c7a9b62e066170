"""Decoder quantization: weight-only INT4 (MatMulNBits built by RTN, HQQ or GPTQ, at several
block sizes, with INT8 or FP32 compute) and dynamic INT8, each measured on this CPU for its time
per output token, and judged for quality against FP32 by

- the perplexity increase on held-out text (mean negative log-likelihood per token, in nats),
- greedy-token agreement: FP32 continues a fixed set of prompts greedily; the candidate reads
  each prompt and continuation and must predict the same next token at every position.

The fastest candidate whose quality holds and which is faster than FP32 beyond the noise band is
written; when none is, nothing is written and the error carries every candidate's row.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from edgepipe import interrupts, onnxfile
from edgepipe.artifacts import StageResult, require_file
from edgepipe.errors import AccuracyError, InputError, LatencyError, first_line
from edgepipe.memory import PeakMemory
from edgepipe.metrics import bootstrap_mean
from edgepipe.quantize.decoder_build import BY_NAME, RECIPES, DecoderRecipe, build
from edgepipe.quantize.decoder_measure import Probe, greedy_reference
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

NOISE_BAND = 0.05  # speedups within 5% are a tie on a busy 2-core machine: the faithful one wins


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
    time_budget_s: float = 900.0  # 0: no limit; building stops past 70% of it
    require_faster: bool = True  # False: a candidate slower than FP32 may be chosen (for its size)
    calibration_windows: int = 4  # GPTQ's calibration prefills

    def __post_init__(self):
        unknown = [r for r in self.recipes if r not in BY_NAME]
        if unknown:
            raise InputError(f"unknown decoder recipe(s) {', '.join(unknown)}; choose from {', '.join(BY_NAME)}")
        if self.max_nll_increase < 0 or not 0 <= self.min_agreement <= 1:
            raise InputError("max_nll_increase must be >= 0 and min_agreement within 0..1")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise InputError("batch sizes must be positive")

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
    budgets: dict
    fp32: dict  # tpot_ms per batch, ttft_ms, nll, size_bytes
    candidates: list[dict]  # one row per recipe: quality, speed, size, verdict (or error)
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


def _candidate(recipe: DecoderRecipe, config: DecoderQuantizeConfig, onnx_path: Path, spec: DecoderSpec, work: Path,
               calibration: np.ndarray, probe: Probe, fp32_row: dict, elapsed: float,
               say: Callable[[str], None]) -> dict:
    """One recipe's row: not tried, skipped for time, failed, or built, measured and judged."""
    row = {"recipe": recipe.name, "describe": recipe.describe}
    if recipe.opt_in and not config.recipes:
        row["verdict"] = f"not tried: {recipe.opt_in}"
        return row
    if config.time_budget_s and elapsed > 0.7 * config.time_budget_s:
        row["verdict"] = f"skipped: time budget ({config.time_budget_s:g} s; raise --time-budget to try it)"
        return row
    out = work / f"{recipe.name}.onnx"
    say(f"building {recipe.name}: {recipe.describe}")
    t0 = time.perf_counter()
    with interrupts.attempt() as tried:  # the builders raise many types on shapes they do not support
        build(recipe, onnx_path, out, spec, calibration)
    if tried.error is not None:
        row["verdict"] = f"failed to build: {first_line(tried.error)[:200]}"
        return row
    row["build_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    with interrupts.attempt() as tried:
        row.update(probe.measure(out))
    if tried.error is not None:
        row["verdict"] = f"failed to run: {first_line(tried.error)[:200]}"
        return row
    row["measure_s"] = round(time.perf_counter() - t0, 2)
    row["path"] = out
    _judge(row, fp32_row, config)
    say(f"  {recipe.name}: {row['verdict']}")
    return row


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
    started = time.perf_counter()
    phases: dict[str, float] = {}
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
        t0 = time.perf_counter()
        fp32_row = probe.measure(onnx_path)
        phases["fp32"] = round(time.perf_counter() - t0, 2)
        rows: list[dict] = []
        calibration = windows[: config.calibration_windows]
        for recipe in config.chosen_recipes:
            rows.append(_candidate(recipe, config, onnx_path, spec, work, calibration, probe, fp32_row,
                                   time.perf_counter() - started, say))
        t0 = time.perf_counter()  # FP32 again: the machine drifts over a long search
        with Engine(onnx_path, providers="cpu") as engine:
            again = {str(b): round(time_per_token(engine, spec, b, probe.past), 3) for b in config.batch_sizes}
        fp32_row["tpot_ms_first"] = fp32_row["tpot_ms"]
        fp32_row["tpot_ms"] = {b: round(min(fp32_row["tpot_ms"][b], again[b]), 3) for b in again}
        phases["fp32_again"] = round(time.perf_counter() - t0, 2)
        for row in rows:
            if "tpot_ms" in row:
                _judge(row, fp32_row, config)
        chosen = _choose(rows)
        report = DecoderQuantizeReport(
            source=str(onnx_path), cpu=asdict(read_cpu()), judged_on=judged + (
                f"; greedy agreement over {sequences.size and len(sequences)} prompts of {prompt_length} tokens "
                f"+ {steps} FP32 greedy tokens ({sequences.size and len(sequences) * steps} predictions)"),
            budgets={"max_nll_increase": config.max_nll_increase, "min_agreement": config.min_agreement,
                     "noise_band": NOISE_BAND, "past_length": probe.past, "ttft_prompt": probe.prompt_for_ttft},
            fp32=_recorded(fp32_row), candidates=[_recorded(r) for r in rows],
            chosen=chosen["recipe"] if chosen else None, seconds=0.0, phases=phases)
        if chosen is None:
            report.seconds = round(time.perf_counter() - started, 2)
            raise _refusal(rows, report)
        chosen["verdict"] = "chosen"
        report.candidates = [_recorded(r) for r in rows]
        out_path = onnxfile.copy(chosen["path"], out_path)
        report.size_bytes = onnxfile.model_bytes(out_path)
    report.peak_mb = peak.mb
    report.seconds = round(time.perf_counter() - started, 2)
    return StageResult("quantize", {"onnx": out_path}, report)


def _recorded(row: dict) -> dict:
    """A row as the report holds it: no path, no per-window arrays."""
    return {k: v for k, v in row.items() if k != "path" and not k.startswith("_")}


def _judge(row: dict, fp32: dict, config: DecoderQuantizeConfig) -> None:
    row["nll_increase"] = round(row["nll"] - fp32["nll"], 4)
    row["nll_increase_interval"] = bootstrap_mean(row["_nll_windows"] - fp32["_nll_windows"]).to_dict()
    row["speedup"] = {b: round(fp32["tpot_ms"][b] / row["tpot_ms"][b], 3) for b in fp32["tpot_ms"]}
    if row["nll_increase"] > config.max_nll_increase:
        row["verdict"] = f"quality: perplexity +{row['nll_increase']:.3f} nats/token > {config.max_nll_increase}"
    elif row.get("agreement", 1.0) < config.min_agreement:
        row["verdict"] = f"quality: greedy agreement {row['agreement']:.3f} < {config.min_agreement}"
    elif min(row["speedup"].values()) < 1 + NOISE_BAND and config.require_faster:
        row["verdict"] = (f"not faster: {min(row['speedup'].values()):.2f}x FP32's time per token "
                          f"(needs {1 + NOISE_BAND:.2f}x)")
    else:
        row["verdict"] = "qualifies"


def _choose(rows: list[dict]) -> dict | None:
    """The fastest qualifying row (slowest batch's speedup); within the noise band of it, the one
    with the smallest perplexity increase."""
    ok = [r for r in rows if r.get("verdict") == "qualifies"]
    if not ok:
        return None
    best = max(min(r["speedup"].values()) for r in ok)
    close = [r for r in ok if min(r["speedup"].values()) >= best / (1 + NOISE_BAND)]
    return min(close, key=lambda r: (r["nll_increase"], -min(r["speedup"].values())))


def _refusal(rows: list[dict], report: DecoderQuantizeReport) -> Exception:
    measured = [r for r in rows if "speedup" in r]
    fast = [r for r in measured if min(r["speedup"].values()) >= 1 + NOISE_BAND]
    lines = "; ".join(f"{r['recipe']}: {r.get('verdict', '?')}" for r in rows)
    if fast:
        return AccuracyError(f"no quantized decoder keeps its quality within budget ({lines}); raise "
                             "--max-nll-increase / lower --min-agreement, or keep FP32; nothing written", report)
    return LatencyError(f"no quantized decoder is faster than FP32 here ({lines}); nothing written", report)
