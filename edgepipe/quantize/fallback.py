"""Accuracy-aware fallback: when the fastest candidate misses only the accuracy budget, put its
most damaging nodes back into FP32 step by step, then trim the set to the nodes it needs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgepipe.quantize.builders import build_with_fallback
from edgepipe.quantize.recipes import Recipe
from edgepipe.quantize.search import Candidate, Search
from edgepipe.quantize.verdict import SUPERSEDED, Verdict


def ranking_model(search: Search, cand: Candidate, step: int) -> Path:
    """The model to rank nodes on: QOperator renames every tensor it quantizes (X ->
    X_quantized), so nothing in it can be compared with FP32 by name; its QDQ twin (same
    types, scales and exclusions) keeps the names and carries the same quantization error."""
    recipe = cand.recipe
    if not (recipe.method == "static" and recipe.format == "QOperator"):
        return cand.path
    twin = search.work / f"rank_twin{step}.onnx"
    build_with_fallback(replace(recipe, format="QDQ"), search.sources, twin, search.calibration,
                        search.config.calibration_samples)
    return twin


def accuracy_fallback(search: Search, max_steps: int = 8) -> tuple[Candidate | None, list[dict]]:
    """The fastest candidate misses only the accuracy budget: return its most damaging
    nodes to FP32 until the budget holds. Each step re-ranks on the current model (excluding
    one node moves the damage to the next) and excludes 1, 2, 4 … more nodes."""
    from edgepipe.quantize.sensitivity import rank_nodes

    inaccurate = [c for c in search.candidates if search.judging.fast_enough(c) and c.verdict.inaccurate]
    if not inaccurate:
        return None, []
    base = current = max(inaccurate, key=lambda c: c.score)
    probe = {k: v[:64] for k, v in search.eval_data.inputs.items()}
    excluded: list[str] = []
    history: list[dict] = []
    noise: dict[str, float] = {}  # excluded node -> noise it added when it was ranked
    for step in range(max_steps):
        if search.clock.out_of_time():
            history.append({"step": "stopped", "why": f"time budget ({search.config.time_budget_s} s) spent"})
            break
        ranking = [r for r in rank_nodes(search.onnx_path, ranking_model(search, current, step), probe, search.work)
                   if r["node"] not in excluded]
        if not ranking:
            break
        # Only nodes that add real noise (>= 1% of the worst); a harmless one stays INT8.
        damaging = [r for r in ranking if r["added_nsr"] >= max(1e-4, 0.01 * ranking[0]["added_nsr"])]
        new = [r["node"] for r in (damaging or ranking[:1])[: 2 ** step]]
        history.append({"step": step + 1, "ranking": ranking[:10], "excluded": new})
        search.say(f"accuracy fallback step {step + 1}: keeping {', '.join(new)} in FP32 "
                   f"(output SQNR {ranking[0]['sqnr_out_db']} dB)")
        excluded += new
        noise.update({r["node"]: r["added_nsr"] for r in ranking if r["node"] in new})
        cand = search.build(base.recipe.excluding(excluded))
        if cand.error is not None:
            break
        if search.judging.accurate(cand):
            cand, trimmed = trim(search, base.recipe, excluded, noise, cand)
            if trimmed["tried"]:
                history.append(trimmed)
            search.measure([search.candidates.index(cand)])
            search.judging.judge(cand)
            return (cand if cand.verdict and search.confirm(cand) else None), history
        cand.verdict = search.judging.accuracy_verdict(cand)
        current = cand
    return None, history


def trim(search: Search, recipe: Recipe, excluded: list[str], noise: dict[str, float], cand: Candidate,
         max_tries: int = 6) -> tuple[Candidate, dict]:
    """Steps exclude 1, 2, 4 … nodes at a time, so the set that meets the budget can hold
    nodes it does not need (on a CPU without VNNI, 7-bit weights make a harmless layer's
    noise look damaging). Put each excluded node back into INT8, least noisy first, and keep
    it there when the budget still holds: fewer FP32 nodes, a faster model."""
    keep = list(excluded)
    tried, back = [], []
    for node in sorted(excluded, key=lambda n: noise.get(n, 0.0))[:max_tries]:
        if len(keep) == 1:
            break
        trial = [n for n in keep if n != node]
        attempt = search.built(recipe.excluding(trial))
        if attempt is None:
            search.say(f"accuracy fallback trim: trying {node} back in INT8")
            attempt = search.build(recipe.excluding(trial))
        ok = search.judging.accurate(attempt)
        tried.append({"node": node, "accuracy_drop": attempt.accuracy_drop, "back_in_int8": ok})
        if ok:
            cand.verdict = Verdict(SUPERSEDED, detail=node)
            keep, cand = trial, attempt
            back.append(node)
        elif attempt.error is None:
            attempt.verdict = search.judging.accuracy_verdict(attempt, f"{node} stays FP32")
    return cand, {"step": "trim", "tried": tried, "back_in_int8": back, "excluded": keep}
