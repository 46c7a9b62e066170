"""`edgepipe quantize`: FP32 ONNX -> the fastest INT8 model inside the accuracy budget."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import (
    check_outputs,
    data_options,
    handle_errors,
    parse_ints,
    read_data,
    write_json_out,
)
from edgepipe.cli.choices import Backend, Calibration, QuantizeDevice, QuantizeMode
from edgepipe.cli.render import candidate_table, quantize_summary
from edgepipe.errors import GateFailed
from edgepipe.quantize.config import DECODER_TIME_BUDGET_S, DEFAULT_TIME_BUDGET_S
from edgepipe.quantize.core import BUILD_SHARE, LATE_BUILD_SHARE


@handle_errors
def quantize(
    model: Annotated[Path, typer.Argument(help="FP32 ONNX model.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="INT8 ONNX file to write.")],
    mode: Annotated[QuantizeMode, typer.Option(help="auto (every recipe that fits the graph and CPU: dynamic, static "
            "QDQ/QOperator, INT4 weight-only), or only dynamic, static, int4, or fp16 (for GPU targets; I/O stays "
            "FP32).")] = QuantizeMode.auto,
    data: Annotated[Optional[Path], typer.Option(help="Decoders: a plain .txt file (tokenized by the tokenizer the "
            "file carries) or an .npz with input_ids. Others: labelled data to judge accuracy: CSV/TSV, JSONL or "
            "Parquet with a text (or text-pair) column and a label column, an image folder (one subfolder per class), "
            "a datasets save_to_disk folder, or an .npz of ready inputs (by name or x; labels y). Rows go through the "
            "tokenizer or image processor the model carries (exported from a Hugging Face folder); 20% of them "
            "(seeded) judge, the rest calibrate. Without it: top-1 agreement with FP32 on generated inputs.")] = None,
    calibration: Annotated[Optional[Path], typer.Option(help="Calibration data for static recipes, in any --data "
            "format (default: --data's calibration rows; given, every row of --data judges).")] = None,
    input_column: Annotated[Optional[list[str]], typer.Option(help="Column holding the text (repeat for a text pair) "
            "or the image; default: found by its usual name (text, sentence, sentence1/sentence2, image, "
            "...).")] = None,
    label_column: Annotated[Optional[str], typer.Option(help="Column holding the labels, as names (config.json's "
            "label2id) or ids; default: label, labels, class, target ...")] = None,
    eval_rows: Annotated[int, typer.Option(help="Most held-out rows to judge accuracy on (reading stops once they and "
                                                "the calibration rows are read).")] = 1000,
    calibration_method: Annotated[Calibration, typer.Option(help="How static recipes set activation ranges from the "
            "calibration data.")] = Calibration.minmax,
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes the model must be faster at, comma-separated "
            "(default 1,32; decoders: 1, timed per output token).")] = None,
    max_accuracy_drop: Annotated[float, typer.Option(help="Max accuracy (or agreement) loss vs FP32, absolute: 0.01 = "
            "1 point. Every drop carries a 95% interval: one whose interval straddles the budget is flagged "
            "'unresolved' with the rows that would resolve it.")] = 0.01,
    require_resolved: Annotated[bool, typer.Option(help="Ship only a candidate whose accuracy drop's whole 95% "
            "interval is within the budget (an unresolved one is refused, not flagged).")] = False,
    exclude_node: Annotated[Optional[list[str]], typer.Option(help="Node name to keep in FP32 (repeatable).")] = None,
    exclude_op_type: Annotated[Optional[list[str]], typer.Option(help="Op type to keep in FP32 (repeatable), e.g. "
            "Conv.")] = None,
    threads: Annotated[Optional[int], typer.Option(help="Pin intra-op threads (then only spinning is tuned). Default: "
            "try 1 thread and all cores.")] = None,
    tune_session: Annotated[bool, typer.Option(help="Time FP32 and every candidate with 1 thread and with all cores "
            "and compare each at its fastest (recorded for deployment); --no-tune-session: all cores only.")] = True,
    try_spinning: Annotated[bool, typer.Option(help="Also try all cores with spinning workers (faster back-to-back "
            "runs, but a core stays busy ~40 ms after each).")] = False,
    try_fusions: Annotated[bool, typer.Option(help="Also try onnxruntime.transformers' offline fusions on transformer "
            "graphs, kept only when the fused FP32 model is faster. Off by default: onnxruntime applies its own "
            "LayerNorm, GELU and attention fusions when it loads a model, and the offline ones were never faster in "
            "our measurements.")] = False,
    time_budget: Annotated[Optional[float], typer.Option(help="Seconds the search may take (0: no limit): building "
            f"stops at {BUILD_SHARE:.0%} of it ({LATE_BUILD_SHARE:.0%} for another backend's run of a built file, and "
            "for a decoder's candidates, each measured as it is built; likeliest winners first; the rest are listed "
            "as skipped), timing rounds shrink to fit (3 at least, so a model whose FP32 call is slow runs past it), "
            "confirmation uses one trial past 80%, the accuracy fallback stops at 100%. Default: "
            f"{DEFAULT_TIME_BUDGET_S:g}; a decoder's {DECODER_TIME_BUDGET_S:g}.")] = None,
    backend: Annotated[Optional[list[Backend]], typer.Option(help="Runtime(s) to measure candidates on (repeatable): "
            "onnxruntime, and openvino (static QDQ run by OpenVINO's INT8 kernels; chosen only when faster; the record "
            "says which won). Default: onnxruntime, plus openvino when installed.")] = None,
    device: Annotated[QuantizeDevice, typer.Option(help="Where candidates are measured: cpu (INT8 recipes for this "
            "CPU), or cuda: FP16 with FP32 I/O timed on onnxruntime's CUDA provider against FP32 on the same GPU, "
            "shipped only when faster at every --batch size and within the accuracy budget (needs onnxruntime-gpu: the "
            "gpu extra). At batch 1 real models are launch-bound on a GPU (ResNet-50, BERT-base on an H100: FP16 "
            "0.93-0.97x FP32): name the batch sizes you serve.")] = QuantizeDevice.cpu,
    max_nll_increase: Annotated[float, typer.Option(help="Decoders: max perplexity increase over FP32 on held-out "
            "text, in nats per token.")] = 0.1,
    min_agreement: Annotated[float, typer.Option(help="Decoders: min greedy-token agreement with FP32 (0..1).")] = 0.9,
    recipe: Annotated[Optional[list[str]], typer.Option(help="Decoders: recipe(s) to try (repeatable): "
            "int4-rtn-b32-acc4, int4-rtn-b128-acc4, int4-hqq-b64-acc4, int4-rtn-b32, int8-dynamic, "
            "int4-gptq-b128-acc4. Default: all but HQQ and GPTQ, which are tried only when named (slow here).")] = None,
    allow_slower: Annotated[bool, typer.Option(help="Decoders: take the best candidate that keeps quality even when it "
            "is not faster than FP32 (for its size).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full record (every candidate) "
            "here.")] = None,
) -> None:
    """Quantize with onnxruntime, measured on this CPU: every candidate recipe that fits the
    graph's ops and the CPU's ISA is built, timed interleaved against FP32 and checked for
    accuracy; the fastest within budget is written. With --device cuda the candidate is FP16,
    timed on the GPU against FP32 there. When the fastest misses only the accuracy
    budget, its most damaging nodes (by added noise) go back to FP32 step by step. If none is
    clearly faster than FP32 and accurate enough, nothing is written and the exit code is 1.

    A decoder (from `edgepipe export` of a causal LM folder) gets INT4 weight-only (RTN; HQQ
    and GPTQ when named) and dynamic INT8 candidates instead, timed per output token and judged by perplexity on
    held-out text (bundled; or --data with input_ids) and greedy-token agreement with FP32."""
    check_outputs(output, json_out)
    from edgepipe.runtime.generate import is_decoder_file

    if is_decoder_file(model):
        if device is not QuantizeDevice.cpu:
            from edgepipe.errors import InputError

            raise InputError(f"--device {device.value} applies to classifier-style models; a decoder's INT4 and INT8 "
                             "candidates are measured on the CPU (drop --device)")
        return _quantize_decoder(model, output, data, batch, max_nll_increase, min_agreement, recipe, allow_slower,
                                 time_budget, json_out)
    batch = batch or "1,32"
    from edgepipe.quantize import EvalData, QuantizeConfig
    from edgepipe.quantize import quantize as quantize_stage
    from edgepipe.runtime import Engine

    names = [s.name for s in Engine(model, providers="cpu").inputs]
    eval_data = calib = None
    options = data_options(input_column, label_column, eval_rows)
    if data is not None:  # with its own calibration data, every row of --data judges
        judge_all = replace(options, test_fraction=1.0) if calibration is not None else options
        inputs, labels, calib_inputs = read_data(data, model, names, judges=True, options=judge_all)
        eval_data = EvalData(inputs, labels)
        calib = EvalData(calib_inputs) if calib_inputs is not None else None
    if calibration is not None:
        held_out, _, rest = read_data(calibration, model, names, options=options)
        calib = EvalData(rest if rest is not None else held_out)
    config = QuantizeConfig(mode=mode.value, calibration=calibration_method.value,
                            batch_sizes=parse_ints(batch, "--batch"),
                            max_accuracy_drop=max_accuracy_drop, require_resolved=require_resolved,
                            nodes_to_exclude=tuple(exclude_node or ()),
                            op_types_to_exclude=tuple(exclude_op_type or ()), threads=threads,
                            tune_session=tune_session, try_spinning=try_spinning, try_fusions=try_fusions,
                            time_budget_s=DEFAULT_TIME_BUDGET_S if time_budget is None else time_budget,
                            backends=tuple(b.value for b in backend or ()), device=device.value)
    if eval_data is None:
        typer.echo("note: no --data: judging agreement with FP32 on generated inputs, not accuracy", err=True)
    from edgepipe.memory import PeakMemory

    peak = PeakMemory()
    with _table_on_refusal(candidate_table, json_out), peak:
        result = quantize_stage(model, output, config, eval_data=eval_data, calibration=calib,
                                progress=lambda m: typer.echo(f"  {m}", err=True))
    typer.echo(quantize_summary(result.report, output))
    typer.echo(f"peak memory {peak.mb} MB ({'this search' if peak.scope == 'work' else 'the process so far'})")
    write_json_out(json_out, result.report.to_dict())


@contextmanager
def _table_on_refusal(render, json_out: Optional[Path]):
    """A refusal (exit 1) still prints every candidate's row and writes the record."""
    try:
        yield
    except GateFailed as exc:
        if exc.report is not None:
            typer.echo(render(exc.report))
            write_json_out(json_out, exc.report.to_dict())
        raise


