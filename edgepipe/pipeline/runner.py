"""Run a pipeline config: each model through the stages of the stage table, gated, into a run
directory with a manifest."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgepipe.artifacts import (
    StageResult,
    folder_lock,
    read_npz,
    require_writable,
)
from edgepipe.errors import EdgepipeError, GateFailed, StageFailed
from edgepipe.memory import PeakMemory
from edgepipe.pipeline import deploy
from edgepipe.pipeline import gates as gates_mod
from edgepipe.pipeline.checks import check_artifacts, onnx_io
from edgepipe.pipeline.config import ModelConfig, PipelineConfig, stage_configs
from edgepipe.pipeline.fingerprint import fingerprint
from edgepipe.pipeline.manifest import Manifest, file_entry
from edgepipe.pipeline.report import build_rows, render_table
from edgepipe.pipeline.stages import STAGES, artifact_name, load_report, reads_paths
from edgepipe.reports import Report


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


class ModelRun:
    """One model's pass through the stages: its settings, data, and the reports so far. Stage
    functions (pipeline.stages) read what they need from it."""

    def __init__(self, model: ModelConfig, config: PipelineConfig, manifest: Manifest,
                 log: Callable[[str], None], resume: bool):
        self.model, self.config, self.manifest, self.log, self.resume = model, config, manifest, log, resume
        self.dir = config.out_dir / model.name
        self.settings = stage_configs(model, config.seed)
        self.reports: dict[str, Report] = {}
        self.gate_results: list[gates_mod.GateResult] = []
        self.deployed = deploy.Decision("fp32")  # pipeline.deploy's decision so far
        self.refusal: str | None = None  # why quantize shipped no INT8, when the run went on
        self._dataset = None
        self._source = None
        self._fingerprint: dict | None = None

    def path(self, stage: str) -> Path:
        return self.dir / artifact_name(stage, folder=self.model.hf_folder)

    @property
    def dataset(self):
        """The model's data: a Dataset (x, y; what training takes), or for a model given as a source,
        NamedInputs (an .npz keyed by its input names, or rows). How they were split is recorded."""
        if self._dataset is None and self.model.dataset:
            from edgepipe.data.for_model import DataOptions, is_rows, source_rows
            from edgepipe.data.named import NamedInputs, named_inputs_npz
            from edgepipe.models.data import load_dataset

            path = Path(self.model.dataset)
            names = [s.name for s in self.source().inputs] if self.model.source and not self.model.causal_lm else []
            if self.model.causal_lm:  # the windows of text fine-tuning holds out, which quantize judges on
                from edgepipe.models.clm import judged_windows

                ids = judged_windows(self.model.source, path, self.settings["train"], say=self.log)
                self._dataset = NamedInputs(path.stem, {"input_ids": ids}, None, {},
                                            f"{len(ids)} held-out windows of {path.name} (fine-tuning's seeded split)")
            elif self.model.source and is_rows(path):  # through the source folder's tokenizer or processor
                self._dataset = source_rows(path, self.source(), DataOptions(
                    seed=self.config.seed, max_calibration=self.settings["quantize"].calibration_samples),
                    say=lambda m: self.log(f"[{self.model.name}] {m}"))
            elif names and path.suffix == ".npz" and path.is_file() and set(names) <= set(read_npz(path).files):
                self._dataset = named_inputs_npz(path, names, seed=self.config.seed)
            else:
                self._dataset = load_dataset(self.model.dataset, seed=self.config.seed)
            if self._dataset.split != "bundled split":
                self.log(f"[{self.model.name}] data: {self._dataset.split}")
            self.manifest.record_data(self.model.name, {"dataset": self.model.dataset, "split": self._dataset.split})
        return self._dataset

    def eval_sets(self):
        """(held-out EvalData with labels when there are any, calibration EvalData), or (None, None)."""
        from edgepipe.data.named import NamedInputs
        from edgepipe.quantize import EvalData

        data = self.dataset
        if data is None:
            return None, None
        if isinstance(data, NamedInputs):  # a decoder takes no calibration rows (its GPTQ calibrates on these)
            return EvalData(data.test, data.labels), EvalData(data.calibration) if data.calibration else None
        return EvalData({data.input_name: data.x_test}, data.y_test), EvalData({data.input_name: data.x_train})

    def source(self):
        """The model source (`file.py:factory` or checkpoint), loaded once per run."""
        if self._source is None:
            from edgepipe.exporters import load_source

            self._source = load_source(self.model.source, self.model.inputs or None, task=self.model.task)
        return self._source

    def fingerprint(self) -> dict:
        """What every stage's result depends on besides its config and input files (fingerprint.py)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.model, self.source)
        return self._fingerprint

    def held_out(self) -> dict | None:
        held_out, _ = self.eval_sets()
        return held_out.inputs if held_out is not None else None

    def export(self, source, out: Path, inputs=None) -> StageResult:
        """Export with this run's export settings and held-out data (the export stage, and the
        profile stage's unpruned baseline)."""
        from edgepipe.exporters import export

        return export(source, out, self.settings["export"], inputs=inputs, data=self.held_out(),
                      seed=self.config.seed)

    def trained_source(self):
        """The fine-tuned folder, the user's source (loaded once, as fingerprinted) or the checkpoint."""
        if self.model.fine_tunes and "train" in self.reports:
            return self.path("train")
        if self.model.causal_lm:  # a folder path: export makes it a decoder
            return Path(self.model.source)
        return self.source() if self.model.source else self.path("train")

    def export_source(self):
        """What the export stage exports: the pruned model, else what training left."""
        return self.path("prune") if "prune" in self.reports else self.trained_source()

    def export_to(self, out: Path, source) -> Path:
        return self.export(source, out).artifacts["onnx"]

    def declared_io(self, stage: str) -> tuple[list[str], list[str]] | None:
        """Inputs/outputs an ONNX artifact of `stage` must have: the export's declared ones,
        and for the INT8 model those of the FP32 model it was made from."""
        if stage == "export":
            report = self.reports["export"]
            return report.input_names, report.outputs
        if stage == "quantize":
            return onnx_io(self.path("export"))
        return None

    # --- the loop -------------------------------------------------------------------------
    def run(self) -> None:
        completed: list[str] = []
        self.manifest.record_deployment(self.model.name, self.deployed.to_dict())  # none of a previous run's
        for stage in self.config.stages:
            if stage == "train" and self.model.source and not self.model.fine_tunes:
                self.log(f"[{self.model.name}] train: skipped (source {self.model.source})")
                continue
            if stage == "quantize" and "export" not in self.reports:
                continue
            section = STAGES[stage].config
            try:
                digest = self.config.digest(self.model.name, stage, vars(self.settings.get(section, {})),
                                            self.model.dataset, self.model.source, self.fingerprint())
            except EdgepipeError as exc:  # the source or data cannot be read: this stage's error
                raise StageFailed(stage, self.model.name, completed, exc) from exc
            inputs = reads_paths(self, stage)
            if self.reuse(stage, digest, inputs):
                completed.append(stage)
                continue
            self.log(f"[{self.model.name}] {stage} …")
            entry: dict[str, Any] = {"config_digest": digest,
                                     "inputs": [file_entry(p, self.config.out_dir) for p in inputs]}
            outcome = self.run_stage(stage, entry, completed)
            if outcome == "stop":
                return
            if outcome == "ok":
                completed.append(stage)

    def reuse(self, stage: str, digest: str, inputs: list[Path]) -> bool:
        """With --resume: take the previous run's result when config, inputs and outputs match."""
        entry = self.manifest.reusable(self.model.name, stage, digest, inputs) if self.resume else None
        if not entry:
            return False
        try:
            self.reports[stage] = load_report(stage, entry["record"])
        except EdgepipeError:  # written by another version: run the stage again
            return False
        self.log(f"[{self.model.name}] {stage}: reused from previous run (inputs and config unchanged)")
        self.record_deployment()
        return True

    def run_stage(self, stage: str, entry: dict, completed: list[str]) -> str:
        """Run one stage and record it: "ok", "skipped" (INT8 refused, FP32 deployed) or "stop"."""
        started = time.perf_counter()
        peak = PeakMemory()
        try:
            with peak:
                result = STAGES[stage].run(self)
            self.reports[stage] = result.report
            check_artifacts(result, self.declared_io(stage))
        except GateFailed as exc:
            return self.refused(stage, exc, entry | {"seconds": round(time.perf_counter() - started, 2)}
                                | peak.to_dict())
        except EdgepipeError as exc:
            self.manifest.record_stage(self.model.name, stage, entry | {"status": "error", "error": str(exc)})
            raise StageFailed(stage, self.model.name, completed, exc) from exc
        entry |= {"status": "ok", "seconds": round(time.perf_counter() - started, 2), **peak.to_dict(),
                  "outputs": [file_entry(p, self.config.out_dir) for p in result.artifacts.values()],
                  "record": result.report.to_dict()}
        self.manifest.record_stage(self.model.name, stage, entry)
        self.record_deployment()
        failed = [g for g in self.check_gates() if not g.ok and g.stage == stage]
        if failed:
            self.log(f"[{self.model.name}] {stage}: GATE FAILED: {failed[0].message}")
            return "stop"
        return "ok"

    def refused(self, stage: str, exc: GateFailed, entry: dict) -> str:
        """A stage's own gate refused. Quantize with require_int8 = false deploys FP32 instead;
        anything else is a failed gate that stops this model."""
        entry |= {"error": str(exc), "record": exc.report.to_dict() if exc.report is not None else {}}
        if exc.report is not None:
            self.reports[stage] = exc.report
        if stage == "quantize" and not self.settings["budgets"].require_int8:
            self.manifest.record_stage(self.model.name, stage, entry | {"status": "refused"})
            self.refusal = f"{exc}; require_int8 = false, so the FP32 model is deployed"
            self.record_deployment()
            return "skipped"
        self.manifest.record_stage(self.model.name, stage, entry | {"status": "gate_failed"})
        self.gate_results.append(gates_mod.GateResult(type(exc).__name__, stage, None, 0.0, False, str(exc)))
        self.manifest.record_gates(self.model.name, [g.to_dict() for g in self.gate_results])
        self.log(f"[{self.model.name}] {stage}: GATE FAILED: {exc}")
        return "stop"

    def record_deployment(self) -> None:
        """The deployed precision after the stages so far (pipeline.deploy), recorded once in the
        manifest; gates, the run table, Engine.from_run and serve read it there."""
        decision = deploy.decide(self.reports, self.settings["budgets"], self.settings["quantize"].batch_sizes,
                                 self.refusal)
        if decision == self.deployed:
            return
        if self.deployed.int8 and not decision.int8:  # quantize's gates judged INT8: judge FP32 again
            self.gate_results = [g for g in self.gate_results if g.stage != "quantize"]
        if decision.why:
            self.log(f"[{self.model.name}] deployed FP32: {decision.why}")
        self.deployed = decision
        self.manifest.record_deployment(self.model.name, decision.to_dict())

    def check_gates(self) -> list[gates_mod.GateResult]:
        deploy_batches = self.settings["quantize"].batch_sizes
        found = gates_mod.check(self.reports, self.settings["budgets"], deploy_batches, self.config.stages,
                                self.deployed)
        known = {(g.gate, g.stage) for g in self.gate_results}
        self.gate_results += [g for g in found if (g.gate, g.stage) not in known]
        self.manifest.record_gates(self.model.name, [g.to_dict() for g in self.gate_results])
        return self.gate_results


