"""Shared CLI plumbing: one place that turns EdgepipeError into a one-line message + exit code."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
import typer

from edgepipe.errors import EdgepipeError, InputError


class _State:
    debug = False


state = _State()


def handle_errors(fn: Callable) -> Callable:
    """Print EdgepipeError as `error: ...` (no traceback unless --debug) and exit with its code
    (2 for bad input, 1 for a failed gate)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _created.clear()
        try:
            try:
                return fn(*args, **kwargs)
            except BaseException:  # a command that fails leaves no empty output folder behind
                _remove_created_if_empty()
                raise
        except EdgepipeError as exc:
            if state.debug:
                raise
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:  # a file the user named cannot be read or written
            if state.debug:
                raise
            where = f": {exc.filename}" if exc.filename else ""
            typer.echo(f"error: {exc.strerror or exc}{where}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


# Folders check_outputs created for the running command, removed again (when still empty) if the
# command fails: a rejected argument must not leave an empty output folder.
_created: list[Path] = []


def _remove_created_if_empty() -> None:
    for folder in sorted(_created, key=lambda p: len(p.parts), reverse=True):
        try:
            folder.rmdir()
        except OSError:  # not empty (the command wrote something), or gone
            pass
    _created.clear()


def check_outputs(*paths: Path | None, folders: tuple[Path | None, ...] = ()) -> None:
    """Refuse, before any work, output files (or folders) that cannot be written. Folders made
    here are removed again if the command then fails before writing into them."""
    from edgepipe.artifacts import require_writable

    targets = [(Path(p), False) for p in paths if p is not None] + [(Path(f), True) for f in folders if f is not None]
    for target, folder in targets:
        parent = (target if folder else target.parent).absolute()
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        require_writable(target, folder=folder)
        _created.extend(missing)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, e.g. 1,32; got '{text}'") from None
    if not values or min(values) < 1:
        raise InputError(f"{what} must be positive integers, got '{text}'")
    return values


def load_npz(path: Path, input_names: list[str],
             judges: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs (by input name, or `x` for a single-input model) and optional labels `y`. With
    `judges` (the rows judge accuracy), a file without labels gets a note saying what judges instead."""
    from edgepipe.artifacts import read_npz

    data = read_npz(path, "data file")
    if all(name in data.files for name in input_names):
        inputs = {name: data[name] for name in input_names}
    elif len(input_names) == 1 and "x" in data.files:
        inputs = {input_names[0]: data["x"]}
    else:
        raise InputError(f"{path} has arrays {', '.join(data.files)}; expected the model's inputs "
                         f"({', '.join(input_names)}) or 'x' for a single-input model")
    labels = data["y"] if "y" in data.files else None
    if labels is None and judges:
        others = [k for k in data.files if k not in input_names and k != "x"]
        typer.echo(f"note: {path} has no labels 'y'" + (f" (it has {', '.join(others)})" if others else "")
                   + ": judging top-1 agreement with FP32, not accuracy", err=True)
    return inputs, labels


def read_data(path: Path, model: Path, input_names: list[str], judges: bool = False,
              options=None) -> tuple[dict[str, np.ndarray], np.ndarray | None, dict[str, np.ndarray] | None]:
    """(held-out inputs, labels, calibration inputs or None) from an .npz of ready inputs, or from
    rows (CSV, JSONL, Parquet, save_to_disk, image folder) through the model's own tokenizer or
    image processor, which the model file carries."""
    from edgepipe.data.for_model import DataOptions, file_preprocess, is_rows, read_for_model

    if not is_rows(path):
        return (*load_npz(path, input_names, judges=judges), None)
    named = read_for_model(path, file_preprocess(model), model, options or DataOptions(),
                           say=lambda m: typer.echo(m, err=True))
    typer.echo(f"data: {named.split}", err=True)
    if named.labels is None and judges:
        typer.echo(f"note: {path} has no label column: judging top-1 agreement with FP32, not accuracy", err=True)
    return named.test, named.labels, named.calibration


def data_options(input_column: list[str] | None, label_column: str | None, rows: int | None = None):
    from edgepipe.data.for_model import DataOptions

    return DataOptions(tuple(input_column or ()), label_column, **({"max_test": rows} if rows else {}))


def write_json_out(path: Path | None, record: dict) -> None:
    if path is not None:
        from edgepipe.artifacts import write_json

        write_json(path, record)
        typer.echo(f"wrote {path}")

