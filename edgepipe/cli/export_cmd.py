"""`edgepipe export`: torch -> ONNX with a parity verdict."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors, load_npz, write_json_out
from edgepipe.errors import InputError


@handle_errors
def export(
    source: Annotated[str, typer.Argument(help="Checkpoint from `edgepipe train`, path/to/file.py:factory, or a "
                                               "Hugging Face model folder (what save_pretrained wrote: config.json + "
                                               "weights; read offline).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="ONNX file to write.")],
    input: Annotated[Optional[list[str]], typer.Option("--input", "-i", help="Input spec name:dtype:dims[:low..high] "
            "(repeat per input), e.g. ids:int64:batch,seq:0..30000. Overrides what the factory declares.")] = None,
    output_name: Annotated[Optional[list[str]], typer.Option("--output-name", help="Output name(s) in order (default: "
            "logits for checkpoints, output otherwise).")] = None,
    task: Annotated[Optional[str], typer.Option(help="Hugging Face folders: the head to export (image-classification, "
            "text-classification, token-classification, fill-mask, feature-extraction, image-feature-extraction, "
            "text-generation). Default: from config.json's architectures; a *ForCausalLM folder is exported as a "
            "decoder with its KV cache (text-generation).")] = None,
    data: Annotated[Optional[Path], typer.Option(help="Held-out inputs for the parity check: an .npz keyed by input "
            "name (or x), or for a Hugging Face folder rows (CSV/TSV, JSONL, Parquet, an image folder, a save_to_disk "
            "folder) through its own tokenizer or image processor. Checkpoints of bundled datasets use their held-out "
            "split.")] = None,
    exporter: Annotated[Optional[list[str]], typer.Option(help="Exporter(s) to try in order: dynamo, "
            "torchscript.")] = None,
    atol: Annotated[float, typer.Option(help="Parity absolute tolerance.")] = 1e-4,
    rtol: Annotated[float, typer.Option(help="Parity relative tolerance.")] = 1e-3,
    opset: Annotated[Optional[int], typer.Option(help="ONNX opset (default: the exporter's).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the export record (attempts, parity per "
            "case) here.")] = None,
    route: Annotated[Optional[str], typer.Option(help="Causal LM folders: dynamo (torch.onnx of the model), genai "
            "(ONNX Runtime GenAI's model builder: fused attention; needs the genai extra) or auto, the default (both, "
            "each timed per output token in FP32 and as an INT4 weight-only model; genai kept when it matches torch "
            "and is >5% faster at one without being >5% slower at the other; dynamo alone without the genai "
            "extra).")] = None,
) -> None:
    """Export a PyTorch model to ONNX. The dynamo exporter is tried first, then TorchScript; the
    first whose model matches PyTorch in ONNX Runtime (batch 1 and 7, two lengths of every other
    dynamic dim) wins. A parity violation fails with exit 1 and the max abs/rel diff per output."""
    check_outputs(output, json_out)
    from edgepipe.data.for_model import is_rows
    from edgepipe.exporters import ExportConfig, load_source
    from edgepipe.exporters import export as export_stage
    from edgepipe.models.hf import is_causal_lm_folder, is_hf_folder

    if is_hf_folder(source) and (task == "text-generation" or (task is None and is_causal_lm_folder(source))):
        return _export_decoder(source, output, atol, json_out, route or "auto")

    if route is not None:
        raise InputError(f"--route {route} applies to causal LM folders (a *ForCausalLM config.json); "
                         f"{source} is exported with --exporter (dynamo, torchscript)")
    src = load_source(source, input or None, output_name or None, task=task)
    held_out = None
    if data is not None and is_rows(data):  # rows through the folder's own tokenizer or image processor
        from edgepipe.data.for_model import DataOptions, source_rows

        held_out = source_rows(data, src, DataOptions(), say=lambda m: typer.echo(m, err=True)).test
    elif data is not None:
        held_out, _ = load_npz(data, [s.name for s in src.inputs])
    elif src.meta.get("dataset", {}).get("name") in ("digits", "marker"):
        from edgepipe.models.data import load_dataset

        ds = load_dataset(src.meta["dataset"]["name"], seed=(src.meta.get("train_config") or {}).get("seed", 0))
        held_out = {ds.input_name: ds.x_test}
    config = ExportConfig(atol=atol, rtol=rtol, opset=opset,
                          **({"exporters": tuple(exporter)} if exporter else {}))
    result = export_stage(src, output, config, data=held_out)
    rec = result.record
    for attempt in rec["attempts"]:
        typer.echo(f"  {attempt['exporter']}: {'ok' if attempt['ok'] else 'rejected'} "
                   f"({attempt.get('parity') or attempt.get('error')})")
    typer.echo(f"exported with {rec['exporter']} (opset {rec['opset']}, {rec['size_bytes'] / 1e6:.2f} MB) "
               f"-> {output}; {'real held-out' if held_out else 'generated'} inputs")
    write_json_out(json_out, rec)


def _export_decoder(source: str, output: Path, atol: float, json_out: Optional[Path], route: str) -> None:
    """A causal LM folder: the decoder with its KV cache, parity on prefill and 16 decode steps."""
    from edgepipe.exporters import ExportConfig, export

    typer.echo("  a causal LM: exporting the decoder with its KV cache (prefill and decode in one graph)", err=True)
    rec = export(source, output, ExportConfig(atol=atol, route=route), task="text-generation").record
    if len(rec["attempts"]) > 1:
        for attempt in rec["attempts"]:
            if attempt["ok"]:
                why = f"matches torch, {attempt['tpot_ms']} ms per token" + (
                    f", as INT4 {attempt['int4_tpot_ms']} ms" if "int4_tpot_ms" in attempt else "")
                if "chosen_because" in attempt:
                    why += f": kept ({attempt['chosen_because']})"
            elif "parity" in attempt:
                worst = max(c["max_abs_diff"] for c in attempt["parity"]["cases"])
                why = f"does not match torch (logits off by up to {worst:.3g})"
            else:
                why = attempt["error"]
            typer.echo(f"  {attempt['exporter']}: {why}")
    for case in rec["parity"]["cases"]:
        typer.echo(f"  prompt of {case['prompt']} tokens + {case.get('steps', 0)} greedy steps: max abs diff "
                   f"{case['max_abs_diff']:.2e}, same tokens: {case.get('same_tokens')}")
    typer.echo(f"exported decoder with {rec['exporter']} (opset {rec['opset']}, {rec['size_bytes'] / 1e6:.2f} MB) -> "
               f"{output}; "
               f"try: edgepipe generate {output} "
               + ("--prompt 'Hello'" if (Path(source) / "tokenizer.json").exists() else "--prompt-ids 1,2,3"))
    write_json_out(json_out, rec)
