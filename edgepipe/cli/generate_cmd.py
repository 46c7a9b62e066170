"""`edgepipe generate`: a quick look at an exported decoder's output, token ids in and out."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import handle_errors
from edgepipe.errors import InputError


@handle_errors
def generate(
    model: Annotated[Path, typer.Argument(help="A decoder written by `edgepipe export` of a causal LM folder.")],
    prompt_ids: Annotated[str, typer.Option(help="Prompt token ids, comma-separated, e.g. 1,15043,29892.")],
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; else sample from softmax(logits / temperature).")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the likeliest tokens whose probability reaches p.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stop_id: Annotated[Optional[list[int]], typer.Option(help="Token id that ends generation (repeatable). Default: the model's EOS.")] = None,
) -> None:
    """Generate token ids with the torch-free runtime (prefill, then the KV cache fed back step by
    step), printed as they come."""
    from edgepipe.runtime.generate import Generator, Sampling

    try:
        prompt = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated token ids, e.g. 1,2,3; got '{prompt_ids}'") from None
    generator = Generator(model, providers="cpu")
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    for token in generator.stream(prompt, max_new_tokens, sampling=sampling,
                                  stop_ids=stop_id):
        typer.echo(token, nl=False)
        typer.echo(" ", nl=False)
    typer.echo("")
