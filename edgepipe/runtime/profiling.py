"""Profiling Engines: one model over batch and thread sweeps, several models interleaved,
and profiles of several devices merged. Torch-free."""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np

from edgepipe.runtime.engine import Engine
from edgepipe.runtime.hardware import fingerprint
from edgepipe.runtime.modelfile import model_bytes
from edgepipe.runtime.placement import operator_profile
from edgepipe.runtime.sessions import SessionSetting, route_batch
from edgepipe.runtime.spec import dynamic_sizes, make_feeds
from edgepipe.runtime.timing import LatencyStats, measure, measure_interleaved, peak_rss_mb


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
    backend: str | None = None,
    allow_out_of_budget: bool = False,
) -> dict:
    """Profile one ONNX model (on the backend its file records, else onnxruntime; or the one
    `backend` names, see Engine): cold
    start (session creation + first inference), warm latency over a batch sweep (and a thread
    sweep), peak RSS, file size, optionally the per-operator breakdown; with the engine's actual
    providers and the hardware fingerprint. On a GPU (or any provider but the CPU) `placement`
    says which nodes fell back to the CPU."""
    sweep = tuple(thread_sweep) if thread_sweep else (threads,)
    runs = []
    cold = None
    for thread_count in sweep:
        t0 = time.perf_counter()
        engine = Engine(model_path, providers=providers, threads=thread_count, provider_options=provider_options,
                        backend=backend, allow_out_of_budget=allow_out_of_budget)
        created = time.perf_counter()
        sizes = dynamic_sizes(engine.inputs, dims)  # refuses a --dim the model does not have
        first_feeds = make_feeds(engine.inputs, batch=1, dims=dims, seed=seed)
        engine.run(first_feeds)  # a model that cannot run these inputs: one line, not a traceback
        if cold is None:  # the first session of this process: closest to a real cold start
            cold = {"session_create_ms": round((created - t0) * 1000, 2),
                    "first_inference_ms": round((time.perf_counter() - created) * 1000, 3)}
        latency = []
        for batch in batch_sizes:
            feeds = make_feeds(engine.inputs, batch=batch, dims=dims, seed=seed)
            engine.validate(feeds)
            stats = measure(engine.runner(feeds), batch, warmup=warmup,
                            min_iterations=min_iterations, min_time_s=min_time_s)
            latency.append(stats.to_dict())
        runs.append({"threads": thread_count or "ort-default", "latency": latency})
    record = {
        "model": str(model_path),
        "dims": sizes,
        "size_bytes": model_bytes(model_path),
        "engine": engine.describe(),
        "cold_start": cold,
        "latency": runs[0]["latency"],
        "thread_sweep": runs if len(runs) > 1 else None,
        "peak_rss_mb": peak_rss_mb(),
        "hardware": fingerprint(),
        "placement": (None if engine.providers[0] == "CPUExecutionProvider" or engine.backend != "onnxruntime"
                      else engine.placement()),
    }
    if operators and engine.backend == "onnxruntime":  # onnxruntime's own profiler
        feeds = make_feeds(engine.inputs, batch=max(batch_sizes), dims=dims, seed=seed)
        record["operators"] = operator_profile(model_path, feeds, providers=providers, threads=sweep[0])
    return record


