"""Run a pipeline config: each model through its stages, gated, into a run directory."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepipe.artifacts import StageResult, write_json
from edgepipe.errors import EdgepipeError, GateFailed, StageFailed
from edgepipe.pipeline import gates as gates_mod
from edgepipe.pipeline.config import ModelConfig, PipelineConfig, stage_configs
from edgepipe.pipeline.manifest import Manifest, file_entry
from edgepipe.pipeline.report import build_rows, render_table
from edgepipe.runtime.engine import Engine

ARTIFACTS = {"train": "checkpoint.pt", "prune": "pruned.pt", "export": "model.onnx",
             "quantize": "model.int8.onnx", "profile": "profile.json", "unpruned": "unpruned.onnx"}


@dataclass
class RunResult:
    run_dir: Path
    manifest: dict
    rows: list[dict]
    failed_gates: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed_gates

    def table(self) -> str:
        return render_table(self.rows)

    def raise_for_gates(self) -> None:
        if self.failed_gates:
            raise GateFailed("gate(s) failed: " + "; ".join(
                f"{g['model']}/{g['stage']}: {g['message']}" for g in self.failed_gates))


class _ModelRun:
    """State of one model's pass through the stages."""

    def __init__(self, model: ModelConfig, config: PipelineConfig, manifest: Manifest,
                 log: Callable[[str], None], resume: bool):
        self.model, self.config, self.manifest, self.log, self.resume = model, config, manifest, log, resume
        self.dir = config.out_dir / model.name
        self.settings = stage_configs(model, config.seed)
        self.records: dict[str, dict] = {}
        self.gate_results: list[gates_mod.GateResult] = []
        self._dataset = None

    def path(self, stage: str) -> Path:
        return self.dir / ARTIFACTS[stage]

    @property
    def dataset(self):
        if self._dataset is None and self.model.dataset:
            from edgepipe.models.data import load_dataset

            self._dataset = load_dataset(self.model.dataset, seed=self.config.seed)
        return self._dataset

    def held_out(self) -> dict | None:
        data = self.dataset
        return {data.input_name: data.x_test} if data is not None else None

    # --- stages: each calls one stage function with artifacts in, StageResult out ----------
    def train(self) -> StageResult:
        from edgepipe.models.training import train

        return train(self.model.name, self.dataset, self.path("train"), self.settings["train"],
                     progress=False)

    def prune(self) -> StageResult:
        from edgepipe.prune import prune

        return prune(self.model.source or self.path("train"), self.path("prune"), self.settings["prune"],
                     dataset=self.dataset, log=self.log)

    def export(self) -> StageResult:
        from edgepipe.exporters import export

        if "prune" in self.records:
            source = self.path("prune")
        else:
            source = self.model.source or self.path("train")
        return export(source, self.path("export"), self.settings["export"],
                      inputs=self.model.inputs or None, data=self.held_out(), seed=self.config.seed)

    def quantize(self) -> StageResult:
        from edgepipe.quantize import EvalData, quantize

        data = self.dataset
        eval_data = calibration = None
        if data is not None:
            eval_data = EvalData({data.input_name: data.x_test}, data.y_test)
            calibration = EvalData({data.input_name: data.x_train})
        return quantize(self.path("export"), self.path("quantize"), self.settings["quantize"],
                        eval_data=eval_data, calibration=calibration, progress=self.log)

    def profile(self) -> StageResult:
        from edgepipe.runtime.profiling import compare_models

        settings = self.settings["profile"]
        models = {"fp32": self.path("export")}
        if self.records.get("quantize", {}).get("chosen"):
            models["int8"] = self.path("quantize")
        if "prune" in self.records:
            # The baseline of the chain: the unpruned model through the same export settings, so
            # the cumulative ratio compares like with like (exporters make different graphs).
            from edgepipe.exporters import export

            export(self.model.source or self.path("train"), self.path("unpruned"), self.settings["export"],
                   data=self.held_out(), seed=self.config.seed)
            models["unpruned"] = self.path("unpruned")
        record = compare_models(models, settings.batch_sizes, providers=settings.providers,
                                threads=settings.threads, data=self.held_out(), rounds=settings.rounds,
                                seed=self.config.seed, sessions=self.tuned_sessions(models))
        from edgepipe.runtime.profiling import operator_profile
        from edgepipe.runtime.spec import make_feeds

        self._deploy_fp32_if_int8_is_slower(record)
        if "int8" not in record["speedup"]:
            models.pop("int8", None)
        deployed = models.get("int8", models["fp32"])
        feeds = make_feeds(Engine(deployed).inputs, batch=max(settings.batch_sizes), seed=self.config.seed)
        record["operators"] = operator_profile(deployed, feeds, providers=settings.providers,
                                               threads=settings.threads, iterations=20)
        if "unpruned" in models:  # the chain's result: deployed model vs the unpruned FP32 one
            final = "int8" if "int8" in models else "fp32"
            record["cumulative_speedup"] = {
                str(b["batch"]): round(u["p50_ms"] / b["p50_ms"], 3)
                for u, b in zip(record["latency"]["unpruned"], record["latency"][final])}
        write_json(self.path("profile"), record)
        return StageResult("profile", {"profile": self.path("profile")}, record)

    def tuned_sessions(self, models: dict) -> dict:
        """Each model's fastest session setting per batch size as quantize measured it (FP32's
        also for the unpruned baseline), unless the profile config pins threads or the provider
        is not the CPU."""
        from edgepipe.runtime.engine import resolve_providers
        from edgepipe.runtime.profiling import SessionSetting

        settings = self.settings["profile"]
        quant = self.records.get("quantize", {})
        on_cpu = resolve_providers(settings.providers)[0][:1] == ["CPUExecutionProvider"]
        if settings.threads or not on_cpu or not quant.get("fp32", {}).get("sessions"):
            return {}

        def parse(per_batch: dict) -> dict:
            return {int(b): SessionSetting.from_dict(v) for b, v in per_batch.items()}

        sessions = {"fp32": parse(quant["fp32"]["sessions"])}
        if "unpruned" in models:
            sessions["unpruned"] = sessions["fp32"]
        if "int8" in models and (quant.get("chosen") or {}).get("sessions"):
            sessions["int8"] = parse(quant["chosen"]["sessions"])
        return sessions

    def _deploy_fp32_if_int8_is_slower(self, record: dict) -> None:
        """Profile has the last word on speed. When it measures the INT8 model below
        min_int8_speedup at the deployment batch sizes and INT8 is not required, the FP32 model
        is deployed (quantize: not_deployed) instead of failing: never ship a slower model.
        Quantize's own timing can disagree (measured: 1.15x there, 0.84x here, same files, same
        process, minutes apart, on a 14k-parameter pruned CNN)."""
        budgets = self.settings["budgets"]
        int8 = record["speedup"].get("int8")
        if not int8 or budgets.require_int8 or budgets.min_int8_speedup is None:
            return
        deploy = self.settings["quantize"].batch_sizes
        measured = min([v for b, v in int8.items() if int(b) in deploy] or list(int8.values()))
        if measured >= budgets.min_int8_speedup:
            return
        why = (f"INT8 measured {measured:.3f}x vs FP32 in profile (< min_int8_speedup "
               f"{budgets.min_int8_speedup}); require_int8 = false, so the FP32 model is deployed")
        record["int8_not_deployed"] = {"speedup": record["speedup"].pop("int8"), "why": why}
        entry = dict(self.manifest.stage(self.model.name, "quantize") or {})
        self.manifest.record_stage(self.model.name, "quantize", entry | {"status": "not_deployed", "error": why})
        self.log(f"[{self.model.name}] profile: {why}")

    def inputs_of(self, stage: str) -> list[Path]:
        previous = {"prune": ["train"], "export": ["prune" if "prune" in self.config.stages else "train"],
                    "quantize": ["export"], "profile": ["export", "quantize"]}
        paths = [self.path(s) for s in previous.get(stage, [])]
        if stage == "export" and self.model.source and "prune" not in self.config.stages:
            paths = [Path(self.model.source.split(":")[0])]  # checkpoint, or the factory's file
        return [p for p in paths if p.exists()]  # a missing one is the stage's error to report

    def run(self) -> None:
        completed: list[str] = []
        for stage in self.config.stages:
            if stage == "train" and self.model.source:
                self.log(f"[{self.model.name}] train: skipped (source {self.model.source})")
                continue
            if stage == "quantize" and "export" not in self.records:
                continue
            digest = self.config.digest(self.model.name, stage, vars(self.settings.get(stage, {})),
                                        self.model.dataset, self.model.source)
            inputs = self.inputs_of(stage)
            if self.resume and (entry := self.manifest.reusable(self.model.name, stage, digest, inputs)):
                self.records[stage] = entry["record"]
                self.log(f"[{self.model.name}] {stage}: reused from previous run (inputs and config unchanged)")
                completed.append(stage)
                continue
            self.log(f"[{self.model.name}] {stage} …")
            started = time.perf_counter()
            entry: dict[str, Any] = {"config_digest": digest,
                                     "inputs": [file_entry(p, self.config.out_dir) for p in inputs]}
            try:
                result = getattr(self, stage)()
            except GateFailed as exc:
                if stage == "quantize" and not self.settings["budgets"].require_int8:
                    entry |= {"status": "not_deployed", "error": str(exc), "record": getattr(exc, "record", {}),
                              "seconds": round(time.perf_counter() - started, 2)}
                    self.manifest.record_stage(self.model.name, stage, entry)
                    self.records[stage] = entry["record"]
                    self.log(f"[{self.model.name}] quantize: no INT8 model deployed ({exc}); "
                             "require_int8 = false, so the FP32 model is the deployed one")
                    continue
                entry |= {"status": "gate_failed", "error": str(exc), "record": getattr(exc, "record", {}),
                          "seconds": round(time.perf_counter() - started, 2)}
                self.manifest.record_stage(self.model.name, stage, entry)
                self.records[stage] = entry["record"]
                self.gate_results.append(gates_mod.GateResult(
                    type(exc).__name__, stage, None, 0.0, False, str(exc)))
                self.manifest.record_gates(self.model.name, [g.to_dict() for g in self.gate_results])
                self.log(f"[{self.model.name}] {stage}: GATE FAILED: {exc}")
                return
            except EdgepipeError as exc:
                self.manifest.record_stage(self.model.name, stage, entry | {"status": "error", "error": str(exc)})
                raise StageFailed(stage, self.model.name, completed, exc) from exc
            entry |= {"status": "ok", "seconds": round(time.perf_counter() - started, 2),
                      "outputs": [file_entry(p, self.config.out_dir) for p in result.artifacts.values()],
                      "record": result.record}
            self.manifest.record_stage(self.model.name, stage, entry)
            self.records[stage] = result.record
            completed.append(stage)
            failed = [g for g in self.check_gates() if not g.ok and g.stage == stage]
            if failed:
                self.log(f"[{self.model.name}] {stage}: GATE FAILED: {failed[0].message}")
                return

    def check_gates(self) -> list[gates_mod.GateResult]:
        deploy = self.settings["quantize"].batch_sizes
        found = gates_mod.check(self.records, self.settings["budgets"], deploy, self.config.stages)
        known = {(g.gate, g.stage) for g in self.gate_results}
        self.gate_results += [g for g in found if (g.gate, g.stage) not in known]
        self.manifest.record_gates(self.model.name, [g.to_dict() for g in self.gate_results])
        return self.gate_results


def run_pipeline(config: PipelineConfig, *, resume: bool = False,
                 log: Callable[[str], None] = lambda message: None) -> RunResult:
    """Run every model of `config`; gate failures are collected (RunResult.failed_gates), input
    errors raise StageFailed naming the stage and what already ran."""
    config.out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(config.out_dir, config.raw, resume=resume)
    runs = []
    try:
        for model in config.models:
            run = _ModelRun(model, config, manifest, log, resume)
            run.run()
            runs.append(run)
    except EdgepipeError:
        manifest.finish("error")
        raise
    failed = [g.to_dict() | {"model": run.model.name} for run in runs for g in run.gate_results if not g.ok]
    manifest.finish("failed" if failed else "passed")
    from edgepipe.pipeline import html_report

    html_report.write([config.out_dir], config.out_dir)  # report.md + report.html
    return RunResult(config.out_dir, manifest.data, build_rows(manifest.data), failed)
