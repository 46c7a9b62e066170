"""`edgepipe prune`: structured pruning for measured ORT latency, with fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors, parse_ints, write_json_out
from edgepipe.cli.choices import Importance
from edgepipe.cli.render import prune_summary


@handle_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from `edgepipe train`.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned checkpoint to write (.pt).")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels/neurons/FFN width (or weights) to remove.")] = 0.5,
    head_ratio: Annotated[Optional[float], typer.Option(help="Fraction of attention heads to remove (default: --ratio).")] = None,
    importance: Annotated[Importance, typer.Option(help="How channels are ranked: magnitude (L2 of weights) or taylor (weight x gradient).")] = Importance.magnitude,
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
    check_outputs(output, json_out)
    from edgepipe.prune import PruneConfig
    from edgepipe.prune import prune as prune_stage

    config = PruneConfig(method="unstructured" if unstructured else "structured", ratio=ratio,
                         head_ratio=head_ratio, importance=importance.value, global_pruning=global_pruning,
                         round_to=round_to or None, protect=tuple(protect or ()), steps=steps,
                         finetune_epochs=finetune_epochs, batch_sizes=parse_ints(batch, "--batch"))
    from edgepipe.exporters import export_module

    report = prune_stage(checkpoint, output, config, exporter=export_module, dataset=dataset,
                         log=lambda m: typer.echo(f"  {m}", err=True), progress=True).report
    typer.echo(prune_summary(report, output))
    write_json_out(json_out, report.to_dict())
