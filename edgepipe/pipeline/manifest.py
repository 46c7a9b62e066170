"""The run manifest: hashes, versions, config and every measurement, rewritten atomically."""

from __future__ import annotations

import datetime as dt
import platform
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Literal, get_args

from edgepipe import __version__
from edgepipe.artifacts import sha256, write_json
from edgepipe.runtime.deployment import MANIFEST_SCHEMA, read_manifest
from edgepipe.runtime.hardware import fingerprint
from edgepipe.runtime.modelfile import model_bytes

# What a stage's entry and the whole run may say. refused: quantize shipped no INT8 model and the
# run went on with FP32 (require_int8 = false); which precision is deployed is the model's
# `deployment` entry (pipeline.deploy), not a stage status.
StageStatus = Literal["ok", "error", "refused", "gate_failed"]
RunStatus = Literal["running", "passed", "failed", "error", "interrupted", "crashed"]

TOOLS = ("torch", "onnx", "onnxruntime", "onnxscript", "numpy", "scikit-learn")


def tool_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"edgepipe": __version__, "python": platform.python_version()}
    for name in TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def file_entry(path: Path, root: Path) -> dict:
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    return {"path": str(rel), "sha256": sha256(path), "bytes": model_bytes(path)}  # with external data


class Manifest:
    """`manifest.json` of a run directory: one entry per (model, stage)."""

    def __init__(self, run_dir: Path, config: dict, resume: bool = False,
                 scope: tuple[set[str], set[str]] | None = None, log=lambda message: None):
        """`resume`: keep the previous run's entries (stages are reused only where config and
        inputs match). `scope` (model names, stage names): what this config runs; a previous
        model outside it is dropped with its folder, and a previous stage outside it is dropped,
        so the run directory never mixes two configs' results."""
        self.run_dir = run_dir
        self.path = run_dir / "manifest.json"
        previous = read_manifest(run_dir) if resume and self.path.exists() else {}
        models = previous.get("models", {})
        if scope is not None and models:
            names, stages = scope
            for gone in sorted(set(models) - names):
                if (run_dir / gone).resolve().parent == run_dir.resolve():  # a model's own folder only
                    shutil.rmtree(run_dir / gone, ignore_errors=True)
                log(f"resume: model '{gone}' is not in this config: dropped from {run_dir} with its folder")
            models = {name: entry | {"stages": {s: e for s, e in entry.get("stages", {}).items() if s in stages}}
                      for name, entry in models.items() if name in names}
        self.data: dict[str, Any] = {
            "schema": MANIFEST_SCHEMA,
            "edgepipe": __version__,
            "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": tool_versions(),
            "hardware": fingerprint(),
            "config": config,
            "models": models,
            "status": "running",
        }
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def stage(self, model: str, stage: str) -> dict | None:
        return self.data["models"].get(model, {}).get("stages", {}).get(stage)

    def record_stage(self, model: str, stage: str, entry: dict) -> None:
        _check(entry.get("status"), StageStatus)
        self.data["models"].setdefault(model, {"stages": {}, "gates": []})["stages"][stage] = entry
        self.save()

    def record_data(self, model: str, data: dict) -> None:
        """Which data the model was judged on, and how its held-out rows were chosen."""
        self.data["models"].setdefault(model, {"stages": {}, "gates": []})["data"] = data
        self.save()

    def record_deployment(self, model: str, deployment: dict) -> None:
        """The precision the run deploys for `model` and why (pipeline.deploy.Decision)."""
        self.data["models"].setdefault(model, {"stages": {}, "gates": []})["deployment"] = deployment
        self.save()

    def record_gates(self, model: str, gates: list[dict]) -> None:
        self.data["models"].setdefault(model, {"stages": {}, "gates": []})["gates"] = gates
        self.save()

    def reusable(self, model: str, stage: str, config_digest: str, inputs: list[Path]) -> dict | None:
        """The previous entry if this stage already ran with the same config and inputs and its
        outputs are intact (hash-checked); else None."""
        entry = self.stage(model, stage)
        if not entry or entry.get("status") != "ok" or entry.get("config_digest") != config_digest:
            return None
        current = [file_entry(p, self.run_dir)["sha256"] for p in inputs if p.exists()]
        if current != [i["sha256"] for i in entry.get("inputs", [])]:
            return None
        for out in entry.get("outputs", []):
            path = self.run_dir / out["path"]
            if not path.exists() or sha256(path) != out["sha256"]:
                return None
        return entry

    def finish(self, status: RunStatus) -> None:
        self.data["status"] = _check(status, RunStatus)
        self.data["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        self.save()


def _check(status: str | None, kind) -> str:
    if status not in get_args(kind):
        raise ValueError(f"manifest status {status!r} is not one of {', '.join(get_args(kind))}")
    return status
