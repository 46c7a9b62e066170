"""GPU benchmark: the zoo and real-size models on CPU FP32, CUDA FP32, CUDA FP16 (and TensorRT
FP16 where its libraries load), IO binding against plain `run`, the nodes that fell back to the
CPU, and decoders generating with the KV cache kept on the GPU.

    python benchmarks/gpu_bench.py [--zoo runs/demo] [--models resnet50,mobilenetv2,vit-base,bert-base]
                                   [--decoders gpt2-small,llama-0.5b] [--out FILE]

Needs onnxruntime-gpu (which replaces onnxruntime) on a machine with an NVIDIA GPU; it says so and
exits 2 otherwise. Real-size models are built offline from their transformers configs (random
weights) and exported with `edgepipe export`; the zoo comes from a `make demo` run folder.
Latency: p50/p99 per call of `Engine.run` (numpy in and out, so host<->device copies included)
at batch 1 and 32 (8 for decoders' batch), each engine timed interleaved with the others in one
process; `bound`: the same CUDA session with its inputs already on the GPU and its outputs left
there (IO binding). Fidelity: relative L2 error and cosine of the logits against CPU FP32.
Each real-size model also goes through `edgepipe quantize --device cuda` in its own process (FP16
timed against FP32 on the GPU), with its choice, speedup, wall time and peak RSS.
Each section's failure is recorded in the JSON and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))


def stats_row(stats) -> dict:
    return {"p50_ms": round(stats.p50_ms, 4), "p99_ms": round(stats.p99_ms, 4)}


def engines_for(fp32: Path, fp16: Path | None, trt_cache: Path) -> dict:
    import onnxruntime as ort

    from edgepipe.runtime import Engine

    engines = {"cpu_fp32": Engine(fp32, providers="cpu", spinning=False),
               "cuda_fp32": Engine(fp32, providers="cuda")}
    if fp16 is not None:
        engines["cuda_fp16"] = Engine(fp16, providers="cuda")
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        options = {"tensorrt": {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                                "trt_engine_cache_path": str(trt_cache)}}
        try:
            engines["tensorrt_fp16"] = Engine(fp32, providers=["tensorrt", "cuda", "cpu"], provider_options=options)
        except Exception as exc:  # the provider is listed but its libraries (libnvinfer) may be absent
            engines["tensorrt_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return engines


def model_row(name: str, fp32: Path, work: Path, batches: tuple[int, ...], rounds: int) -> dict:
    from edgepipe.quantize.builders import build
    from edgepipe.quantize.evaluation import fidelity
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.runtime import measure_interleaved
    from edgepipe.runtime.spec import make_feeds

    fp16 = work / f"{name}.fp16.onnx"
    started = time.perf_counter()
    build(Recipe("fp16"), fp32, fp16, None, 0)
    row: dict = {"model": name, "fp32_mb": round(fp32.stat().st_size / 1e6, 1), "fp16_build_s":
                 round(time.perf_counter() - started, 1)}
    engines = engines_for(fp32, fp16, work / f"{name}.trt")
    if "tensorrt_error" in engines:
        row["tensorrt_error"] = engines.pop("tensorrt_error")
    row["providers"] = {k: e.providers[0] for k, e in engines.items()}
    cuda = engines["cuda_fp32"]
    placement = cuda.placement(make_feeds(cuda.inputs, batch=1, seed=1))
    row["placement"] = {"nodes_per_provider": placement["nodes_per_provider"],
                        "fell_back": placement["fell_back"][:40]}
    reference_feeds = make_feeds(cuda.inputs, batch=8, seed=2)
    reference = engines["cpu_fp32"].run(reference_feeds)[cuda.output_names[0]]
    row["fidelity"] = {k: {m: round(v, 6) for m, v in fidelity(e.run(reference_feeds)[cuda.output_names[0]],
                                                                reference).items()}
                       for k, e in engines.items() if k != "cpu_fp32"}
    row["latency"] = {}
    for batch in batches:
        feeds = make_feeds(cuda.inputs, batch=batch, seed=3)
        fns = {k: e.runner(feeds) for k, e in engines.items()}
        for key in ("cuda_fp32", "cuda_fp16"):
            engine = engines[key]
            on_device = {n: engine.to_device(v) for n, v in feeds.items()}
            fns[f"{key}_bound"] = (lambda e=engine, d=on_device: e.run_bound(d, keep_on_device=True))
        stats = measure_interleaved(fns, batch, rounds=rounds)
        row["latency"][batch] = {k: stats_row(s) for k, s in stats.items()}
        cpu = stats["cpu_fp32"].p50_ms
        row["latency"][batch]["speedup_vs_cpu_fp32"] = {k: round(cpu / s.p50_ms, 2) for k, s in stats.items()
                                                       if k != "cpu_fp32"}
        row["latency"][batch]["io_binding_gain"] = {
            k: round(stats[k].p50_ms / stats[f"{k}_bound"].p50_ms, 2) for k in ("cuda_fp32", "cuda_fp16")}
    for engine in engines.values():
        engine.close()
    return row


def export_hf(name: str, work: Path) -> tuple[Path, dict]:
    from hf_models import save_model
    from steps import run_step

    folder, out = work / name, work / f"{name}.onnx"
    params = save_model(name, folder)
    step = run_step(["export", str(folder), "-o", str(out)])
    if step["exit"] != 0:
        raise RuntimeError(f"export failed: {step['tail'][-3:]}")
    return out, {"parameters": params, "export_s": step["seconds"], "export_peak_mb": step.get("peak_rss_mb")}


def quantize_on_cuda(name: str, fp32: Path, work: Path, batches: tuple[int, ...]) -> dict:
    """`edgepipe quantize --device cuda` in its own process: what it chose, measured on the GPU
    against FP32 there, its wall time and peak RSS."""
    from steps import run_step

    record = work / f"{name}.quantize-cuda-{'-'.join(map(str, batches))}.json"
    step = run_step(["quantize", str(fp32), "-o", str(work / f"{name}.cuda.onnx"), "--device", "cuda",
                     "--batch", ",".join(map(str, batches)), "--json", str(record)])
    row = {"exit": step["exit"], "seconds": step["seconds"], "peak_rss_mb": step.get("peak_rss_mb")}
    if record.is_file():
        report = json.loads(record.read_text())
        chosen = report.get("chosen") or {}
        row |= {"chosen": chosen.get("recipe"), "speedup_vs_cuda_fp32": chosen.get("speedup"),
                "rel_l2": chosen.get("rel_l2"), "phases": report.get("phases"),
                "verdicts": {c["recipe"]: c["verdict"] for c in report.get("candidates", [])}}
    else:
        row["tail"] = step["tail"][-3:]
    return row


def decoder_row(name: str, work: Path) -> dict:
    import torch
    from decoder_bench import save_model
    from steps import run_step

    from edgepipe.quantize.builders import build
    from edgepipe.quantize.decoder import decoder_spec_of
    from edgepipe.quantize.decoder_build import BY_NAME
    from edgepipe.quantize.decoder_build import build as build_decoder
    from edgepipe.quantize.recipes import Recipe
    from edgepipe.runtime import Engine
    from edgepipe.runtime.decoder_profile import profile_decoder, time_per_token
    from edgepipe.runtime.generate import Generator

    folder, fp32 = work / name, work / f"{name}.onnx"
    row: dict = {"model": name, "parameters": save_model(name, folder)}
    step = run_step(["export", str(folder), "-o", str(fp32)])
    row["export_s"] = step["seconds"]
    if step["exit"] != 0:
        raise RuntimeError(f"export failed: {step['tail'][-3:]}")
    spec = decoder_spec_of(fp32)
    files = {"fp32": fp32}
    started = time.perf_counter()
    build_decoder(BY_NAME["int4-rtn-b128-acc4"], fp32, work / f"{name}.int4.onnx", spec, np.zeros((0, 0), np.int64))
    files["int4_rtn_b128"] = work / f"{name}.int4.onnx"
    row["int4_build_s"] = round(time.perf_counter() - started, 1)
    try:
        build(Recipe("fp16"), fp32, work / f"{name}.fp16.onnx", None, 0)
        files["fp16"] = work / f"{name}.fp16.onnx"
    except Exception as exc:
        row["fp16_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    # the GPU's memory bandwidth: the floor for a decode step is the weight bytes / bandwidth
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")
    y = torch.empty_like(x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    row["gpu_bandwidth_gbs"] = round(2 * x.numel() * 4 / best / 1e9, 1)
    del x, y
    torch.cuda.empty_cache()
    prompt = [3, 17, 42, 99, 7, 11, 5, 200]
    cpu_tokens = Generator(fp32, providers="cpu").generate(prompt, 24, stop_ids=())
    row["variants"] = {}
    for key, path in files.items():
        entry: dict = {"file_mb": round(sum(p.stat().st_size for p in path.parent.glob(path.name + "*")) / 1e6, 1)}
        gpu = Generator(path, providers="cuda")
        tokens = gpu.generate(prompt, 24, stop_ids=())
        entry["same_greedy_tokens_as_cpu_fp32"] = sum(a == b for a, b in zip(tokens, cpu_tokens))
        entry["profile_cuda"] = profile_decoder(path, (128, 512), (1, 8), new_tokens=32, repeats=3,
                                                providers="cuda")["rows"]
        with Engine(path, providers="cuda") as engine:  # the cache through numpy every step
            entry["tpot_plain_run_ms_b1_past128"] = round(time_per_token(engine, spec, 1, 128, seconds=2.0), 3)
        bound = [r for r in entry["profile_cuda"] if r["batch"] == 1 and r["prompt"] == 128][0]["tpot_ms"]
        entry["io_binding_gain_tpot"] = round(entry["tpot_plain_run_ms_b1_past128"] / bound, 2)
        row["variants"][key] = entry
    row["cpu_fp32_profile"] = profile_decoder(fp32, (128,), (1,), new_tokens=16, repeats=2, providers="cpu")["rows"]
    return row


def section(result: dict, key: str, fn, out: Path) -> None:
    started = time.perf_counter()
    try:
        result[key] = fn()
    except Exception as exc:
        result[key] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "trace": traceback.format_exc()[-2000:]}
    if isinstance(result[key], dict):
        result[key]["section_s"] = round(time.perf_counter() - started, 1)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps({key: result[key]}, indent=1)[:6000], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=ROOT / "runs" / "demo", help="a `make demo` run folder")
    parser.add_argument("--models", default="resnet50,mobilenetv2,vit-base,bert-base")
    parser.add_argument("--decoders", default="gpt2-small")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_bench.json")
    args = parser.parse_args()
    import onnxruntime as ort

    from edgepipe.runtime import fingerprint
    from edgepipe.runtime.hardware import read_gpu

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        sys.exit(f"no CUDA provider in this onnxruntime ({ort.__version__}: {ort.get_available_providers()}); "
                 "install onnxruntime-gpu in place of onnxruntime on a machine with an NVIDIA GPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu-bench-"))
    result: dict = {"gpu": read_gpu() or "unknown", "onnxruntime": ort.__version__,
                    "providers": ort.get_available_providers(),
                    "hardware": fingerprint()}
    for name in ("mlp", "cnn", "lstm", "transformer"):
        path = args.zoo / name / "model.onnx"
        if path.is_file():
            section(result, f"zoo_{name}", lambda p=path, n=name: model_row(n, p, work, (1, 32), args.rounds), args.out)
    for name in [m for m in args.models.split(",") if m]:
        def real(n=name):
            path, info = export_hf(n, work)
            row = info | model_row(n, path, work, (1, 32), max(5, args.rounds // 2))
            # at batch 1 a real model is launch-bound on a GPU; at 32 FP16's tensor cores count
            return row | {"quantize_device_cuda": {",".join(map(str, b)): quantize_on_cuda(n, path, work, b)
                                                   for b in ((1, 32), (32,))}}
        section(result, name, real, args.out)
    for name in [m for m in args.decoders.split(",") if m]:
        section(result, f"decoder_{name}", lambda n=name: decoder_row(n, work), args.out)


if __name__ == "__main__":
    main()