def merge_profiles(records: list[dict]) -> list[dict]:
    """Rows (device, model, batch, p50/p99, throughput) from profile JSONs of several devices; a
    decoder's profile gives rows per batch and prompt length (TTFT, time per token, tokens/s)."""
    rows = []
    for record in records:
        cpu = record.get("hardware", {}).get("cpu", {})
        device = f"{cpu.get('model', '?')} [{record.get('hardware', {}).get('hostname', '?')}]"
        if record.get("kind") == "decoder":
            rows += [{"device": device, "model": record.get("model"), "kind": "decoder"}
                     | {k: r[k] for k in ("batch", "prompt", "ttft_ms", "tpot_ms", "tpot_p90_ms", "tokens_per_s")}
                     | {"onnxruntime": record.get("hardware", {}).get("onnxruntime")} for r in record["rows"]]
            continue
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
    dims: Mapping[str, int] | None = None,
    backends: Mapping[str, str | None] | None = None,
    allow_out_of_budget: bool = False,
) -> dict:
    """Profile several models (e.g. FP32 and INT8) interleaved in one process; ratios are
    reported against the first. `backends`: a model's runtime (e.g. {"int8": "openvino"});
    a model not named runs on the backend its file records, else onnxruntime. `data` supplies real
    input rows; else inputs are generated.
    `sessions`: a model's own settings per batch size (Engine's batch_sessions), e.g. those
    quantize found fastest for it; the others run with `threads` and spinning off.

    The rounds are split over `trials` independent trials, each with freshly created sessions,
    and each model's median trial is reported: on 2 cores a pair of sessions occasionally lands
    in a slow thread hand-off state for its whole life (an INT8 LSTM read 0.5x once in 12 trials,
    1.7-1.9x otherwise), and one such trial must not decide a verdict.
    """
    default = SessionSetting(threads or 0, False)  # no spinning: sessions share the cores (see Engine)
    chosen: dict[str, dict[int, SessionSetting]] = {}  # what each engine runs each batch with

    def settings_of(engine: Engine) -> dict[int, SessionSetting]:
        table = dict(engine.batch_sessions)  # `sessions`, or those the file records (see Engine)
        return {int(b): table[route_batch(table, b)] if table else default for b in batch_sizes}

    def fresh() -> dict[str, Engine]:
        return {label: Engine(path, providers=providers, threads=threads, spinning=False,
                              provider_options=provider_options,
                              batch_sessions=(sessions or {}).get(label),
                              backend=(backends or {}).get(label), allow_out_of_budget=allow_out_of_budget)
                for label, path in models.items()}

    per_trial: dict[int, dict[str, list[LatencyStats]]] = {b: {label: [] for label in models} for b in batch_sizes}
    for trial in range(max(1, trials)):
        engines = fresh()
        chosen = chosen or {label: settings_of(engine) for label, engine in engines.items()}
        if not trial:
            dynamic_sizes(next(iter(engines.values())).inputs, dims)  # refuses a dim the model lacks
        for batch in batch_sizes:
            stats = _time_batch(engines, batch, data, seed, dims, rounds=max(5, rounds // max(1, trials)),
                                spinning={label for label in engines if chosen[label][batch].spinning})
            for label, st in stats.items():
                per_trial[batch][label].append(st)
    baseline = next(iter(models))
    latency, speedup = median_trials(per_trial, baseline)
    return {
        "models": {label: {"path": str(path), "size_bytes": model_bytes(path),
                           "providers": engines[label].providers,
                           "backend": engines[label].backend,
                           "sessions": {str(b): {"threads": st.threads or "ort-default", "spinning": st.spinning}
                                        for b, st in chosen[label].items()}}
                   for label, path in models.items()},
        "baseline": baseline,
        "dims": observed_dims(engines[baseline].inputs,
                              batch_feeds(engines[baseline].inputs, max(batch_sizes), data, seed, dims)),
        "latency": latency,
        "speedup": speedup,
        "threads": threads or "ort-default",
        "intra_op_spinning": any(st.spinning for per in chosen.values() for st in per.values()),
        "trials": max(1, trials),
        "hardware": fingerprint(),
    }


def median_trials(per_trial: Mapping[int, Mapping[str, list[LatencyStats]]],
                  baseline: str) -> tuple[dict[str, list[dict]], dict[str, dict[str, float]]]:
    """Each model's median trial per batch size (with every trial's p50), and its speedup over
    `baseline`'s median trial."""
    labels = list(next(iter(per_trial.values())))
    latency: dict[str, list[dict]] = {label: [] for label in labels}
    speedup: dict[str, dict[str, float]] = {label: {} for label in labels if label != baseline}
    for batch, runs_by_label in per_trial.items():
        median = {label: sorted(runs, key=lambda st: st.p50_ms)[len(runs) // 2]
                  for label, runs in runs_by_label.items()}
        for label, st in median.items():
            latency[label].append(st.to_dict() | {"trial_p50_ms": [round(r.p50_ms, 4) for r in runs_by_label[label]]})
            if label != baseline:
                speedup[label][str(batch)] = round(median[baseline].p50_ms / st.p50_ms, 3)
    return latency, speedup


def batch_feeds(specs, batch: int, data: Mapping[str, np.ndarray] | None, seed: int,
                dims: Mapping[str, int] | None) -> dict[str, np.ndarray]:
    """`batch` real rows from `data` when it has enough, else generated inputs (sized by `dims`)."""
    feeds = make_feeds(specs, batch=batch, dims=dims, seed=seed)
    if data and all(name in data and len(data[name]) >= batch for name in feeds):
        feeds = {name: np.ascontiguousarray(data[name][:batch]) for name in feeds}
    return feeds


def observed_dims(specs, feeds: Mapping[str, np.ndarray]) -> dict[str, int]:
    """The size each named dynamic dim (but batch) really had in `feeds`."""
    return {name: int(feeds[s.name].shape[axis]) for s in specs for axis, name in s.dynamic_dims.items()
            if name != "batch" and s.name in feeds and axis < feeds[s.name].ndim}


def _time_batch(engines: Mapping[str, Engine], batch: int, data: Mapping[str, np.ndarray] | None, seed: int,
                dims: Mapping[str, int] | None, rounds: int, spinning: set[str]) -> dict[str, LatencyStats]:
    """One trial at one batch size (see batch_feeds)."""
    feeds = batch_feeds(next(iter(engines.values())).inputs, batch, data, seed, dims)
    for engine in engines.values():
        engine.run(feeds)  # validates; a model that cannot run these inputs: one line, not a traceback
    return measure_interleaved({label: e.runner(feeds) for label, e in engines.items()}, batch,
                               rounds=rounds, spinning=spinning)
