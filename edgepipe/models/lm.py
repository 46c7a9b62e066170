"""A tiny causal language model trained on the bundled text (models/text.py): a Llama-architecture
decoder over byte tokens, written as a Hugging Face folder (`save_pretrained`), so its
perplexity on the held-out text means something when a quantized copy is judged against it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepipe.artifacts import StageResult
from edgepipe.errors import ConfigError, InputError
from edgepipe.models import text
from edgepipe.reports import Report


@dataclass
class LMConfig:
    hidden_size: int = 256
    intermediate_size: int = 704
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    context: int = 256
    seq: int = 128  # training window
    batch_size: int = 16
    lr: float = 3e-3
    seconds: float = 180.0  # training stops at this wall time ...
    max_steps: int = 100_000  # ... or this many steps
    seed: int = 0
    steps: int | None = None  # exactly this many steps, whatever they take (reproducible); seconds is ignored

    def __post_init__(self):
        if self.seconds <= 0 or self.max_steps < 1 or self.seq < 2 or self.seq > self.context:
            raise ConfigError(f"tiny LM config needs seconds > 0, max_steps >= 1 and 2 <= seq <= context; got {self}")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"tiny LM training needs steps >= 1, got {self.steps}")


@dataclass
class LMTrainReport(Report):
    stage = "train"

    config: dict
    steps: int
    train_seconds: float
    train_loss: float
    heldout_nll_before: float  # nats per byte on the held-out text, untrained
    heldout_nll: float  # ... and trained
    params: int
    text: str


def _bytes_to_unicode() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


def save_byte_tokenizer(folder: Path) -> None:
    """tokenizer.json whose token ids are the bytes of the UTF-8 text (what the model reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))


def _heldout_nll(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids=windows).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       windows[:, 1:].reshape(-1)))


def train_tiny_lm(out_dir: str | Path, config: LMConfig | None = None,
                  progress: Callable[[str], None] | None = None) -> StageResult:
    """Train for `config.steps` steps (the same model on any machine, however loaded), else for
    `config.seconds` (AdamW, cosine decay to zero at the end), and save the folder to `out_dir`;
    the record has the held-out NLL (nats per byte) before and after."""
    import transformers

    transformers.utils.logging.disable_progress_bar()  # the record and `progress` say what matters
    config = config or LMConfig()
    say = progress or (lambda message: None)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                      and not (out_dir / "edgepipe_train.json").exists())):
        raise InputError(f"{out_dir} exists and is not an earlier tiny-lm folder: give a new folder")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model_config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.kv_heads,
        max_position_embeddings=config.context, bos_token_id=None, eos_token_id=0, pad_token_id=None,
        tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(model_config)
    train = torch.from_numpy(text.token_ids("train").astype(np.int64))
    heldout = torch.from_numpy(text.windows(text.token_ids("heldout"), config.seq, 16))
    model.eval()
    before = _heldout_nll(model, heldout)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01, betas=(0.9, 0.95))
    started, step, loss = time.perf_counter(), 0, float("nan")
    last = config.steps or config.max_steps
    while step < last:
        elapsed = time.perf_counter() - started
        if config.steps is None and elapsed >= config.seconds:
            break
        fraction = step / last if config.steps else min(1.0, max(elapsed / config.seconds, step / last))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * fraction))
        starts = rng.integers(0, len(train) - config.seq, config.batch_size)
        batch = torch.stack([train[s:s + config.seq] for s in starts])
        out = model(input_ids=batch, labels=batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step, loss = step + 1, out.loss.item()
        if step % 100 == 0:
            say(f"step {step}: train loss {loss:.3f} nats/byte ({time.perf_counter() - started:.0f} s)")
    model.eval()
    after = _heldout_nll(model, heldout)
    staging = out_dir.with_name(f".{out_dir.name}.partial")  # the folder appears whole or not at all
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    save_byte_tokenizer(staging)
    report = LMTrainReport(config=asdict(config), steps=step, train_seconds=round(time.perf_counter() - started, 1),
                           train_loss=round(loss, 4), heldout_nll_before=round(before, 4),
                           heldout_nll=round(after, 4), params=sum(p.numel() for p in model.parameters()),
                           text="Python's documentation topics (pydoc_data), byte tokens")
    (staging / "edgepipe_train.json").write_text(json.dumps(report.to_dict(), indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return StageResult("train", {"folder": out_dir}, report)
