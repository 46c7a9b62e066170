"""The pipeline's profile stage: the deployed model(s) timed interleaved against FP32 on this
machine, each at the session settings quantize measured fastest for it, plus the per-operator
breakdown and, after pruning, the cumulative speedup over the unpruned FP32 model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.artifacts import StageResult, write_json
from edgepipe.errors import ConfigError
from edgepipe.pipeline.deploy import decide
from edgepipe.pipeline.stage_context import StageRun
from edgepipe.reports import Report, optional
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.placement import operator_profile
from edgepipe.runtime.profiling import compare_models
from edgepipe.runtime.sessions import parse_sessions, resolve_providers
from edgepipe.runtime.spec import make_feeds


@dataclass
class ProfileReport(Report):
    stage: ClassVar[str] = "profile"

    models: dict[str, dict]  # label -> path, size, providers, sessions per batch
    baseline: str
    latency: dict[str, list[dict]]  # label -> LatencyStats per batch (median of the trials)
    speedup: dict[str, dict[str, float]]  # label -> batch -> ratio vs the baseline
    threads: Any
    intra_op_spinning: bool
    trials: int
    hardware: dict[str, Any]
    dims: dict[str, int] = optional()  # the size of each dynamic dim the models were timed at
    operators: dict | None = optional()
    cumulative_speedup: dict[str, float] | None = optional()  # deployed vs unpruned FP32


def on_cpu(settings) -> bool:
    return resolve_providers(settings.providers)[0][:1] == ["CPUExecutionProvider"]


def tuned_sessions(run: StageRun, models: dict) -> dict:
    """Each model's fastest session setting per batch size as quantize measured it (FP32's
    also for the unpruned baseline), unless the profile config pins threads or the provider
    is not the CPU."""
    settings = run.settings["profile"]
    quant = run.reports.get("quantize")
    if settings.threads or not on_cpu(settings) or quant is None or not quant.fp32.sessions:
        return {}
    sessions = {"fp32": parse_sessions(quant.fp32.sessions)}
    if "unpruned" in models:
        sessions["unpruned"] = sessions["fp32"]
    if "int8" in models and quant.deployed_sessions:
        sessions["int8"] = parse_sessions(quant.deployed_sessions)
    return sessions


DECODER_PROMPT = 16  # prompt tokens before a decoder's timed output tokens
DECODER_TOKENS = 16  # output tokens per timed generation


def decoder_report(run: StageRun, models: dict) -> ProfileReport:
    """A decoder's profile: time per output token (its percentiles) after a prompt of DECODER_PROMPT
    tokens at each of quantize's batch sizes, FP32 and the quantized model one after the other;
    `speedup` is FP32's time per token over the quantized model's."""
    from edgepipe.runtime.decoder_profile import profile_decoder
    from edgepipe.runtime.hardware import fingerprint

    settings, batches = run.settings["profile"], run.settings["quantize"].batch_sizes
    rounds = max(2, settings.rounds // 10)
    profiles = {label: profile_decoder(path, (DECODER_PROMPT,), batches, DECODER_TOKENS, rounds,
                                       providers=settings.providers, threads=settings.threads)
                for label, path in models.items()}
    latency = {label: [r["tpot_stats"] | {"ttft_ms": r["ttft_ms"], "tokens_per_s": r["tokens_per_s"]}
                       for r in p["rows"]] for label, p in profiles.items()}
    speedup = {label: {str(r["batch"]): round(f["p50_ms"] / r["p50_ms"], 3) for f, r in zip(latency["fp32"], rows)}
               for label, rows in latency.items() if label != "fp32"}
    return ProfileReport(
        models={label: {"path": str(path), "size_bytes": profiles[label]["size_bytes"],
                        "providers": profiles[label]["engine"]["providers"]} for label, path in models.items()},
        baseline="fp32", latency=latency, speedup=speedup, threads=settings.threads, intra_op_spinning=False,
        trials=rounds, hardware=fingerprint(), dims={"prompt": DECODER_PROMPT},
        operators={"skipped": "a decoder is timed per output token; the per-operator breakdown is for one-call models"})


def profile_stage(run: StageRun) -> StageResult:
    settings = run.settings["profile"]
    models = {"fp32": run.path("export")}
    quant = run.reports.get("quantize")
    if quant is not None and quant.chosen is not None:
        models["int8"] = run.path("quantize")
    if run.model.causal_lm:
        report = decoder_report(run, models)
        write_json(run.path("profile"), report.to_dict())
        return StageResult("profile", {"profile": run.path("profile")}, report)
    if "prune" in run.reports:
        # The baseline of the chain: the unpruned model through the same export settings, so
        # the cumulative ratio compares like with like (exporters make different graphs).
        models["unpruned"] = run.export_to(run.path("unpruned"), run.trained_source())
    backends = {}
    if "int8" in models and quant.chosen.backend != "onnxruntime":
        if not on_cpu(settings):
            raise ConfigError(f"quantize chose {quant.chosen.backend} (a CPU runtime) for the INT8 model but "
                              f"[profile] providers is {settings.providers}: profile on the CPU, or limit "
                              "[quantize] backends to onnxruntime")
        backends["int8"] = quant.chosen.backend
    report = ProfileReport.from_dict(compare_models(
        models, settings.batch_sizes, providers=settings.providers, threads=settings.threads,
        data=run.held_out(), rounds=settings.rounds, seed=run.config.seed, sessions=tuned_sessions(run, models),
        dims=settings.dims, backends=backends))
    if "int8" in models and not decide(run.reports | {"profile": report}, run.settings["budgets"],
                                       run.settings["quantize"].batch_sizes).int8:
        models.pop("int8")  # measured too slow: FP32 is the deployed model (its speedup stays on record)
    deployed = models.get("int8", models["fp32"])
    feeds = make_feeds(Engine(deployed).inputs, batch=max(settings.batch_sizes), dims=settings.dims,
                       seed=run.config.seed)
    if deployed == models.get("int8") and "int8" in backends:
        report.operators = {"skipped": f"the deployed model runs on {backends['int8']}; the per-operator "
                                       "breakdown is onnxruntime's profiler"}
    else:
        report.operators = operator_profile(deployed, feeds, providers=settings.providers,
                                            threads=settings.threads, iterations=20)
    if "unpruned" in models:  # the chain's result: deployed model vs the unpruned FP32 one
        final = "int8" if "int8" in models else "fp32"
        report.cumulative_speedup = {
            str(b["batch"]): round(u["p50_ms"] / b["p50_ms"], 3)
            for u, b in zip(report.latency["unpruned"], report.latency[final])}
    write_json(run.path("profile"), report.to_dict())
    return StageResult("profile", {"profile": run.path("profile")}, report)
