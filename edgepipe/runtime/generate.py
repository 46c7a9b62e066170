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
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from edgepipe.errors import InputError

DECODER_KEY = "edgepipe.decoder"  # ONNX metadata_props key holding the DecoderSpec as JSON
TOKENIZER_KEY = "edgepipe.tokenizer"  # ... and the folder's tokenizer.json, when it had one


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


def is_decoder_file(path) -> bool:
    """Whether `path` is a decoder exported by edgepipe (False for anything unreadable: the
    command's own loading then says what is wrong with it)."""
    from edgepipe.runtime.modelfile import onnx_metadata

    try:
        return DECODER_KEY in onnx_metadata(path)
    except (InputError, OSError, ValueError):
        return False


def empty_past(spec: DecoderSpec, batch: int = 1, length: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """The cache inputs for `length` cached positions (zeros; length 0 for a prefill)."""
    zeros = np.zeros((batch, spec.kv_heads, length, spec.head_dim), dtype=dtype)
    return {name: zeros for name in spec.past_names()}


def prefill_feeds(spec: DecoderSpec, ids: np.ndarray, dtype=np.float32) -> dict[str, np.ndarray]:
    """Feeds for a prefill of `ids` [batch, seq] with an empty cache."""
    ids = np.asarray(ids, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones(ids.shape, dtype=np.int64),
            **empty_past(spec, ids.shape[0], 0, dtype)}


def step_feeds(spec: DecoderSpec, batch: int, past: int, dtype=np.float32) -> dict[str, np.ndarray]:
    """Feeds for one decode step (one new token per row) after `past` cached positions: what a
    time-per-output-token measurement runs."""
    return {"input_ids": np.ones((batch, 1), dtype=np.int64),
            "attention_mask": np.ones((batch, past + 1), dtype=np.int64), **empty_past(spec, batch, past, dtype)}


def next_token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood (nats) of each next token: logits [batch, seq, vocab] of a prefill
    of `ids` [batch, seq] -> [batch, seq - 1]."""
    scores = logits[:, :-1].astype(np.float64)
    top = scores.max(axis=-1, keepdims=True)
    log_norm = np.log(np.exp(scores - top).sum(axis=-1)) + top[..., 0]
    chosen = np.take_along_axis(scores, ids[:, 1:, None], axis=-1)[..., 0]
    return log_norm - chosen


class Generator:
    """`Generator("decoder.onnx").generate([1, 2, 3], max_new_tokens=16)` -> new token ids.
    `model`: a decoder file, or an Engine already open on one.
    `stream(...)` yields them one at a time; `on_token` in `generate` gets each as it comes."""

    def __init__(self, model, **engine_options):
        from edgepipe.runtime.engine import Engine

        self.engine = model if isinstance(model, Engine) else Engine(model, **engine_options)
        text = self.engine.metadata.get(DECODER_KEY)
        if text is None:
            raise InputError(f"{model} is not a decoder exported by edgepipe (no '{DECODER_KEY}' metadata); "
                             "export a causal LM folder with `edgepipe export FOLDER`")
        self.spec = DecoderSpec.from_json(text)
        dtype = {s.name: s.np_dtype for s in self.engine.inputs}
        self._past_dtype = dtype.get("past.0.key", np.dtype("float32"))
        self._tokenizer = None

    @property
    def has_tokenizer(self) -> bool:
        return TOKENIZER_KEY in self.engine.metadata

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` the model was exported with (text in and out)."""
        if self._tokenizer is None:
            if not self.has_tokenizer:
                raise InputError(f"{self.engine.path} has no tokenizer (its folder had no tokenizer.json): "
                                 "give token ids instead of text")
            try:
                import tokenizers
            except ImportError:
                raise InputError("text in and out needs the tokenizers package: pip install 'edgepipe[text]'") from None
            self._tokenizer = tokenizers.Tokenizer.from_str(self.engine.metadata[TOKENIZER_KEY])
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        if not text:
            raise InputError("the prompt is empty")
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def stream_text(self, prompt: str, max_new_tokens: int = 32, **options) -> Iterator[str]:
        """Text pieces as tokens come: each piece is what the new token adds to the decoded
        text (a character split across tokens waits for its last byte)."""
        ids, shown = [], ""
        for token in self.stream(self.encode(prompt), max_new_tokens, **options):
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                continue
            if text.startswith(shown):
                piece, shown = text[len(shown):], text
                if piece:
                    yield piece
        text = self.decode(ids)
        if text != shown and text.startswith(shown):
            yield text[len(shown):]

    def check_prompts(self, prompts: np.ndarray, max_new_tokens: int) -> None:
        spec = self.spec
        if prompts.ndim != 2 or prompts.shape[1] == 0:
            raise InputError("the prompt is empty: give at least one token id")
        bad = prompts[(prompts < 0) | (prompts >= spec.vocab_size)]
        if bad.size:
            raise InputError(f"token id(s) {bad[:5].tolist()} outside the vocabulary (0..{spec.vocab_size - 1})")
        if max_new_tokens < 1:
            raise InputError("max_new_tokens must be at least 1")
        if prompts.shape[1] + max_new_tokens > spec.max_positions:
            raise InputError(f"prompt ({prompts.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's context of {spec.max_positions} positions")

    def runner(self) -> Callable[[dict], tuple[np.ndarray, list]]:
        """feeds -> (logits, present caches), for this engine's backend and device."""
        from edgepipe.runtime.cache_runners import cache_runner

        return cache_runner(self.engine, self.spec)

    def steps(self, prompts, max_new_tokens: int, pick: Callable[[np.ndarray], np.ndarray]) -> Iterator[np.ndarray]:
        """The generation loop for a batch of equal-length prompts [batch, length]: a prefill,
        then one step per token with the cache fed back. Yields each step's tokens [batch];
        `pick` maps last-position logits [batch, vocab] to tokens. The caller stops it."""
        prompts = np.asarray(prompts, dtype=np.int64)
        if prompts.ndim == 1:
            prompts = prompts[None]
        self.check_prompts(prompts, max_new_tokens)
        spec, run = self.spec, self.runner()
        batch, length = prompts.shape
        past = empty_past(spec, batch, 0, self._past_dtype)
        ids = prompts
        for _ in range(max_new_tokens):
            logits, presents = run({"input_ids": ids, "attention_mask": np.ones((batch, length), dtype=np.int64),
                                    **past})
            tokens = np.asarray(pick(logits[:, -1]), dtype=np.int64)
            yield tokens
            past = dict(zip(spec.past_names(), presents))
            ids, length = tokens[:, None], length + 1

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, *, sampling: Sampling | None = None,
               stop_ids: Sequence[int] | None = None) -> Iterator[int]:
        sampling = sampling or Sampling()
        prompt = np.asarray([[int(t) for t in prompt_ids]], dtype=np.int64).reshape(1, -1)
        stops = set(self.spec.eos_token_ids if stop_ids is None else stop_ids)
        for tokens in self.steps(prompt, max_new_tokens, lambda logits: [sampling.pick(logits[0])]):
            token = int(tokens[0])
            yield token
            if token in stops:
                return

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int = 32, *, sampling: Sampling | None = None,
                 stop_ids: Sequence[int] | None = None, on_token: Callable[[int], None] | None = None) -> list[int]:
        tokens = []
        for token in self.stream(prompt_ids, max_new_tokens, sampling=sampling, stop_ids=stop_ids):
            tokens.append(token)
            if on_token is not None:
                on_token(token)
        return tokens

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *,
                       sampling: Sampling | None = None, stop_ids: Sequence[int] | None = None) -> list[list[int]]:
        """Several prompts of the same length at once (one batch through the model); each row
        is cut after its first stop token. The loop ends when every row has stopped."""
        sampling = sampling or Sampling()
        if len({len(p) for p in prompts}) > 1:
            raise InputError("generate_batch needs prompts of equal length (no padding): "
                             f"got lengths {sorted({len(p) for p in prompts})}")
        stops = set(self.spec.eos_token_ids if stop_ids is None else stop_ids)
        rows: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        pick = (lambda logits: logits.argmax(axis=-1)) if sampling.temperature == 0 else (
            lambda logits: [sampling.pick(row) for row in logits])
        for tokens in self.steps(np.asarray(prompts, dtype=np.int64), max_new_tokens, pick):
            for i, token in enumerate(tokens.tolist()):
                if not done[i]:
                    rows[i].append(token)
                    done[i] = token in stops
            if all(done):
                break
        return rows
