"""`edgepipe prune`: structured pruning for measured ORT latency, with fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli import app
from edgepipe.cli._common import handle_errors, parse_ints, write_json_out


@app.command()
@handle_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from `edgepipe train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned checkpoint to write (.pt).")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels/neurons/FFN width (or weights) to remove.")] = 0.5,
    head_ratio: Annotated[Optional[float], typer.Option(help="Fraction of attention heads to remove (default: --ratio).")] = None,
    importance: Annotated[str, typer.Option(help="magnitude or taylor.")] = "magnitude",
    global_pruning: Annotated[bool, typer.Option(help="Rank channels across layers rather than per layer.")] = False,
    round_to: Annotated[int, typer.Option(help="Keep channel counts multiples of this (0: off).")] = 8,
    protect: Annotated[Optional[list[str]], typer.Option(help="Module name never pruned (repeatable); the classifier head always is.")] = None,
    steps: Annotated[int, typer.Option(help="Iterative steps: prune a step, fine-tune, repeat.")] = 2,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per step (0: none).")] = 3,
    unstructured: Annotated[bool, typer.Option(help="Magnitude-prune single weights instead: smaller when compressed, never faster.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="Data to fine-tune and evaluate on (default: the checkpoint's).")] = None,
    batch: Annotated[str, typer.Option(help="Batch sizes for the ORT latency comparison.")] = "32",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full record here.")] = None,
) -> None:
    """Prune a trained model with Torch-Pruning (channels and neurons; heads and FFN width of
    Transformers), fine-tune after each step, then compare accuracy, params, MACs and ONNX
    Runtime latency with the unpruned model. The pruned checkpoint loads with weights_only=True."""
    from edgepipe.prune import PruneConfig
    from edgepipe.prune import prune as prune_stage

    config = PruneConfig(method="unstructured" if unstructured else "structured", ratio=ratio,
                         head_ratio=head_ratio, importance=importance, global_pruning=global_pruning,
                         round_to=round_to or None, protect=tuple(protect or ()), steps=steps,
                         finetune_epochs=finetune_epochs, batch_sizes=parse_ints(batch, "--batch"))
    rec = prune_stage(checkpoint, output, config, dataset=dataset,
                      log=lambda m: typer.echo(f"  {m}", err=True), progress=True).record
    typer.echo(f"accuracy {rec['accuracy_before']:.4f} -> {rec['accuracy_after']:.4f}; params "
               f"{rec['params_before']:,} -> {rec['params_after']:,}; MACs {rec['macs_before']:,} -> "
               f"{rec['macs_after']:,}")
    for b, p50 in rec["p50_ms"].items():
        ratio_text = (f"{rec['speedup'][b]:.2f}x faster" if rec["speedup"]
                      else f"dense latency ratio {rec['dense_latency_ratio'][b]:.2f}x (no speedup claimed)")
        typer.echo(f"ORT p50 at batch {b}: {p50['unpruned']:.4f} -> {p50['pruned']:.4f} ms, {ratio_text}")
    if rec["method"] == "unstructured":
        typer.echo(f"sparsity {rec['sparsity']:.1%}; compressed state_dict {rec['compressed_bytes_before']:,} -> "
                   f"{rec['compressed_bytes_after']:,} bytes. {rec['note']}")
    typer.echo(f"-> {output} ({rec['seconds']} s)")
    write_json_out(json_out, rec)
