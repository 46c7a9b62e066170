"""Token generation with an exported decoder (edgepipe export of a causal LM folder): prefill,
then one token at a time with the KV cache fed back. Torch-free: numpy + onnxruntime.

The decoder's graph takes input_ids [batch, seq], attention_mask [batch, past + seq] and, per
layer, past.{i}.key / past.{i}.value [batch, kv_heads, past, head_dim]; it returns logits and
present.{i}.key / present.{i}.value with the new positions appended. `DecoderSpec` (written to
the model's metadata by the exporter) says how many layers and heads, the context length and
the stop tokens.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from edgepipe.errors import InputError

DECODER_KEY = "edgepipe.decoder"  # ONNX metadata_props key holding the DecoderSpec as JSON


@dataclass(frozen=True)
class DecoderSpec:
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int  # the context: prompt + generated tokens
    eos_token_ids: tuple[int, ...] = ()
    architecture: str = ""

    def past_names(self) -> list[str]:
        return [f"past.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def present_names(self) -> list[str]:
        return [f"present.{i}.{kv}" for i in range(self.layers) for kv in ("key", "value")]

    def to_json(self) -> str:
        return json.dumps(asdict(self) | {"eos_token_ids": list(self.eos_token_ids)})

    @classmethod
    def from_json(cls, text: str) -> "DecoderSpec":
        data = json.loads(text)
        return cls(**(data | {"eos_token_ids": tuple(data.get("eos_token_ids") or ())}))


@dataclass
class Sampling:
    """temperature 0: greedy. Else softmax(logits / temperature) restricted to the top_k tokens
    (0: all) and to the smallest set whose probability reaches top_p, drawn with `seed`."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise InputError("sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1")
        self.rng = np.random.default_rng(self.seed)

    def pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / self.temperature
        order = np.argsort(-scaled)
        if self.top_k:
            order = order[: self.top_k]
        probs = np.exp(scaled[order] - scaled[order[0]])
        probs /= probs.sum()
        keep = int(np.searchsorted(np.cumsum(probs), self.top_p) + 1)
        probs = probs[:keep] / probs[:keep].sum()
        return int(order[self.rng.choice(len(probs), p=probs)])


class Generator:
    """`Generator("decoder.onnx").generate([1, 2, 3], max_new_tokens=16)` -> new token ids.
    `stream(...)` yields them one at a time; `on_token` in `generate` gets each as it comes."""

    def __init__(self, model: str | os.PathLike, **engine_options):
        from edgepipe.runtime.engine import Engine

        self.engine = Engine(model, **engine_options)
        text = self.engine.metadata.get(DECODER_KEY)
        if text is None:
            raise InputError(f"{model} is not a decoder exported by edgepipe (no '{DECODER_KEY}' metadata); "
                             "export a causal LM folder with `edgepipe export FOLDER`")
        self.spec = DecoderSpec.from_json(text)
        dtype = {s.name: s.np_dtype for s in self.engine.inputs}
        self._past_dtype = dtype.get("past.0.key", np.dtype("float32"))

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, *, sampling: Sampling | None = None,
               stop_ids: Sequence[int] | None = None) -> Iterator[int]:
        spec, sampling = self.spec, sampling or Sampling()
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise InputError("the prompt is empty: give at least one token id")
        bad = [t for t in prompt if not 0 <= t < spec.vocab_size]
        if bad:
            raise InputError(f"token id(s) {bad[:5]} outside the vocabulary (0..{spec.vocab_size - 1})")
        if len(prompt) + max_new_tokens > spec.max_positions:
            raise InputError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {spec.max_positions} positions")
        stops = set(spec.eos_token_ids if stop_ids is None else stop_ids)
        empty = np.zeros((1, spec.kv_heads, 0, spec.head_dim), dtype=self._past_dtype)
        past = {name: empty for name in spec.past_names()}
        ids = np.asarray([prompt], dtype=np.int64)
        length = len(prompt)
        for _ in range(max_new_tokens):
            feeds = {"input_ids": ids, "attention_mask": np.ones((1, length), dtype=np.int64), **past}
            out = self.engine.run(feeds)
            token = sampling.pick(out["logits"][0, -1])
            yield token
            if token in stops:
                return
            past = {p: out[q] for p, q in zip(spec.past_names(), spec.present_names())}
            ids = np.asarray([[token]], dtype=np.int64)
            length += 1

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, *, sampling: Sampling | None = None,
                 stop_ids: Sequence[int] | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
        tokens = []
        for token in self.stream(prompt_ids, max_new_tokens, sampling=sampling, stop_ids=stop_ids):
            tokens.append(token)
            if on_token is not None:
                on_token(token)
        return tokens
