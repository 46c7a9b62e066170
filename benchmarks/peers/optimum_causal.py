"""Peer: Optimum's ORTModelForCausalLM (package optimum-onnx) exports a causal LM folder and runs
generate(). Runs in a venv with optimum-onnx (never in edgepipe's):

    OPTIMUM_VENV/bin/python benchmarks/peers/optimum_causal.py FOLDER OUT_DIR

Prints one JSON line: export seconds, and time per output token = (time of generate() with 65
new tokens - time with 1 new token) / 64, after a 128-token prompt at batch 1 (p50 of 3)."""

import json
import sys
import time

import numpy as np


def main() -> None:
    folder, out = sys.argv[1:3]
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    started = time.perf_counter()
    model = ORTModelForCausalLM.from_pretrained(folder, export=True, use_cache=True)
    model.save_pretrained(out)
    export_s = time.perf_counter() - started
    vocab = model.config.vocab_size
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, min(vocab, 256), (1, 128)))
    mask = torch.ones_like(ids)

    def timed(new: int) -> float:
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=0)
        return time.perf_counter() - t0

    timed(2)
    one = [timed(1) for _ in range(3)]
    many = [timed(65) for _ in range(3)]
    tpot = (float(np.median(many)) - float(np.median(one))) / 64
    import optimum.onnxruntime
    print(json.dumps({"export_s": round(export_s, 1), "tpot_ms": round(tpot * 1000, 3),
                      "ttft128_ms": round(float(np.median(one)) * 1000, 1),
                      "optimum_onnx": getattr(optimum.onnxruntime, "__version__", "?")}))


if __name__ == "__main__":
    main()
