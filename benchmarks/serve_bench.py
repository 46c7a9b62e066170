"""Serving benchmark on loopback: dynamic batching vs batch-1 serving, and a soak test.

    python benchmarks/serve_bench.py [--model runs/demo/mlp/model.onnx] [--requests 20000]
    python benchmarks/serve_bench.py --soak 300      # 5 minutes of load, server RSS sampled

The server runs as `edgepipe serve` in its own process (a client in the same process would share
its GIL and measure itself); the load comes from benchmarks/loadgen.py, closed loop, with
`--concurrency` requests in flight, to 127.0.0.1 only, a bounded number of requests (or seconds).
Every reply is checked against a direct Engine.run of its own input: lost (no reply or not 200)
and mixed (someone else's answer) are counted, and must both be 0.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import post_all  # noqa: E402

from edgepipe.runtime import Engine  # noqa: E402

NPY = "application/x-npy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, max_batch: int, max_delay_ms: float, threads: int | None, spin: bool = False):
        self.port = free_port()
        command = [sys.executable, "-m", "edgepipe", "serve", str(model), "--port", str(self.port), "--max-batch",
                   str(max_batch),
                   "--max-delay-ms", str(max_delay_ms), "--max-queue", "4096"]
        if threads:
            command += ["--threads", str(threads)]
        command.append("--spin" if spin else "--no-spin")
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        import urllib.request

        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(self.url + "/readyz", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError("server did not become ready")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)


def encode(x: np.ndarray, fmt: str) -> bytes:
    if fmt == "npy":
        buffer = io.BytesIO()
        np.save(buffer, x, allow_pickle=False)
        return buffer.getvalue()
    return json.dumps({"inputs": {"x": x.tolist()}}).encode()


def decode(body: bytes, fmt: str) -> np.ndarray:
    if fmt == "npy":
        return np.load(io.BytesIO(body), allow_pickle=False)
    return np.asarray(json.loads(body)["outputs"]["logits"], np.float32)


def load(server: Server, inputs, expected, fmt: str, concurrency: int, atol: float = 1e-5) -> dict:
    bodies = [encode(x, fmt) for x in inputs]
    kind = NPY if fmt == "npy" else "application/json"
    replies, seconds = post_all(server.url + "/v1/predict", bodies, concurrency, content_type=kind, accept=kind)
    lost = len(inputs) - sum(r.status == 200 for r in replies)
    mixed = sum(r.status == 200 and not np.allclose(decode(r.body, fmt), expected[r.index], rtol=atol, atol=atol)
                for r in replies)
    ms = np.asarray([r.seconds for r in replies]) * 1000
    return {"requests": len(inputs), "seconds": round(seconds, 2), "throughput_rps": round(len(inputs) / seconds, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "lost": int(lost), "mixed": int(mixed)}


def batch_sizes(server: Server) -> dict:
    import urllib.request

    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("edgepipe_batch_size_count") or line.startswith("edgepipe_batch_size_sum"):
            name, value = line.split()
            values[name.split("_")[-1]] = float(value)
    return {"model_calls": int(values.get("count", 0)),
            "mean_rows_per_call": round(values.get("sum", 0) / max(values.get("count", 1), 1), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("runs/demo/mlp/model.onnx"))
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--formats", default="npy,json")
    parser.add_argument("--max-delay-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="server's onnxruntime threads")
    parser.add_argument("--soak", type=float, default=0, help="seconds of continuous load instead")
    parser.add_argument("--atol", type=float, default=1e-5,
                        help="a reply matches its input's direct run within this, relative and absolute (on a GPU, "
                             "TF32 kernels that vary with the batch move logits by ~1e-3 relative; another row's "
                             "answer is off by O(1))")
    args = parser.parse_args()
    if not args.model.is_file():
        sys.exit(f"{args.model} not found: run `make demo` first (or pass --model)")
    engine = Engine(args.model)  # the server's default provider: auto (the GPU when there is one)
    rng = np.random.default_rng(0)
    shape = tuple(d if isinstance(d, int) else 1 for d in engine.inputs[0].shape)
    inputs = [rng.random(shape, dtype=np.float32) for _ in range(args.requests)]
    expected = [engine.run(x)["logits"] for x in inputs]
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)

    if args.soak:
        with Server(args.model, 32, args.max_delay_ms, args.threads) as server:
            samples, rounds, started = [], [], time.time()
            while time.time() - started < args.soak:
                rounds.append(load(server, inputs, expected, "json", args.concurrency))
                samples.append({"t_s": round(time.time() - started, 1), "rss_mb": round(server.rss_mb(), 1)})
                print(json.dumps(samples[-1] | {"rps": rounds[-1]["throughput_rps"]}), flush=True)
        warm = samples[min(1, len(samples) - 1)]["rss_mb"]  # after the first round: allocator warmed up
        result = {"seconds": round(time.time() - started, 1), "requests": sum(r["requests"] for r in rounds),
                  "rss_after_first_round_mb": warm, "rss_end_mb": samples[-1]["rss_mb"],
                  "rss_max_mb": max(s["rss_mb"] for s in samples),
                  "growth_pct": round(100 * (samples[-1]["rss_mb"] - warm) / warm, 2),
                  "lost": sum(r["lost"] for r in rounds), "mixed": sum(r["mixed"] for r in rounds),
                  "p99_ms_worst_round": max(r["p99_ms"] for r in rounds), "samples": samples}
        Path("benchmarks/results/serve_soak.json").write_text(json.dumps(result, indent=2))
        print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
        return

    # Both servers with and without ORT's thread spinning: it helps batch-1 serving and hurts
    # batched serving on 2 cores, so the gain is reported against the best batch-1 setting.
    results = []
    for fmt in args.formats.split(","):
        row = {"format": fmt, "provider": engine.providers[0]}
        for label, max_batch in (("batch1", 1), ("dynamic", 32)):
            for spin in (False, True):
                with Server(args.model, max_batch, args.max_delay_ms, args.threads, spin) as server:
                    load(server, inputs[:2000], expected, fmt, args.concurrency, args.atol)  # warm-up, not counted
                    row[f"{label}_{'spin' if spin else 'nospin'}"] = (
                        load(server, inputs, expected, fmt, args.concurrency, args.atol) | batch_sizes(server))
        best = {label: max((v for k, v in row.items() if k.startswith(label)), key=lambda r: r["throughput_rps"])
                for label in ("batch1", "dynamic")}
        row["gain_best_vs_best"] = round(best["dynamic"]["throughput_rps"] / best["batch1"]["throughput_rps"], 2)
        row["gain_default_settings"] = round(row["dynamic_nospin"]["throughput_rps"]
                                             / row["batch1_nospin"]["throughput_rps"], 2)
        results.append(row)
        print(json.dumps(row, indent=2), flush=True)
    Path("benchmarks/results/serve_bench.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
