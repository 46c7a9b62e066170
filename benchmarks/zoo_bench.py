"""Zoo benchmark: accuracy FP32 vs INT8, ORT FP32 vs PyTorch eager, INT8 vs FP32, sizes.

    python benchmarks/zoo_bench.py [--run runs/demo] [--out benchmarks/results]

Runs the demo pipeline (unless --run points at a finished one), then times PyTorch eager,
ORT FP32 and ORT INT8 interleaved in this process at batch 1 and 32: both as deployed
(Engine.from_run: each batch size on the threads quantize found fastest for that model) and
both at ONNX Runtime's defaults (all cores, spinning workers; the timer waits out the spin
after each block). Absolute timings are for this machine only; the hardware fingerprint and the
date are written beside them (benchmarks/results/zoo_bench.json, which make_docs.py renders).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import torch

from edgepipe.models import load_checkpoint, load_dataset
from edgepipe.pipeline import demo_config, run_pipeline
from edgepipe.runtime import Engine, fingerprint, measure, measure_interleaved

BATCHES = (1, 32)


def bench_model(run_dir: Path, name: str, manifest: dict, rounds: int) -> dict:
    stages = manifest["models"][name]["stages"]
    quant = stages["quantize"]["record"]
    model, meta = load_checkpoint(run_dir / name / "checkpoint.pt")
    data = load_dataset(meta["dataset"]["name"])
    fp32 = Engine.from_run(run_dir, name, precision="fp32")
    int8 = Engine.from_run(run_dir, name, precision="int8")
    fp32_default, int8_default = Engine(fp32.path, providers="cpu"), Engine(int8.path, providers="cpu")
    row = {"model": name, "exporter": stages["export"]["record"]["exporter"],
           "recipe": quant["chosen"]["recipe"],
           "accuracy_torch": stages["train"]["record"]["test_accuracy"],
           "accuracy_fp32": quant["fp32"]["accuracy"], "accuracy_int8": quant["chosen"]["accuracy"],
           "size_fp32_mb": round(quant["fp32"]["size_bytes"] / 1e6, 3),
           "size_int8_mb": round(quant["size_bytes"] / 1e6, 3),
           "quantize_seconds": quant["seconds"], "train_seconds": stages["train"]["seconds"],
           "export_seconds": stages["export"]["seconds"], "p50_ms": {}}
    for batch in BATCHES:
        x = np.ascontiguousarray(data.x_test[:batch])
        tx = torch.from_numpy(x)
        # torch's OpenMP workers spin-wait after each call and would steal the cores from ORT if
        # interleaved with it: eager is timed in its own block, FP32 vs INT8 interleaved.
        with torch.inference_mode():
            stats = {"torch": measure(lambda: model(tx), batch, min_time_s=1.0)}
        stats |= measure_interleaved({"ort_fp32": lambda: fp32.run(x), "ort_int8": lambda: int8.run(x),
                                      "ort_fp32_default": lambda: fp32_default.run(x),
                                      "ort_int8_default": lambda: int8_default.run(x)},
                                     batch, rounds=rounds, spinning={"ort_fp32_default", "ort_int8_default"})
        row["p50_ms"][batch] = {k: round(v.p50_ms, 4) for k, v in stats.items()}
        row[f"ort_vs_torch_b{batch}"] = round(stats["torch"].p50_ms / stats["ort_fp32"].p50_ms, 2)
        row[f"int8_vs_fp32_b{batch}"] = round(stats["ort_fp32"].p50_ms / stats["ort_int8"].p50_ms, 2)
        row[f"int8_vs_fp32_ort_defaults_b{batch}"] = round(
            stats["ort_fp32_default"].p50_ms / stats["ort_int8_default"].p50_ms, 2)
        row[f"sessions_b{batch}"] = {k: e.describe()["batch_sessions"] for k, e in (("fp32", fp32), ("int8", int8))}
    return row


def markdown(rows: list[dict], demo_seconds: float | None) -> str:
    lines = []
    if demo_seconds is not None:
        lines.append(f"demo pipeline wall time (in-process): {demo_seconds:.1f} s\n")
    lines += ["| model | acc torch | acc ORT FP32 | acc INT8 | recipe | p50 ms b1 torch/FP32/INT8 | "
              "p50 ms b32 torch/FP32/INT8 | ORT/torch b1, b32 | INT8/FP32 b1, b32 | "
              "INT8/FP32 at ORT defaults b1, b32 | size FP32→INT8 MB | quantize s |",
              "|" + "---|" * 12]
    for r in rows:
        p1, p32 = r["p50_ms"][1], r["p50_ms"][32]
        lines.append(
            f"| {r['model']} | {r['accuracy_torch']:.4f} | {r['accuracy_fp32']:.4f} | {r['accuracy_int8']:.4f} | "
            f"{r['recipe']} | {p1['torch']:.3f}/{p1['ort_fp32']:.3f}/{p1['ort_int8']:.3f} | "
            f"{p32['torch']:.3f}/{p32['ort_fp32']:.3f}/{p32['ort_int8']:.3f} | "
            f"{r['ort_vs_torch_b1']}x, {r['ort_vs_torch_b32']}x | {r['int8_vs_fp32_b1']}x, {r['int8_vs_fp32_b32']}x | "
            f"{r['int8_vs_fp32_ort_defaults_b1']}x, {r['int8_vs_fp32_ort_defaults_b32']}x | "
            f"{r['size_fp32_mb']}→{r['size_int8_mb']} | {r['quantize_seconds']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="finished demo run directory to reuse")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    demo_seconds = None
    run_dir = args.run
    if run_dir is None:
        run_dir = args.out / "demo-run"
        started = time.perf_counter()
        result = run_pipeline(demo_config(run_dir), log=print)
        demo_seconds = time.perf_counter() - started
        print(result.table())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    rows = [bench_model(run_dir, name, manifest, args.rounds) for name in manifest["models"]]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "zoo_bench.json").write_text(json.dumps(
        {"benchmark": "zoo", "date": dt.date.today().isoformat(), "machine": fingerprint(), "rows": rows,
         "demo_seconds": demo_seconds, "rounds": args.rounds}, indent=2))
    text = markdown(rows, demo_seconds)
    (args.out / "zoo_bench.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
