"""A Hugging Face classifier folder's own preprocessing, as the model file carries it: the
tokenizer (as tokenizer.json, converted by transformers when the folder has only a slow
tokenizer's files) or the image processor's settings, the length limit and the label names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgepipe import interrupts
from edgepipe.errors import InputError
from edgepipe.runtime.preprocess import IMAGE, TEXT, Preprocess

# Above this a tokenizer's model_max_length is transformers' "no limit" placeholder.
_NO_LIMIT = 1 << 20
# What turns rows into a folder's model inputs (beside config.json and the weights).
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "preprocessor_config.json", "edgepipe_pruned.json")  # the last: what a config cannot say


def copy_processor_files(source: Path, target: Path) -> None:
    """The tokenizer or image processor files of folder `source`, into folder `target`."""
    import shutil

    for name in PROCESSOR_FILES:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, Path(target) / name)


def label_names(config: dict[str, Any]) -> tuple[str, ...]:
    id2label = config.get("id2label") or {}
    try:
        return tuple(id2label[k] for k in sorted(id2label, key=int))
    except (ValueError, TypeError):
        return ()


def _tokenizer(folder: Path):
    """The folder's tokenizer through transformers (fast form), or None when it has none."""
    import transformers

    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                  "vocab.json", "spiece.model", "sentencepiece.bpe.model")):
        return None
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True, use_fast=True)
    except Exception as exc:  # a tokenizer file transformers cannot read
        interrupts.reraise()
        raise InputError(f"{folder}: its tokenizer files cannot be loaded: {str(exc).splitlines()[0][:200]}") from exc
    return tok if getattr(tok, "is_fast", False) else None


def folder_preprocess(folder: str | Path, modality: str, input_names: list[str],
                      config: dict[str, Any], per_word: bool = False) -> Preprocess | None:
    """What turns raw rows into this folder's model inputs, or None when the folder has no
    tokenizer (text) or no preprocessor_config.json (images). `per_word`: its labels tag words."""
    folder = Path(folder)
    labels = label_names(config)
    if modality == IMAGE:
        path = folder / "preprocessor_config.json"
        if not path.is_file():
            return None
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{path} is not readable JSON: {exc}") from exc
        return Preprocess(IMAGE, tuple(input_names), labels, image=settings)
    tok = _tokenizer(folder)
    if tok is None:
        return None
    limits = [v for v in (config.get("max_position_embeddings"), tok.model_max_length)
              if isinstance(v, int) and 0 < v < _NO_LIMIT]
    return Preprocess(TEXT, tuple(input_names), labels, max_length=min(limits) if limits else None,
                      pad_id=tok.pad_token_id if tok.pad_token_id is not None else 0,
                      tokenizer=tok.backend_tokenizer.to_str(), per_word=per_word)


def processor_size(folder: Path) -> int | None:
    """The square side the folder's image processor outputs (its crop, else its resize), or None."""
    path = Path(folder) / "preprocessor_config.json"
    try:
        settings = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    size = settings.get("crop_size") if settings.get("do_center_crop") else None
    size = size or settings.get("size")
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        side = size.get("height") or size.get("shortest_edge")
        return side if isinstance(side, int) else None
    return None
