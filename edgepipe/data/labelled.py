"""Labelled rows -> a model's inputs through its own tokenizer or image processor (as the model
file or folder carries them), split into held-out rows that judge accuracy and calibration rows.
Reading stops once both are full, so the file may be larger than memory."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from edgepipe.data.named import NamedInputs
from edgepipe.data.rows import data_format, iter_rows, saved_splits
from edgepipe.errors import InputError
from edgepipe.metrics import IGNORED
from edgepipe.runtime.preprocess import IMAGE, Preprocess, TextEncoder

TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "comment", "tweet", "question",
                "sentence1", "premise", "text_a")
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "text_a": "text_b", "question": "sentence",
                "text": "text_pair"}
IMAGE_COLUMNS = ("image", "img", "picture", "file", "path")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category", "y")
WORD_COLUMNS = ("tokens", "words")  # token classification: a row's words, as a list or space-separated
TAG_COLUMNS = ("ner_tags", "tags", "labels", "label", "pos_tags", "chunk_tags")  # one tag per word
HELD_OUT_SPLITS = ("test", "validation", "valid", "dev")
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Columns:
    inputs: tuple[str, ...]  # the text column (and its pair), or the image column
    label: str | None


def pick_columns(names: list[str], pre: Preprocess, where: str, text: tuple[str, ...] = (),
                 label: str | None = None) -> Columns:
    """The columns that hold the model's input and the label: as named, or found by their usual names."""
    missing = [c for c in (*text, label) if c and c not in names]
    if missing:
        raise InputError(f"{where} has no column {', '.join(repr(c) for c in missing)}; its columns are "
                         f"{', '.join(names) or 'none'}")
    if not text:
        usual = IMAGE_COLUMNS if pre.kind == IMAGE else WORD_COLUMNS if pre.per_word else TEXT_COLUMNS
        first = next((c for c in usual if c in names), None)
        if first is None:
            what = "words" if pre.per_word else pre.kind
            raise InputError(f"{where} has no {what} column (its columns: {', '.join(names) or 'none'}); "
                             "name it with --input-column")
        pair = PAIR_COLUMNS.get(first) if pre.kind != IMAGE and not pre.per_word else None
        text = (first, pair) if pair in names else (first,)
    if label is None:
        usual = TAG_COLUMNS if pre.per_word else LABEL_COLUMNS
        label = next((c for c in usual if c in names and c not in text), None)
    return Columns(tuple(text), label)


def _image_processor(pre: Preprocess):
    """The model's own image processor, built from the settings its file carries: its PIL/numpy
    implementation (the default and fast ones need torchvision)."""
    try:
        import transformers
    except ImportError:
        raise InputError("image data needs transformers and pillow: pip install 'edgepipe[hf]'") from None
    name = str(pre.image.get("image_processor_type") or "AutoImageProcessor").removesuffix("Fast")
    cls = getattr(transformers, name + "Pil", None) or getattr(transformers, name, None)
    if cls is None or not hasattr(cls, "from_dict"):
        raise InputError(f"transformers has no image processor '{name}' (the model's preprocessor_config.json)")
    settings = {k: v for k, v in pre.image.items() if k != "image_processor_type"}
    return cls.from_dict(settings)


def _open_image(value: Any, base: Path):
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        value = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    name = value if not isinstance(value, io.BytesIO) else "an embedded image"
    if isinstance(value, str):
        value = base / value
    try:
        with Image.open(value) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"cannot read image {name}: {str(exc).splitlines()[0][:160]}") from None


class RowEncoder:
    """Rows -> per-row model inputs, then stacked into arrays (text padded to the longest row)."""

    def __init__(self, pre: Preprocess, columns: Columns, base: Path):
        self.pre, self.columns, self.base = pre, columns, base
        self.text = TextEncoder(pre) if pre.kind != IMAGE else None
        self.images = _image_processor(pre) if pre.kind == IMAGE else None

    def encode(self, rows: list[dict]) -> list:
        if self.pre.per_word:
            return self.text.word_rows([words(r[self.columns.inputs[0]]) for r in rows])
        if self.text is not None:
            texts = [[str(r[c] if r[c] is not None else "") for r in rows] for c in self.columns.inputs]
            return self.text.token_rows(texts[0], texts[1] if len(texts) > 1 else None)
        images = [_open_image(r[self.columns.inputs[0]], self.base) for r in rows]
        pixels = self.images(images=images, return_tensors="np")["pixel_values"].astype(np.float32)
        return list(pixels)

    def stack(self, items: list) -> dict[str, np.ndarray]:
        if self.text is not None:
            return self.text.pad(items)
        return {self.pre.inputs[0]: np.stack(items)}


@dataclass
class _Part:
    items: list
    labels: list[int]
    limit: int

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limit


def words(value: Any) -> list[str]:
    """A row's words: a list as it is, a string split at white space."""
    if value is None:
        return []
    return value.split() if isinstance(value, str) else [str(v) for v in value]


def _label_id(value: Any, pre: Preprocess, where: str) -> int:
    index = pre.label_id(value)
    if index is None:
        heads = ", ".join(pre.labels) if pre.labels else "integer ids"
        raise InputError(f"{where}: label {value!r} is not one of the model's labels ({heads})")
    return index


