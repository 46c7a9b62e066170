"""A termination request (SIGTERM, which the CLI turns into an exit) that no broad `except`
can swallow.

The CLI's handler raises SystemExit in whatever Python code is running when the signal lands.
When that is a callback under a native library (an onnxruntime or OpenVINO call that checks for
signals), the library can turn the SystemExit into its own error, a RuntimeError, and code that
records a failed candidate and goes on (the quantize search) would carry on as if nothing had
happened: a CI run finished a whole search after its SIGTERM. The request is remembered here, and
those `except` blocks call `reraise()` first."""

from __future__ import annotations

_pending: int | None = None


def request(code: int) -> None:
    """Remember a termination with exit code `code` and raise SystemExit(code)."""
    global _pending
    _pending = code
    raise SystemExit(code)


def reraise() -> None:
    """Raise SystemExit again if a termination was requested (call first in a broad `except`)."""
    if _pending is not None:
        raise SystemExit(_pending)


def clear() -> None:
    """Forget a request (tests that simulate one)."""
    global _pending
    _pending = None
