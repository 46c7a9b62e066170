"""Which model a pipeline run deployed, and with which session settings: read from the run's
manifest.json alone, so a device without torch can open it."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.runtime.modelfile import onnx_metadata
from edgepipe.runtime.sessions import SessionSetting, parse_sessions

# ONNX metadata_props key of the record quantize writes into the file it ships: the backend and
# session settings it was measured on, the budget it was judged against, and its verdict on each
# backend that ran the same file. A file keeps it wherever it is copied.
DEPLOYMENT_KEY = "edgepipe.deployment"

# Manifests this runtime reads: 1 (unversioned, written before the schema was recorded), 2, and 3
# (each model's deployed precision in its `deployment` entry rather than in quantize's status).
MANIFEST_SCHEMA = 3
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
    int8_ok = stages.get("quantize", {}).get("status") == "ok"  # an INT8 model was written
    if precision == "int8" and not int8_ok:
        raise InputError(f"run {run_dir} has no INT8 model for '{model}' (quantize did not write one)")
    decided = models[model].get("deployment")  # schema 3; before it, quantize's status said it
    deployed_int8 = decided.get("precision") == "int8" if isinstance(decided, dict) else int8_ok
    int8 = precision == "int8" or (precision == "deployed" and deployed_int8 and int8_ok)
    quant = stages.get("quantize", {}).get("record") or {}
    measured = (quant.get("chosen") or {}) if int8 else quant.get("fp32", {})
    measured = measured if isinstance(measured, dict) else {}  # a decoder search's choice is a recipe name
    return Deployment(run_dir, model, "model.int8.onnx" if int8 else "model.onnx", stages,
                      parse_sessions(measured.get("sessions")), measured.get("backend") or "onnxruntime")


@dataclass(frozen=True)
class MeasuredOn:
    """A model file's own deployment record (DEPLOYMENT_KEY), as quantize wrote it."""

    backend: str  # the backend the file was chosen for
    device: str  # "cpu", or the GPU device it was measured on
    sessions: dict[int, SessionSetting]  # the fastest session setting per batch size there
    budget: dict[str, float]  # max_accuracy_drop, min_speedup
    backends: dict[str, dict]  # backend -> {"within_budget", "verdict", "speedup", "accuracy_drop"}

    @classmethod
    def read(cls, path: str | os.PathLike) -> "MeasuredOn | None":
        """The record of ONNX file `path`; None when it has none (it runs as any model does)."""
        try:
            text = onnx_metadata(path).get(DEPLOYMENT_KEY)
        except (InputError, ValueError, IndexError):  # not a readable model: its loader says so
            return None
        if text is None:
            return None
        try:
            data = json.loads(text)
            return cls(str(data["backend"]), str(data.get("device", "cpu")), parse_sessions(data.get("sessions")),
                       dict(data.get("budget") or {}), dict(data.get("backends") or {}))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise InputError(f"{path}: its deployment record ({DEPLOYMENT_KEY}) is not readable; re-run "
                             "edgepipe quantize, or strip the entry from the file's metadata") from None

    def refusal(self, backend: str) -> str | None:
        """Why running the file on `backend` would run it outside its budget (None: it would not,
        or nothing was measured there)."""
        entry = self.backends.get(backend) or {}
        if entry.get("within_budget", True):
            return None
        return (f"this model was quantized for {self.backend}; on {backend} the same file is out of its budget "
                f"({entry.get('verdict', 'rejected')}, budget: accuracy drop <= "
                f"{self.budget.get('max_accuracy_drop')}); run it on {self.backend} (the default), or allow it "
                "anyway with --allow-out-of-budget (in Python: allow_out_of_budget=True)")

    def describe(self) -> dict:
        return {"backend": self.backend, "device": self.device, "budget": self.budget,
                "sessions": {b: s.to_dict() for b, s in self.sessions.items()} or None,
                "backends": self.backends}


def choose_backend(record: MeasuredOn | None, asked: str | None, on_cpu: bool, allow_out_of_budget: bool,
                   name: str) -> str:
    """The backend to run file `name` on: the one asked for, else the one its CPU record names
    (when running on the CPU), else onnxruntime. InputError where the record says the file is out
    of budget on it, unless `allow_out_of_budget`."""
    record = record if record is not None and record.device == "cpu" and on_cpu else None
    backend = asked or (record.backend if record is not None else "onnxruntime")
    refused = record.refusal(backend) if record is not None else None
    if refused and not allow_out_of_budget:
        raise InputError(f"{name}: {refused}")
    return backend
