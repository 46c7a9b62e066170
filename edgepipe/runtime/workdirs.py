"""Scratch folders that never outlive their process: named after the process that owns them,
removed on exit (also on SIGTERM, which the CLI turns into an exit), and swept by the next
edgepipe process when a killed one (kill -9, OOM) could not remove its own."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

_OWNED = re.compile(r"^edgepipe-[a-z]+-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove edgepipe scratch folders under `root` (the temp dir) whose process is gone."""
    root = Path(root or tempfile.gettempdir())
    removed = []
    for path in root.glob("edgepipe-*-*-*"):
        match = _OWNED.match(path.name)
        if match and path.is_dir() and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def work_dir(kind: str) -> Iterator[Path]:
    """A scratch folder `edgepipe-<kind>-<pid>-*` in the temp dir, removed when the block ends;
    stale folders of killed edgepipe processes are removed first."""
    sweep_stale()
    with tempfile.TemporaryDirectory(prefix=f"edgepipe-{kind}-{os.getpid()}-") as tmp:
        yield Path(tmp)
