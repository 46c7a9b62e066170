"""Latency measurement for Engines: warm-up, percentiles, throughput, interleaved A/B. Torch-free."""

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


@dataclass(frozen=True)
class SessionSetting:
    """How an Engine's CPU session runs: intra-op threads and whether idle workers spin.

    On a small CPU these move an INT8/FP32 ratio as much as the recipe does, and not the same
    way for both models (2 cores: the INT8 MLP runs fastest on 1 thread, the FP32 transformer at
    batch 32 on 2), so each model is compared, and deployed, at its own fastest setting."""

    threads: int
    spinning: bool

    def to_dict(self) -> dict:
        return {"threads": self.threads, "spinning": self.spinning}

    @classmethod
    def from_dict(cls, data: Mapping) -> "SessionSetting":
        return cls(int(data["threads"]), bool(data["spinning"]))

    def engine_options(self) -> dict:
        return {"threads": self.threads, "spinning": self.spinning}

    def __str__(self) -> str:
        return f"{self.threads} thread{'s' if self.threads > 1 else ''}" + (", spinning" if self.spinning else "")


def session_settings(threads: int | None = None, cores: int | None = None,
                     spinning: bool = False) -> list[SessionSetting]:
    """The settings worth sweeping: one thread and all `cores` (or only the user's fixed
    `threads`), without spinning; with `spinning`, also all cores with spinning workers. Those
    keep a core busy ~40 ms after every run (measured here), which slows whatever else runs, so
    they are opt-in, and timing them needs a pause after each (measure_interleaved does it)."""
    import os

    n = max(1, int(threads or cores or os.cpu_count() or 1))
    settings = [SessionSetting(n, False)] if threads else list(dict.fromkeys([SessionSetting(1, False),
                                                                             SessionSetting(n, False)]))
    if spinning and n > 1:
        settings.append(SessionSetting(n, True))
    return settings


def route_batch(batches, rows: int) -> int:
    """Which configured batch size serves `rows`: the smallest >= rows, else the largest."""
    ordered = sorted(batches)
    return next((b for b in ordered if rows <= b), ordered[-1])


