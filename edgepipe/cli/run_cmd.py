"""`edgepipe run` and `edgepipe demo`: whole pipelines from a TOML config."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import handle_errors


def _run(config, resume: bool) -> None:
    from edgepipe.pipeline import run_pipeline

    started = time.perf_counter()
    result = run_pipeline(config, resume=resume, log=lambda m: typer.echo(m, err=True))
    typer.echo(result.table())
    typer.echo(f"\nrun directory: {result.run_dir} (manifest.json, report.md); "
               f"{time.perf_counter() - started:.1f} s")
    result.raise_for_gates()
    typer.echo("all gates passed")


@handle_errors
def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config (TOML); see `edgepipe demo` for an example.")],
    out: Annotated[Optional[Path], typer.Option(help="Run directory (overrides out_dir in the config).")] = None,
    resume: Annotated[bool, typer.Option(help="Reuse stages whose config, inputs and outputs are unchanged "
                                              "(hash-checked).")] = False,
) -> None:
    """Run the stages listed in CONFIG for every model into a run directory: artifacts written
    atomically, manifest.json with hashes, versions, config and measurements, and one table.
    Exit 1 names each violated gate with measured value vs budget; exit 2 for bad input."""
    from edgepipe.pipeline import config as config_mod

    cfg = config_mod.load(config)
    if out is not None:
        cfg.out_dir = out
    _run(cfg, resume)


@handle_errors
def demo(
    out: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    resume: Annotated[bool, typer.Option(help="Reuse unchanged stages of a previous demo run.")] = False,
    show_config: Annotated[bool, typer.Option(help="Print the built-in config (TOML) and exit.")] = False,
) -> None:
    """Run the built-in pipeline: MLP and CNN on digits, LSTM and Transformer on a generated
    sequence task; train -> export -> quantize -> profile, every gate checked."""
    from importlib import resources

    from edgepipe.pipeline.config import demo_config

    if show_config:
        typer.echo(resources.files("edgepipe.pipeline").joinpath("demo.toml").read_text())
        return
    _run(demo_config(out), resume)
