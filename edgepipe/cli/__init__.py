"""The `edgepipe` command line: a thin Typer layer over the Python API."""

from __future__ import annotations

import sys

import typer

from edgepipe import __version__
from edgepipe.cli._common import state

app = typer.Typer(
    name="edgepipe",
    help="Train -> export to ONNX -> quantize -> profile, with every stage checked for parity, "
         "accuracy, latency and size against its budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgepipe {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks instead of one-line errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    state.debug = debug


from edgepipe.cli import (  # noqa: E402,F401
    compare_cmd,
    export_cmd,
    profile_cmd,
    prune_cmd,
    quantize_cmd,
    report_cmd,
    run_cmd,
    serve_cmd,
    train_cmd,
    triton_cmd,
)


def main() -> None:
    app(prog_name="edgepipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
