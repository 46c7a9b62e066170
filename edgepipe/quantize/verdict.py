"""A candidate's verdict: what was judged, the measured value and the threshold. Becomes text
only where it is printed or recorded."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

PENDING, FAILED, OK, CHOSEN = "pending", "failed", "ok", "chosen"
ACCURACY, SPEED, SLOWER_TRIAL, SUPERSEDED = "accuracy", "speed", "slower_trial", "superseded"
NOT_RETIMED = "not_retimed"  # accepted in its first trial, which was no faster than the chosen's median
NOT_TRIED, OUT_OF_TIME = "not_tried", "out_of_time"  # an opt-in recipe not named; a build the budget left out
OUT_OF_BUDGET = frozenset({FAILED, ACCURACY, SPEED, SLOWER_TRIAL})  # kinds a deployment must not run as


def per_batch(values: Mapping[int, float]) -> str:
    return ", ".join(f"{b} ({s:.2f}x)" for b, s in values.items())


@dataclass(frozen=True)
class Verdict:
    kind: str = PENDING
    measured: float | None = None  # accuracy drop, or the lowest speedup that missed
    threshold: float | None = None  # the budget it was held to
    detail: str = ""  # the batches that missed, or the node a fallback step concerns
    unconfirmed_after: int = 0  # > 0: an "ok" overturned when re-timed in this many more trials
    metric: str = ""  # a quality verdict's measurement against its budget, as text (decoders: perplexity)

    def __bool__(self) -> bool:
        return self.kind in (OK, CHOSEN)

    @property
    def inaccurate(self) -> bool:
        return self.kind == ACCURACY

    @classmethod
    def accuracy(cls, drop: float, budget: float, detail: str = "") -> "Verdict":
        return cls(ACCURACY, drop, budget, detail)

    @classmethod
    def quality(cls, metric: str, measured: float, budget: float) -> "Verdict":
        """Out of a quality budget other than the accuracy drop (`metric` says which and how)."""
        return cls(ACCURACY, measured, budget, metric=metric)

    @classmethod
    def too_slow(cls, slow: Mapping[int, float], needed: float) -> "Verdict":
        return cls(SPEED, min(slow.values()), needed, per_batch(slow))

    @classmethod
    def slower_in_a_trial(cls, slower: Mapping[int, float], floor: float) -> "Verdict":
        return cls(SLOWER_TRIAL, min(slower.values()), floor, per_batch(slower))

    def unconfirmed(self, trials: int) -> "Verdict":
        return replace(self, unconfirmed_after=trials)

    def __str__(self) -> str:
        text = {
            PENDING: "",
            FAILED: f"failed {self.detail}" if self.detail else "failed",
            OK: "ok",
            CHOSEN: "chosen",
            ACCURACY: f"quality: {self.metric}" if self.metric else
                      f"accuracy drop {self.measured or 0.0:.4f} > {self.threshold}"
                      + (f": {self.detail}" if self.detail else ""),
            SPEED: f"not clearly faster (needs >= {self.threshold or 0.0:.2f}x) at batch {self.detail}",
            SLOWER_TRIAL: f"slower than FP32 in one trial at batch {self.detail}",
            NOT_TRIED: f"not tried: {self.detail}",
            OUT_OF_TIME: f"skipped: time budget ({self.threshold or 0:g} s; raise --time-budget to try it)",
            SUPERSEDED: f"superseded: {self.detail} can stay INT8",
            NOT_RETIMED: ("ok in one trial, not re-timed: " + (self.detail or
                          "neither faster there than the chosen one's median nor more faithful within the noise band")),
        }[self.kind]
        if self.unconfirmed_after:
            text = f"not confirmed in {self.unconfirmed_after} more trials: {text}"
        return text
