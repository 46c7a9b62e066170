"""Peak resident memory of a piece of work: what a stage really needed, recorded beside its wall
time. On Linux the process's high-water mark is reset before the work (/proc/self/clear_refs), so
the figure belongs to that work alone; elsewhere it is the process's peak so far, and says so."""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def return_freed_memory() -> None:
    """Hand memory that Python and the onnx tooling have freed back to the OS. glibc keeps freed
    heap for reuse: after a 440 MB model was parsed and dropped, the process stayed gigabytes
    larger while it went on to time sessions. A no-op where there is no glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """`with PeakMemory() as peak: work()` then `peak.mb` and `peak.scope` ("work": the peak of
    this work alone; "process": the process's peak since it started, where no reset exists).

    They nest: an inner one (a phase of a stage) resets the high-water mark too, so before it
    does, the mark so far is carried to the ones around it, and its own peak after it."""

    _open: list["PeakMemory"] = []  # the ones entered and not exited, outermost first

    def __init__(self) -> None:
        self.mb: float | None = None
        self.scope = "process"
        self._carried_kb = 0

    def _carry(self, kb: int | None) -> None:
        for outer in PeakMemory._open:
            if outer is not self:
                outer._carried_kb = max(outer._carried_kb, kb or 0)

    def __enter__(self) -> "PeakMemory":
        self._carry(_status_kb("VmHWM"))
        PeakMemory._open.append(self)
        try:
            _CLEAR.write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
            self.scope = "work" if _status_kb("VmHWM") is not None else "process"
        except OSError:
            self.scope = "process"
        return self

    def __exit__(self, *exc) -> None:
        if self in PeakMemory._open:
            PeakMemory._open.remove(self)
        kb = _status_kb("VmHWM") if self.scope == "work" else None
        if kb is None:
            self.scope = "process"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            kb = peak // 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux
        kb = max(kb, self._carried_kb)
        self._carry(kb)
        self.mb = round(kb / 1024, 1)

    def to_dict(self) -> dict:
        return {"peak_rss_mb": self.mb, "peak_rss_scope": self.scope}
