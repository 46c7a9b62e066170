"""How raw rows become a classifier's inputs, carried in the model file: the tokenizer (text)
or the image processor's settings (images), the length limit, and the label names. The export
of a Hugging Face folder writes it; data loading, `Engine`-side text classification and serve
read it back, so what was measured and what ships encode text the same way. Text needs only the
`tokenizers` package (no torch)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from edgepipe.errors import InputError

PREPROCESS_KEY = "edgepipe.preprocess"
TEXT, IMAGE = "text", "image"


@dataclass(frozen=True)
class Preprocess:
    kind: str  # TEXT or IMAGE
    inputs: tuple[str, ...]  # the model inputs it fills, in the model's order
    labels: tuple[str, ...] = ()  # class names by id (config.json's id2label); empty: ids only
    max_length: int | None = None  # text: longest token sequence the model's positions take
    pad_id: int = 0  # text: the id padding uses
    tokenizer: str | None = None  # text: the tokenizer.json content
    image: dict[str, Any] = field(default_factory=dict)  # images: the image processor's settings
    per_word: bool = False  # text: a label tags each word of a row (token classification), not the row

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Preprocess":
        raw = json.loads(text)
        return cls(**{**raw, "inputs": tuple(raw["inputs"]), "labels": tuple(raw.get("labels") or ())})

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> "Preprocess | None":
        text = metadata.get(PREPROCESS_KEY)
        return cls.from_json(text) if text else None

    def label_id(self, value: Any) -> int | None:
        """A label given as a class name or an integer id -> its id (None: the head has none such)."""
        if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
            index = int(value)
        elif isinstance(value, str) and value in self.labels:
            return self.labels.index(value)
        elif isinstance(value, str) and value.strip().lstrip("-").isdigit():
            index = int(value)
        else:
            return None
        return index if 0 <= index < (len(self.labels) or index + 1) else None

    def label_name(self, index: int) -> str:
        return self.labels[index] if 0 <= index < len(self.labels) else str(index)


class TextEncoder:
    """Texts (or text pairs) -> the model's token inputs, padded to the longest row (or `pad_to`),
    cut at the model's length limit. `truncated` counts the rows cut so far."""

    def __init__(self, pre: Preprocess):
        if pre.kind != TEXT or not pre.tokenizer:
            raise InputError("this model carries no tokenizer: export it from a Hugging Face folder "
                             "that has one (tokenizer.json or a tokenizer transformers can load)")
        try:
            import tokenizers
        except ImportError:
            raise InputError("text input needs the tokenizers package: pip install 'edgepipe[text]'") from None
        self.pre = pre
        self.tokenizer = tokenizers.Tokenizer.from_str(pre.tokenizer)
        self.tokenizer.no_padding()
        if pre.max_length:
            self.tokenizer.enable_truncation(pre.max_length)
        else:
            self.tokenizer.no_truncation()
        self.truncated = 0

    def token_rows(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict[str, list[int]]]:
        """Each row's ids, attention mask and token types, unpadded."""
        batch = list(zip(texts, pairs)) if pairs is not None else list(texts)
        encodings = self.tokenizer.encode_batch(batch)
        self.truncated += sum(bool(e.overflowing) for e in encodings)
        return [{"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids}
                for e in encodings]

    def word_rows(self, words: Sequence[Sequence[str]]) -> list[dict[str, list]]:
        """Rows already split into words -> token_rows' fields plus `word_ids`: the word each token
        comes from (None for special tokens), so per-word labels can be placed on the tokens."""
        encodings = self.tokenizer.encode_batch([list(w) for w in words], is_pretokenized=True)
        self.truncated += sum(bool(e.overflowing) for e in encodings)
        return [{"input_ids": e.ids, "attention_mask": e.attention_mask, "token_type_ids": e.type_ids,
                 "word_ids": e.word_ids} for e in encodings]

    def pad(self, rows: Sequence[dict[str, list[int]]], pad_to: int | None = None) -> dict[str, np.ndarray]:
        """Rows from token_rows -> int64 arrays [rows, length] for the model's inputs."""
        length = pad_to or max((len(r["input_ids"]) for r in rows), default=1)
        out = {}
        for name in self.pre.inputs:
            fill = self.pre.pad_id if name == "input_ids" else 0
            array = np.full((len(rows), length), fill, dtype=np.int64)
            for i, row in enumerate(rows):
                values = row[name][:length]
                array[i, :len(values)] = values
            out[name] = array
        return out

    def encode(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self.pad(self.token_rows(texts, pairs))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(-1, keepdims=True)


class TextClassifier:
    """Text in, label names out, on an Engine whose model carries its tokenizer:
    `TextClassifier(Engine("model.onnx"))(["great film"])` -> [{"label": ..., "score": ..., "id": ...}]."""

    def __init__(self, engine):
        pre = Preprocess.from_metadata(engine.metadata)
        if pre is None or pre.kind != TEXT:
            raise InputError(f"{engine.path} carries no tokenizer: export it from a Hugging Face folder "
                             "with its tokenizer files to send text")
        if pre.per_word:
            raise InputError(f"{engine.path} tags each word (token classification): use WordTagger, "
                             "TextClassifier labels whole texts")
        self.engine, self.pre, self.encoder = engine, pre, TextEncoder(pre)

    def __call__(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if pairs is not None and len(pairs) != len(texts):
            raise InputError(f"{len(texts)} texts but {len(pairs)} text pairs: give one pair per text")
        logits = self.engine.run(self.encoder.encode(texts, pairs))[self.engine.output_names[0]]
        probs = softmax(logits.astype(np.float64))
        best = probs.argmax(-1)
        return [{"label": self.pre.label_name(int(i)), "id": int(i), "score": round(float(p[i]), 6)}
                for i, p in zip(best, probs)]


class WordTagger:
    """Sentences in, a tag per word out, on an Engine whose token-classification model carries its
    tokenizer: `WordTagger(Engine("ner.onnx"))(["Ada lives in Paris"])` -> one list per sentence of
    {"word", "tag", "id", "score"}, each word tagged by its first token (a sentence is split at
    white space unless given as a list of words; words past the model's length limit get tag None)."""

    def __init__(self, engine):
        pre = Preprocess.from_metadata(engine.metadata)
        if pre is None or not pre.per_word:
            raise InputError(f"{engine.path} is not a token-classification model that carries its tokenizer: "
                             "export one from a Hugging Face folder with its tokenizer files")
        self.engine, self.pre, self.encoder = engine, pre, TextEncoder(pre)

    def __call__(self, sentences: Sequence[str | Sequence[str]]) -> list[list[dict[str, Any]]]:
        rows = [s.split() if isinstance(s, str) else [str(w) for w in s] for s in sentences]
        encoded = self.encoder.word_rows(rows)
        logits = self.engine.run(self.encoder.pad(encoded))[self.engine.output_names[0]]
        probs = softmax(logits.astype(np.float64))
        tagged = []
        for words, row, row_probs in zip(rows, encoded, probs):
            first = {}
            for position, word in enumerate(row["word_ids"]):
                if word is not None:
                    first.setdefault(word, position)
            out = []
            for index, word in enumerate(words):
                p = row_probs[first[index]] if index in first else None
                best = int(p.argmax()) if p is not None else None
                out.append({"word": word, "tag": self.pre.label_name(best) if p is not None else None, "id": best,
                            "score": round(float(p[best]), 6) if p is not None else None})
            tagged.append(out)
        return tagged
