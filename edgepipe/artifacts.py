"""Artifacts on disk: atomic writes, hashes, and the result every stage returns."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from edgepipe.errors import InputError
from edgepipe.reports import Report
from edgepipe.runtime.modelfile import model_files


@dataclass
class StageResult:
    """What a stage produced (named artifact paths) and what it measured (its typed report)."""

    stage: str
    artifacts: dict[str, Path]
    report: Report

    @property
    def record(self) -> dict[str, Any]:
        """The report as plain JSON data, as the manifest stores it."""
        return self.report.to_dict()


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `target`; rename it over `target` only if the block succeeds.

    A failed or interrupted stage therefore never leaves a half-written artifact.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        make_shared(tmp_path)  # mkstemp makes 0600 files
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def make_shared(path: str | os.PathLike) -> None:
    """Give a file the mode a plain open() would (0666 less the umask): artifacts are shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(target: str | os.PathLike, data: Any) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return Path(target)


def sha256(path: str | os.PathLike) -> str:
    """Of the file; for an ONNX model with external data, of the graph file then its weights."""
    digest = hashlib.sha256()
    files = model_files(path) if str(path).endswith(".onnx") else [Path(path)]
    for name in files:
        with open(name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tree_digest(folder: str | os.PathLike) -> str:
    """sha256 over a folder's files (their relative paths and contents), e.g. an image dataset."""
    digest = hashlib.sha256()
    root = Path(folder)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(sha256(path).encode())
    return digest.hexdigest()


def read_npz(path: str | os.PathLike, what: str = "data file"):
    """np.load an .npz without pickles, or raise InputError saying what is wrong."""
    import zipfile

    import numpy as np

    path = require_file(path, what)
    if not zipfile.is_zipfile(path):
        raise InputError(f"{what} {path} is not an .npz archive (numpy.savez writes one, with an array "
                         "per input name)")
    try:
        return np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputError(f"cannot read {path} as .npz: {exc}") from None


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """Return `path` as a Path, or raise InputError saying what was expected there."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    return path


def require_writable(path: str | os.PathLike, what: str = "output", folder: bool = False) -> Path:
    """Create the folder that will hold `path` (or `path` itself with folder=True) and check that
    a file can be written there, or raise InputError saying why: before any work is done."""
    path = Path(path)
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise InputError(f"cannot write {what} {path}: it is a folder")
    try:
        target.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edgepipe-probe-", dir=target)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc} ({exc.filename or target})") from None
    return path


LOCK_NAME = ".edgepipe.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run directory") -> Iterator[Path]:
    """Hold an exclusive OS lock on `folder` (a `.edgepipe.lock` file in it, holding the owner's
    PID) for as long as the block runs, or raise InputError naming the process that holds it.
    The OS drops the lock when the process ends, however it ends: a killed run never leaves
    a folder locked."""
    import fcntl

    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise InputError(f"another edgepipe run (PID {holder}) is writing {what} {folder}; wait for it "
                             "to finish or choose another output folder (--out)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
