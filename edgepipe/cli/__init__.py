"""The `edgepipe` command line: a thin Typer layer over the Python API."""

from __future__ import annotations

import sys

import typer

from edgepipe import __version__
from edgepipe.cli import (
    compare_cmd,
    export_cmd,
    generate_cmd,
    profile_cmd,
    prune_cmd,
    quantize_cmd,
    report_cmd,
    run_cmd,
    serve_cmd,
    train_cmd,
    triton_cmd,
)
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


# Every command, registered here and nowhere else (importing a command module registers nothing).
# Heavy imports (torch, onnx) happen inside each command, so `--help` and `profile` stay light.
COMMANDS = (
    ("train", train_cmd.train),
    ("prune", prune_cmd.prune),
    ("export", export_cmd.export),
    ("quantize", quantize_cmd.quantize),
    ("compare", compare_cmd.compare),
    ("profile", profile_cmd.profile),
    ("merge-profiles", profile_cmd.merge_profiles),
    ("run", run_cmd.run),
    ("demo", run_cmd.demo),
    ("report", report_cmd.report),
    ("serve", serve_cmd.serve),
    ("triton", triton_cmd.triton),
    ("generate", generate_cmd.generate),
)
for _name, _command in COMMANDS:
    app.command(_name)(_command)


def _terminate(signum, frame) -> None:
    """SIGTERM ends the command like Ctrl-C does: every `with` block unwinds, so scratch folders
    and half-written artifacts are removed (exit code 128 + signal, as shells report it). The
    request is remembered (interrupts), so a native library that turns the exit into its own
    error cannot make the search carry on."""
    from edgepipe import interrupts

    sys.stderr.write(f"terminated (signal {signum}): stopping, removing scratch files; exit {128 + signum}\n")
    interrupts.request(128 + signum)


def main() -> None:
    import signal

    signal.signal(signal.SIGTERM, _terminate)
    app(prog_name="edgepipe")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