def fastest_per_batch(p50_by_batch: Mapping[int, Mapping[SessionSetting, float]]) -> dict[int, SessionSetting]:
    """{batch: the setting with the lowest p50 at that batch} (ties: fewer threads, no spinning)."""
    return {b: min(sorted(p50, key=lambda s: (s.threads, s.spinning)), key=lambda s: p50[s])
            for b, p50 in p50_by_batch.items()}


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
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    if spinning:
        wait_until_idle()
    times: dict[str, list[float]] = {name: [] for name in fns}
    start = time.perf_counter()
    done_rounds = 0
    while done_rounds < rounds or time.perf_counter() - start < min_time_s:
        for name, fn in fns.items():
            for _ in range(calls_per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
            if name in spinning:
                wait_until_idle()
        done_rounds += 1
    return {name: LatencyStats.from_times(batch, t) for name, t in times.items()}


def peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far (None where the OS does not say)."""
    try:
        import resource
        import sys
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def profile_events(model, feeds: Mapping[str, np.ndarray], session_providers: list, *,
                   threads: int | None = None, iterations: int = 30) -> list[dict]:
    """Run `model` `iterations` times under ONNX Runtime's profiler; its JSON events.
    `session_providers`: what InferenceSession takes (names, or (name, options) pairs)."""
    import json
    import tempfile
    from pathlib import Path

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    with tempfile.TemporaryDirectory(prefix="edgepipe-ops-") as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        source = model if isinstance(model, bytes) else str(model)
        session = ort.InferenceSession(source, options, providers=session_providers)
        for _ in range(iterations):
            session.run(None, dict(feeds))
        return json.loads(Path(session.end_profiling()).read_text())


def node_times(events: list[dict]) -> dict[str, dict]:
    """{node name: {"node", "op", "provider", "us"}} from profiler events (kernel time summed)."""
    by_node: dict[str, dict] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        args = event.get("args", {})
        node = event["name"][: -len("_kernel_time")]
        entry = by_node.setdefault(node, {"node": node, "op": args.get("op_name", "?"),
                                          "provider": args.get("provider"), "us": 0.0})
        entry["us"] += event.get("dur", 0)
    return by_node


def placement_report(by_node: dict[str, dict], providers: list[str]) -> dict:
    """Which provider ran each node. `fell_back`: nodes not on the preferred (first) provider,
    e.g. the CPU nodes of a CUDA session, with the copies ORT inserted around them."""
    from collections import Counter

    preferred = providers[0] if providers else None
    fell_back = [] if preferred in (None, "CPUExecutionProvider") else [
        {"node": n["node"], "op": n["op"], "provider": n["provider"]}
        for n in by_node.values() if n["provider"] != preferred]
    return {"providers": list(providers),
            "nodes_per_provider": dict(Counter(n["provider"] for n in by_node.values())),
            "fell_back": fell_back,
            "memcpy_nodes": sum(n["op"].startswith("Memcpy") for n in by_node.values())}


def operator_profile(model_path, feeds: Mapping[str, np.ndarray], *, providers="auto",
                     threads: int | None = None, iterations: int = 30, top: int = 15) -> dict:
    """Per-operator time from ONNX Runtime's own profiler: by op type and by node, with the
    provider each node ran in."""
    from collections import defaultdict

    from edgepipe.runtime.engine import resolve_providers

    names = resolve_providers(providers)[0]
    by_node = node_times(profile_events(model_path, feeds, names, threads=threads, iterations=iterations))
    by_op: dict[str, float] = defaultdict(float)
    for entry in by_node.values():
        by_op[entry["op"]] += entry["us"]
    total = sum(by_op.values()) or 1.0
    ops = sorted(({"op": op, "us_per_run": round(us / iterations, 2), "share": round(us / total, 4)}
                  for op, us in by_op.items()), key=lambda r: r["us_per_run"], reverse=True)
    nodes = sorted(by_node.values(), key=lambda r: r["us"], reverse=True)
    return {
        "iterations": iterations,
        "by_op_type": ops,
        "by_node": [{"node": n["node"], "op": n["op"], "provider": n["provider"],
                     "us_per_run": round(n["us"] / iterations, 2), "share": round(n["us"] / total, 4)}
                    for n in nodes[:top]],
        "nodes_per_provider": placement_report(by_node, names)["nodes_per_provider"],
    }


def profile_model(
    model_path,
    batch_sizes=(1, 32),
    *,
    providers="auto",
    threads: int | None = None,
    thread_sweep: tuple[int | None, ...] | None = None,
    dims: Mapping[str, int] | None = None,
    warmup: int = 10,
    min_iterations: int = 30,
    min_time_s: float = 0.3,
    operators: bool = False,
    seed: int = 0,
    provider_options: Mapping[str, Mapping] | None = None,
) -> dict:
    """Profile one ONNX model: cold start (session creation + first inference), warm latency
    over a batch sweep (and a thread sweep), peak RSS, file size, optionally the per-operator
    breakdown; with the engine's actual providers and the hardware fingerprint. On a GPU (or
    any provider but the CPU) `placement` says which nodes fell back to the CPU."""
    from pathlib import Path

    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.hardware import fingerprint
    from edgepipe.runtime.spec import make_feeds

    sweep = tuple(thread_sweep) if thread_sweep else (threads,)
    runs = []
    cold = None
    for thread_count in sweep:
        t0 = time.perf_counter()
        engine = Engine(model_path, providers=providers, threads=thread_count, provider_options=provider_options)
        created = time.perf_counter()
        first_feeds = make_feeds(engine.inputs, batch=1, dims=dims, seed=seed)
        engine.session.run(None, first_feeds)
        if cold is None:  # the first session of this process: closest to a real cold start
            cold = {"session_create_ms": round((created - t0) * 1000, 2),
                    "first_inference_ms": round((time.perf_counter() - created) * 1000, 3)}
        latency = []
        for batch in batch_sizes:
            feeds = make_feeds(engine.inputs, batch=batch, dims=dims, seed=seed)
            engine.validate(feeds)
            stats = measure(lambda: engine.session.run(None, feeds), batch, warmup=warmup,
                            min_iterations=min_iterations, min_time_s=min_time_s)
            latency.append(stats.to_dict())
        runs.append({"threads": thread_count or "ort-default", "latency": latency})
    record = {
        "model": str(model_path),
        "size_bytes": Path(model_path).stat().st_size,
        "engine": engine.describe(),
        "cold_start": cold,
        "latency": runs[0]["latency"],
        "thread_sweep": runs if len(runs) > 1 else None,
        "peak_rss_mb": peak_rss_mb(),
        "hardware": fingerprint(),
        "placement": None if engine.providers[0] == "CPUExecutionProvider" else engine.placement(),
    }
    if operators:
        feeds = make_feeds(engine.inputs, batch=max(batch_sizes), dims=dims, seed=seed)
        record["operators"] = operator_profile(model_path, feeds, providers=providers, threads=sweep[0])
    return record


def merge_profiles(records: list[dict]) -> list[dict]:
    """Rows (device, model, batch, p50/p99, throughput) from profile JSONs of several devices."""
    rows = []
    for record in records:
        cpu = record.get("hardware", {}).get("cpu", {})
        device = f"{cpu.get('model', '?')} [{record.get('hardware', {}).get('hostname', '?')}]"
        for stats in record.get("latency", []):
            rows.append({"device": device, "model": record.get("model"), "batch": stats["batch"],
                         "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"], "throughput": stats["throughput"],
                         "onnxruntime": record.get("hardware", {}).get("onnxruntime")})
    return rows


def compare_models(
    models: Mapping[str, object],
    batch_sizes=(1, 32),
    *,
    providers="auto",
    threads: int | None = None,
    data: Mapping[str, np.ndarray] | None = None,
    rounds: int = 20,
    trials: int = 3,
    seed: int = 0,
    provider_options: Mapping[str, Mapping] | None = None,
    sessions: Mapping[str, Mapping[int, SessionSetting]] | None = None,
) -> dict:
    """Profile several models (e.g. FP32 and INT8) interleaved in one process; ratios are
    reported against the first. `data` supplies real input rows; else inputs are generated.
    `sessions`: a model's own settings per batch size (Engine's batch_sessions), e.g. those
    quantize found fastest for it; the others run with `threads` and spinning off.

    The rounds are split over `trials` independent trials, each with freshly created sessions,
    and each model's median trial is reported: on 2 cores a pair of sessions occasionally lands
    in a slow thread hand-off state for its whole life (an INT8 LSTM read 0.5x once in 12 trials,
    1.7-1.9x otherwise), and one such trial must not decide a verdict.
    """
    from pathlib import Path

    from edgepipe.runtime.engine import Engine
    from edgepipe.runtime.hardware import fingerprint
    from edgepipe.runtime.spec import make_feeds

    default = SessionSetting(threads or 0, False)  # no spinning: sessions share the cores (see Engine)
    chosen = {label: {int(b): (sessions[label][route_batch(sessions[label], b)] if (sessions or {}).get(label)
                               else default) for b in batch_sizes}
              for label in models}

    def fresh() -> dict[str, Engine]:
        return {label: Engine(path, providers=providers, threads=threads, spinning=False,
                              provider_options=provider_options,
                              batch_sessions=(sessions or {}).get(label))
                for label, path in models.items()}

    engines = fresh()
    baseline = next(iter(engines))
    per_trial: dict[int, dict[str, list[LatencyStats]]] = {b: {label: [] for label in engines} for b in batch_sizes}
    for trial in range(max(1, trials)):
        if trial:
            engines = fresh()
        for batch in batch_sizes:
            feeds = make_feeds(engines[baseline].inputs, batch=batch, seed=seed)
            if data and all(name in data and len(data[name]) >= batch for name in feeds):
                feeds = {name: np.ascontiguousarray(data[name][:batch]) for name in feeds}
            for engine in engines.values():
                engine.validate(feeds)
            fns = {label: (lambda s=e.session_for(batch): s.run(None, feeds)) for label, e in engines.items()}
            stats = measure_interleaved(fns, batch, rounds=max(5, rounds // max(1, trials)),
                                        spinning={label for label in fns if chosen[label][batch].spinning})
            for label, st in stats.items():
                per_trial[batch][label].append(st)
    latency: dict[str, list[dict]] = {label: [] for label in engines}
    speedup: dict[str, dict[str, float]] = {label: {} for label in engines if label != baseline}
    for batch in batch_sizes:
        median = {label: sorted(runs, key=lambda st: st.p50_ms)[len(runs) // 2]
                  for label, runs in per_trial[batch].items()}
        for label, st in median.items():
            latency[label].append(st.to_dict() | {"trial_p50_ms": [round(r.p50_ms, 4) for r in per_trial[batch][label]]})
            if label != baseline:
                speedup[label][str(batch)] = round(median[baseline].p50_ms / st.p50_ms, 3)
    return {
        "models": {label: {"path": str(path), "size_bytes": Path(path).stat().st_size,
                           "providers": engines[label].providers,
                           "sessions": {str(b): {"threads": st.threads or "ort-default", "spinning": st.spinning}
                                        for b, st in chosen[label].items()}}
                   for label, path in models.items()},
        "baseline": baseline,
        "latency": latency,
        "speedup": speedup,
        "threads": threads or "ort-default",
        "intra_op_spinning": any(st.spinning for per in chosen.values() for st in per.values()),
        "trials": max(1, trials),
        "hardware": fingerprint(),
    }
