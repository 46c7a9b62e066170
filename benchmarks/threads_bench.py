"""INT8 vs FP32 ratio under each thread setting, for the models of a finished run.

    python benchmarks/threads_bench.py [--run runs/demo] [--rounds 30]

ORT's intra-op threads change the INT8/FP32 ratio a lot on 2 cores: tiny INT8 kernels pay for
thread wake-ups when spinning is off. Prints p50 ms and the ratio per model, batch and setting
(1 thread; 2 threads without and with spinning), timed interleaved in one process.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from edgepipe.models import load_dataset
from edgepipe.runtime import Engine, measure_interleaved

SETTINGS = ((1, False), (2, False), (2, True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    manifest = json.loads((args.run / "manifest.json").read_text())
    datasets = {m["name"]: m.get("dataset") or "digits" for m in manifest["config"]["models"]}
    rows = []
    for name, model in manifest["models"].items():
        int8 = args.run / name / "model.int8.onnx"
        if model["stages"].get("quantize", {}).get("status") != "ok" or not int8.exists():
            continue
        dataset = load_dataset(datasets[name])
        for threads, spin in SETTINGS:
            fp32 = Engine(args.run / name / "model.onnx", threads=threads, spinning=spin)
            quant = Engine(int8, threads=threads, spinning=spin)
            for batch in (1, 32):
                feeds = {fp32.inputs[0].name: np.ascontiguousarray(dataset.x_test[:batch])}
                stats = measure_interleaved({"fp32": fp32.runner(feeds),
                                             "int8": quant.runner(feeds)}, batch, rounds=args.rounds,
                                             spinning={"fp32", "int8"} if spin else ())
                row = {"model": name, "threads": threads, "spinning": spin, "batch": batch,
                       "fp32_p50_ms": round(stats["fp32"].p50_ms, 4), "int8_p50_ms": round(stats["int8"].p50_ms, 4),
                       "ratio": round(stats["fp32"].p50_ms / stats["int8"].p50_ms, 2)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/threads_bench.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
