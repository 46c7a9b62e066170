"""Fine-tuning a causal language model folder on the user's plain text.

The text is read through the folder's own tokenizer.json, cut into windows of equal length
(`max_length` tokens), a seeded share held out. The model learns to predict each next token; every
epoch is judged by the held-out next-token accuracy (95% interval), the best epoch kept, and the
held-out perplexity is recorded before and after. Checkpoints, resume and the stop on a
non-finite loss are the fine-tuning loop's (models.trainer). The folder written is a
save_pretrained folder with the tokenizer files, which `edgepipe export` takes as a decoder."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepipe.artifacts import StageResult
from edgepipe.errors import InputError
from edgepipe.metrics import proportion
from edgepipe.models.finetune import check_out_dir, finish, publish
from edgepipe.models.mlm import PretrainConfig
from edgepipe.models.trainer import STATE_DIR, Rows, Trainer

TASK = "text-generation"


class CausalLMTrainer(Trainer):
    def batch(self, index: np.ndarray):
        ids = torch.from_numpy(self.rows.train["input_ids"][index])
        return {"input_ids": ids}, ids  # the model shifts the labels by one itself

    @torch.no_grad()
    def scores(self, model=None) -> tuple[dict, float]:
        """(held-out next-token accuracy with its interval, held-out perplexity)."""
        model = (model or self.model).eval()
        hits = total = 0
        loss = 0.0
        for i in range(0, len(self.rows.eval_y), 16):
            ids = torch.from_numpy(self.rows.eval["input_ids"][i:i + 16])
            logits = model(input_ids=ids).logits[:, :-1]
            hits += int((logits.argmax(-1) == ids[:, 1:]).sum())
            total += ids[:, 1:].numel()
            loss += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                            ids[:, 1:].reshape(-1), reduction="sum"))
        return proportion(hits, total, seed=self.config.seed).to_dict(), round(math.exp(loss / max(total, 1)), 4)

    def accuracy(self, model=None) -> dict:
        return self.scores(model)[0]


def windows(text: Path, folder: Path, config: PretrainConfig, say) -> Rows:
    """The text's token ids in windows of `config.max_length`, a seeded `eval_fraction` held out."""
    if text.suffix != ".txt" or not text.is_file():
        raise InputError(f"fine-tuning a language model reads a plain .txt file; {text} is not one")
    if not (folder / "tokenizer.json").is_file():
        raise InputError(f"{folder} has no tokenizer.json, so the text cannot become its token ids")
    import tokenizers

    tokenizer = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    ids = np.asarray(tokenizer.encode(text.read_text(encoding="utf-8", errors="replace")).ids, dtype=np.int64)
    count = min(len(ids) // config.max_length, config.max_rows)
    cut = ids[:count * config.max_length].reshape(count, config.max_length)
    held = np.random.default_rng(config.seed).random(count) < config.eval_fraction
    if held.sum() < 1 or (~held).sum() < config.batch_size:
        raise InputError(f"{text} gives {count} windows of {config.max_length} tokens: too few to train on and judge "
                         f"(at least {config.batch_size + 10}); give more text or a smaller --max-length")
    say(f"{count} windows of {config.max_length} tokens from {text.name}: {int((~held).sum())} train, "
        f"{int(held.sum())} judge")
    return Rows({"input_ids": cut[~held]}, np.zeros(int((~held).sum()), np.int64), {"input_ids": cut[held]},
                np.zeros(int(held.sum()), np.int64), f"{text.name}: {int((~held).sum())} windows train, "
                f"{int(held.sum())} judge")


def judged_windows(folder: str | Path, text: str | Path, config: PretrainConfig,
                   say: Callable[[str], None] | None = None) -> np.ndarray:
    """The held-out windows [rows, length] fine-tuning judges on (the same seeded split, at the
    length fine-tuning uses), so that quantize judges the exported decoder on text it never saw."""
    folder = Path(folder)
    return windows(Path(text), folder, fitted(folder, config), say or (lambda message: None)).eval["input_ids"]


def fitted(folder: Path, config: PretrainConfig) -> PretrainConfig:
    """`config` with its window length cut to the model's positions (config.json's
    max_position_embeddings): what fine-tuning trains on and judges."""
    import dataclasses
    import json

    positions = json.loads((folder / "config.json").read_text()).get("max_position_embeddings") or config.max_length
    return dataclasses.replace(config, max_length=min(config.max_length, positions))


def finetune_lm(folder: str | Path, text: str | Path, out_dir: str | Path, config: PretrainConfig | None = None, *,
                resume: bool = False, progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: a causal LM folder + plain text -> the fine-tuned folder, with a FinetuneReport whose
    accuracies are held-out next-token accuracy (and `perplexity` before and after)."""
    import transformers

    from edgepipe.models.hf import is_causal_lm_folder

    config = config or PretrainConfig()
    say = progress or (lambda message: None)
    folder, text, out_dir = Path(folder), Path(text), Path(out_dir)
    if not is_causal_lm_folder(folder):
        raise InputError(f"{folder} is not a causal language model folder (config.json of a ...ForCausalLM)")
    check_out_dir(out_dir, resume)
    transformers.utils.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True)
    config = fitted(folder, config)
    rows = windows(text, folder, config, say)
    trainer = CausalLMTrainer(model, ["input_ids"], rows, config, out_dir, say)
    before, perplexity_before = trainer.scores()
    if resume:
        trainer.restore()
    say(f"fine-tuning {folder.name} (causal LM): {trainer.total} steps; held-out next-token accuracy before "
        f"{before['value']:.4f}, perplexity {perplexity_before}")
    started = time.perf_counter()
    trainer.run()
    publish(folder, out_dir / STATE_DIR / "best", out_dir)
    kept = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), local_files_only=True)
    return finish(trainer, folder, TASK, before, started, out_dir,
                  perplexity={"before": perplexity_before, "after": trainer.scores(kept)[1]})
