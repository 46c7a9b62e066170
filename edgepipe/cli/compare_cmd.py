"""`edgepipe compare`: parity of two models, and where they start to diverge."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import (
    check_outputs,
    data_options,
    handle_errors,
    read_data,
    write_json_out,
)
from edgepipe.cli.render import compare_summary


@handle_errors
def compare(
    a: Annotated[str, typer.Argument(help="Reference: ONNX model, checkpoint, or file.py:factory.")],
    b: Annotated[str, typer.Argument(help="Candidate: ONNX model (e.g. its INT8 version), checkpoint, or "
                                          "file.py:factory.")],
    data: Annotated[Optional[Path], typer.Option(help="Inputs to compare on: an .npz (by input name, or x), or rows "
            "(CSV/TSV, JSONL, Parquet, an image folder, a datasets save_to_disk folder) that the ONNX model's own "
            "tokenizer or image processor turns into inputs (its held-out 20%, seeded). Default: a checkpoint's "
            "held-out split, else seeded generated inputs.")] = None,
    input_column: Annotated[Optional[list[str]], typer.Option(help="With rows: the text column (repeat for a text "
            "pair) or the image column; default: found by its usual name.")] = None,
    atol: Annotated[float, typer.Option(help="Absolute tolerance per element.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Relative tolerance per element.")] = 1e-3,
    tol: Annotated[Optional[list[str]], typer.Option(help="Per-output tolerance NAME=ATOL[:RTOL] (repeatable), e.g. "
            "logits=1e-2:1e-2.")] = None,
    min_top1: Annotated[Optional[float], typer.Option(help="Judge by agreement instead of element-wise tolerance: "
            "top-1 agreement of [rows, classes] outputs at least this (e.g. 0.99 for INT8 vs FP32).")] = None,
    min_cosine: Annotated[Optional[float], typer.Option(help="Judge by agreement instead of element-wise tolerance: "
            "cosine similarity of each output at least this (e.g. 0.99).")] = None,
    batch: Annotated[int, typer.Option(help="Rows of generated inputs (and of the localization probe).")] = 16,
    localize: Annotated[bool, typer.Option(help="On divergence, find the first diverging node (two ONNX "
                                                "models).")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the report here.")] = None,
    allow_out_of_budget: Annotated[bool, typer.Option(help="Run a quantized model even on a backend where its own "
            "record says it is out of its budget (by default each model runs on the backend it was quantized "
            "for).")] = False,
) -> None:
    """Compare the outputs of A and B on the same inputs: max abs / max rel / mean abs error,
    cosine similarity, SQNR and top-1 agreement per output, against atol + rtol*|A|, or, with
    --min-top1 / --min-cosine, against agreement (what an INT8 model owes FP32). On a
    violation (exit 1), run instrumented copies of both ONNX graphs to name the first node whose
    output diverges and the nodes that add the most noise, FP32 vs QDQ included."""
    check_outputs(json_out)
    from edgepipe.compare import compare as compare_models
    from edgepipe.errors import ParityError

    feeds = None
    if data is not None:
        from edgepipe.compare import load_side

        names = [s.name for s in load_side(a).inputs]
        carrier = Path(a) if str(a).endswith(".onnx") else Path(b)  # the ONNX file carries the preprocessing
        feeds = read_data(data, carrier, names, options=data_options(input_column, None))[0]
    per_output = {}
    for item in tol or []:
        name, _, value = item.partition("=")
        try:
            o_atol, _, o_rtol = value.partition(":")
            per_output[name] = (float(o_atol), float(o_rtol) if o_rtol else rtol)
        except ValueError:
            from edgepipe.errors import InputError

            raise InputError(f"--tol '{item}' must be NAME=ATOL[:RTOL], e.g. logits=1e-2:1e-2") from None
    report = compare_models(a, b, data=feeds, batch=batch, atol=atol, rtol=rtol, do_localize=localize,
                            per_output=per_output, min_top1=min_top1, min_cosine=min_cosine,
                            allow_out_of_budget=allow_out_of_budget)
    typer.echo(compare_summary(report))
    write_json_out(json_out, report.to_dict())
    if not report:
        raise ParityError(f"{b} differs from {a}: not within {report.criteria}")
    typer.echo("parity ok")
