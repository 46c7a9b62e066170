"""The quantize stage: build candidate INT8 models, measure each on this CPU, keep the fastest
one inside the accuracy budget — never one slower than the FP32 input."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from edgepipe import onnxfile
from edgepipe.artifacts import StageResult, require_file
from edgepipe.errors import QuantizationError
from edgepipe.onnxgraph import skeleton
from edgepipe.quantize.bias_correction import nothing_to_correct
from edgepipe.quantize.builders import largest_matmul_weight
from edgepipe.quantize.config import EvalData, QuantizeConfig
from edgepipe.quantize.core import BUILD_SHARE, LATE_BUILD_SHARE, Clock, pick
from edgepipe.quantize.evaluation import generated_eval_data
from edgepipe.quantize.fallback import accuracy_fallback
from edgepipe.quantize.outcome import (
    TIME_BUDGET,
    describe_search,
    initial_report,
    kernel_ceiling,
    refusal,
)
from edgepipe.quantize.recipes import Recipe, candidate_recipes
from edgepipe.quantize.record import deployment_metadata
from edgepipe.quantize.rewrites import TRANSFORMER_OPS, Sources, preprocess
from edgepipe.quantize.search import Candidate, Search
from edgepipe.quantize.twins import group, inherit, judge_twin
from edgepipe.quantize.verdict import CHOSEN, NOT_RETIMED, Verdict
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import DECODER_KEY
from edgepipe.runtime.hardware import CpuInfo, read_cpu
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.sessions import shared_cpu_arena
from edgepipe.runtime.workdirs import work_dir


def plan(onnx_path: Path, config: QuantizeConfig, cpu: CpuInfo) -> tuple[list[Recipe], list[dict], set[str]]:
    """The recipes to try on this graph and CPU, those skipped (why), and the graph's op types."""
    graph = skeleton(onnx_path).graph
    graph_ops = {n.op_type for n in graph.node}
    convs = sum(n.op_type == "Conv" for n in graph.node)
    recipes, skipped = candidate_recipes(graph_ops, cpu, config.calibration,
                                         conv_heavy=convs > sum(n.op_type in ("MatMul", "Gemm") for n in graph.node),
                                         allow_dynamic=config.mode in ("auto", "dynamic"),
                                         allow_static=config.mode in ("auto", "static"),
                                         largest_matmul_weight=largest_matmul_weight(graph),
                                         mode="fp16" if config.device != "cpu" else config.mode,
                                         backends=config.active_backends)
    recipes = [replace(r.excluding(config.nodes_to_exclude), op_types_to_exclude=config.op_types_to_exclude)
               for r in recipes]
    if not recipes:
        raise QuantizationError(f"no quantization recipe applies to {onnx_path.name} (ops: "
                                f"{', '.join(sorted(graph_ops))}): "
                                + "; ".join(f"{s['recipe']}: {s['why']}" for s in skipped))
    return recipes, skipped, graph_ops


def _rel_l2(cand: Candidate) -> float:
    return cand.fidelity["rel_l2"] if cand.fidelity else float("inf")


def _pick(confirmed: list[Candidate], band: float) -> Candidate | None:
    """Among the confirmed, by their geometric-mean speedup and relative L2 error (core.pick)."""
    return pick(confirmed, band, speed=lambda c: c.score, error=_rel_l2)


def choose(search: Search, accepted: list[Candidate]) -> Candidate | None:
    """The candidate to ship: the fastest by the figures the table shows, except that a candidate
    as fast within the noise band (speedup_margin) and more faithful to FP32 wins (per-channel
    over per-tensor at equal speed, say). Accepted candidates are re-timed (confirmed) in order
    of their first trial when they could win on speed or on fidelity; the rest are marked as not
    re-timed. Returns None when no candidate is confirmed."""
    band = 1 + search.config.speedup_margin
    confirmed: list[Candidate] = []
    for cand in sorted(accepted, key=lambda c: c.score, reverse=True):
        if cand.timed_as is not None and cand.timed_as.speedup_trials:  # its twin was re-timed
            inherit(cand, cand.timed_as)
            judge_twin(search, cand, cand.timed_as)
            if cand.verdict:
                confirmed.append(cand)
            continue
        top, pick = max((c.score for c in confirmed), default=None), _pick(confirmed, band)
        could_win = (top is None or cand.score > top
                     or (cand.score * band >= top and _rel_l2(cand) < _rel_l2(pick)))
        if not could_win:
            cand.verdict = Verdict(NOT_RETIMED)
        elif confirmed and search.clock.out_of_time():
            cand.verdict = Verdict(NOT_RETIMED, detail=f"the time budget ({search.config.time_budget_s:g} s) "
                                                       "was spent with a candidate confirmed")
        elif search.confirm(cand, trials=1 if search.clock.out_of_time(0.8) else 2):
            confirmed.append(cand)
    chosen = _pick(confirmed, band)
    if chosen is not None:
        fastest = max(confirmed, key=lambda c: c.score)
        search.choice = ("the fastest confirmed candidate" if fastest is chosen else
                         f"within {search.config.speedup_margin:.0%} of the fastest ({fastest.recipe.name}, "
                         f"{fastest.score:.3f}x vs {chosen.score:.3f}x geometric mean) and more faithful to FP32 "
                         f"(relative L2 {_rel_l2(chosen):.4g} vs {_rel_l2(fastest):.4g})")
    return chosen


