"""`edgepipe quantize`: FP32 ONNX -> the fastest INT8 model inside the accuracy budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors, load_npz, parse_ints, write_json_out
from edgepipe.cli.choices import Backend, Calibration, QuantizeMode
from edgepipe.cli.render import candidate_table, quantize_summary
from edgepipe.errors import GateFailed


@handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="INT8 ONNX file to write.")],
    mode: Annotated[QuantizeMode, typer.Option(help="auto (every recipe that fits the graph and CPU: dynamic, static QDQ/QOperator, INT4 weight-only), or only dynamic, static, int4, or fp16 (for GPU targets; I/O stays FP32).")] = QuantizeMode.auto,
    data: Annotated[Optional[Path], typer.Option(help="Held-out .npz (inputs by name or x; labels y) to judge accuracy. Without it: top-1 agreement with FP32 on generated inputs.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration .npz for static recipes (default: --data).")] = None,
    calibration_method: Annotated[Calibration, typer.Option(help="How static recipes set activation ranges from the calibration data.")] = Calibration.minmax,
    batch: Annotated[str, typer.Option(help="Batch sizes the model must be faster at, comma-separated.")] = "1,32",
    max_accuracy_drop: Annotated[float, typer.Option(help="Max accuracy (or agreement) loss vs FP32, absolute: 0.01 = 1 point.")] = 0.01,
    exclude_node: Annotated[Optional[list[str]], typer.Option(help="Node name to keep in FP32 (repeatable).")] = None,
    exclude_op_type: Annotated[Optional[list[str]], typer.Option(help="Op type to keep in FP32 (repeatable), e.g. Conv.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Pin intra-op threads (then only spinning is tuned). Default: try 1 thread and all cores.")] = None,
    tune_session: Annotated[bool, typer.Option(help="Time FP32 and every candidate with 1 thread and with all cores and compare each at its fastest (recorded for deployment); --no-tune-session: all cores only.")] = True,
    try_spinning: Annotated[bool, typer.Option(help="Also try all cores with spinning workers (faster back-to-back runs, but a core stays busy ~40 ms after each).")] = False,
    time_budget: Annotated[float, typer.Option(help="Seconds the search may take (0: no limit): building stops at 40% of it (likeliest winners first; the rest are listed as skipped), timing rounds shrink to fit (3 at least), confirmation uses one trial past 80%, the accuracy fallback stops at 100%. The default keeps a 100M-parameter model near 2 minutes on 2 cores.")] = 120.0,
    backend: Annotated[Optional[list[Backend]], typer.Option(help="Runtime(s) to measure candidates on (repeatable): onnxruntime, and openvino (static QDQ run by OpenVINO's INT8 kernels; chosen only when faster; the record says which won). Default: onnxruntime, plus openvino when installed.")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full record (every candidate) here.")] = None,
) -> None:
    """Quantize with onnxruntime, measured on this CPU: every candidate recipe that fits the
    graph's ops and the CPU's ISA is built, timed interleaved against FP32 and checked for
    accuracy; the fastest within budget is written. When the fastest misses only the accuracy
    budget, its most damaging nodes (by added noise) go back to FP32 step by step. If none is
    clearly faster than FP32 and accurate enough, nothing is written and the exit code is 1."""
    check_outputs(output, json_out)
    from edgepipe.quantize import EvalData, QuantizeConfig
    from edgepipe.quantize import quantize as quantize_stage
    from edgepipe.runtime import Engine

    names = [s.name for s in Engine(model, providers="cpu").inputs]
    eval_data = calib = None
    if data is not None:
        eval_data = EvalData(*load_npz(data, names))
    if calibration is not None:
        calib = EvalData(load_npz(calibration, names)[0])
    config = QuantizeConfig(mode=mode.value, calibration=calibration_method.value, batch_sizes=parse_ints(batch, "--batch"),
                            max_accuracy_drop=max_accuracy_drop,
                            nodes_to_exclude=tuple(exclude_node or ()),
                            op_types_to_exclude=tuple(exclude_op_type or ()), threads=threads,
                            tune_session=tune_session, try_spinning=try_spinning, time_budget_s=time_budget,
                            backends=tuple(b.value for b in backend or ()))
    if eval_data is None:
        typer.echo("note: no --data: judging agreement with FP32 on generated inputs, not accuracy", err=True)
    from edgepipe.memory import PeakMemory

    peak = PeakMemory()
    try:
        with peak:
            result = quantize_stage(model, output, config, eval_data=eval_data, calibration=calib,
                                    progress=lambda m: typer.echo(f"  {m}", err=True))
    except GateFailed as exc:
        if exc.report is not None:
            typer.echo(candidate_table(exc.report))
            write_json_out(json_out, exc.report.to_dict())
        raise
    typer.echo(quantize_summary(result.report, output))
    typer.echo(f"peak memory {peak.mb} MB ({'this search' if peak.scope == 'work' else 'the process so far'})")
    write_json_out(json_out, result.report.to_dict())
