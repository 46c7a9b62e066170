"""What an exporter's failure means: the one line of it worth showing, and whether it was the
file system's rather than a conversion the exporter cannot do."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


def error_line(exc: Exception) -> str:
    """The one line of an exporter's error worth showing: torch.onnx's exception summary (with
    the line of the model's code that raised it) rather than its "Next steps:" advice or the
    first of tens of lines of log."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    summary = next((line for line in lines if line.startswith("<class '")), None)
    if summary:
        summary = re.sub(r"^<class '(?:[\w.]+\.)?(\w+)'>:", r"\1:", summary)
        if "The following call raised this error:" in lines:
            at = lines.index("The following call raised this error:")
            where = " ".join(lines[at + 1:at + 3])
            summary += f" [{where}]" if where.startswith("File ") else ""
        return summary
    for line in lines:
        if ("Error" in line or "error:" in line or "Unsupported" in line) and not line.endswith(":"):
            return line
    meaningful = [line for line in lines if not line.endswith(":")]
    return (meaningful or lines or [type(exc).__name__])[0]


def is_io_error(exc: BaseException, staged: Path) -> bool:
    """Whether an exporter's error is the file system's (a full or read-only disk, a staging file
    removed under it) rather than a conversion it cannot do."""
    if not isinstance(exc, OSError):
        return False
    if exc.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES):
        return True
    names = [Path(n) for n in (exc.filename, exc.filename2) if isinstance(n, (str, os.PathLike))]
    return any(n.resolve().is_relative_to(staged.parent.resolve()) for n in names)
