"""Peer: ONNX Runtime GenAI's model builder on a causal LM folder, then its own generator timed.
Runs in a venv with onnxruntime-genai (never in edgepipe's):

    GENAI_VENV/bin/python benchmarks/peers/genai_build.py FOLDER OUT_DIR int4|fp32 [HELDOUT.npy]

Prints one JSON line: build seconds, time per output token (p50 over 64 decode steps after a
128-token prompt, batch 1) and time to first token; with HELDOUT.npy (token windows [n, length]),
the mean next-token NLL on them, from the logits of a prefill of each window."""

import json
import subprocess
import sys
import time

import numpy as np


def main() -> None:
    folder, out, precision = sys.argv[1:4]
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", folder, "-o", out,
                           "-p", precision, "-e", "cpu", "-c", out + "_cache"], capture_output=True, text=True)
    build_s = time.perf_counter() - started
    if proc.returncode:
        print(json.dumps({"error": (proc.stdout + proc.stderr)[-1500:]}))
        sys.exit(1)
    import onnxruntime_genai as og

    model = og.Model(out)
    vocab = json.load(open(f"{folder}/config.json"))["vocab_size"]
    prompt = np.random.default_rng(0).integers(0, min(vocab, 256), 128).astype(np.int32)
    ttft, steps = [], []
    for _ in range(3):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=128 + 65, do_sample=False)
        generator = og.Generator(model, params)
        t0 = time.perf_counter()
        generator.append_tokens(prompt)
        ttft.append(time.perf_counter() - t0)
        last = time.perf_counter()
        for _ in range(64):
            generator.generate_next_token()
            now = time.perf_counter()
            steps.append(now - last)
            last = now
    result = {"build_s": round(build_s, 1), "tpot_ms": round(float(np.median(steps)) * 1000, 3),
              "ttft128_ms": round(float(np.median(ttft)) * 1000, 1), "genai": og.__version__}
    if len(sys.argv) > 4:
        total, count = 0.0, 0
        for window in np.load(sys.argv[4]):
            params = og.GeneratorParams(model)
            params.set_search_options(max_length=len(window) + 1, do_sample=False)
            generator = og.Generator(model, params)
            generator.append_tokens(window.astype(np.int32))
            logits = np.asarray(generator.get_output("logits"), dtype=np.float64)[0, :-1]
            top = logits.max(axis=-1, keepdims=True)
            norm = np.log(np.exp(logits - top).sum(axis=-1)) + top[:, 0]
            total += float((norm - logits[np.arange(len(window) - 1), window[1:]]).sum())
            count += len(window) - 1
        result["nll"] = round(total / count, 4)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
