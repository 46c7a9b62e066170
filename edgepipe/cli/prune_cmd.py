"""`edgepipe prune`: structured pruning for measured ORT latency, with fine-tuning."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors, parse_ints, write_json_out
from edgepipe.cli.choices import Importance
from edgepipe.cli.render import prune_summary
from edgepipe.errors import InputError


@handle_errors
def prune(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint from `edgepipe train`, or a fine-tuned Hugging Face "
            "classifier folder (with --data).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Pruned checkpoint to write (.pt), or for a folder the "
            "pruned folder to write.")],
    ratio: Annotated[float, typer.Option(help="Fraction of channels/neurons/FFN width (or weights) to remove.")] = 0.5,
    head_ratio: Annotated[Optional[float], typer.Option(help="Fraction of attention heads to remove (default: "
            "--ratio).")] = None,
    importance: Annotated[Importance, typer.Option(help="How channels are ranked: magnitude (L2 of weights) or taylor "
            "(weight x gradient).")] = Importance.magnitude,
    global_pruning: Annotated[bool, typer.Option(help="Rank channels across layers rather than per layer.")] = False,
    round_to: Annotated[int, typer.Option(help="Keep channel counts multiples of this (0: off).")] = 8,
    protect: Annotated[Optional[list[str]], typer.Option(help="Module name never pruned (repeatable); the classifier "
            "head always is.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Iterative steps: prune a step, fine-tune, repeat (default 2; a "
            "folder is pruned in 1).")] = None,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs per step (0: none). A folder recovers by "
            "distillation from the unpruned folder on --data.")] = 3,
    data: Annotated[Optional[Path], typer.Option(help="A folder's labelled rows (CSV/TSV, JSONL, Parquet, "
            "save_to_disk, image folder): pruning importance, recovery and the held-out accuracy.")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="A folder's held-out rows (default: 20% of --data, "
            "seeded).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of fine-tuning (default: zoo 1e-3; a folder's "
            "recovery 1e-4 with AdamW).")] = None,
    unstructured: Annotated[bool, typer.Option(help="Magnitude-prune single weights instead: smaller when compressed, "
            "never faster.")] = False,
    dataset: Annotated[Optional[str], typer.Option(help="Data to fine-tune and evaluate on (default: the "
            "checkpoint's).")] = None,
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes for the ORT latency comparison (default: zoo 32, a "
            "folder 1,32).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full record here.")] = None,
) -> None:
    """Prune a trained model with Torch-Pruning (channels and neurons; heads and FFN width of
    Transformers), fine-tune after each step, then compare accuracy, params, MACs and ONNX
    Runtime latency with the unpruned model. The pruned checkpoint loads with weights_only=True.

    A fine-tuned Hugging Face classifier folder (with --data) loses attention heads and FFN
    neurons (BERT-style transformers) or channels (CNNs) in one step, then recovers by
    distillation from the unpruned folder on the rows; the pruned folder exports and quantizes
    like any other (edgepipe_pruned.json records the shapes its config cannot say)."""
    from edgepipe.prune import PruneConfig

    folder = checkpoint.is_dir()
    config = PruneConfig(method="unstructured" if unstructured else "structured", ratio=ratio,
                         head_ratio=head_ratio, importance=importance.value, global_pruning=global_pruning,
                         round_to=round_to or None, protect=tuple(protect or ()),
                         steps=steps or (1 if folder else 2), finetune_epochs=finetune_epochs,
                         lr=lr or (1e-4 if folder else 1e-3),
                         batch_sizes=parse_ints(batch or ("1,32" if folder else "32"), "--batch"))
    if folder:
        report = _prune_folder(checkpoint, output, config, data, eval_data, json_out)
    else:
        if data is not None or eval_data is not None:
            raise InputError("--data and --eval-data prune a Hugging Face folder; a checkpoint takes --dataset")
        check_outputs(output, json_out)
        from edgepipe.exporters import export_module
        from edgepipe.prune import prune as prune_stage

        report = prune_stage(checkpoint, output, config, exporter=export_module, dataset=dataset,
                             log=lambda m: typer.echo(f"  {m}", err=True), progress=True).report
    typer.echo(prune_summary(report, output))
    write_json_out(json_out, report.to_dict())


def _prune_folder(folder: Path, output: Path, config, data: Optional[Path], eval_data: Optional[Path],
                  json_out: Optional[Path]):
    from edgepipe.models.finetune import FinetuneConfig
    from edgepipe.prune.hf import prune_folder

    if data is None:
        raise InputError(f"pruning the folder {folder} needs its labelled rows: --data rows.csv (or JSONL, Parquet, "
                         "a save_to_disk folder, an image folder)")
    recovery = FinetuneConfig(epochs=max(config.finetune_epochs, 1), lr=config.lr, seed=config.seed)
    check_outputs(json_out, folders=(output,))
    return prune_folder(folder, data, output, config, eval_data=eval_data, recovery=recovery,
                        log=lambda m: typer.echo(f"  {m}", err=True)).report
