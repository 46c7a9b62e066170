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


class Attempt:
    """Record a failure and go on, without swallowing a termination: `with attempt() as tried:`
    runs one try of a loop (an exporter, a route, a recipe); an Exception raised in it is kept in
    `tried.error` and the block's caller goes on to the next try, except when a termination was
    requested, which is raised again. BaseExceptions (KeyboardInterrupt, SystemExit) pass through."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def __enter__(self) -> "Attempt":
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        if kind is None or not issubclass(kind, Exception):
            return False
        reraise()
        self.error = exc
        return True


def attempt() -> Attempt:
    return Attempt()