def _quantize_decoder(model: Path, output: Path, data: Optional[Path], batch: Optional[str], max_nll_increase: float,
                      min_agreement: float, recipe: Optional[list[str]], allow_slower: bool,
                      time_budget: Optional[float], json_out: Optional[Path]) -> None:
    from edgepipe.cli.render import decoder_table
    from edgepipe.quantize import DecoderQuantizeConfig, EvalData, quantize

    heldout = None
    config = DecoderQuantizeConfig(recipes=tuple(recipe or ()), max_nll_increase=max_nll_increase,
                                   min_agreement=min_agreement, batch_sizes=parse_ints(batch or "1", "--batch"),
                                   require_faster=not allow_slower,
                                   **({} if time_budget is None else {"time_budget_s": time_budget}))
    if data is not None and data.suffix.lower() == ".txt":  # plain text through the file's own tokenizer
        from edgepipe.data.lm_text import text_windows
        from edgepipe.quantize.decoder import decoder_spec_of
        from edgepipe.runtime.generate import TOKENIZER_KEY
        from edgepipe.runtime.modelfile import onnx_metadata

        spec = decoder_spec_of(model)
        heldout = text_windows(data, onnx_metadata(model).get(TOKENIZER_KEY),
                               min(config.window, spec.max_positions), config.text_windows)
    elif data is not None:
        from edgepipe.artifacts import read_npz
        from edgepipe.errors import InputError

        arrays = read_npz(data, "data file")
        if "input_ids" not in arrays.files:
            raise InputError(f"{data} has arrays {', '.join(arrays.files)}; a decoder is judged on held-out "
                             "token ids: an array 'input_ids' [rows, length]")
        heldout = arrays["input_ids"]
    with _table_on_refusal(decoder_table, json_out):
        result = quantize(model, output, config,
                          eval_data=None if heldout is None else EvalData({"input_ids": heldout}),
                          progress=lambda m: typer.echo(f"  {m}", err=True))
    report = result.report
    typer.echo(decoder_table(report))
    chosen = next(c for c in report.candidates if c["recipe"] == report.chosen)
    speed = ", ".join(f"{v:.2f}x at batch {b}" for b, v in chosen["speedup"].items())
    typer.echo(f"chose {report.chosen} ({chosen['describe']}): time per token {speed}, perplexity "
               f"{chosen['nll_increase']:+.4f} nats/token, agreement {chosen['agreement']:.3f}, "
               f"{report.size_bytes / 1e6:.2f} MB -> {output} ({report.seconds} s, peak memory {report.peak_mb} MB)")
    write_json_out(json_out, report.to_dict())
