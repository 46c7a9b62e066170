"""What every quantize search shares, for classifiers and decoders alike: its Clock (the time
budget, each phase's seconds and peak memory), when building stops, the speedup a candidate
needs, and the choice among the candidates that qualify.

A search's strategy is what differs and lives beside it: what it builds, the metric it judges
on and its timing unit. The classifier search (search.Search, judged by judging.Judge) times
calls interleaved with FP32 at each batch size and judges an accuracy drop; the decoder search
(decoder.py, measured by decoder_measure.Probe) times a decode step per output token and judges
perplexity and greedy-token agreement. Both record a Verdict per candidate and pick with `pick`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, TypeVar

from edgepipe.memory import PeakMemory, return_freed_memory

# Shares of the time budget past which no build starts: one whose candidate is timed later, with
# the others (what is built must leave room for its timing), and one that adds nothing to time
# later (a copy of a built file for another runtime, a bias correction of a built file, or a
# decoder candidate, measured as it is built).
BUILD_SHARE, LATE_BUILD_SHARE = 0.4, 0.7

T = TypeVar("T")


def needed_speedup(min_speedup: float, margin: float) -> float:
    """The speedup a candidate must show at every batch size to count as faster: `min_speedup`
    beaten by `margin`, since two measurements of a ratio near 1.0 disagree by a few percent."""
    return min_speedup * (1 + margin)


@dataclass
class Clock:
    """A search's time: its budget (None: no limit), when it started, the seconds and peak RSS
    of each phase, and the timing rounds each timed phase could afford."""

    budget_s: float | None
    started: float = field(default_factory=time.perf_counter)
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (repeats add up)
    phase_peaks: dict[str, float] = field(default_factory=dict)  # MB, where the peak can be reset (Linux)
    rounds_used: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        self.budget_s = self.budget_s or None  # 0: no limit

    @contextmanager
    def phase(self, name: str):
        """Time a phase (seconds add up over repeats) and record its peak RSS (the highest)."""
        return_freed_memory()  # what the phase before freed is not this phase's peak
        began = time.perf_counter()
        peak = PeakMemory()
        try:
            with peak:
                yield
        finally:
            self.phases[name] = round(self.phases.get(name, 0.0) + time.perf_counter() - began, 2)
            if peak.scope == "work" and peak.mb is not None:
                self.phase_peaks[name] = max(self.phase_peaks.get(name, 0.0), peak.mb)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def out_of_time(self, fraction: float = 1.0, ahead: float = 0.0) -> bool:
        """Whether `fraction` of the budget is spent, or would be after `ahead` more seconds
        (never, without a budget)."""
        return self.budget_s is not None and self.elapsed() + ahead >= fraction * self.budget_s

    def left(self) -> float | None:
        """Seconds of the budget left (None without one)."""
        return None if self.budget_s is None else self.budget_s - self.elapsed()


def pick(qualifying: Iterable[T], band: float, speed: Callable[[T], float], error: Callable[[T], float]) -> T | None:
    """The candidate to ship among those that qualify: of the ones as fast as the fastest within
    the noise band (`band` = 1 + margin), the most faithful to FP32 (lowest `error`), then the
    fastest. None when none qualifies."""
    qualifying = list(qualifying)
    if not qualifying:
        return None
    top = max(map(speed, qualifying))
    return min((c for c in qualifying if speed(c) * band >= top), key=lambda c: (error(c), -speed(c)))
