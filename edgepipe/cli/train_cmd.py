"""`edgepipe train`: train a zoo model on bundled or user data."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors


@handle_errors
def train(
    model: Annotated[str, typer.Option("--model", "-m", help="Zoo model: mlp, cnn, lstm or transformer; or tiny-lm (a 3M-parameter Llama-style language model over bytes, trained on the bundled text and written as a Hugging Face folder with a tokenizer).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Run directory (writes checkpoint.pt) or a .pt path.")],
    dataset: Annotated[Optional[str], typer.Option(help="digits, marker, or an .npz with x and y. Default: the model's usual dataset.")] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 10,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 2e-3,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for data split, init and shuffling.")] = 0,
    seconds: Annotated[float, typer.Option(help="tiny-lm: training time in seconds (AdamW, cosine decay to zero at the end).")] = 180.0,
    steps: Annotated[Optional[int], typer.Option(help="tiny-lm: train exactly this many steps instead of --seconds: the same model on any machine, however loaded (about 0.3 s a step on 2 cores).")] = None,
) -> None:
    """Train a zoo model with Adam (seeded) and write a safe checkpoint (config + state_dict,
    loadable with torch.load(weights_only=True)). Reports held-out accuracy.

    --model tiny-lm trains a small causal LM on Python's documentation texts (shipped with
    Python; one topic in eight held out) and writes a Hugging Face folder (config.json,
    model.safetensors, tokenizer.json) that `edgepipe export` takes. Reports held-out
    perplexity (nats per byte)."""
    if model == "tiny-lm":
        return _train_lm(output, seconds, seed, steps)
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


def _train_lm(output: Path, seconds: float, seed: int, steps: Optional[int]) -> None:
    from edgepipe.models.lm import LMConfig, train_tiny_lm

    config = LMConfig(seconds=seconds, seed=seed, steps=steps)  # refused before a folder is made
    check_outputs(folders=(output,))
    rec = train_tiny_lm(output, config, progress=lambda m: typer.echo(f"  {m}", err=True)).record
    typer.echo(f"tiny-lm ({rec['params']:,} params, {rec['steps']} steps in {rec['train_seconds']} s): held-out "
               f"{rec['heldout_nll']:.3f} nats/byte (untrained {rec['heldout_nll_before']:.3f}) -> {output}")