def run_pipeline(config: PipelineConfig, *, resume: bool = False,
                 log: Callable[[str], None] = lambda message: None) -> RunResult:
    """Run every model of `config`; gate failures are collected (RunResult.failed_gates), input
    errors raise StageFailed naming the stage and what already ran."""
    require_writable(config.out_dir, "run directory", folder=True)
    with folder_lock(config.out_dir):
        return _run_locked(config, resume, log)


def _run_locked(config: PipelineConfig, resume: bool, log: Callable[[str], None]) -> RunResult:
    manifest = Manifest(config.out_dir, config.raw, resume=resume,
                        scope=({m.name for m in config.models}, set(config.stages)), log=log)
    runs = []
    try:
        for model in config.models:
            run = ModelRun(model, config, manifest, log, resume)
            run.run()
            runs.append(run)
    except BaseException as exc:  # never leave the manifest saying "running"
        manifest.finish("error" if isinstance(exc, EdgepipeError) else
                        "interrupted" if isinstance(exc, (KeyboardInterrupt, SystemExit)) else "crashed")
        raise
    failed = [g.to_dict() | {"model": run.model.name} for run in runs for g in run.gate_results if not g.ok]
    manifest.finish("failed" if failed else "passed")
    from edgepipe.pipeline import html_report

    html_report.write([config.out_dir], config.out_dir)  # report.md + report.html
    return RunResult(config.out_dir, manifest.data, build_rows(manifest.data), failed)
