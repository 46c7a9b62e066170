"""`edgepipe profile`: latency on this machine; torch-free, so it runs on the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli import app
from edgepipe.cli._common import handle_errors, parse_ints, write_json_out


@app.command()
@handle_errors
def profile(
    model: Annotated[Path, typer.Argument(help="ONNX model to profile.")],
    batch: Annotated[str, typer.Option(help="Batch sizes, comma-separated.")] = "1,32",
    compare: Annotated[Optional[list[Path]], typer.Option(help="Other model(s) to time interleaved with MODEL; ratios are vs MODEL.")] = None,
    provider: Annotated[str, typer.Option(help="auto, cpu, cuda, tensorrt … (auto: GPU when present, else CPU).")] = "auto",
    threads: Annotated[Optional[int], typer.Option(help="Intra-op threads (default: onnxruntime's, one per core).")] = None,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per batch size (single model).")] = 0.5,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write latency + hardware fingerprint here.")] = None,
) -> None:
    """Print p50/p90/p99 latency and throughput per batch size after warm-up, with the provider
    and threads actually used. --json adds the hardware fingerprint (CPU model, ISA features,
    cores, OS, onnxruntime version and providers)."""
    from edgepipe.runtime import compare_models, profile_model

    batches = parse_ints(batch, "--batch")
    if compare:
        models = {model.name: model, **{p.name: p for p in compare}}
        if len(models) != 1 + len(compare):
            models = {str(model): model, **{str(p): p for p in compare}}
        record = compare_models(models, batches, providers=provider, threads=threads)
        by_label = record["latency"]
    else:
        record = profile_model(model, batches, providers=provider, threads=threads, min_time_s=seconds)
        by_label = {model.name: record["latency"]}
    providers = (record.get("engine") or next(iter(record["models"].values())))["providers"]
    typer.echo(f"provider: {providers[0]}  threads: {threads or 'onnxruntime default'}  "
               f"cpu: {record['hardware']['cpu']['model']}")
    typer.echo(f"{'model':28} {'batch':>5} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'samples/s':>11} {'vs base':>8}")
    for label, rows in by_label.items():
        for stats in rows:
            ratio = record.get("speedup", {}).get(label, {}).get(str(stats["batch"]))
            typer.echo(f"{label[:28]:28} {stats['batch']:>5} {stats['p50_ms']:>9.4f} {stats['p90_ms']:>9.4f} "
                       f"{stats['p99_ms']:>9.4f} {stats['throughput']:>11.1f} "
                       f"{(f'{ratio:.2f}x' if ratio else '-'):>8}")
    write_json_out(json_out, record)