def prepare(search: Search, graph_ops: set[str]) -> tuple[list[dict], dict]:
    """Transformer fusions (with try_fusions; kept only when faster), then pre-processing. Sets
    the sources each candidate is built from (rewrites.Sources, in fallback order)."""
    source, optimizer_record = search.onnx_path, {"tried": False}
    if not graph_ops & TRANSFORMER_OPS or search.config.mode == "fp16":
        pass
    elif not search.config.try_fusions:
        optimizer_record["why"] = ("not tried (try_fusions off): onnxruntime applies its own LayerNorm, GELU and "
                                   "attention fusions when it loads the model")
    else:
        search.say("trying onnxruntime.transformers graph fusions")
        from edgepipe.quantize.fusions import fused_source

        source, optimizer_record = fused_source(search)
    model_in, pre_attempts = preprocess(source, search.work)
    search.sources = Sources(model_in, source, search.work)
    return pre_attempts, optimizer_record


def build_all(search: Search, recipes: list[Recipe], skipped: list[dict]) -> None:
    """Build every planned recipe the time budget leaves room for; the rest go to `skipped`."""
    config = search.config
    seconds: dict[str, list[float]] = {}  # per build kind: what each build and evaluation took
    for recipe in recipes:
        if nothing_to_correct(search, recipe):
            skipped.append({"recipe": recipe.name, "why": "no quantized Conv or Gemm has a bias to correct"})
            continue
        kind = search.build_kind(recipe)
        share = LATE_BUILD_SHARE if kind in ("twin", "bias-correction") else BUILD_SHARE
        # until one candidate is built within the accuracy budget, the budget stops nothing
        if any(search.judging.accurate(search.candidates[i]) for i in search.usable) and \
                not search.budget.build_fits(kind, seconds, share):
            estimate = search.budget.build_estimate(kind, seconds)
            skipped.append({"recipe": recipe.name, "cause": TIME_BUDGET,
                            "why": f"time budget ({config.time_budget_s} s): building "
                            f"stops at {share:.0%} of it (this one: about {estimate:.0f} s) so the timing "
                            "of what was built fits"})
            continue
        began = time.perf_counter()
        search.build(recipe)
        seconds.setdefault(kind, []).append(time.perf_counter() - began)


def measure_and_judge(search: Search) -> None:
    """Screen, then time the finalists against FP32, and judge them; twins take the figures of
    the one timed for them. FP32's and the finalists' sessions are released afterwards."""
    config = search.config
    say = search.say
    timed, twins = group(search.candidates, sorted(search.usable))
    # Screening and measurement run their sessions one at a time: one arena for all. Evaluation's
    # and confirmation's keep their own: confirmation in a shared arena misreads its trials.
    with shared_cpu_arena():
        with search.clock.phase("screen"):
            finalists = search.screen(timed)
        say(f"measuring {len(finalists)} candidate(s) against FP32 at batch {list(config.batch_sizes)}")
        with search.clock.phase("measure"):
            search.measure(finalists)
    for i in finalists:
        search.judging.judge(search.candidates[i])
    for i in timed:  # twins take the figures of the one timed for them
        for t in twins[i]:
            inherit(search.candidates[t], search.candidates[i])
            judge_twin(search, search.candidates[t], search.candidates[i])
    search.release("fp32", *finalists)  # confirmation and the fallback time with fresh sessions


