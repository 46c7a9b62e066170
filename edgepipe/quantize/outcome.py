"""What a classifier quantize search reports: the report of everything it measured, the kernel
ceiling of the chosen recipe, and the refusal that names the candidate that came closest."""

from __future__ import annotations

from edgepipe import interrupts, onnxfile
from edgepipe.errors import AccuracyError, GateFailed, LatencyError
from edgepipe.quantize.candidate import by_session_rows
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.report import Baseline, QuantizeReport
from edgepipe.quantize.search import Candidate, Search
from edgepipe.runtime.hardware import CpuInfo, read_gpu

TIME_BUDGET = "time_budget"  # a skipped recipe's cause when the budget left it unbuilt


def refusal(search: Search, report: QuantizeReport) -> GateFailed:
    """The error for 'no candidate qualifies', naming the one that came closest: the fastest
    accurate one when there is one (it missed on speed), else the fastest one (it missed on
    accuracy). It carries the report with every candidate."""
    measured = [c for c in search.candidates if c.speedup]
    accurate = [c for c in measured if search.judging.accurate(c)]
    best = max(accurate or measured, key=lambda c: c.score)
    error_cls = LatencyError if accurate else AccuracyError
    untried = sum(s.get("cause") == TIME_BUDGET for s in report.skipped_recipes)
    stopped = any(s.get("step") == "stopped" for s in report.accuracy_fallback)
    timing = ""
    if untried or stopped:
        timing = (f"; the {search.config.time_budget_s:g} s time budget left "
                  + (f"{untried} recipe(s) untried" if untried else "")
                  + (" and " if untried and stopped else "") + ("the accuracy fallback unfinished" if stopped else "")
                  + " (--time-budget 0, or [quantize] time_budget_s = 0, tries everything)")
    # accuracy, not speed, is what training through the INT8 rounding can win back
    qat = ("; quantization-aware training is the next step where the model came from a Hugging Face folder "
           "(edgepipe train FOLDER --qat --data ROWS -o OUT, then export and quantize OUT)") if not accurate else ""
    return error_cls(f"no quantized candidate is both faster than FP32 and within the accuracy budget "
                     f"(drop <= {search.config.max_accuracy_drop}); best was {best.recipe.name}: "
                     f"{best.verdict}{timing}. Keep the FP32 model or relax the budget{qat}", report=report)


def initial_report(search: Search, cpu: CpuInfo, recipes: list[Recipe], skipped: list[dict],
                   pre_attempts: list[dict], optimizer_record: dict, fallback_steps: list[dict]) -> QuantizeReport:
    """Everything the search measured, before the candidates' rows and the choice are added."""
    config = search.config
    return QuantizeReport(
        cpu={"model": cpu.model, "features": cpu.features, "vnni": cpu.has_vnni},
        recipe_reason=recipes[0].reasons[0] if recipes[0].reasons else "",
        device=None if config.device == "cpu" else {"provider": search.fp32_providers, "gpu": read_gpu()},
        preprocess=pre_attempts, transformer_optimizer=optimizer_record, skipped_recipes=skipped,
        fp32=baseline(search), accuracy_fallback=fallback_steps,
        budget={"max_accuracy_drop": config.max_accuracy_drop, "min_speedup": config.min_speedup,
                "speedup_margin": config.speedup_margin},
        timing=("a screening pass (a quarter of the rounds) drops candidates below 80% of the needed speedup; "
                "the rest interleaved with FP32 at each session setting (rounds per phase in 'rounds': fewer "
                "when a time budget would not hold them all) ("
                + "; ".join(f"batch {b}: {' or '.join(map(str, ss))}" for b, ss in search.sweep.items())
                + "); each model judged at its fastest per batch size (recorded in 'sessions'); kernel twins "
                "(same nodes, initializer types and ranks: 'timed_as') are timed once; re-timed "
                "candidates show the median of their trials, and the choice is the fastest by those"))


def baseline(search: Search) -> Baseline:
    """FP32's row: its accuracy and scores on the held-out rows, its timing and its size."""
    return Baseline(accuracy=search.fp32_accuracy,
                    scores={k: v.to_dict() for k, v in search.fp32_scores.items()} if search.fp32_scores else None,
                    p50_ms={str(b): round(v, 4) for b, v in search.fp32_p50.items()},
                    sessions={str(b): s.to_dict() for b, s in search.fp32_settings.items()},
                    p50_ms_by_session=by_session_rows(search.fp32_p50_by_setting),
                    size_bytes=onnxfile.model_bytes(search.onnx_path))


def kernel_ceiling(search: Search, chosen: Candidate) -> dict:
    """The chosen recipe on the model's dominant kernel alone, at the largest batch size, and the
    model's speedup there as a fraction of it (ceiling.py), over 4 rounds past the time budget
    (a kernel's calls are short: 20-50 of them per model even so). Never fails the stage."""
    from edgepipe.quantize.ceiling import ceiling_record, measure_ceiling

    batch = max(search.config.batch_sizes)
    search.say(f"measuring the INT8 kernel ceiling of the dominant op at batch {batch}")
    try:
        # the pre-processed model the candidates were built from: weights there are constants
        measured = measure_ceiling(search.sources.first, search.inputs, chosen.recipe, batch,
                                   chosen.settings[batch], search.work, rounds=4 if search.clock.out_of_time() else 8)
    except Exception as exc:  # a diagnostic: its failure is recorded, not raised
        interrupts.reraise()
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[:200]}"}
    return ceiling_record(measured, chosen.speedup.get(batch))


def describe_search(report: QuantizeReport, search: Search, judged_on: str, chosen: Candidate | None) -> None:
    """What the search spent and on which rows it judged, into the report."""
    judge = search.judging
    report.judged_on = judged_on + (
        "" if judge.resolved else
        f"; {judge.units} {judge.unit} cannot resolve a {search.config.max_accuracy_drop} budget (one is "
        f"{1 / judge.units:.4f}), so a drop above it fails only if its 95% lower bound is above it too")
    report.choice = search.choice
    report.phases = search.clock.phases
    report.phase_peak_mb = search.clock.phase_peaks or None
    report.rounds = search.clock.rounds_used or None
    if chosen is not None and chosen.recipe.reasons:
        report.recipe_reason = chosen.recipe.reasons[0]
