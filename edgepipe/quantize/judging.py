"""The judging side of a quantize search: whether a candidate is accurate and fast enough, and
its verdict. A Judge is what a Search holds (`search.judging`); it knows only the budgets, FP32's
reference output and the labels, never the search's timing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgepipe.metrics import UNRESOLVED, WITHIN, resolution, rows_needed, scores, unresolved_text
from edgepipe.quantize.candidate import Candidate
from edgepipe.quantize.config import QuantizeConfig
from edgepipe.quantize.evaluation import flips, resolves
from edgepipe.quantize.verdict import OK, Verdict


@dataclass
class Judge:
    config: QuantizeConfig  # the budgets: accuracy drop, speedup and its margin, require_resolved
    reference: np.ndarray  # FP32's first output on the held-out rows
    labels: np.ndarray | None  # per row, or per token (token classification); None: agreement with FP32
    units: int  # what a drop counts: rows, or the tagged words of token classification
    unit: str  # "rows" or "words"
    resolved: bool  # whether one unit is at most half the budget (else a drop fails only on its lower bound)

    @classmethod
    def of(cls, config: QuantizeConfig, reference: np.ndarray, labels: np.ndarray | None) -> "Judge":
        units = flips(reference, reference, labels).rows
        unit = "words" if labels is not None and labels.ndim == 2 else "rows"
        return cls(config, reference, labels, units, unit, resolves(units, config.max_accuracy_drop))

    @property
    def needed(self) -> float:
        """The speedup a candidate must show at every batch size to count as faster."""
        return self.config.min_speedup * (1 + self.config.speedup_margin)

    def rate(self, cand: Candidate, out: np.ndarray) -> None:
        """A built candidate's rows lost and gained against FP32, its task scores against the
        labels, and whether its drop's 95% interval resolves the budget."""
        labels = self.labels
        cand.flips = flips(out, self.reference, labels)
        if labels is not None:
            cand.scores = scores(out.argmax(-1), labels[:len(out)])
        budget, drop = self.config.max_accuracy_drop, cand.flips.interval
        cand.resolution = resolution(drop, budget)
        cand.rows_needed = rows_needed(drop, budget, self.units) if cand.resolution == UNRESOLVED else None

    def accurate(self, cand: Candidate) -> bool:
        """Within the budget: the measured drop is at most the budget (or, on rows too few to
        resolve it, its interval's lower end is); with require_resolved the whole interval is."""
        if cand.error is not None:
            return False
        budget = self.config.max_accuracy_drop
        if self.config.require_resolved and cand.resolution is not None and cand.resolution != WITHIN:
            return False
        if cand.accuracy_drop <= budget:
            return True
        return not self.resolved and cand.flips is not None and cand.flips.drop_lower_bound <= budget

    def accuracy_verdict(self, cand: Candidate, detail: str = "") -> Verdict:
        if cand.flips is not None:
            counted = f"{cand.flips.losses} of {cand.flips.rows} {self.unit} lost, {cand.flips.gains} gained"
            if not self.resolved:
                counted += f"; 95% lower bound {cand.flips.drop_lower_bound:.4f} is above the budget too"
            if cand.resolution == UNRESOLVED:
                counted += "; " + unresolved_text(cand.rows_needed)
            detail = f"{detail}; {counted}" if detail else counted
        return Verdict.accuracy(cand.accuracy_drop, self.config.max_accuracy_drop, detail)

    def fast_enough(self, cand: Candidate) -> bool:
        return bool(cand.speedup) and all(s >= self.needed for s in cand.speedup.values())

    def judge(self, cand: Candidate) -> None:
        slow = {b: s for b, s in cand.speedup.items() if s < self.needed}
        if not self.accurate(cand):
            cand.verdict = self.accuracy_verdict(cand)
        elif slow:
            cand.verdict = Verdict.too_slow(slow, self.needed)
        else:
            cand.verdict = Verdict(OK)