def quantize(onnx_path: str | Path, out_path: str | Path, config: QuantizeConfig | None = None, *,
             eval_data: EvalData | None = None, calibration: EvalData | None = None,
             cpu: CpuInfo | None = None, progress=None) -> StageResult:
    """Stage: FP32 ONNX -> the fastest INT8 model within the accuracy budget, with the table of
    every candidate. Raises LatencyError/AccuracyError (exit 1) when no candidate qualifies;
    the error's `report` holds every candidate."""
    config = config or QuantizeConfig()
    onnx_path = require_file(onnx_path, "ONNX model")
    if DECODER_KEY in onnx_metadata(onnx_path):
        raise QuantizationError(f"{onnx_path.name} is a decoder with a KV cache: edgepipe.quantize.quantize sends it "
                                "to the decoder search; this one judges classifier-style outputs and would mislead")
    cpu = cpu or read_cpu()
    say = progress or (lambda message: None)
    started = time.perf_counter()
    generated = eval_data is None
    fp32 = Engine(onnx_path, providers=config.providers, threads=config.threads, spinning=False)
    call_cost, head = {}, []
    if generated:  # no held-out data: judge agreement with FP32 on seeded inputs
        eval_data = generated_eval_data(onnx_path, engine=fp32, call_cost=call_cost, head=head)
    rows = min(len(v) for v in eval_data.inputs.values())
    per_word = eval_data.labels is not None and eval_data.labels.ndim == 2
    judged_on = (f"accuracy against labels on {rows} held-out rows" + (" (each word judged)" if per_word else "")
                 if eval_data.labels is not None else
                 f"top-1 agreement with FP32 on {rows} {'generated' if generated else 'given'} rows (no labels)")
    recipes, skipped, graph_ops = plan(onnx_path, config, cpu)
    with work_dir("quant") as tmp:
        # calibrating on the held-out rows: the symmetric layout's ranges come from the reference pass
        tap = calibration is None and rows <= config.calibration_samples and any(r.symmetric for r in recipes)
        if tap:  # the tapped pass loads a copy of its own: one FP32 model in memory at a time
            fp32 = None
        search = Search(onnx_path, config, eval_data, calibration or eval_data, tmp, say, fp32=fp32,
                        call_cost=call_cost, fp32_head=head[0] if head else None, tap_ranges=tap,
                        clock=Clock(config.time_budget_s, started))  # the budget covers the whole stage
        del fp32  # the search drops it while building
        with search.clock.phase("prepare"):
            pre_attempts, optimizer_record = prepare(search, graph_ops)
        with search.clock.phase("build"):
            build_all(search, recipes, skipped)
        if not search.usable:
            raise QuantizationError("every quantization recipe failed: " + "; ".join(
                f"{c.recipe.name}: {c.error}" for c in search.candidates))
        measure_and_judge(search)
        with search.clock.phase("confirm"):
            chosen = choose(search, [c for c in search.candidates if c.verdict])
        fallback_steps: list[dict] = []  # accuracy-fallback steps: ranking and nodes kept in FP32
        if chosen is None and config.device != "cpu":
            fallback_steps = [{"step": "skipped", "why": "the accuracy fallback ranks nodes on the CPU; "
                               f"on device {config.device} exclude nodes with --exclude-node instead"}]
        elif chosen is None:
            with search.clock.phase("accuracy_fallback"):
                chosen, fallback_steps = accuracy_fallback(search)
        report = initial_report(search, cpu, recipes, skipped, pre_attempts, optimizer_record, fallback_steps)
        describe_search(report, search, judged_on, chosen)
        if chosen is None:
            report.candidates = [c.row() for c in search.candidates]
            report.seconds = round(time.perf_counter() - started, 2)
            raise refusal(search, report)
        chosen.verdict = Verdict(CHOSEN)
        if config.measure_ceiling and config.device == "cpu":  # a second or two, past the budget too
            with search.clock.phase("ceiling"):
                report.ceiling = kernel_ceiling(search, chosen)
            report.phases = search.clock.phases
            report.phase_peak_mb = search.clock.phase_peaks or None
        # atomic; external data relocated with it; the file carries where it was measured and judged
        out_path = onnxfile.copy(chosen.path, out_path, metadata=deployment_metadata(search, chosen))
        report.candidates = [c.row() for c in search.candidates]
        report.chosen = chosen.row()
        report.size_bytes = onnxfile.model_bytes(out_path)
        report.seconds = round(time.perf_counter() - started, 2)
    return StageResult("quantize", {"onnx": out_path}, report)
