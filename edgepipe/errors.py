"""One exception family for everything a user can cause; the CLI maps it to an exit code."""

from __future__ import annotations


class EdgepipeError(Exception):
    """A problem the user can fix: bad input, missing file, unsupported model. Exit code 2."""

    exit_code = 2


class ConfigError(EdgepipeError):
    """A config file, option or value is wrong."""


class InputError(EdgepipeError):
    """A file, model source, or tensor fed to a model is missing or malformed."""


class ExportError(EdgepipeError):
    """No exporter produced a valid ONNX model."""


class QuantizationError(EdgepipeError):
    """Quantization could not run (every pre-processing / recipe path failed)."""


class GateFailed(EdgepipeError):
    """A measured value violated its budget. Exit code 1. `report`: the stage's typed report
    with everything it measured before it refused (None when the gate is checked afterwards)."""

    exit_code = 1

    def __init__(self, message: str, report: object | None = None):
        super().__init__(message)
        self.report = report


class ParityError(GateFailed):
    """Two models that must agree do not, beyond the stated tolerance."""


class AccuracyError(GateFailed):
    """Accuracy dropped more than its budget allows."""


class LatencyError(GateFailed):
    """A model is slower than its budget allows (or slower than the model it replaces)."""


class TrainingError(EdgepipeError):
    """Training diverged (a loss that is not finite). Exit code 1: the run failed, not its input."""

    exit_code = 1


class StageFailed(EdgepipeError):
    """Wraps an error raised inside a pipeline stage, naming the stage and what already ran."""

    def __init__(self, stage: str, model: str, completed: list[str], cause: EdgepipeError):
        done = ", ".join(completed) if completed else "nothing"
        super().__init__(f"stage '{stage}' of model '{model}' failed: {cause} (completed: {done})")
        self.stage, self.model, self.completed, self.cause = stage, model, completed, cause
        self.exit_code = cause.exit_code


class InternalError(RuntimeError):
    """An invariant of edgepipe itself broke: a bug to report, not a user mistake."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries raise multi-line ones), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
