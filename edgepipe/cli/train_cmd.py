"""`edgepipe train`: train a zoo model on bundled or user data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors


@handle_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model: mlp, cnn, lstm or transformer.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (writes checkpoint.pt) or a .pt path.")],
    dataset: Annotated[Optional[str], typer.Option(help="digits, marker, or an .npz with x and y. Default: the model's usual dataset.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for data split, init and shuffling.")] = 0,
) -> None:
    """Train a zoo model with Adam (seeded) and write a safe checkpoint (config + state_dict,
    loadable with torch.load(weights_only=True)). Reports held-out accuracy."""
    check_outputs(output if output.suffix in (".pt", ".pth") else output / "checkpoint.pt")
    from edgepipe.models.training import TrainConfig
    from edgepipe.models.training import train as train_stage
    from edgepipe.models.zoo import DEFAULT_DATASET, ZOO

    if model not in ZOO:
        from edgepipe.errors import InputError

        raise InputError(f"unknown model '{model}'; the zoo has {', '.join(ZOO)}")
    path = output if output.suffix in (".pt", ".pth") else output / "checkpoint.pt"
    result = train_stage(model, dataset or DEFAULT_DATASET[model], path,
                         TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed), progress=True)
    rec = result.record
    typer.echo(f"{model} on {rec['dataset']['name']}: held-out accuracy {rec['test_accuracy']:.4f} "
               f"({rec['params']:,} params, {rec['train_seconds']} s) -> {path}")
