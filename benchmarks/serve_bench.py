"""Serving benchmark on loopback: dynamic batching vs batch-1 serving at concurrency 32.

    python benchmarks/serve_bench.py [--run benchmarks/results/demo-run] [--requests 3000]

Bounded: a fixed number of requests, to 127.0.0.1 only. Reports throughput, p50/p99 latency,
and checks every response against a direct Engine.run of its own input (lost or mixed: 0).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import httpx
import numpy as np

from edgepipe.runtime import Engine


async def load(url: str, inputs: list[np.ndarray], concurrency: int) -> tuple[list, list[float], float]:
    semaphore = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=url, timeout=60,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        async def one(x):
            async with semaphore:
                t0 = time.perf_counter()
                response = await client.post("/v1/predict", json={"inputs": {"x": x.tolist()}})
                latencies.append(time.perf_counter() - t0)
                return response
        started = time.perf_counter()
        responses = await asyncio.gather(*(one(x) for x in inputs))
        return responses, latencies, time.perf_counter() - started


def run_case(model: Path, max_batch: int, inputs: list[np.ndarray], concurrency: int, port: int) -> dict:
    """The server runs as `edgepipe serve` in its own process: a client in the same process
    would share its GIL and measure itself."""
    import subprocess
    import sys

    engine = Engine(model)
    cli = str(Path(sys.executable).parent / "edgepipe")
    server = subprocess.Popen([cli, "serve", str(model), "--port", str(port),
                               "--max-batch", str(max_batch), "--max-delay-ms", "2", "--max-queue", "4096"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)
        responses, latencies, seconds = asyncio.run(load(url, inputs, concurrency))
    finally:
        server.terminate()
        server.wait(timeout=30)
    wrong = sum(r.status_code != 200 or not np.allclose(np.asarray(r.json()["outputs"]["logits"], np.float32),
                                                       engine.run(x)["logits"], atol=1e-5)
                for r, x in zip(responses, inputs))
    ms = np.asarray(latencies) * 1000
    return {"max_batch": max_batch, "requests": len(inputs), "throughput_rps": round(len(inputs) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "lost_or_mixed": int(wrong)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("benchmarks/results/demo-run"))
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    model = args.run / "mlp" / "model.onnx"
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 1, 8, 8), dtype=np.float32) for _ in range(args.requests)]
    results = [run_case(model, 1, inputs, args.concurrency, 18931),
               run_case(model, 32, inputs, args.concurrency, 18932)]
    results.append({"batching_throughput_gain": round(results[1]["throughput_rps"] / results[0]["throughput_rps"], 2)})
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/serve_bench.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
