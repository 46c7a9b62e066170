"""Latency measurement for Engines: warm-up, percentiles, throughput, interleaved A/B. Torch-free."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Mapping

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


def measure_interleaved(
    fns: Mapping[str, Callable[[], object]],
    batch: int,
    *,
    warmup: int = 10,
    rounds: int = 15,
    calls_per_round: int = 10,
    min_time_s: float = 0.0,
) -> dict[str, LatencyStats]:
    """Time several candidates in alternating rounds, so machine drift hits all of them alike.

    This is how ratios (INT8 vs FP32) must be measured on a noisy machine: one process,
    same inputs, interleaved.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    done_rounds = 0
    while done_rounds < rounds or time.perf_counter() - start < min_time_s:
        for name, fn in fns.items():
            for _ in range(calls_per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        done_rounds += 1
    return {name: LatencyStats.from_times(batch, t) for name, t in times.items()}


def profile_model(
    model_path,
    batch_sizes=(1, 32),
    *,
    providers="auto",
    threads: int | None = None,
    dims: Mapping[str, int] | None = None,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 0.3,
    seed: int = 0,
) -> dict:
    """Profile one ONNX model over a batch sweep; returns a JSON-ready record with the
    engine's actual providers/threads and the hardware fingerprint."""
    from pathlib import Path

    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.hardware import fingerprint
    from edgepipe.runtime.spec import make_feeds

    t0 = time.perf_counter()
    engine = Engine(model_path, providers=providers, threads=threads)
    create_s = time.perf_counter() - t0
    results = []
    for batch in batch_sizes:
        feeds = make_feeds(engine.inputs, batch=batch, dims=dims, seed=seed)
        engine.validate(feeds)
        stats = measure(lambda: engine.session.run(None, feeds), batch, warmup=warmup,
                        min_iterations=min_iterations, min_time_s=min_time_s)
        results.append(stats.to_dict())
    return {
        "model": str(model_path),
        "size_bytes": Path(model_path).stat().st_size,
        "engine": engine.describe(),
        "session_create_ms": round(create_s * 1000, 2),
        "latency": results,
        "hardware": fingerprint(),
    }


def compare_models(
    models: Mapping[str, object],
    batch_sizes=(1, 32),
    *,
    providers="auto",
    threads: int | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    rounds: int = 20,
    seed: int = 0,
) -> dict:
    """Profile several models (e.g. FP32 and INT8) interleaved in one process; ratios are
    reported against the first. `data` supplies real input rows; else inputs are generated."""
    from pathlib import Path

    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.hardware import fingerprint
    from edgepipe.runtime.spec import make_feeds

    # No spinning: several sessions share the cores while interleaved (see Engine).
    engines = {label: Engine(path, providers=providers, threads=threads, spinning=False)
               for label, path in models.items()}
    baseline = next(iter(engines))
    latency: dict[str, list[dict]] = {label: [] for label in engines}
    speedup: dict[str, dict[str, float]] = {label: {} for label in engines if label != baseline}
    for batch in batch_sizes:
        feeds = make_feeds(engines[baseline].inputs, batch=batch, seed=seed)
        if data and all(name in data and len(data[name]) >= batch for name in feeds):
            feeds = {name: np.ascontiguousarray(data[name][:batch]) for name in feeds}
        for engine in engines.values():
            engine.validate(feeds)
        fns = {label: (lambda e=e: e.session.run(None, feeds)) for label, e in engines.items()}
        stats = measure_interleaved(fns, batch, rounds=rounds)
        for label, s in stats.items():
            latency[label].append(s.to_dict())
            if label != baseline:
                speedup[label][str(batch)] = round(stats[baseline].p50_ms / s.p50_ms, 3)
    return {
        "models": {label: {"path": str(path), "size_bytes": Path(path).stat().st_size,
                           "providers": engines[label].providers}
                   for label, path in models.items()},
        "baseline": baseline,
        "latency": latency,
        "speedup": speedup,
        "threads": threads or "ort-default",
        "intra_op_spinning": False,
        "hardware": fingerprint(),
    }