def _labels(rows: list[dict], numbers: list[int], columns: Columns, pre: Preprocess, where: str) -> list:
    """Label ids of `rows` (their row numbers in the file: `numbers`, from 1): one per row, or for
    token classification a list per row, one per word."""
    if columns.label is None:
        return []
    if not pre.per_word:
        return [_label_id(row.get(columns.label), pre, f"{where}, row {n}") for n, row in zip(numbers, rows)]
    ids = []
    for number, row in zip(numbers, rows):
        tags, said = words(row.get(columns.label)), words(row.get(columns.inputs[0]))
        if len(tags) != len(said):
            raise InputError(f"{where}, row {number}: {len(said)} words but {len(tags)} tags; token "
                             "classification needs one tag per word")
        ids.append([_label_id(t, pre, f"{where}, row {number}") for t in tags])
    return ids


def tag_array(items: list[dict], tags: list[list[int]], width: int) -> np.ndarray:
    """Per-word tags placed on each word's first token ([rows, width]); every other token IGNORED."""
    out = np.full((len(items), width), IGNORED, dtype=np.int64)
    for row, (item, row_tags) in enumerate(zip(items, tags)):
        seen = set()
        for position, word in enumerate(item["word_ids"][:width]):
            if word is not None and word not in seen:
                out[row, position] = row_tags[word]
                seen.add(word)
    return out


def _fill(batches: Iterator[list[dict]], encoder: RowEncoder, parts: list[_Part], where: str,
          pick: Callable[[int], np.ndarray] | None) -> int:
    """Encode rows into `parts` (held-out, calibration) until both are full; `pick(n)` says per
    row whether it goes to the first part (None: every row does). Returns rows read."""
    seen = 0
    for rows in batches:
        chosen = pick(len(rows)) if pick is not None else np.ones(len(rows), dtype=bool)
        for part, mask in zip(parts, (chosen, ~chosen)):
            numbers = [seen + i + 1 for i in np.flatnonzero(mask)][:max(0, part.limit - len(part.items))]
            take = [rows[n - seen - 1] for n in numbers]
            if take:
                part.labels += _labels(take, numbers, encoder.columns, encoder.pre, where)
                part.items += encoder.encode(take)
        seen += len(rows)
        if all(p.full for p in parts):
            break
    return seen


def load_labelled(path: str | Path, pre: Preprocess, *, seed: int = 0, max_test: int = 1000,
                  max_calibration: int = 256, text_columns: tuple[str, ...] = (), label_column: str | None = None,
                  test_fraction: float = TEST_FRACTION, say: Callable[[str], None] | None = None) -> NamedInputs:
    """Held-out and calibration inputs (and labels) for a model whose preprocessing is `pre`.
    A save_to_disk DatasetDict gives its test (or validation) split to judge and its train split
    to calibrate; any other source a seeded split of its rows (`test_fraction` judge; 1.0: every
    row judges, for data whose calibration rows come from elsewhere)."""
    path = Path(path)
    kind = data_format(path)
    splits = saved_splits(path) if kind == "saved" else [""]
    held = next((s for s in HELD_OUT_SPLITS if s in splits), None)
    first = held or splits[0]
    where = f"{path}" + (f" (split '{first}')" if first else "")
    batches = iter_rows(path, first)
    head = next(batches, None)
    if not head:
        raise InputError(f"{where} has no rows")
    if kind == "images":
        columns = Columns(("image",), "label")
    else:
        columns = pick_columns(list(head[0]), pre, where, text_columns, label_column)
    encoder = RowEncoder(pre, columns, path if path.is_dir() else path.parent)
    test, calib = _Part([], [], max_test), _Part([], [], max_calibration)

    def chained():
        yield head
        yield from batches

    if held is not None:
        _fill(chained(), encoder, [test], where, None)
        train = "train" if "train" in splits else held
        _fill(iter_rows(path, train), encoder, [calib], f"{path} (split '{train}')", None)
        how = f"{path.name}'s '{held}' split judges, its '{train}' split calibrates"
    else:
        rng = np.random.default_rng(seed)
        parts = [test, calib] if test_fraction < 1 else [test]  # 1.0: calibration rows come from elsewhere
        read = _fill(chained(), encoder, parts, where, lambda n: rng.random(n) < test_fraction)
        how = (f"a seeded {round((1 - test_fraction) * 100)}/{round(test_fraction * 100)} split of the first {read} "
               f"rows of {path.name} (seed {seed}): {len(test.items)} judge, {len(calib.items)} calibrate"
               if test_fraction < 1 else f"the first {len(test.items)} rows of {path.name} judge")
    if not test.items:
        raise InputError(f"{where}: the held-out split is empty (no row was drawn to judge); give more rows")
    if encoder.text is not None and encoder.text.truncated and say is not None:
        say(f"note: {encoder.text.truncated} rows were longer than the model's {pre.max_length} positions "
            "and were cut to fit")
    held_inputs, calibration = encoder.stack(test.items), encoder.stack(calib.items or test.items)
    labels = _label_array(test, held_inputs, encoder) if columns.label else None
    calibration_labels = _label_array(calib if calib.items else test, calibration, encoder) if columns.label else None
    return NamedInputs(path.stem, held_inputs, labels, calibration, how, calibration_labels)


def _label_array(part: _Part, inputs: dict[str, np.ndarray], encoder: RowEncoder) -> np.ndarray:
    if not encoder.pre.per_word:
        return np.asarray(part.labels, dtype=np.int64)
    return tag_array(part.items, part.labels, next(iter(inputs.values())).shape[1])
