"""Latency measurement: warm-up, percentiles, interleaved A/B timing. Torch-free."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Collection, Mapping

import numpy as np


@dataclass
class LatencyStats:
    """Per-call latency of one model at one batch size."""

    batch: int
    iterations: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float

    @property
    def throughput(self) -> float:
        """Samples per second at the median latency."""
        return self.batch / (self.p50_ms / 1000.0) if self.p50_ms > 0 else float("inf")

    def to_dict(self) -> dict:
        return asdict(self) | {"throughput": round(self.throughput, 1)}

    @classmethod
    def from_times(cls, batch: int, seconds: list[float]) -> "LatencyStats":
        ms = np.asarray(seconds) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return cls(batch=batch, iterations=len(ms), p50_ms=float(p50), p90_ms=float(p90),
                   p99_ms=float(p99), mean_ms=float(ms.mean()), min_ms=float(ms.min()),
                   max_ms=float(ms.max()))


def measure(
    fn: Callable[[], object],
    batch: int,
    *,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 0.3,
    max_iterations: int = 10_000,
) -> LatencyStats:
    """Time `fn()` after `warmup` calls until both `min_iterations` and `min_time_s` are reached."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iterations:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_iterations and time.perf_counter() - start >= min_time_s:
            break
    return LatencyStats.from_times(batch, times)


def wait_until_idle(quiet_ms: float = 1.0, step_s: float = 0.005, max_s: float = 0.5) -> float:
    """Sleep until this process uses (almost) no CPU for one `step_s`: spinning ORT workers have
    stopped. Returns the seconds waited (at most `max_s`)."""
    start = time.perf_counter()
    while time.perf_counter() - start < max_s:
        cpu = time.process_time()
        time.sleep(step_s)
        if (time.process_time() - cpu) * 1000.0 < quiet_ms:
            break
    return time.perf_counter() - start


# Warm-up per model: up to `warmup` calls, as many as fit in this; 2 at least (a cold first call and
# a warm one timed for the cost of a call), except that one first call this long is warm-up enough:
# its session's arena and kernels are set up, and a second would double a slow model's warm-up.
WARMUP_S = 0.5
BLOCK_S = 0.1  # one model's block of calls per round: up to `calls_per_round`, as many as fit


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    batch: int,
    *,
    warmup: int = 10,
    rounds: int = 15,
    calls_per_round: int = 10,
    min_time_s: float = 0.0,
    spinning: Collection = (),
) -> dict[str, LatencyStats]:
    """Time several candidates in alternating rounds, so machine drift hits all of them alike.

    This is how ratios (INT8 vs FP32) must be measured on a noisy machine: one process,
    same inputs, interleaved. `spinning`: the keys whose sessions spin their idle workers.
    After each of their blocks the process waits until those workers stop (about 40 ms of
    busy CPU after every run on this project's machine), else they would slow whichever
    model is timed next.
    """
    # Warm-up and calls per block scale with the cost of a call: a sub-millisecond model gets
    # the full counts; one whose call takes a block or more gets one call per block and fewer
    # warm-up calls (one, past WARMUP_S), so timing many candidates of a large model stays in
    # minutes. Each model keeps `rounds` interleaved samples at least.
    calls = {}
    for name, fn in fns.items():
        cost = time_call(fn)
        if cost < WARMUP_S:  # that call was cold: time a warm one, then warm up to WARMUP_S
            cost = time_call(fn)
            for _ in range(max(0, min(warmup, round(WARMUP_S / cost)) - 2)):
                fn()
        calls[name] = max(1, min(calls_per_round, round(BLOCK_S / cost)))
    if spinning:
        wait_until_idle()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    done_rounds = 0
    while done_rounds < rounds or time.perf_counter() - start < min_time_s:
        for name, fn in fns.items():
            for _ in range(calls[name]):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            if name in spinning:
                wait_until_idle()
        done_rounds += 1
    return {name: LatencyStats.from_times(batch, t) for name, t in times.items()}


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of `fn` takes (1 us at least)."""
    began = time.perf_counter()
    fn()
    return max(time.perf_counter() - began, 1e-6)


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (None where the OS does not say)."""
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)
