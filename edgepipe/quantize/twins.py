"""Kernel twins: candidates whose built graphs run the same kernels on the same shapes, so one
timing serves them all. Recipes that differ only in the values of their weights (reduce_range's
7-bit weights beside full-range 8-bit ones) build graphs with the same nodes, the same
initializer types and the same ranks: onnxruntime runs them with the same kernels, and they
cost the same to the measurement noise. The search times the first of each group (the likeliest winner, built
first) and its twins take its figures; they are still judged on their own accuracy, and among
equally fast candidates the most faithful one ships."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

from edgepipe.onnxgraph import skeleton
from edgepipe.quantize.candidate import Candidate

# Ops whose third input is a bias: an add per output value, fused into the kernel. Whether one is
# there does not change the signature (bias correction gives a classifier without one a bias),
# since a fused add per output value does not change the kernel's speed.
BIASED = frozenset({"Conv", "Gemm"})


def kernel_signature(path: Path, backend: str) -> tuple:
    """What decides a model's speed beyond its weights' values: per node, its op type and each
    constant input's data type and rank (a per-channel scale is a vector, a per-tensor one a
    scalar), counted, leaving out Conv's and Gemm's biases and the DequantizeLinear that feeds
    one (BIASED); and the runtime that runs it."""
    graph = skeleton(path).graph
    constants = {t.name: (t.data_type, len(t.dims)) for t in graph.initializer}
    biases = {n.input[2] for n in graph.node if n.op_type in BIASED and len(n.input) > 2}
    nodes = Counter((n.domain, n.op_type,
                     tuple(constants.get(i, ()) for i in n.input[:2 if n.op_type in BIASED else None]))
                    for n in graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in biases))
    return backend, tuple(sorted(nodes.items()))


def group(candidates: list[Candidate], indices: list[int]) -> tuple[list[int], dict[int, list[int]]]:
    """(the candidates to time, {each of them: its twins}); twins get `timed_as` set."""
    reps: dict[tuple, int] = {}
    twins: dict[int, list[int]] = {}
    for i in indices:
        cand = candidates[i]
        key = kernel_signature(cand.path, cand.backend)
        if key in reps:
            cand.timed_as = candidates[reps[key]]
            twins[reps[key]].append(i)
        else:
            reps[key] = i
            twins[i] = []
    return list(reps.values()), twins


def inherit(twin: Candidate, timed: Candidate) -> None:
    """Give `twin` the timing figures of `timed`, its kernel twin."""
    twin.p50_ms, twin.speedup = dict(timed.p50_ms), dict(timed.speedup)
    twin.speedup_trials = {b: list(v) for b, v in timed.speedup_trials.items()}
    twin.settings, twin.p50_by_setting = dict(timed.settings), dict(timed.p50_by_setting)
    twin.screened = timed.screened


def judge_twin(search, twin: Candidate, timed: Candidate) -> None:
    """`twin`'s verdict after taking `timed`'s figures: its own accuracy first; then the timed
    one's speed verdict (a confirmation's, when it was re-timed), or, when the timed one missed
    the accuracy budget and so has no speed verdict, a judgment of the figures it took."""
    if not search.judging.accurate(twin):
        twin.verdict = search.judging.accuracy_verdict(twin)
    elif timed.verdict.inaccurate:
        search.judging.judge(twin)
    else:
        twin.verdict = replace(timed.verdict)
