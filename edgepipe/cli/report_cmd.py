"""`edgepipe report`: Markdown + self-contained HTML from runs and profile results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from edgepipe.cli._common import check_outputs, handle_errors


@handle_errors
def report(
    sources: Annotated[list[Path], typer.Argument(help="Run directories (or their manifest.json) and/or `edgepipe "
            "profile --json` files.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for report.md and report.html.")] = Path("."),
    name: Annotated[str, typer.Option(help="File stem of the report files.")] = "report",
) -> None:
    """Write a Markdown report and a self-contained HTML page (inline SVG charts: latency
    distributions per stage, accuracy vs latency across stages, throughput vs batch, time per
    operator). `edgepipe run` writes one into every run directory."""
    check_outputs(folders=(out,))
    from edgepipe.pipeline.html_report import write

    md_path, html_path = write(sources, out, name)
    typer.echo(f"wrote {md_path} and {html_path}")
