"""Tiny Hugging Face classifiers (and a token classifier) that carry a tokenizer or an image
processor, and labelled data for them in the formats users bring (CSV, JSONL, Parquet, CoNLL,
image folders, save_to_disk), built offline with random weights."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

WORDS = ("good great fine bad awful poor film movie plot actor scene story music the a and was is "
         "very not really quite").split()
LABELS = ("negative", "positive")


def word_tokenizer(folder: Path):
    """A WordPiece tokenizer over WORDS saved as a BERT tokenizer (tokenizer.json and its config)."""
    import transformers
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                          cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(folder)
    return len(vocab)


def text_classifier(folder: Path, seed: int = 0, tokenizer: bool = True, positions: int = 64) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=positions,
                                     num_labels=2, id2label=dict(enumerate(LABELS)),
                                     label2id={n: i for i, n in enumerate(LABELS)})
    transformers.BertForSequenceClassification(config).save_pretrained(folder)
    if tokenizer:
        word_tokenizer(folder)
    return folder


TAGS = ("O", "B-POS", "B-NEG")


def token_classifier(folder: Path, seed: int = 0) -> Path:
    """A tiny BERT that tags each word with one of TAGS, with its tokenizer."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=len(WORDS) + 5, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
                                     num_labels=len(TAGS), id2label=dict(enumerate(TAGS)),
                                     label2id={n: i for i, n in enumerate(TAGS)})
    transformers.BertForTokenClassification(config).save_pretrained(folder)
    word_tokenizer(folder)
    return folder


def tagged_sentences(n: int, seed: int = 0) -> list[dict]:
    """Words tagged B-POS (good words), B-NEG (bad words, and good ones after "not") or O; some
    words are hyphenated pairs, which the tokenizer cuts into several tokens."""
    rng = np.random.default_rng(seed)
    good, bad, rest = WORDS[:3], WORDS[3:6], [w for w in WORDS[6:] if w != "not"]
    rows = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(int(rng.integers(4, 10))):
            kind = rng.random()
            if kind < 0.15 and tokens and tokens[-1] != "not":
                tokens.append("not")
                tags.append("O")
            elif kind < 0.4:
                word = str(rng.choice(good))
                tokens.append(word)
                tags.append("B-NEG" if tokens[-2:-1] == ["not"] else "B-POS")
            elif kind < 0.55:
                tokens.append(str(rng.choice(bad)) + ("-" + str(rng.choice(rest)) if rng.random() < 0.5 else ""))
                tags.append("B-NEG")
            else:
                tokens.append(str(rng.choice(rest)))
                tags.append("O")
        rows.append({"tokens": tokens, "tags": tags})
    return rows


def write_conll(path: Path, rows: list[dict]) -> Path:
    path.write_text("-DOCSTART- O\n\n" + "".join("".join(f"{w} {t}\n" for w, t in zip(r["tokens"], r["tags"]))
                                                    + "\n" for r in rows))
    return path


def image_classifier(folder: Path, seed: int = 0, size: int = 32) -> Path:
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10,
                                       id2label={i: f"digit{i}" for i in range(10)},
                                       label2id={f"digit{i}": i for i in range(10)})
    transformers.ResNetForImageClassification(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": size}, crop_pct=1.0).save_pretrained(folder)
    return folder


def sentences(n: int, seed: int = 0) -> list[dict]:
    """Short reviews labelled by the sign of their good/bad words."""
    rng = np.random.default_rng(seed)
    good, bad, rest = WORDS[:3], WORDS[3:6], WORDS[6:]
    rows = []
    for _ in range(n):
        label = int(rng.integers(2))
        words = list(rng.choice(rest, size=int(rng.integers(3, 9)))) + [str(rng.choice(good if label else bad))]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": LABELS[label]})
    return rows


def write_csv(path: Path, rows: list[dict], columns: dict[str, str] | None = None) -> Path:
    columns = columns or {}
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[columns.get(k, k) for k in rows[0]])
        writer.writeheader()
        for row in rows:
            writer.writerow({columns.get(k, k): v for k, v in row.items()})
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digit_folder(path: Path, per_class: int = 20) -> Path:
    """scikit-learn's handwritten digits as PNG files, one subfolder per class (digit0 ... digit9)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    counts: dict[int, int] = {}
    for image, label in zip(bunch.images, bunch.target):
        if counts.get(int(label), 0) >= per_class:
            continue
        counts[int(label)] = counts.get(int(label), 0) + 1
        folder = path / f"digit{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * 16).clip(0, 255).astype(np.uint8)).save(folder / f"{counts[int(label)]}.png")
    return path
