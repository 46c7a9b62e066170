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
    prompt_ids: Annotated[Optional[str], typer.Option(help="Prompt token ids, comma-separated, e.g. 1,15043,29892; the "
            "new ids are printed.")] = None,
    prompt: Annotated[Optional[str], typer.Option(help="Prompt text (needs the tokenizers package and a model exported "
            "from a folder with tokenizer.json); the new text is printed.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens to generate at most.")] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy; else sample from softmax(logits / "
            "temperature).")] = 0.0,
    top_k: Annotated[int, typer.Option(min=0, help="Sample among the k likeliest tokens (0: all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the likeliest tokens whose probability reaches p.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    stop_id: Annotated[Optional[list[int]], typer.Option(help="Token id that ends generation (repeatable). Default: "
            "the model's EOS.")] = None,
    provider: Annotated[str, typer.Option(help="cpu, cuda … (on cuda the KV cache stays on the GPU between "
                                               "steps).")] = "cpu",
) -> None:
    """Generate with the torch-free runtime (prefill, then the KV cache fed back step by step),
    printed as it comes: token ids for --prompt-ids, text for --prompt."""
    from edgepipe.runtime.generate import Generator, Sampling

    if (prompt_ids is None) == (prompt is None):
        raise InputError("give the prompt as --prompt-ids 1,2,3 or as --prompt TEXT (one of them)")
    if model.is_dir():
        hint = (f"export it first: edgepipe export {model} -o model.onnx, then generate from model.onnx"
                if (model / "config.json").is_file() else "give the .onnx file `edgepipe export` wrote")
        raise InputError(f"{model} is a folder; generate runs an exported decoder file: {hint}")
    generator = Generator(model, providers=provider)
    sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if prompt is not None:
        for piece in generator.stream_text(prompt, max_new_tokens, sampling=sampling, stop_ids=stop_id):
            typer.echo(piece, nl=False)
        typer.echo("")
        return
    try:
        ids = [int(t) for t in prompt_ids.split(",") if t.strip()]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated token ids, e.g. 1,2,3; got '{prompt_ids}'") from None
    for token in generator.stream(ids, max_new_tokens, sampling=sampling, stop_ids=stop_id):
        typer.echo(token, nl=False)
        typer.echo(" ", nl=False)
    typer.echo("")
