"""What the runner checks after every stage, whatever the stage: each artifact it claims
exists, is not empty and loads; an ONNX artifact has the inputs and outputs its report (or the
model it was made from) declares."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from edgepipe import interrupts
from edgepipe.artifacts import StageResult
from edgepipe.errors import InternalError
from edgepipe.runtime.sessions import new_session


def onnx_io(path: Path) -> tuple[list[str], list[str]]:
    session = new_session(path)
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


def check_artifacts(result: StageResult, declared_io: tuple[list[str], list[str]] | None = None) -> None:
    """Raise InternalError (a bug in the stage, not the user's input) when an artifact of
    `result` is missing, empty or unreadable, or an ONNX one lacks the declared inputs/outputs."""
    for name, path in result.artifacts.items():
        path = Path(path)
        problem = None
        if not path.is_file() or path.stat().st_size == 0:
            problem = "is missing or empty"
        elif path.suffix == ".onnx":
            try:
                io = onnx_io(path)
            except Exception as exc:
                interrupts.reraise()
                problem = f"does not load in onnxruntime ({exc})"
            else:
                if declared_io is not None and (io[0], io[1]) != (list(declared_io[0]), list(declared_io[1])):
                    problem = f"has inputs {io[0]} and outputs {io[1]}; declared {declared_io[0]}, {declared_io[1]}"
        elif path.suffix == ".json":
            try:
                json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                problem = f"is not JSON ({exc})"
        elif path.suffix == ".pt" and not zipfile.is_zipfile(path):
            problem = "is not a torch checkpoint archive"
        if problem:
            raise InternalError(f"stage '{result.stage}' wrote {name} artifact {path}, which {problem}")
