"""Which model a pipeline run deployed, and with which session settings: read from the run's
manifest.json alone, so a device without torch can open it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.runtime.sessions import SessionSetting, parse_sessions

# Manifests this runtime reads: 1 (unversioned, written before the schema was recorded) and 2.
MANIFEST_SCHEMA = 2
PRECISIONS = ("deployed", "int8", "fp32")


def read_manifest(run_dir: str | os.PathLike) -> dict:
    """The manifest of run directory `run_dir`, or InputError saying why it cannot be used."""
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{run_dir} is not an edgepipe run directory (no manifest.json)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not a readable manifest: {exc}") from None
    schema = manifest.get("schema", 1) if isinstance(manifest, dict) else None
    if not isinstance(schema, int) or schema > MANIFEST_SCHEMA:
        raise InputError(f"{path} has manifest schema {schema!r}; this edgepipe reads schemas 1 to "
                         f"{MANIFEST_SCHEMA}: upgrade edgepipe to open it")
    return manifest


@dataclass
class Deployment:
    """One model of a run: the artifact to load and the CPU session settings measured for it."""

    run_dir: Path
    model: str
    artifact: str  # "model.int8.onnx" or "model.onnx"
    stages: dict[str, Any]
    tuned: dict[int, SessionSetting]  # fastest setting per batch size, as quantize measured it
    backend: str = "onnxruntime"  # what quantize measured the artifact on ("openvino" when it won)

    @property
    def path(self) -> Path:
        return self.run_dir / self.model / self.artifact

    def engine_options(self, options: dict) -> tuple[dict, dict | None]:
        """`options` plus the backend quantize chose (unless the caller chose one or asked for
        a provider other than the CPU) and the tuned per-batch sessions (unless the caller
        chose threads or sessions itself or runs on another provider); and what was applied
        (None: nothing)."""
        on_cpu = options.get("providers", "auto") in ("auto", "cpu")
        if self.backend != "onnxruntime" and on_cpu and "backend" not in options:
            options = options | {"backend": self.backend}
        if not (self.tuned and options.get("providers", "auto") in ("auto", "cpu")
                and options.get("threads") is None and not options.get("batch_sessions")):
            return options, None
        sessions = self.tuned
        if "spinning" in options:  # e.g. serve --spin/--no-spin: the caller's word on spinning
            sessions = {b: SessionSetting(v.threads, bool(options["spinning"])) for b, v in sessions.items()}
        return options | {"batch_sessions": sessions}, {b: v.to_dict() for b, v in sessions.items()}


def find_deployment(run_dir: str | os.PathLike, model: str | None = None,
                    precision: str = "deployed") -> Deployment:
    """precision: "deployed" (INT8 when the run quantized it, else FP32), "int8" or "fp32"."""
    run_dir = Path(run_dir)
    models = read_manifest(run_dir).get("models", {})
    if model is None:
        if len(models) != 1:
            raise InputError(f"{run_dir} holds models {', '.join(models)}: name one")
        model = next(iter(models))
    if model not in models:
        raise InputError(f"no model '{model}' in {run_dir}; it has {', '.join(models) or 'none'}")
    if precision not in PRECISIONS:
        raise InputError(f"precision must be deployed, int8 or fp32, got '{precision}'")
    stages = models[model].get("stages", {})
    int8_ok = stages.get("quantize", {}).get("status") == "ok"
    if precision == "int8" and not int8_ok:
        raise InputError(f"run {run_dir} has no INT8 model for '{model}' (quantize did not deploy one)")
    int8 = precision == "int8" or (precision == "deployed" and int8_ok)
    quant = stages.get("quantize", {}).get("record") or {}
    measured = (quant.get("chosen") or {}) if int8 else quant.get("fp32", {})
    return Deployment(run_dir, model, "model.int8.onnx" if int8 else "model.onnx", stages,
                      parse_sessions(measured.get("sessions")), measured.get("backend") or "onnxruntime")
