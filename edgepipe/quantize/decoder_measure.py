"""How a decoder (FP32 or a quantized candidate) is measured: mean next-token NLL on held-out
windows, greedy-token agreement with FP32's continuations, time per output token and time to
the first token."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepipe import onnxfile
from edgepipe.metrics import bootstrap_mean
from edgepipe.runtime.decoder_profile import time_per_token, time_to_first_token
from edgepipe.runtime.engine import Engine
from edgepipe.runtime.generate import (
    DecoderSpec,
    Generator,
    next_token_nll,
    prefill_feeds,
)


def window_scores(engine: Engine, spec: DecoderSpec, windows: np.ndarray,
                  batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Per window of `windows` [n, length]: the mean next-token NLL (nats) and the share of next
    tokens predicted (top-1), prefilled `batch` rows at a time."""
    nlls, hits = [], []
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch]
        logits = engine.run(prefill_feeds(spec, ids), outputs=["logits"])["logits"]
        nlls.append(next_token_nll(logits, ids).mean(axis=1))
        hits.append((logits[:, :-1].argmax(axis=-1) == ids[:, 1:]).mean(axis=1))
    return np.concatenate(nlls), np.concatenate(hits)


def quality(nll: np.ndarray, hits: np.ndarray) -> dict:
    """Perplexity and token accuracy, each with a 95% bootstrap interval over the windows."""
    mean = bootstrap_mean(nll)
    ppl = {"value": float(np.exp(mean.value)), "low": float(np.exp(mean.low)), "high": float(np.exp(mean.high))}
    return {"perplexity": {k: round(v, 4) for k, v in ppl.items()},
            "token_accuracy": bootstrap_mean(hits).to_dict()}


def greedy_reference(engine: Engine, spec: DecoderSpec, prompts: np.ndarray, steps: int) -> np.ndarray:
    """FP32's greedy continuation of each prompt: [n, prompt + steps] token ids."""
    generator = Generator(engine)
    rows = [list(p) + generator.generate(list(p), steps, stop_ids=()) for p in prompts]
    return np.asarray(rows, dtype=np.int64)


def agreement(engine: Engine, spec: DecoderSpec, sequences: np.ndarray, prompt_length: int) -> float:
    """Fraction of FP32's greedy tokens that `engine` predicts too, reading the same sequence."""
    logits = engine.run(prefill_feeds(spec, sequences[:, :-1]), outputs=["logits"])["logits"]
    predicted = logits[:, prompt_length - 1:].argmax(axis=-1)
    return float((predicted == sequences[:, prompt_length:]).mean())


@dataclass
class Probe:
    """What every model (FP32 and each candidate) is measured on."""

    spec: DecoderSpec
    text: np.ndarray  # held-out windows [n, length]
    sequences: np.ndarray  # prompts + FP32 greedy continuations
    prompt_length: int
    batch_sizes: tuple[int, ...]
    past: int
    prompt_for_ttft: int

    def measure(self, path: Path) -> dict:
        with Engine(path, providers="cpu") as engine:
            nll, hits = window_scores(engine, self.spec, self.text)
            row = {"nll": round(float(nll.mean()), 4), **quality(nll, hits), "_nll_windows": nll}
            if len(self.sequences):
                row["agreement"] = round(agreement(engine, self.spec, self.sequences, self.prompt_length), 4)
            row["tpot_ms"] = {str(b): round(time_per_token(engine, self.spec, b, self.past), 3)
                              for b in self.batch_sizes}
            row["ttft_ms"] = round(time_to_first_token(engine, self.spec, self.prompt_for_ttft), 2)
        row["size_bytes"] = onnxfile.model_bytes(path)
        return row
