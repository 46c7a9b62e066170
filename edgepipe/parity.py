"""Parity verdicts: compare two sets of named outputs with stated tolerances (numpy only)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np


@dataclass
class OutputDiff:
    """How far `actual` is from `expected` for one output (allclose semantics)."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    mean_abs_diff: float
    top1_agreement: float | None
    ok: bool
    note: str | None = None  # why the comparison could not be made (missing output, shape)
    cosine: float | None = None
    sqnr_db: float | None = None

    def line(self) -> str:
        if self.note:
            return f"'{self.name}': {self.note}"
        top1 = f", top-1 agreement {self.top1_agreement:.3f}" if self.top1_agreement is not None else ""
        return (f"'{self.name}': max abs diff {self.max_abs_diff:.3g}, max rel diff "
                f"{self.max_rel_diff:.3g}{top1}")


def diff_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray],
                 atol: float, rtol: float,
                 per_output: Mapping[str, tuple[float, float]] | None = None) -> list[OutputDiff]:
    """One OutputDiff per expected output; ok means |actual-expected| <= atol + rtol*|expected|,
    with (atol, rtol) overridden per output name by `per_output`."""
    diffs = []
    default = (atol, rtol)
    for name, ref in expected.items():
        atol, rtol = (per_output or {}).get(name, default)
        got = actual.get(name)
        ref = np.asarray(ref, dtype=np.float64)
        if got is None or np.shape(got) != ref.shape:
            note = ("missing" if got is None
                    else f"shape {list(np.shape(got))}, expected {list(ref.shape)}")
            diffs.append(OutputDiff(name, float("inf"), float("inf"), float("inf"), None, False, note))
            continue
        got = np.asarray(got, dtype=np.float64)
        err = np.abs(got - ref)
        finite = np.isfinite(got).all()
        rel = err / np.maximum(np.abs(ref), 1e-12)
        top1 = None
        if ref.ndim == 2 and ref.shape[1] > 1:
            top1 = float((ref.argmax(-1) == got.argmax(-1)).mean())
        ok = bool(finite and np.all(err <= atol + rtol * np.abs(ref)))
        norms = float(np.linalg.norm(ref) * np.linalg.norm(got))
        cosine = float(np.sum(ref * got) / norms) if norms > 0 else float(np.array_equal(ref, got))
        noise = float(np.sum(err ** 2))
        sqnr = 10 * np.log10(float(np.sum(ref ** 2)) / noise) if noise > 0 and np.any(ref) else float("inf")
        diffs.append(OutputDiff(name, float(err.max(initial=0.0)), float(rel.max(initial=0.0)),
                                float(err.mean()) if err.size else 0.0, top1, ok, None, cosine, float(sqnr)))
    return diffs


@dataclass
class ParityCase:
    label: str  # e.g. "batch=7 seq=12"
    outputs: list[OutputDiff]

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs)


@dataclass
class ParityReport:
    """Verdict over several input cases; falsy when any output of any case is out of tolerance."""

    atol: float
    rtol: float
    cases: list[ParityCase] = field(default_factory=list)
    error: str | None = None  # a case that could not run at all (e.g. ORT rejected a shape)

    def __bool__(self) -> bool:
        return self.error is None and all(case.ok for case in self.cases)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for c in self.cases for o in c.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for c in self.cases for o in c.outputs), default=0.0)

    def failures(self) -> list[str]:
        lines = [self.error] if self.error else []
        lines += [f"{c.label}: {o.line()}" for c in self.cases for o in c.outputs if not o.ok]
        return lines

    def summary(self) -> str:
        if self:
            return (f"parity ok over {len(self.cases)} case(s): max abs diff {self.max_abs_diff:.3g}, "
                    f"max rel diff {self.max_rel_diff:.3g} (atol {self.atol:g}, rtol {self.rtol:g})")
        return (f"parity violated (atol {self.atol:g}, rtol {self.rtol:g}): "
                + "; ".join(self.failures()))

    def to_dict(self) -> dict:
        return {
            "ok": bool(self), "atol": self.atol, "rtol": self.rtol, "error": self.error,
            "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
            "cases": [{"case": c.label, "ok": c.ok, "outputs": [vars(o) for o in c.outputs]}
                      for c in self.cases],
        }
