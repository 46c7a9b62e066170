"""`compare A B`: end-to-end parity of two models, and where two ONNX graphs start to diverge.

A and B may each be an ONNX model, an edgepipe checkpoint or `file.py:factory`. The verdict
always comes from the unmodified models; localization runs instrumented copies (every
intermediate tensor made an output), which changes what ORT fuses, so it only says *where*.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np

from edgepipe.errors import InputError
from edgepipe.parity import OutputDiff, diff_outputs
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.spec import InputSpec, make_feeds
from edgepipe.runtime.workdirs import work_dir

LOCALIZE_NOTE = ("localization ran instrumented copies (all intermediates as outputs), which changes "
                 "what onnxruntime fuses; the verdict above is from the unmodified models")


@dataclass
class Side:
    """One model to compare: how to run it and what it takes."""

    ref: str
    kind: str  # "onnx" | "torch"
    inputs: list[InputSpec]
    run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
    output_names: list[str]
    onnx_path: Path | None = None
    held_out: dict[str, np.ndarray] | None = None  # the checkpoint's own held-out inputs, if any
    labels: np.ndarray | None = None


def load_side(ref: str, allow_out_of_budget: bool = False) -> Side:
    """How to run `ref`: an ONNX file on the backend its deployment record names (see Engine),
    else a torch checkpoint or factory."""
    if str(ref).endswith(".onnx"):
        engine = Engine(ref, providers="cpu", allow_out_of_budget=allow_out_of_budget)
        return Side(str(ref), "onnx", engine.inputs, engine.run, engine.output_names, Path(ref))
    import torch  # a checkpoint or factory needs the pipeline extra

    from edgepipe.exporters.source import load_source

    source = load_source(ref)

    @torch.no_grad()
    def run(feeds):
        out = source.model(*[torch.from_numpy(np.asarray(feeds[s.name])) for s in source.inputs])
        out = out if isinstance(out, (tuple, list)) else (out,)
        return {n: o.numpy() for n, o in zip(source.output_names, out)}

    side = Side(str(ref), "torch", source.inputs, run, source.output_names)
    dataset = source.meta.get("dataset", {}).get("name")
    if dataset in ("digits", "marker"):
        from edgepipe.models.data import load_dataset

        data = load_dataset(dataset)
        side.held_out, side.labels = {data.input_name: data.x_test}, data.y_test
    return side


@dataclass
class Divergence:
    node: str
    op: str
    tensor: str
    max_abs_diff: float
    added_nsr: float  # channel-averaged noise this node adds over its inputs


@dataclass
class CompareReport:
    a: str
    b: str
    atol: float
    rtol: float
    inputs: str  # where the inputs came from
    outputs: list[OutputDiff]
    first_divergence: Divergence | None = None
    offenders: list[Divergence] = field(default_factory=list)
    localized: str | None = None  # why localization did not run, or the note
    judged_by: str = ""  # "" : element-wise tolerance; else the agreement thresholds used

    @property
    def criteria(self) -> str:
        return self.judged_by or f"|B-A| <= {self.atol:g} + {self.rtol:g}*|A|"

    def __bool__(self) -> bool:
        return all(o.ok for o in self.outputs)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "ok": bool(self), "atol": self.atol, "rtol": self.rtol,
                "criteria": self.criteria,
                "inputs": self.inputs, "outputs": [vars(o) for o in self.outputs],
                "first_divergence": vars(self.first_divergence) if self.first_divergence else None,
                "offenders": [vars(o) for o in self.offenders], "localization": self.localized}


def localize(a_path: Path, b_path: Path, feeds: Mapping[str, np.ndarray], atol: float, rtol: float,
             top: int = 5) -> tuple[Divergence | None, list[Divergence]]:
    """Run instrumented copies of both graphs; the first node of A (topological order) whose
    output differs beyond tolerance in B (matched by name, or by its Q/DQ alias), and the nodes
    that add the most noise."""
    from edgepipe.instrument import after_qdq, channel_nsr, instrumented_copy, run_all
    from edgepipe.onnxgraph import skeleton

    graph_a = skeleton(a_path).graph
    graph_b = skeleton(b_path).graph
    tensors_b = {o for n in graph_b.node for o in n.output}
    alias = after_qdq(graph_b)
    pairs = [(n, n.output[0], alias.get(n.output[0], n.output[0])) for n in graph_a.node
             if n.output and n.output[0] in tensors_b]
    if not pairs:
        return None, []
    with work_dir("compare") as tmp:
        ref = run_all(instrumented_copy(a_path, [a for _, a, _ in pairs], tmp), feeds)
        got = run_all(instrumented_copy(b_path, sorted({b for _, _, b in pairs}), tmp), feeds)
    found: list[Divergence] = []
    first = None
    nsr_of: dict[str, float] = {}
    for node, name_a, name_b in pairs:
        x, y = ref.get(name_a), got.get(name_b)
        if x is None or y is None or x.shape != y.shape or not np.issubdtype(x.dtype, np.floating):
            continue
        diff = np.abs(x.astype(np.float64) - y.astype(np.float64))
        nsr = channel_nsr(x, y)
        nsr_of[name_a] = nsr
        added = nsr - max((nsr_of.get(i, 0.0) for i in node.input), default=0.0)
        entry = Divergence(node.name, node.op_type, name_a, float(diff.max(initial=0.0)), round(added, 6))
        if first is None and not np.all(diff <= atol + rtol * np.abs(x)):
            first = entry
        found.append(entry)
    offenders = sorted((d for d in found if d.added_nsr > 0), key=lambda d: d.added_nsr, reverse=True)
    return first, offenders[:top]


def judge_by_agreement(report: CompareReport, min_top1: float | None, min_cosine: float | None) -> None:
    """Re-judge each comparable output by agreement instead of element-wise tolerance; an output
    with no top-1 (not [rows, classes]) is judged by cosine, or keeps its tolerance verdict when
    only a top-1 threshold is given."""
    for bound, label in ((min_top1, "min top-1"), (min_cosine, "min cosine")):
        if bound is not None and not 0.0 <= bound <= 1.0:
            raise InputError(f"{label} must be between 0 and 1, got {bound}")
    report.judged_by = " and ".join(part for part in (
        f"top-1 agreement >= {min_top1:g}" if min_top1 is not None else "",
        f"cosine >= {min_cosine:g}" if min_cosine is not None else "") if part)
    for o in report.outputs:
        if o.note or not np.isfinite(o.max_abs_diff):
            continue
        checks = []
        if min_top1 is not None and o.top1_agreement is not None:
            checks.append(o.top1_agreement >= min_top1)
        if min_cosine is not None and o.cosine is not None:
            checks.append(o.cosine >= min_cosine)
        if checks:
            o.ok = all(checks)


def compare(a: str, b: str, *, data: Mapping[str, np.ndarray] | None = None, batch: int = 16,
            atol: float = 1e-4, rtol: float = 1e-3, seed: int = 0, do_localize: bool = True,
            per_output: Mapping[str, tuple[float, float]] | None = None,
            min_top1: float | None = None, min_cosine: float | None = None,
            allow_out_of_budget: bool = False) -> CompareReport:
    """A against B on the same inputs. Each output passes by element-wise tolerance, or, given
    `min_top1` / `min_cosine`, by agreement: top-1 agreement (for [rows, classes] outputs) and
    cosine similarity at least those. Agreement is what an INT8 model owes its FP32 original:
    its logits move by design, and a logit tolerance either fails it or is too loose to mean
    anything."""
    if batch < 1:
        raise InputError(f"batch must be at least 1 row, got {batch}")
    side_a, side_b = load_side(a, allow_out_of_budget), load_side(b, allow_out_of_budget)
    names_a, names_b = [s.name for s in side_a.inputs], [s.name for s in side_b.inputs]
    if names_a != names_b:
        raise InputError(f"{a} takes inputs {names_a} but {b} takes {names_b}: not comparable")
    if data is not None:
        feeds, source = dict(data), "given data"
    elif side_a.held_out or side_b.held_out:
        held = side_a.held_out or side_b.held_out
        feeds, source = {k: v[:max(batch, 256)] for k, v in held.items()}, "the checkpoint's held-out split"
    else:
        feeds, source = make_feeds(side_a.inputs, batch=batch, seed=seed), f"generated (seed {seed})"
    rows = min((len(v) for v in feeds.values()), default=0)
    if rows == 0:
        raise InputError(f"no rows to compare ({source} has 0): parity on nothing proves nothing")
    out_a, out_b = side_a.run(feeds), side_b.run(feeds)
    missing = [n for n in out_a if n not in out_b]
    if missing and len(out_a) == len(out_b):  # same arity, other names: compare in order
        out_b = dict(zip(out_a, out_b.values()))
    unknown = sorted(set(per_output or {}) - set(out_a))
    if unknown:
        raise InputError(f"tolerance given for unknown output(s) {', '.join(unknown)}; outputs: {', '.join(out_a)}")
    report = CompareReport(a, b, atol, rtol, source, diff_outputs(out_a, out_b, atol, rtol, per_output))
    if min_top1 is not None or min_cosine is not None:
        judge_by_agreement(report, min_top1, min_cosine)
    if report:
        return report
    if not do_localize:
        report.localized = "skipped (--no-localize)"
    elif side_a.onnx_path is None or side_b.onnx_path is None:
        report.localized = "needs two ONNX models: export the checkpoint first (edgepipe export)"
    else:
        probe = {k: v[:batch] for k, v in feeds.items()}
        report.first_divergence, report.offenders = localize(side_a.onnx_path, side_b.onnx_path, probe, atol, rtol)
        report.localized = LOCALIZE_NOTE
    return report
