"""Masked-language-model pre-training of a text classifier folder's encoder on plain text.

The folder is the classifier to be fine-tuned later (config.json with its labels, and its
tokenizer; weights optional: without them the encoder starts from random init). Its encoder is
trained as a masked language model on the text: 15% of the tokens are chosen, 80% of those
replaced by [MASK], 10% by a random token, 10% kept, and the model predicts the originals. The
masks are seeded by the step, so an interrupted run resumes exactly. Every epoch is judged by the
share of masked held-out tokens predicted right (95% interval), the best kept. The folder written
is the classifier again, its encoder pre-trained and its head fresh, ready for `edgepipe train
OUT --data rows.csv`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgepipe.artifacts import StageResult
from edgepipe.errors import ConfigError, InputError
from edgepipe.metrics import proportion
from edgepipe.models.finetune import check_out_dir, finish
from edgepipe.models.hf_preprocess import copy_processor_files
from edgepipe.models.trainer import STATE_DIR, FinetuneConfig, Rows, Trainer

TASK = "masked-lm pre-training"


@dataclass
class PretrainConfig(FinetuneConfig):
    lr: float = 5e-4
    batch_size: int = 32
    mask_probability: float = 0.15
    max_length: int = 128  # tokens per passage, at most the model's positions
    eval_fraction: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.mask_probability < 1 or self.max_length < 8:
            raise ConfigError("pre-training needs mask_probability in (0, 1) and max_length >= 8")


def mask(ids: np.ndarray, special: np.ndarray, tokenizer, probability: float, seed: int):
    """(masked input ids, labels: the original id where masked, -100 elsewhere)."""
    rng = np.random.default_rng(seed)
    chosen = (rng.random(ids.shape) < probability) & ~special
    labels = np.where(chosen, ids, -100)
    roll = rng.random(ids.shape)
    masked = np.where(chosen & (roll < 0.8), tokenizer.mask_token_id, ids)
    random_ids = rng.integers(0, len(tokenizer), ids.shape)
    masked = np.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, masked)
    return masked.astype(ids.dtype), labels.astype(np.int64)


class MaskedLMTrainer(Trainer):
    def __init__(self, *args, tokenizer, special: dict[str, np.ndarray], **kwargs):
        super().__init__(*args, **kwargs)
        self.tokenizer, self.special = tokenizer, special
        self.eval_ids, self.eval_labels = mask(self.rows.eval["input_ids"], special["eval"], tokenizer,
                                               self.config.mask_probability, self.config.seed + 1)

    def batch(self, index: np.ndarray):
        ids, labels = mask(self.rows.train["input_ids"][index], self.special["train"][index], self.tokenizer,
                           self.config.mask_probability, self.config.seed * 1_000_003 + self.step)
        feeds = {n: torch.from_numpy(self.rows.train[n][index]) for n in self.names}
        feeds["input_ids"] = torch.from_numpy(ids)
        return feeds, torch.from_numpy(labels)

    @torch.no_grad()
    def accuracy(self, model=None) -> dict:
        model = (model or self.model).eval()
        hits = total = 0
        for i in range(0, len(self.eval_labels), 64):
            feeds = {n: torch.from_numpy(self.rows.eval[n][i:i + 64]) for n in self.names}
            feeds["input_ids"] = torch.from_numpy(self.eval_ids[i:i + 64])
            labels = self.eval_labels[i:i + 64]
            pred = model(**feeds).logits.argmax(-1).numpy()
            hits, total = hits + int((pred == labels)[labels >= 0].sum()), total + int((labels >= 0).sum())
        return proportion(hits, total, seed=self.config.seed).to_dict()


def _passages(text: Path, tokenizer, config: PretrainConfig, say) -> tuple[Rows, dict[str, np.ndarray]]:
    """Every non-empty line of `text` a passage, tokenized and padded; a seeded share held out."""
    if text.suffix != ".txt" or not text.is_file():
        raise InputError(f"pre-training reads a plain .txt file, one passage per line; {text} is not one")
    lines = [line.strip() for line in text.read_text(encoding="utf-8", errors="replace").splitlines()]
    lines = [line for line in lines if line][:config.max_rows]
    held = np.random.default_rng(config.seed).random(len(lines)) < config.eval_fraction
    if held.sum() < 1 or (~held).sum() < config.batch_size:
        raise InputError(f"{text} has {len(lines)} passages: too few to pre-train on and judge "
                         f"(at least {config.batch_size + 10})")
    encoded = tokenizer(lines, truncation=True, max_length=config.max_length, padding="max_length",
                        return_special_tokens_mask=True, return_tensors="np")
    special = encoded.pop("special_tokens_mask").astype(bool)
    feeds = {k: v.astype(np.int64) for k, v in encoded.items()}
    say(f"{len(lines)} passages from {text.name}: {int((~held).sum())} train, {int(held.sum())} judge")
    rows = Rows({k: v[~held] for k, v in feeds.items()}, np.zeros(int((~held).sum()), np.int64),
                {k: v[held] for k, v in feeds.items()}, np.zeros(int(held.sum()), np.int64),
                f"{text.name}: {int((~held).sum())} passages train, {int(held.sum())} judge")
    return rows, {"train": special[~held], "eval": special[held]}


def _load(folder: Path):
    import transformers

    from edgepipe.models.hf import infer_task, read_config

    raw = read_config(folder)
    if infer_task(raw, folder) != "text-classification":
        raise InputError(f"{folder}: masked-LM pre-training takes a text classifier folder (its config and "
                         "tokenizer); the pre-trained encoder is then fine-tuned on its labels")
    transformers.utils.logging.set_verbosity_error()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if tokenizer.mask_token_id is None:
        raise InputError(f"{folder}: its tokenizer has no mask token, so nothing can be masked")
    config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    if any((folder / n).is_file() for n in ("model.safetensors", "pytorch_model.bin")):
        model = transformers.AutoModelForMaskedLM.from_pretrained(str(folder), local_files_only=True)
    else:
        model = transformers.AutoModelForMaskedLM.from_config(config)
    return model, tokenizer, config


def pretrain_mlm(folder: str | Path, text: str | Path, out_dir: str | Path, config: PretrainConfig | None = None,
                 *, resume: bool = False, progress: Callable[[str], None] | None = None) -> StageResult:
    """Stage: a text classifier folder + plain text -> the classifier folder with its encoder
    pre-trained as a masked LM (head fresh), and a FinetuneReport whose accuracies are the
    masked-token accuracy on held-out passages."""
    import transformers

    config = config or PretrainConfig()
    say = progress or (lambda message: None)
    folder, text, out_dir = Path(folder), Path(text), Path(out_dir)
    check_out_dir(out_dir, resume)
    torch.manual_seed(config.seed)  # a fresh encoder or MLM head starts the same on every run
    model, tokenizer, classifier_config = _load(folder)
    config.max_length = min(config.max_length, getattr(classifier_config, "max_position_embeddings", 512))
    rows, special = _passages(text, tokenizer, config, say)
    names = [n for n in rows.train if n in ("input_ids", "attention_mask", "token_type_ids")]
    trainer = MaskedLMTrainer(model, names, rows, config, out_dir, say, tokenizer=tokenizer, special=special)
    before = trainer.accuracy()
    if resume:
        trainer.restore()
    say(f"pre-training {folder.name}'s encoder as a masked LM: {trainer.total} steps; held-out masked-token "
        f"accuracy before {before['value']:.4f}")
    started = time.perf_counter()
    trainer.run()
    best = out_dir / STATE_DIR / "best"
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(best), config=classifier_config, local_files_only=True)  # the encoder kept, a fresh head
    transformers.utils.logging.disable_progress_bar()
    classifier.save_pretrained(out_dir)
    copy_processor_files(folder, out_dir)
    return finish(trainer, folder, TASK, before, started, out_dir)
