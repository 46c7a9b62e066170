"""Latency of a decoder as a user of a chat or completion feels it: time to load the model, time
to the first token (the prefill of a prompt), time per output token (a decode step with the real
cache growing), tokens per second and peak memory, at each prompt length and batch size.
Torch-free: numpy + onnxruntime, so it runs on the target device.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import DecoderSpec, Generator, prefill_feeds, step_feeds
from edgepipe.runtime.hardware import fingerprint
from edgepipe.runtime.modelfile import model_bytes
from edgepipe.runtime.timing import LatencyStats, measure, peak_rss_mb


def time_per_token(engine: Engine, spec: DecoderSpec, batch: int, past: int, seconds: float = 0.6) -> float:
    """p50 of one decode step (ms) with `past` cached positions."""
    run = engine.runner(step_feeds(spec, batch, past))
    return measure(run, batch, warmup=2, min_iterations=8, min_time_s=seconds).p50_ms


def time_to_first_token(engine: Engine, spec: DecoderSpec, length: int, batch: int = 1,
                        seconds: float = 0.6) -> float:
    """p50 of a prefill of `length` tokens (ms): the time to the first new token."""
    run = engine.runner(prefill_feeds(spec, np.ones((batch, length), dtype=np.int64)))
    return measure(run, batch, warmup=1, min_iterations=3, min_time_s=seconds).p50_ms


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3)


def profile_decoder(model: str | os.PathLike, prompt_lengths: Sequence[int] = (128, 512),
                    batch_sizes: Sequence[int] = (1, 4), new_tokens: int = 32, repeats: int = 3, *,
                    providers: str = "cpu", threads: int | None = None, backend: str | None = None,
                    cap: bool = True) -> dict:
    """For each batch size and prompt length (capped at the context minus `new_tokens`; with
    `cap=False` a length that does not fit is refused instead, as for lengths a user named):
    `repeats` generations of `new_tokens` greedy tokens from a prompt of that length. TTFT is
    the prefill (p50 over repeats); TPOT the p50/p90 of every decode step after it."""
    if new_tokens < 2 or repeats < 1:
        raise InputError("a decoder profile needs new_tokens >= 2 and repeats >= 1")
    started = time.perf_counter()
    generator = Generator(model, providers=providers, threads=threads, backend=backend)
    load_s = time.perf_counter() - started
    load_peak = peak_rss_mb()  # the process's peak: for `edgepipe profile`, the loading
    spec = generator.spec
    room = spec.max_positions - new_tokens
    if room < 1:
        raise InputError(f"--new-tokens {new_tokens} leaves no room for a prompt in a context of {spec.max_positions}")
    too_long = sorted({int(p) for p in prompt_lengths if int(p) > room})
    if too_long and not cap:
        raise InputError(f"--prompt-lengths {','.join(map(str, too_long))} does not fit: the model's context is "
                         f"{spec.max_positions} positions and --new-tokens {new_tokens} takes {new_tokens}, so a "
                         f"prompt can have at most {room}; choose lengths up to {room} (or fewer --new-tokens)")
    lengths = sorted({min(int(p), room) for p in prompt_lengths})
    rng = np.random.default_rng(0)
    rows = []
    for batch in batch_sizes:
        for length in lengths:
            prompts = rng.integers(0, spec.vocab_size, (batch, length))
            ttft, steps = [], []
            for _ in range(repeats + 1):  # the first generation warms up and is not counted
                stamps = [time.perf_counter()]
                for _tokens in generator.steps(prompts, new_tokens, lambda logits: logits.argmax(axis=-1)):
                    stamps.append(time.perf_counter())
                ttft.append(stamps[1] - stamps[0])
                steps += list(np.diff(stamps[1:]))
            ttft, steps = ttft[1:], steps[new_tokens - 1:]
            tpot = float(np.median(steps))
            rows.append({"batch": batch, "prompt": length, "new_tokens": new_tokens,
                         "ttft_ms": _percentile(ttft, 50), "tpot_ms": _percentile(steps, 50),
                         "tpot_p90_ms": _percentile(steps, 90), "tokens_per_s": round(batch / tpot, 1),
                         "tpot_stats": LatencyStats.from_times(batch, steps).to_dict(),
                         "runs": repeats})
    engine = generator.engine
    return {"kind": "decoder", "model": str(model), "size_bytes": model_bytes(model), "load_s": round(load_s, 3),
            "capped_prompt_lengths": {"asked": too_long, "to": room} if too_long else None,
            "load_peak_mb": load_peak, "peak_rss_mb": peak_rss_mb(),
            "rows": rows, "decoder": {"layers": spec.layers, "kv_heads": spec.kv_heads, "head_dim": spec.head_dim,
                                      "vocab_size": spec.vocab_size, "context": spec.max_positions,
                                      "architecture": spec.architecture},
            "engine": {"providers": engine.providers, "backend": engine.backend, "threads": threads},
            "hardware": fingerprint()}
