"""`edgepipe profile`: latency on this machine; torch-free, so it runs on the target device."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from edgepipe.cli._common import check_outputs, handle_errors, parse_ints, write_json_out
from edgepipe.cli.choices import Backend
from edgepipe.cli.render import latency_table, merged_table, operator_lines, placement_lines


@handle_errors
def profile(
    model: Annotated[Path, typer.Argument(help="ONNX model to profile.")],
    batch: Annotated[Optional[str], typer.Option(help="Batch sizes, comma-separated (default 1,32; decoders "
            "1,4).")] = None,
    compare: Annotated[Optional[list[Path]], typer.Option(help="Other model(s) to time interleaved with MODEL; ratios "
            "are vs MODEL.")] = None,
    provider: Annotated[str, typer.Option(help="auto, cpu, cuda, tensorrt … (auto: GPU when present, else "
                                               "CPU).")] = "auto",
    threads: Annotated[Optional[str], typer.Option(help="Intra-op threads, or a sweep like 1,2,4 (default: "
            "onnxruntime's, one per core).")] = None,
    provider_option: Annotated[Optional[list[str]], typer.Option(
        help="PROVIDER.KEY=VALUE (repeatable), e.g. cuda.device_id=1, tensorrt.trt_fp16_enable=True.")] = None,
    dim: Annotated[Optional[list[str]], typer.Option(
        help="Size of a named dynamic dim, NAME=SIZE (repeatable), e.g. seq=128. Default: the export's example size "
             "(else 16); the size used is printed and recorded.")] = None,
    backend: Annotated[Optional[list[Backend]], typer.Option(
        help="Runtime: onnxruntime or openvino (CPU; needs the openvino extra). Default: the one the model was "
             "quantized for (its file records it), else onnxruntime. One value for every model, or one per model in "
             "order (MODEL, then each --compare), e.g. FP32 on onnxruntime against INT8 on openvino.")] = None,
    allow_out_of_budget: Annotated[bool, typer.Option(
        help="Run a quantized model on a backend where its own record says it is out of its accuracy or speed budget "
             "(refused otherwise).")] = False,
    ops: Annotated[bool, typer.Option(help="Add the per-operator breakdown from onnxruntime's profiler (at the largest "
                                           "batch).")] = False,
    seconds: Annotated[float, typer.Option(help="Minimum timed seconds per batch size (single model).")] = 0.5,
    prompt_lengths: Annotated[Optional[str], typer.Option(help="Decoders: prompt lengths for time to first token, "
            "comma-separated. Lengths you name must fit the context with --new-tokens (refused otherwise); the default "
            "128,512 is capped to fit.")] = None,
    new_tokens: Annotated[int, typer.Option(help="Decoders: tokens generated per run (time per output token is their "
            "p50).")] = 32,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write latency + hardware fingerprint "
            "here.")] = None,
) -> None:
    """Print p50/p90/p99 latency and throughput per batch size after warm-up, with the provider
    and threads actually used. --json adds the hardware fingerprint (CPU model, ISA features,
    cores, OS, onnxruntime version and providers).

    A decoder (from `edgepipe export` of a causal LM folder) is profiled as generation: model
    load time, time to first token per prompt length, time per output token (p50/p90), tokens/s
    and peak memory, per batch size."""
    check_outputs(json_out)
    from edgepipe.runtime.generate import is_decoder_file

    if is_decoder_file(model):
        if compare or ops or dim:
            from edgepipe.errors import InputError

            raise InputError("--compare, --ops and --dim are for single-pass models; a decoder is profiled as "
                             "generation (--prompt-lengths, --new-tokens, --batch)")
        return _profile_decoder(model, batch or "1,4", prompt_lengths, new_tokens, provider, threads,
                                backend, json_out)
    if prompt_lengths is not None:
        from edgepipe.errors import InputError

        raise InputError("--prompt-lengths is for decoders; this model is profiled per batch size (--batch, --dim)")
    batch = batch or "1,32"
    from edgepipe.runtime import compare_models, profile_model
    from edgepipe.runtime.sessions import parse_provider_options
    from edgepipe.runtime.spec import parse_dims

    provider_options = parse_provider_options(provider_option or [])
    paths = [model, *(compare or [])]
    backends = [b.value for b in backend] if backend else [None]  # None: the file's own, else onnxruntime
    if len(backends) not in (1, len(paths)):
        from edgepipe.errors import InputError

        raise InputError(f"--backend takes one value or one per model ({len(paths)}), got {len(backends)}")
    backends = backends * len(paths) if len(backends) == 1 else backends

    batches = parse_ints(batch, "--batch")
    sweep = parse_ints(threads, "--threads") if threads else (None,)
    if compare and len(sweep) > 1:
        from edgepipe.errors import InputError

        raise InputError("--compare takes one --threads value; sweep threads on a single model")
    if compare:
        models = dict(zip(_labels(paths, backends), paths))
        record = compare_models(models, batches, providers=provider, threads=sweep[0], dims=parse_dims(dim or []),
                                provider_options=provider_options, backends=dict(zip(models, backends)),
                                allow_out_of_budget=allow_out_of_budget)
        by_label = record["latency"]
    else:
        record = profile_model(model, batches, providers=provider, thread_sweep=sweep, min_time_s=seconds,
                               operators=ops, provider_options=provider_options, dims=parse_dims(dim or []),
                               backend=backends[0], allow_out_of_budget=allow_out_of_budget)
        runs = record["thread_sweep"] or [{"threads": sweep[0] or "default", "latency": record["latency"]}]
        by_label = {f"{model.name} t={run['threads']}" if len(runs) > 1 else model.name: run["latency"]
                    for run in runs}
        cold = record["cold_start"]
        typer.echo(f"cold start: session {cold['session_create_ms']:.1f} ms + first inference "
                   f"{cold['first_inference_ms']:.2f} ms; peak RSS {record['peak_rss_mb']} MB; "
                   f"file {record['size_bytes'] / 1e6:.2f} MB")
    providers = (record.get("engine") or next(iter(record["models"].values())))["providers"]
    if record.get("dims"):
        typer.echo("dynamic dims: " + ", ".join(f"{k}={v}" for k, v in record["dims"].items())
                   + ("" if dim else " (the export's example sizes; set them with --dim NAME=SIZE)"))
    engines = list((record.get("models") or {"": record.get("engine")}).values())
    typer.echo(f"provider: {', '.join(dict.fromkeys(m['providers'][0] for m in engines))}  threads: "
               f"{threads or ' and '.join(f'{b} default' for b in dict.fromkeys(m['backend'] for m in engines))}  "
               f"cpu: {record['hardware']['cpu']['model']}")
    typer.echo(latency_table(record, by_label))
    if record.get("placement"):
        typer.echo("\n".join(placement_lines(record["placement"], providers[0])))
    if record.get("operators"):
        typer.echo("\n".join(operator_lines(record["operators"], max(batches))))
    write_json_out(json_out, record)


@handle_errors
def merge_profiles(
    files: Annotated[list[Path], typer.Argument(help="Profile JSONs written by `edgepipe profile --json` on each "
            "device.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the merged rows here.")] = None,
) -> None:
    """Merge profile results from several devices into one comparison table."""
    check_outputs(json_out)
    import json

    from edgepipe.errors import InputError
    from edgepipe.runtime.profiling import merge_profiles as merge

    records = []
    for path in files:
        try:
            records.append(json.loads(path.read_text()))
        except FileNotFoundError:
            raise InputError(f"profile file not found: {path}") from None
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not JSON: {exc}") from None
        if not isinstance(records[-1], dict) or "hardware" not in records[-1] or \
                ("latency" not in records[-1] and records[-1].get("kind") != "decoder"):
            raise InputError(f"{path} is not an `edgepipe profile --json` result (no latency/hardware)")
    rows = merge(records)
    typer.echo(merged_table(rows))
    write_json_out(json_out, {"rows": rows})


def _profile_decoder(model: Path, batch: str, prompt_lengths: Optional[str], new_tokens: int, provider: str,
                     threads: Optional[str], backend: Optional[list[Backend]], json_out: Optional[Path]) -> None:
    from edgepipe.runtime.decoder_profile import profile_decoder

    record = profile_decoder(model, parse_ints(prompt_lengths or "128,512", "--prompt-lengths"),
                             parse_ints(batch, "--batch"), new_tokens, providers=provider,
                             threads=int(threads) if threads else None,
                             backend=backend[0].value if backend else None, cap=prompt_lengths is None)
    if record["capped_prompt_lengths"]:
        capped = record["capped_prompt_lengths"]
        typer.echo(f"note: default prompt length(s) {','.join(map(str, capped['asked']))} capped to {capped['to']} "
                   f"(context {record['decoder']['context']} minus {new_tokens} new tokens)")
    typer.echo(f"load {record['load_s']:.2f} s (peak {record['load_peak_mb']} MB); file "
               f"{record['size_bytes'] / 1e6:.2f} MB; provider {record['engine']['providers'][0]}; "
               f"cpu: {record['hardware']['cpu']['model']}")
    head = f"{'batch':>5} {'prompt':>6} {'TTFT ms':>9} {'TPOT p50':>9} {'TPOT p90':>9} {'tokens/s':>9}"
    typer.echo(head + "\n" + "-" * len(head))
    for r in record["rows"]:
        typer.echo(f"{r['batch']:>5} {r['prompt']:>6} {r['ttft_ms']:>9.2f} {r['tpot_ms']:>9.3f} "
                   f"{r['tpot_p90_ms']:>9.3f} {r['tokens_per_s']:>9.1f}")
    typer.echo(f"peak RSS {record['peak_rss_mb']} MB; {record['rows'][0]['new_tokens']} new tokens per run, "
               f"{record['rows'][0]['runs']} runs after a warm-up")
    write_json_out(json_out, record)


def _labels(paths: list[Path], backends: list[str]) -> list[str]:
    """A row label per model: its file name; with its backend where the same file is timed on two
    runtimes; else the shortest tail of the paths that tells them apart."""
    from edgepipe.errors import InputError

    full = [p.resolve() for p in paths]
    tails = [[p.name for p in paths]]
    if len(set(full)) < len(full):  # one file on two runtimes
        tails.append([f"{p.name} ({b})" for p, b in zip(paths, backends)])
    for depth in range(2, max(len(p.parts) for p in full) + 1):
        tails.append([str(Path(*p.parts[-depth:])) for p in full])
    tails.append([f"{p} ({b})" for p, b in zip(full, backends)])
    for labels in tails:
        if len(set(labels)) == len(labels):
            return labels
    raise InputError("--compare names the same model on the same backend twice; time each model once")
